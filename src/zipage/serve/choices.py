"""One choice of a response as its tokens come: its text (decoded incrementally) and log-probabilities.

Text is streamed as soon as it decodes, except the last ``len(longest stop string) - 1``
characters while stop strings are set: a stop string may still start there, and a stop string
is never sent. The final text comes from the engine (cut at the stop string, or kept with
``include_stop_str_in_output``).
"""

from __future__ import annotations

from typing import Any

from ..engine.outputs import IncrementalText
from ..engine.sequence import TokenLogprobs
from .engine_client import Delta
from .protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

LOWEST_LOGPROB = -9999.0  # JSON has no -inf


class TokenStrings:
    """The text of single tokens (for log-probabilities), cached."""

    def __init__(self, tokenizer: Any, size: int = 1 << 16) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}
        self.size = size

    def __call__(self, token: int) -> str:
        s = self.cache.get(token)
        if s is None:
            s = self.tokenizer.decode([token])
            if len(self.cache) >= self.size:
                self.cache.clear()
            self.cache[token] = s
        return s


class ChoiceState:
    """Tokens, text sent so far and log-probabilities of one choice."""

    def __init__(self, tokenizer: Any, stop: list[str], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.detokenizer = IncrementalText()
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.unsent = ""  # decoded, not sent yet (held back for a stop string)
        self.sent = 0  # characters sent
        self.finish_reason: str | None = None
        self.text = ""  # the final text, once finished

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
        if delta.text is not None:
            final = delta.text
        else:  # (aborted or cancelled: no final text from the engine) what decodes so far
            if delta.token_ids:
                self.unsent += self.detokenizer.add(self.tokenizer, self.token_ids, self.skip_special_tokens)
            final = self.detokenizer.text()
        self.text = final
        out = final[self.sent:]
        self.sent = len(final)
        return out

    def since(self, start: int) -> list[TokenLogprobs]:
        return self.logprobs[start:]


def _lp(x: float) -> float:
    return max(x, LOWEST_LOGPROB)


def completion_logprobs(entries: list[TokenLogprobs], strings: TokenStrings, offset: int) -> CompletionLogprobs:
    """The completions API's log-probabilities (``text_offset`` counts characters from ``offset``)."""
    out = CompletionLogprobs()
    for e in entries:
        token = strings(e.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(_lp(e.logprob))
        out.top_logprobs.append({strings(t): _lp(v) for t, v in e.top} or None)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def chat_logprobs(entries: list[TokenLogprobs], strings: TokenStrings) -> ChatLogprobs:
    """The chat API's log-probabilities."""
    content = []
    for e in entries:
        token = strings(e.token_id)
        top = [TopLogprob(token=strings(t), logprob=_lp(v), bytes=list(strings(t).encode())) for t, v in e.top]
        content.append(ChatTokenLogprob(token=token, logprob=_lp(e.logprob), bytes=list(token.encode()),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)
