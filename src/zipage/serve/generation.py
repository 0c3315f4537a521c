"""What both endpoints share: the request's sampling parameters, adding its prompts to the engine,
and reading their deltas while watching for the client to go away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from ..engine import SamplingParams
from ..engine.sampling import ENGINE_BUDGET
from .engine_client import AsyncEngine, Delta, EngineDead, RequestStream
from .errors import APIError, bad_request
from .protocol import SamplingFields
from .reasoning import check_parser

T = TypeVar("T")

DISCONNECT_POLL_S = 0.5  # how often a request waiting for tokens checks that its client is still there
MAX_REQUEST_BYTES = 32 << 20  # the default largest request body (--max-request-bytes)

# Prompts are tokenized (and chat templates applied) here, one request at a time, not on the event loop: a
# prompt of megabytes held every other request's stream, and /health, for seconds
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zipage-tokenize")


async def off_loop(raw: Request, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the tokenizing thread, the event loop free meanwhile; what it raises is raised here. A
    client that goes away meanwhile (checked every ``DISCONNECT_POLL_S``) takes its job off the thread's queue
    (one started runs to its end, unread) and gets a 499."""
    job = asyncio.get_running_loop().run_in_executor(_TOKENIZER_THREAD, fn, *args)
    while True:
        done, _ = await asyncio.wait({job}, timeout=DISCONNECT_POLL_S)
        if done:
            return job.result()
        if await raw.is_disconnected():
            job.cancel()
            raise APIError(499, "the client went away before its prompt was tokenized", code="client_closed")


@dataclass
class ServeConfig:
    """What the endpoints need to know beyond the engine."""

    model_names: list[str]
    model_root: str
    tokenizer: Any
    max_model_len: int
    api_key: str | None = None
    max_waiting: int | None = None  # requests (samples) waiting beyond which new ones get a 429
    max_budget: int | None = None  # largest per-request budget; full KV (null) is then refused too
    # defaults of the sampling fields a request leaves out, from the model's generation_config (--generation-config)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    # origins whose browser pages may call the API (CORS; "*": any); None: no CORS headers (--allowed-origins)
    allowed_origins: list[str] | None = None
    max_request_bytes: int = MAX_REQUEST_BYTES  # a larger request body gets a 413 (--max-request-bytes)
    # the chat endpoint's thinking apart from its answer (reasoning.py's PARSERS); None: all of it is content
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        check_parser(self.reasoning_parser)


def check_model(config: ServeConfig, model: str | None) -> None:
    if model is not None and model not in config.model_names:
        raise APIError(404, f"The model `{model}` does not exist; this server serves {config.model_names}",
                       param="model", code="model_not_found")


def sampling_params(req: SamplingFields, config: ServeConfig, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """The engine's SamplingParams for a request (a 400 naming the field when they are invalid)."""
    field = req.unsupported()
    if field is not None:
        raise APIError(400, f"`{field}` is not supported by this server", param=field, code="unsupported")
    if req.stream_options is not None and not req.stream:  # (as OpenAI's API and vLLM's server)
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    budget: Any = ENGINE_BUDGET
    if "budget" in req.model_fields_set:
        budget = req.budget
        if config.max_budget is not None and (budget is None or budget > config.max_budget):
            asked = "full KV (null)" if budget is None else str(budget)
            raise APIError(400, f"budget {asked} is above this server's --max-budget={config.max_budget}",
                           param="budget")
    given, defaults = req.model_fields_set, config.sampling_defaults

    def pick(name: str, api_default: Any) -> Any:  # the request's value; else the model's default; else the API's
        value = getattr(req, name)
        if name in given and value is not None:
            return value
        return defaults.get(name, api_default)

    bias = {} if req.logit_bias else None
    for token, value in (req.logit_bias or {}).items():
        try:
            bias[int(token)] = value
        except ValueError:
            raise APIError(400, f"logit_bias maps token ids (strings such as \"50256\") to biases; got the key "
                                f"{token[:40]!r}", param="logit_bias") from None
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=pick("top_k", -1),
            seed=req.seed, stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
            n=req.n, min_p=pick("min_p", 0.0), repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output, budget=budget,
            skip_special_tokens=req.skip_special_tokens, logit_bias=bias, allowed_token_ids=req.allowed_token_ids,
        )
    except (ValueError, TypeError) as e:
        raise bad_request(e, "prompt") from None


def check_length(prompt: list[int], params: SamplingParams, config: ServeConfig, prompt_field: str) -> None:
    """A 400 when prompt + max_tokens passes the context, naming the prompt's field when the prompt alone
    leaves no room for a token, else ``max_tokens``."""
    if len(prompt) + params.max_tokens > config.max_model_len:
        raise APIError(400, f"this model's maximum context length is {config.max_model_len} tokens; the request "
                            f"asks for {len(prompt) + params.max_tokens} ({len(prompt)} in the {prompt_field}, "
                            f"{params.max_tokens} in the completion)",
                       param=prompt_field if len(prompt) >= config.max_model_len else "max_tokens")


MAX_REQUEST_SAMPLES = 4096  # samples (prompts x n) one request may add, whatever --max-waiting says


def check_samples(samples: int, prompt_field: str) -> None:
    """Refuse a request of more than ``MAX_REQUEST_SAMPLES`` samples (one small body made 128,000)."""
    if samples > MAX_REQUEST_SAMPLES:
        raise APIError(400, f"the request has {samples} samples (prompts x n); one request may have at most "
                            f"{MAX_REQUEST_SAMPLES}: send the prompts in several requests", param=prompt_field)


async def add_all(engine: AsyncEngine, config: ServeConfig, prompts: list[list[int]],
                  params: list[SamplingParams], prompt_field: str) -> list[RequestStream]:
    """Add every prompt of a request, all or none, in one round of the engine thread (``AsyncEngine.add_many``)."""
    if engine.dead is not None:
        raise APIError(503, f"the engine is not running: {engine.dead}")
    samples = sum(p.n for p in params)
    if config.max_waiting is not None and samples > config.max_waiting:  # (never fits: a retry cannot help)
        raise APIError(400, f"the request has {samples} samples (prompts x n) but the server queues at most "
                            f"{config.max_waiting} (--max-waiting)", param="n")
    check_samples(samples, prompt_field)  # (without --max-waiting too)
    if not engine.reserve(samples, config.max_waiting):  # (all the request's samples at once, or none)
        raise APIError(429, f"the server's waiting queue is full ({config.max_waiting} requests); retry later",
                       code="queue_full")
    try:  # (one engine round: a bad prompt refuses the request before any is added; they start together)
        return await engine.add_many(prompts, params, reserved=True)  # (which un-counts the reserved samples)
    except (ValueError, TypeError) as e:
        raise bad_request(e, prompt_field) from None
    except EngineDead as e:
        raise APIError(503, str(e)) from None


def close_all(streams: list[RequestStream]) -> None:
    for s in streams:
        s.close()


async def merged(streams: list[RequestStream], raw: Request) -> AsyncIterator[tuple[int, list[Delta]]]:
    """``(prompt index, deltas)`` of several streams as they come. Every stream is cancelled when the
    iteration ends early: the client went away (checked every ``DISCONNECT_POLL_S``), the consumer
    stopped or was cancelled. A stream is read again only once the consumer has taken its last deltas and
    comes back for more, so what a slow consumer (a client that stops reading) has not taken waits in the
    stream, where it is joined into one delta per sample."""
    inbox: asyncio.Queue = asyncio.Queue()
    wanted = [asyncio.Event() for _ in streams]  # set: the consumer has taken the stream's last deltas
    gone = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for deltas in stream:
                wanted[i].clear()
                inbox.put_nowait((i, deltas))
                await wanted[i].wait()
            inbox.put_nowait((i, None))
        except BaseException as e:  # (EngineDead, or cancelled below)
            inbox.put_nowait((i, e))

    async def watch() -> None:
        while not await raw.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        inbox.put_nowait((-1, gone))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    tasks.append(asyncio.create_task(watch()))
    left = len(streams)
    try:
        while left:
            i, item = await inbox.get()
            if item is gone:
                return
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                if isinstance(item, asyncio.CancelledError):
                    raise item
                raise APIError(503, str(item)) if isinstance(item, EngineDead) else item
            else:
                yield i, item
                wanted[i].set()
    finally:
        close_all(streams)
        for t in tasks:
            t.cancel()


# Characters that JSON may leave raw inside a string but that line readers splitting like Python's
# ``str.splitlines`` (httpx's ``aiter_lines``, among others) take for line ends, cutting an event in two.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


# Fields left out of a stream chunk when they are null: zipage's extras, the chunk's usage unless the
# request asked for it, a delta's role and content. Every other null is sent as OpenAI sends it
# (a choice's ``finish_reason`` and ``logprobs``).
_OMITTED_WHEN_NULL = frozenset({"token_ids", "prompt_token_ids", "usage", "role", "content", "reasoning",
                                "reasoning_content"})


def _prune(value: Any, keep: frozenset) -> Any:
    if isinstance(value, dict):
        return {k: _prune(v, keep) for k, v in value.items()
                if v is not None or k not in _OMITTED_WHEN_NULL or k in keep}
    if isinstance(value, list):
        return [_prune(v, keep) for v in value]
    return value


def sse(payload: Any, keep_null: frozenset = frozenset()) -> str:
    """One server-sent event, on one line for every line reader (text holding U+0085, U+2028 or U+2029
    is sent with those escaped: the same JSON value). ``keep_null``: fields sent as null all the same
    (``usage`` in every chunk of a stream whose request asked for it)."""
    if hasattr(payload, "model_dump_json"):  # (pydantic's JSON: infinities and NaN become null)
        payload = _prune(json.loads(payload.model_dump_json()), keep_null)
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data.translate(_LINE_BREAKS)}\n\n"


DONE = "data: [DONE]\n\n"
