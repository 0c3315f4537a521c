"""Output processing: each sampled token is booked here (stop ids, stop strings, lengths, text).

Text is decoded incrementally: each token decodes only a few tokens around it (a window that
starts a few tokens back, so a word split over tokens and multi-byte characters come out right),
and stop strings are searched only in the new text plus the tail of the old one that a stop
string could straddle. A 32K-token output therefore costs O(n), not O(n^2). The final text is
decoded once, whole, when the request finishes.

An output's text is decoded after the last few tokens of its prompt (``CONTEXT``), then cut after
their text, as vLLM does: a SentencePiece tokenizer (Llama 2, Mistral, Gemma) drops the space a
``▁word`` token starts with when that token comes first, so ``" Paris"`` after ``"... is"`` would
come out as ``"Paris"`` decoded alone.
"""

from __future__ import annotations

from typing import Any

from .sequence import Sequence, TokenLogprobs

_UNFINISHED = "\ufffd"  # what a tokenizer decodes the first bytes of a multi-byte character to
CONTEXT = 5  # prompt tokens an output's text is decoded after (vLLM's initial offset)


def decode_output(tokenizer: Any, prompt_ids: Any, ids: Any, skip_special_tokens: bool = True) -> str:
    """The text of output tokens ``ids``, decoded after the prompt's last ``CONTEXT`` tokens and cut after
    their text (decoded alone where that cut does not hold: a character split between prompt and output).
    Where the output ends inside a character, the characters before it are kept and the incomplete one is one
    U+FFFD (a byte-fallback decoder, Llama 2's, turns a whole run of byte tokens into U+FFFD while its last
    character is incomplete, characters before it included; the stream has sent those characters)."""
    text = _decode_output(tokenizer, prompt_ids, ids, skip_special_tokens)
    if text.endswith(_UNFINISHED) and len(ids) > 1:
        ids = list(ids)
        for k in range(1, min(IncrementalText.MAX_HELD, len(ids))):  # (a character is at most 4 bytes)
            part = _decode_output(tokenizer, prompt_ids, ids[: len(ids) - k], skip_special_tokens)
            if not part.endswith(_UNFINISHED):
                if len(part) > len(text.rstrip(_UNFINISHED)):
                    return part + _UNFINISHED
                break
    return text


def _decode_output(tokenizer: Any, prompt_ids: Any, ids: Any, skip_special_tokens: bool) -> str:
    context = list(prompt_ids[-CONTEXT:]) if prompt_ids is not None and len(prompt_ids) else []
    if not context:
        return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    head = tokenizer.decode(context, skip_special_tokens=skip_special_tokens)
    if head.endswith(_UNFINISHED):  # the prompt ends inside a character (IncrementalText does the same)
        return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return tokenizer.decode(context + list(ids), skip_special_tokens=skip_special_tokens)[len(head) :]


class IncrementalText:
    """A request's output text, decoded a few tokens at a time (after ``context``, the prompt's last tokens,
    whose own text is not part of it: see ``decode_output``).

    The tokens decoded for the next piece are a window: the last piece's tokens (decoded only as context, so a
    word split over tokens and a ``▁word`` token's space come out right), then the tokens whose text is not out
    yet (``holding``: bytes of a character still incomplete). A token that adds no text (a special token
    skipped) leaves the window, as vLLM leaves skipped tokens out, so a run of them costs no more per token
    than text does. Where the window ends inside a character, the text of the tokens before that character
    comes out (a run of byte tokens streams character by character), and tokens more than ``MAX_HELD`` from the
    window's end come out whatever they decode to (bytes that are no UTF-8: their U+FFFD cannot change), so the
    held tokens, and the work per token, stay bounded."""

    MAX_HELD = 4  # a character's bytes: at most 4 tokens

    def __init__(self, context: Any = ()) -> None:
        self.pieces: list[str] = []
        self.context = list(context[-CONTEXT:]) if len(context) else []
        self.window = list(self.context)
        self.prefix = 0  # window tokens decoded only as the next piece's context (from the window's head)
        self.read = len(self.window)  # window tokens whose text is out (or the context's)
        self.prefix_text: str | None = None  # the text of window[prefix:read] (None: not decoded yet)
        self.consumed = 0  # output tokens taken (into the window, or left out as adding no text)
        self.length = 0  # characters in ``pieces``
        self._special: frozenset[int] | None = None  # the tokenizer's special ids (skipped: never in the window)

    @property
    def holding(self) -> bool:
        """Whether tokens were taken whose text is not out yet (a character's first bytes)."""
        return self.read < len(self.window)

    def _decode(self, tokenizer: Any, stop: int | None, skip_special_tokens: bool) -> str:
        return tokenizer.decode(self.window[self.prefix:stop], skip_special_tokens=skip_special_tokens)

    def _emit(self, new: str, read: int) -> str:
        """``new`` is the text of the window's tokens up to ``read``: out; they become the next piece's context."""
        del self.window[: self.prefix]
        self.read, read = self.read - self.prefix, read - self.prefix
        self.prefix, self.read, self.prefix_text = self.read, read, None
        self.pieces.append(new)
        self.length += len(new)
        return new

    def add(self, tokenizer: Any, ids: Any, skip_special_tokens: bool = True) -> str:
        """Decode what ``ids`` (the whole output so far) adds; returns the new text: '' while nothing new is
        complete (the text of the tokens before an incomplete character comes out)."""
        new_ids = ids[self.consumed:]
        self.consumed = len(ids)
        if skip_special_tokens:
            if self._special is None:
                self._special = frozenset(getattr(tokenizer, "all_special_ids", None) or ())
            if self._special:
                new_ids = [t for t in new_ids if t not in self._special]
        if not new_ids:
            return ""
        self.window += new_ids
        if self.prefix_text is None:
            self.prefix_text = self._decode(tokenizer, self.read, skip_special_tokens)
        prefix = self.prefix_text
        if self.context and self.prefix == 0 and self.read == len(self.context) and not self.pieces \
                and prefix.endswith(_UNFINISHED):
            # the prompt ends inside a character: the output is decoded alone (as decode_output does)
            del self.window[: len(self.context)]
            self.context, self.read, self.prefix_text = [], 0, ""
            prefix = ""
        full = self._decode(tokenizer, None, skip_special_tokens)
        if full.endswith(_UNFINISHED):
            # the text of the tokens before the incomplete character, where it adds to the prefix's
            for stop in range(len(self.window) - 1, max(self.read, len(self.window) - self.MAX_HELD) - 1, -1):
                part = self._decode(tokenizer, stop, skip_special_tokens)
                if not part.endswith(_UNFINISHED):
                    if len(part) > len(prefix) and part.startswith(prefix):
                        return self._emit(part[len(prefix):], stop)
                    break
            stop = len(self.window) - self.MAX_HELD
            if stop > self.read:  # bytes no later token can complete: out as they decode (U+FFFD)
                part = self._decode(tokenizer, stop, skip_special_tokens)
                if len(part) > len(prefix) and part.startswith(prefix) and full.startswith(part):
                    return self._emit(part[len(prefix):], stop)
            return ""
        if len(full) <= len(prefix):
            if full == prefix and prefix:  # the new tokens add no text: they leave the window
                del self.window[self.read:]
            return ""
        return self._emit(full[len(prefix):], len(self.window))

    def held_chars(self, tokenizer: Any, skip_special_tokens: bool = True) -> int:
        """Characters of complete text the held tokens decode to before their incomplete character (the
        space a ``Ġ`` token carries before a character's first bytes), 0 when not ``holding``."""
        if not self.holding:
            return 0
        prefix = self.prefix_text if self.prefix_text is not None else self._decode(tokenizer, self.read,
                                                                                      skip_special_tokens)
        full = self._decode(tokenizer, None, skip_special_tokens).rstrip(_UNFINISHED)
        best = len(full) - len(prefix) if full.startswith(prefix) else 0
        # (byte-fallback decoders: a token fewer; at most a character's bytes back)
        for stop in range(len(self.window) - 1, max(self.read, len(self.window) - self.MAX_HELD) - 1, -1):
            part = self._decode(tokenizer, stop, skip_special_tokens)
            if not part.endswith(_UNFINISHED):
                return max(best, len(part) - len(prefix), 0)
        return max(best, 0)

    def tail(self, n: int) -> str:
        """The last ``n`` characters of the text so far."""
        out = ""
        for piece in reversed(self.pieces):
            if len(out) >= n:
                break
            out = piece + out
        return out[len(out) - n :] if n and len(out) > n else out if n else ""

    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""


class OutputProcessor:
    """Books sampled tokens into their requests and says when a request stops."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.generated_tokens = 0

    def partial_text(self, seq: Sequence, ids: list[int]) -> str:
        """A running request's text so far: its tokens decoded, less the last ``len(longest stop) - 1``
        characters while stop strings are set (a stop string may still start there; vLLM holds them back too)."""
        params = seq.params
        # (a character still incomplete is never shown, as vLLM's; decode_output keeps the characters before it)
        text = decode_output(self.tokenizer, seq.prompt_token_ids, ids, params.skip_special_tokens).rstrip(_UNFINISHED)
        hold = max((len(s) for s in params.stop), default=1) - 1
        return text[: max(0, len(text) - hold)]

    def suppressed(self, seq: Sequence) -> list[int] | None:
        """Token ids the next token of ``seq`` may not be (EOS and stop ids before ``min_tokens``)."""
        p = seq.params
        if len(seq.output_ids) + seq.pending >= p.min_tokens:
            return None
        ids = list(p.stop_token_ids)
        if not p.ignore_eos:
            ids += [t for t in self.eos_ids if t not in ids]
        return ids or None

    def append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> str | None:
        """Book ``token`` (and its log-probabilities, when the request asked for them) for ``seq``;
        returns the reason it stops now ("stop", "length") or None."""
        seq.output_ids.append(token)
        if logprobs is not None:
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(logprobs)
        self.generated_tokens += 1
        p = seq.params
        n = len(seq.output_ids)
        reason = None
        if n > p.min_tokens and ((token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids):
            reason = "stop"
        stop_at = None
        # a token that stops the request, its text left out, ends it whatever stop string its text would complete
        if self.tokenizer is not None and p.stop and not (reason == "stop" and not p.include_stop_str_in_output):
            stop_at = self._find_stop(seq, n > p.min_tokens)  # (as EOS: past the first min_tokens)
            if stop_at is not None:
                reason = "stop"
        if reason is None and (n >= p.max_tokens or len(seq.prompt_token_ids) + n >= self.max_model_len):
            reason = "length"
        if reason is not None and self.tokenizer is not None:
            seq.text = self._final_text(seq, stop_at, by_token=stop_at is None and reason == "stop")
            if stop_at is None and p.stop and (seq.stop_from is not None or n > p.min_tokens):
                # a stop string the incremental search could not see: it ends in the complete part of a last
                # token that ends inside a character (its text held back), which the whole decode shows
                cut = self._cut_at_stop(seq, seq.text)
                if cut is not None:
                    seq.text, reason = cut, "stop"
        return reason

    def finished(self, seq: Sequence) -> None:
        """``seq`` is finished: its text, if no stop or length decoded it (cancelled, failed). Never raises: a
        request failed by its own tokens' decode keeps the text decoded so far (its tokens stay whole)."""
        if seq.text is None and self.tokenizer is not None:
            try:
                seq.text = decode_output(self.tokenizer, seq.prompt_token_ids, seq.output_ids,
                                         seq.params.skip_special_tokens)
            except Exception:  # (this runs while finishing, with other requests' tokens still to book)
                seq.text = seq.detokenizer.text() if seq.detokenizer is not None else ""

    def _find_stop(self, seq: Sequence, may_stop: bool) -> int | None:
        """Decode the new token's text; the index in the whole text where a stop string starts."""
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalText(seq.prompt_token_ids)
        d = seq.detokenizer
        longest = max(len(s) for s in seq.params.stop)
        before = d.length
        overlap = d.tail(longest - 1)
        new = d.add(self.tokenizer, seq.output_ids, seq.params.skip_special_tokens)
        if not new or not may_stop:
            return None
        if seq.stop_from is None:  # stop strings count from here on (the text of the first min_tokens tokens is out)
            seq.stop_from = before
        # only a stop string that ends in the new text (one ending before was seen, or did not count, already)
        window = overlap + new
        hits = [i for i in (window.find(s, max(0, len(overlap) - len(s) + 1)) for s in seq.params.stop) if i >= 0]
        return before - len(overlap) + min(hits) if hits else None

    @staticmethod
    def _cut_at_stop(seq: Sequence, text: str, start: int | None = None) -> str | None:
        """``text`` cut at its first stop string that ends past ``start`` (where stop strings count: by default
        ``seq.stop_from``, or all the text decoded so far where no text came since they count), None if none does."""
        if start is None:
            start = seq.stop_from
        if start is None:
            start = seq.detokenizer.length if seq.detokenizer is not None else 0
        hits = [(i, s) for i, s in ((text.find(s, max(0, start - len(s) + 1)), s) for s in seq.params.stop) if i >= 0]
        return _cut(seq, text, hits) if hits else None

    def _final_text(self, seq: Sequence, stop_at: int | None, by_token: bool = False) -> str:
        """The finished request's text. A request stopped by a token (EOS or one of ``stop_token_ids``) leaves that
        token's text out unless ``include_stop_str_in_output`` (its id stays in ``token_ids``), as vLLM does."""
        ids = seq.output_ids
        if by_token and not seq.params.include_stop_str_in_output:
            ids = ids[:-1]
        text = decode_output(self.tokenizer, seq.prompt_token_ids, ids, seq.params.skip_special_tokens)
        if stop_at is None:
            return text
        # the whole decode and the incremental one agree but for rare tokenizer clean-ups: cut at
        # the first stop string of the whole text that ends where stop strings count (past the text
        # of the first ``min_tokens`` tokens), and at the incremental position otherwise
        cut = self._cut_at_stop(seq, text, seq.stop_from or 0)
        if cut is not None:
            return cut
        text = seq.detokenizer.text()
        hits = [(stop_at, s) for s in seq.params.stop if text.startswith(s, stop_at)]
        return _cut(seq, text, hits or [(stop_at, "")])


def _cut(seq: Sequence, text: str, hits: list[tuple[int, str]]) -> str:
    """``text`` cut at the first of ``hits`` (position, stop string; the longest of those starting there), the stop
    string kept with ``include_stop_str_in_output``."""
    at, stop = min(hits, key=lambda h: (h[0], -len(h[1])))
    return text[: at + len(stop)] if seq.params.include_stop_str_in_output else text[:at]
