"""One choice of a response as its tokens come: its text (decoded incrementally) and log-probabilities.

Text is streamed as soon as it decodes, except the last ``len(longest stop string) - 1``
characters while stop strings are set: a stop string may still start there, and a stop string
is never sent. The final text comes from the engine (cut at the stop string, or kept with
``include_stop_str_in_output``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ..engine.outputs import _UNFINISHED, IncrementalText
from ..engine.sequence import TokenLogprobs
from ..engine.views import ListView
from .engine_client import Delta
from .errors import APIError
from .protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

logger = logging.getLogger("zipage.serve")
LOWEST_LOGPROB = -9999.0  # JSON has no -inf


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's, which Llama 3, Qwen and SmolLM2 tokenizers use): each byte is a
    printable character, itself where it is printable and not a space, else 256 + its rank among the rest."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in kept}
    for rank, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + rank)
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_table()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


class TokenStrings:
    """The text and the bytes of single tokens (for log-probabilities), cached. A token holding part of a
    character (one byte of an emoji) has no text of its own: its string is vLLM's ``bytes:\\xNN...`` form and
    its bytes are its own, so a choice's tokens' bytes join into the text's UTF-8."""

    def __init__(self, tokenizer: Any, size: int = 1 << 16) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, bytes]] = {}
        self.size = size

    def __call__(self, token: int) -> str:
        return self.entry(token)[0]

    def bytes(self, token: int) -> bytes:
        return self.entry(token)[1]

    def entry(self, token: int) -> tuple[str, bytes]:
        e = self.cache.get(token)
        if e is None:
            e = self._entry(token)
            if len(self.cache) >= self.size:
                self.cache.clear()
            self.cache[token] = e
        return e

    def _entry(self, token: int) -> tuple[str, bytes]:
        text = self.tokenizer.decode([token])
        piece = None
        if hasattr(self.tokenizer, "convert_ids_to_tokens"):
            piece = self.tokenizer.convert_ids_to_tokens(token)
        if "\ufffd" not in text:
            if isinstance(piece, str) and piece.startswith("\u2581"):
                # (SentencePiece's decoder drops the first space of a ▁word token decoded alone)
                missing = (len(piece) - len(piece.lstrip("\u2581"))) - (len(text) - len(text.lstrip(" ")))
                text = " " * max(0, missing) + text
            return text, text.encode()
        raw = None
        if isinstance(piece, str) and piece:
            m = _BYTE_TOKEN.fullmatch(piece)
            if m:
                raw = bytes([int(m.group(1), 16)])
            elif all(c in _BYTE_LEVEL for c in piece):
                candidate = bytes(_BYTE_LEVEL[c] for c in piece)
                if candidate.decode("utf-8", errors="replace") == text:  # (the tokenizer is byte-level)
                    raw = candidate
        if raw is None:  # (a real U+FFFD, or bytes this tokenizer does not show)
            return text, text.encode()
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


class ChoiceState:
    """Tokens, text sent so far and log-probabilities of one choice."""

    def __init__(self, tokenizer: Any, stop: list[str], skip_special_tokens: bool = True,
                 prompt_ids: list[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        # (the text is decoded after the prompt's last tokens, as the engine's: IncrementalText keeps those)
        self.detokenizer = IncrementalText(prompt_ids)
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.unsent = ""  # decoded, not sent yet (held back for a stop string)
        self.sent = 0  # characters sent
        self.finish_reason: str | None = None
        self.text = ""  # the final text, once finished
        self._offsets: list[int] = []  # characters of text before each token (log-probabilities' text_offset)
        self._offset_text = IncrementalText(prompt_ids)
        self._held = 0  # characters of complete text the offsets' held tokens decode to
        self._warned = False

    def add(self, delta: Delta) -> str:
        """Take a step's delta; returns the text to send now."""
        self.token_ids += delta.token_ids
        if delta.logprobs:
            self.logprobs += delta.logprobs
        if delta.finish_reason is None:
            if delta.token_ids:
                self.unsent += self.detokenizer.add(self.tokenizer, self.token_ids, self.skip_special_tokens)
            ready = len(self.unsent) - self.hold
            if ready <= 0:
                return ""
            out, self.unsent = self.unsent[:ready], self.unsent[ready:]
            self.sent += len(out)
            return out
        self.finish_reason = delta.finish_reason
        if delta.error is not None:  # (the engine failed this sample: the request answers with a 500)
            raise APIError(500, f"the engine failed this request: {delta.error}", code="engine_error")
        if delta.text is not None:
            final = delta.text
        else:  # (aborted or cancelled: no final text from the engine) what decodes so far
            if delta.token_ids:
                self.unsent += self.detokenizer.add(self.tokenizer, self.token_ids, self.skip_special_tokens)
            final = self.detokenizer.text()
        self.text = final
        sent = self.detokenizer.text()[: self.sent]
        if not final.startswith(sent) and not self._warned:
            # (bytes that are no UTF-8, or a tokenizer's clean-up of spaces, decode differently whole than
            # token by token: what was streamed stands, and the rest of the final text follows it)
            self._warned = True
            logger.warning("a streamed choice's text differs from its final decode (streamed %r, final %r): the "
                           "stream keeps what it sent", sent[-40:], final[: len(sent)][-40:])
        out = final[self.sent:]
        self.sent = max(self.sent, len(final))
        return out

    def since(self, start: int) -> list[TokenLogprobs]:
        return self.logprobs[start:]

    def offsets(self, start: int) -> list[int]:
        """The characters of text before each token from ``start`` on (a token that completes a character
        counts from where that character starts; decoded one token at a time, linear work over a choice)."""
        text = self._offset_text
        while len(self._offsets) < len(self.token_ids):
            i = len(self._offsets)
            held = text.holding  # earlier tokens' bytes not yet a character
            # (the held tokens' complete text, a space before the character's first bytes, comes first)
            before = text.length + (self._held if held else 0)
            length = text.length
            new = text.add(self.tokenizer, ListView(self.token_ids, i + 1), self.skip_special_tokens)
            if held and new:  # held bytes that never became a character came out (as U+FFFD) with this
                # token: it starts after them when its own text ends what came out
                own = self.tokenizer.decode([self.token_ids[i]], skip_special_tokens=self.skip_special_tokens)
                if own and not own.endswith(_UNFINISHED) and len(own) < len(new) and new.endswith(own):
                    before = length + len(new) - len(own)
            self._held = text.held_chars(self.tokenizer, self.skip_special_tokens) if text.holding else 0
            self._offsets.append(before)
        return self._offsets[start:]


def _lp(x: float) -> float:
    return max(x, LOWEST_LOGPROB)


def completion_logprobs(entries: list[TokenLogprobs], strings: TokenStrings, offsets: list[int]) -> CompletionLogprobs:
    """The completions API's log-probabilities; ``offsets``: each token's ``text_offset`` (``ChoiceState.offsets``)."""
    out = CompletionLogprobs()
    for e, offset in zip(entries, offsets):
        token = strings(e.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(_lp(e.logprob))
        out.top_logprobs.append({strings(t): _lp(v) for t, v in e.top} or None)
        out.text_offset.append(offset)
    return out


def chat_logprobs(entries: list[TokenLogprobs], strings: TokenStrings) -> ChatLogprobs:
    """The chat API's log-probabilities."""
    content = []
    for e in entries:
        token = strings(e.token_id)
        top = [TopLogprob(token=strings(t), logprob=_lp(v), bytes=list(strings.bytes(t))) for t, v in e.top]
        content.append(ChatTokenLogprob(token=token, logprob=_lp(e.logprob), bytes=list(strings.bytes(e.token_id)),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)
