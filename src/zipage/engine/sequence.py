"""A request's state inside the engine, and what the user gets back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from .sampling import ENGINE_BUDGET, SamplingParams
from .views import ListView


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprobs:
    """Log-probabilities at one output position (``SamplingParams.logprobs``)."""

    token_id: int  # the sampled token
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability) of the most likely tokens, best first


@dataclass
class CompletionOutput:
    """One sample of a request (vLLM's name): a request with ``n`` samples has ``n`` of them. While it runs,
    ``text`` is the text of its tokens so far, decoded when first read (with stop strings set, less their
    longest's length minus one characters, where a stop string may still start), as vLLM's is."""

    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None


class _RunningCompletionOutput(CompletionOutput):
    """A running sample's output whose text is decoded at the first read (``step()`` reports every running
    request each step: most of those texts are never read). Pickles, copies and ``dataclasses.replace``s as a
    plain ``CompletionOutput`` with its text."""

    @classmethod
    def make(cls, index: int, token_ids: Any, logprobs: Any, source: tuple) -> _RunningCompletionOutput:
        out = cls.__new__(cls)
        out.__dict__.update(index=index, token_ids=token_ids, finish_reason=None, logprobs=logprobs, _text=None,
                            _source=source)
        return out

    @property
    def text(self) -> str | None:
        text = self.__dict__.get("_text")
        source = self.__dict__.get("_source")
        if text is None and source is not None:
            decode, seq, ids = source
            text = self.__dict__["_text"] = decode(seq, ids[:])
            self.__dict__["_source"] = None
        return text

    @text.setter
    def text(self, value: str | None) -> None:
        self.__dict__["_text"] = value
        self.__dict__["_source"] = None

    def __reduce__(self) -> tuple:
        return CompletionOutput, (self.index, self.token_ids, self.text, self.finish_reason, self.logprobs)


@dataclass
class RequestOutput:
    """One finished (or, while streaming, in-progress) request.

    ``token_ids``, ``text``, ``finish_reason`` and ``logprobs`` are those of its first sample;
    ``outputs`` holds every sample (``n`` of them). An output that ``step()`` returns for one
    sample of a request with ``n > 1`` holds that sample alone (``outputs[0].index`` says which)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # "stop", "length", "cancelled", "error" (a failed step) or None while running
    finished: bool
    error: str | None = None  # why the engine ended it, when it did (finish_reason "error")
    logprobs: list[TokenLogprobs] | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)

    @classmethod
    def of(cls, seqs: list[Sequence]) -> RequestOutput:
        """The output of a request from its samples' sequences (one for ``n = 1``)."""
        first = seqs[0]
        outputs = [s.completion() for s in seqs]
        done = all(s.finished for s in seqs)
        lazy = isinstance(outputs[0], _RunningCompletionOutput)
        if lazy and cls is RequestOutput:
            cls = _RunningRequestOutput
        return cls(
            request_id=first.parent if first.parent is not None else first.request_id,
            prompt=first.prompt,
            prompt_token_ids=list(first.prompt_token_ids) if done else ListView(first.prompt_token_ids),
            token_ids=outputs[0].token_ids,
            text=None if lazy else outputs[0].text,  # (a running sample's text is decoded when read)
            finish_reason=outputs[0].finish_reason,
            finished=done,
            error=next((s.error for s in seqs if s.error is not None), None),
            logprobs=outputs[0].logprobs,
            outputs=outputs,
        )


class _RunningRequestOutput(RequestOutput):
    """A running request's output: its ``text`` is its first sample's, decoded at the first read. Pickles,
    copies and ``dataclasses.replace``s as a plain ``RequestOutput`` with its text."""

    @property
    def text(self) -> str | None:
        text = self.__dict__.get("_text")
        if text is None and self.outputs:
            text = self.__dict__["_text"] = self.outputs[0].text
        return text

    @text.setter
    def text(self, value: str | None) -> None:
        self.__dict__["_text"] = value

    def __reduce__(self) -> tuple:
        state = {f.name: getattr(self, f.name) for f in fields(RequestOutput)}
        return _plain_request_output, (state,)


def _plain_request_output(state: dict) -> RequestOutput:
    return RequestOutput(**state)


@dataclass(eq=False)
class Sequence:
    """A request: its tokens, its pages and where it is in its life.

    ``num_computed`` is the logical length L (tokens whose KV went through the model; positions
    come from it); ``stored`` is S <= L, the tokens kept in its pages."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival: int = 0
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    stored: int = 0
    compressions: int = 0
    compressing: bool = False  # an asynchronous compression of this sequence is in flight
    cancel_requested: bool = False  # cancelled while compressing: finished once the compression lands
    finish_requested: str | None = None  # stopped (by a token) while compressing: finished once it lands
    pending: int = 0  # sampled tokens still on the device (asynchronous scheduling): not yet in output_ids
    last_pending: bool = False  # the pending token is the last one (max_tokens / max_model_len): no more steps
    slot: int = -1  # query-slot index while running
    ring_from: int = 0  # first position computed in this slot (after a prefix-cache hit): its rings hold no earlier
    finish_reason: str | None = None
    text: str | None = None  # decoded output, when the engine has a tokenizer
    cached_pages: int = 0  # leading pages whose hashes are registered (shared or shareable)
    window_pages: list[int] = field(default_factory=list)  # sliding-window layers' pages (memory/window_blocks.py)
    window_offset: int = 0  # logical position of slot 0 of ``window_pages``
    generator: torch.Generator | None = None
    streamed: int = 0  # output tokens already handed to a stream
    detokenizer: Any = None  # the incremental text, while stop strings are checked (outputs.IncrementalText)
    decode: Callable[[Sequence, list[int]], str] | None = None  # a running sample's text (with a tokenizer)
    stop_from: int | None = None  # characters of text before stop strings count (those of the first min_tokens)
    error: str | None = None  # why the scheduler ended it (finish_reason "error")
    # tokens kept after a compression; None: full KV (never compressed); the scheduler resolves the default
    budget: Any = ENGINE_BUDGET
    reserved: int = 0  # pages the scheduler set aside for this sequence's worst case while it runs
    parent: str | None = None  # the request id of a sample of a request with n > 1 (None: the request itself)
    index: int = 0  # which sample of its request
    leader: Sequence | None = None  # the sample whose prompt pages this one waits for (n > 1)
    logprobs: list[TokenLogprobs] | None = None
    logit_edits: Any = None  # its allowed_token_ids and logit_bias on the device (sampler.LogitEdits), made once

    @property
    def tokens(self) -> list[int]:
        return self.prompt_token_ids + self.output_ids

    def token_at(self, i: int) -> int:
        """Token ``i`` of prompt + output (a pending token has no value on the host yet)."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_ids[i - n]

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens, the pending ones (sampled, still on the device) included."""
        return len(self.prompt_token_ids) + len(self.output_ids) + self.pending

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def completion(self) -> CompletionOutput:
        """This sample's output: views of its lists while it runs (a step reports every running
        request; copies would cost O(n) each time), plain lists once it is finished. A running
        sample's text is decoded only when read (``decode``)."""
        if self.finished:
            return CompletionOutput(self.index, list(self.output_ids), self.text, self.finish_reason,
                                    list(self.logprobs) if self.logprobs is not None else None)
        ids = ListView(self.output_ids)
        logprobs = ListView(self.logprobs) if self.logprobs is not None else None
        if self.decode is None or self.text is not None:
            return CompletionOutput(self.index, ids, self.text, self.finish_reason, logprobs)
        return _RunningCompletionOutput.make(self.index, ids, logprobs, (self.decode, self, ids))

    def output(self) -> RequestOutput:
        return RequestOutput.of([self])
