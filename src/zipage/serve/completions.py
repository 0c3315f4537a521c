"""``POST /v1/completions``: text in, text out; several prompts and ``n`` samples per prompt."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import StreamingResponse

from .choices import ChoiceState, TokenStrings, completion_logprobs
from .engine_client import AsyncEngine
from .errors import APIError, error_body
from .generation import (DONE, ServeConfig, add_all, check_length, check_model, check_samples, merged,
                         off_loop, sampling_params, sse)
from .protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Usage,
    random_id,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def prompt_parts(req: CompletionRequest) -> tuple[list[str] | None, list[list[int]] | None]:
    """``(texts, None)`` or ``(None, token ids)`` of the prompts: a string, a list of strings, token ids, or a
    list of token id lists."""
    p = req.prompt
    if isinstance(p, str):
        return [p], None
    if p and all(isinstance(x, int) for x in p):
        return None, [list(p)]
    if p and all(isinstance(x, str) for x in p):
        return list(p), None
    if p and all(isinstance(x, list) for x in p):
        return None, [list(x) for x in p]
    raise APIError(400, "prompt must be a string, a list of strings, token ids or a list of token id lists",
                   param="prompt")


def tokenize_all(texts: list[str], tokenizer, add_special_tokens: bool = True) -> list[list[int]]:
    try:
        return [list(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]
    except Exception as e:  # (text the tokenizer cannot take: a lone surrogate, ...)
        raise APIError(400, f"prompt could not be tokenized: {type(e).__name__}: {e}"[:500], param="prompt") from None


async def create_completion(req: CompletionRequest, raw: Request, engine: AsyncEngine,
                            config: ServeConfig) -> CompletionResponse | StreamingResponse:
    check_model(config, req.model)
    texts, prompts = prompt_parts(req)
    check_samples(len(texts or prompts) * req.n, "prompt")  # (before tokenizing: counting is cheap)
    params = sampling_params(req, config, req.max_tokens or DEFAULT_MAX_TOKENS, req.logprobs)
    if texts is not None:  # (on the tokenizing thread: token ids need none)
        prompts = await off_loop(raw, tokenize_all, texts, config.tokenizer)
    for ids in prompts:
        check_length(ids, params, config, "prompt")
    streams = await add_all(engine, config, prompts, [params] * len(prompts), "prompt")
    model = req.model or config.model_names[0]
    n = params.n
    choices = {(i, k): ChoiceState(config.tokenizer, params.stop, params.skip_special_tokens, prompts[i])
               for i in range(len(prompts)) for k in range(n)}
    strings = TokenStrings(config.tokenizer)
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        body = _stream(req, raw, streams, choices, strings, model, n, prompt_tokens)
        return StreamingResponse(body, media_type="text/event-stream")
    async with aclosing(merged(streams, raw)) as deltas_of:
        async for i, deltas in deltas_of:
            for d in deltas:
                choices[i, d.index].add(d)
    out = []
    for (i, k), c in sorted(choices.items()):
        lp = completion_logprobs(c.logprobs, strings, c.offsets(0)) if req.logprobs is not None else None
        out.append(CompletionChoice(index=i * n + k, text=c.text, logprobs=lp, finish_reason=c.finish_reason,
                                    token_ids=c.token_ids if req.return_token_ids else None))
    completion_tokens = sum(len(c.token_ids) for c in choices.values())
    return CompletionResponse(
        model=model, choices=out,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
        prompt_token_ids=prompts if req.return_token_ids else None,
    )


async def _stream(req: CompletionRequest, raw: Request, streams, choices: dict, strings: TokenStrings, model: str,
                  n: int, prompt_tokens: int) -> AsyncIterator[str]:
    cid, created = random_id("cmpl"), int(time.time())
    # with include_usage every chunk has a usage field, null until the last (OpenAI's stream)
    keep = frozenset({"usage"}) if req.stream_options is not None and req.stream_options.include_usage else frozenset()
    # with continuous_usage_stats too (vLLM's), every chunk's usage counts the tokens so far
    continuous = bool(keep) and req.stream_options.continuous_usage_stats
    try:
        async with aclosing(merged(streams, raw)) as deltas_of:
            async for i, deltas in deltas_of:
                out = []
                for d in deltas:
                    c = choices[i, d.index]
                    seen = len(c.logprobs)
                    text = c.add(d)
                    lp = None
                    if req.logprobs is not None:
                        lp = completion_logprobs(c.since(seen), strings, c.offsets(seen))
                    ids = d.token_ids if req.return_token_ids else None
                    if text or lp is not None or d.finish_reason is not None or ids:
                        out.append(CompletionChoice(index=i * n + d.index, text=text, logprobs=lp,
                                                    finish_reason=d.finish_reason,
                                                    token_ids=ids))
                if out:
                    usage = None
                    if continuous:
                        done = sum(len(c.token_ids) for c in choices.values())
                        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=done,
                                      total_tokens=prompt_tokens + done)
                    yield sse(CompletionChunk(id=cid, created=created, model=model, choices=out, usage=usage), keep)
        if req.stream_options is not None and req.stream_options.include_usage:
            completion_tokens = sum(len(c.token_ids) for c in choices.values())
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
            yield sse(CompletionChunk(id=cid, created=created, model=model, choices=[], usage=usage), keep)
    except APIError as e:  # the engine stopped mid-stream: say so in the stream
        yield sse(error_body(e.status, e.message, None, e.code))
    yield DONE
