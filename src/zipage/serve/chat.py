"""``POST /v1/chat/completions``: messages through the tokenizer's chat template; ``n`` choices."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import StreamingResponse

from .choices import ChoiceState, TokenStrings, chat_logprobs
from .engine_client import AsyncEngine
from .errors import APIError, bad_request, error_body
from .generation import (DONE, ServeConfig, add_all, check_length, check_model, merged, off_loop,
                         sampling_params, sse)
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    DeltaMessage,
    Usage,
    random_id,
)
from .reasoning import ReasoningSplitter, prompt_leaves_thinking_open


# apply_chat_template's own arguments, which chat_template_kwargs may not set
TEMPLATE_ARGUMENTS = frozenset({"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                                "chat_template", "return_dict", "return_tensors", "tools", "documents", "padding",
                                "truncation", "max_length", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def _template_message(m) -> dict:
    """A message as the chat template gets it: an assistant's earlier thinking under both names templates read
    (``reasoning_content``, Qwen3's; ``reasoning``), as vLLM passes it."""
    out = {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
    thinking = m.reasoning_content or m.reasoning
    if thinking and m.role == "assistant":
        out["reasoning_content"] = out["reasoning"] = thinking
    return out


def chat_prompt(req: ChatCompletionRequest, tokenizer, tokenize: bool = True) -> list[int] | str:
    """The messages as token ids (as text, with ``tokenize=False``), through the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
    messages = [_template_message(m) for m in req.messages]
    kwargs = dict(req.chat_template_kwargs or {})
    taken = sorted(TEMPLATE_ARGUMENTS & set(kwargs))
    if taken:
        raise APIError(400, f"chat_template_kwargs may not set {taken}: the request's own fields and the server set "
                            "these", param="chat_template_kwargs")
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true: set "
                            "add_generation_prompt to false to continue the last message", param="continue_final_message")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                            tokenize=tokenize, continue_final_message=req.continue_final_message,
                                            **kwargs)
    except Exception as e:  # a template that refuses these messages (roles out of order, ...)
        raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
    if not tokenize:
        return ids
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(t) for t in ids]


async def create_chat_completion(req: ChatCompletionRequest, raw: Request, engine: AsyncEngine,
                                 config: ServeConfig) -> ChatCompletionResponse | StreamingResponse:
    check_model(config, req.model)
    prompt = await off_loop(raw, chat_prompt, req, config.tokenizer)
    asked = req.max_completion_tokens or req.max_tokens
    max_tokens = asked or max(1, config.max_model_len - len(prompt))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    params = sampling_params(req, config, max_tokens, logprobs)
    if asked is None:  # by default as many tokens as fit: in the context and, for full KV, in the KV pool
        try:
            params.max_tokens = max(1, min(max_tokens, engine.llm.max_new_tokens(len(prompt), params)))
            params.validate()  # (min_tokens against the smaller max_tokens)
        except (ValueError, TypeError) as e:
            raise bad_request(e, "messages") from None
    check_length(prompt, params, config, "messages")
    streams = await add_all(engine, config, [prompt], [params], "messages")
    model = req.model or config.model_names[0]
    choices = [ChoiceState(config.tokenizer, params.stop, params.skip_special_tokens, prompt)
               for _ in range(params.n)]
    strings = TokenStrings(config.tokenizer)
    parser = config.reasoning_parser
    last = req.messages[-1]
    continued = (last.text() if last.role == "assistant" else "") if req.continue_final_message else None
    prompt_open = parser is not None and prompt_leaves_thinking_open(config.tokenizer, prompt, continued)
    if req.stream:
        splitters = [ReasoningSplitter(parser, prompt_open) if parser else None for _ in choices]
        return StreamingResponse(_stream(req, raw, streams, choices, strings, model, len(prompt), splitters),
                                 media_type="text/event-stream")
    async with aclosing(merged(streams, raw)) as deltas_of:
        async for _, deltas in deltas_of:
            for d in deltas:
                choices[d.index].add(d)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return ChatCompletionResponse(
        model=model,
        choices=[ChatChoice(index=k, message=_message(c.text, parser, prompt_open), finish_reason=c.finish_reason,
                            logprobs=chat_logprobs(c.logprobs, strings) if req.logprobs else None,
                            token_ids=c.token_ids if req.return_token_ids else None)
                 for k, c in enumerate(choices)],
        usage=Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens,
                    total_tokens=len(prompt) + completion_tokens),
        prompt_token_ids=prompt if req.return_token_ids else None,
    )


def _message(text: str, parser: str | None, prompt_open: bool) -> AssistantMessage:
    if parser is None:
        return AssistantMessage(content=text)
    reasoning, content = ReasoningSplitter.split(parser, text, prompt_open)
    return AssistantMessage(content=content, reasoning=reasoning, reasoning_content=reasoning)


def _delta(text: str, splitter: ReasoningSplitter | None, finished: bool) -> DeltaMessage:
    """A chunk's delta for ``text``, the choice's new text (its thinking apart where a parser splits it)."""
    if splitter is None:
        return DeltaMessage(content=text or None)
    reasoning, content = splitter.feed(text)
    if finished:
        more = splitter.finish()
        reasoning, content = reasoning + more[0], content + more[1]
    return DeltaMessage(content=content or None, reasoning=reasoning or None, reasoning_content=reasoning or None)


async def _stream(req: ChatCompletionRequest, raw: Request, streams, choices: list[ChoiceState],
                  strings: TokenStrings, model: str, prompt_tokens: int,
                  splitters: list[ReasoningSplitter | None]) -> AsyncIterator[str]:
    cid, created = random_id("chatcmpl"), int(time.time())

    # with include_usage every chunk has a usage field, null until the last (OpenAI's stream)
    keep = frozenset({"usage"}) if req.stream_options is not None and req.stream_options.include_usage else frozenset()

    # with continuous_usage_stats too (vLLM's), every chunk's usage counts the tokens so far
    continuous = bool(keep) and req.stream_options.continuous_usage_stats

    def chunk(out: list[ChatStreamChoice], usage: Usage | None = None) -> str:
        if usage is None and continuous:
            done = sum(len(c.token_ids) for c in choices)
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)
        return sse(ChatCompletionChunk(id=cid, created=created, model=model, choices=out, usage=usage), keep)

    yield chunk([ChatStreamChoice(index=k, delta=DeltaMessage(role="assistant", content=""))
                 for k in range(len(choices))])
    try:
        async with aclosing(merged(streams, raw)) as deltas_of:
            async for _, deltas in deltas_of:
                out = []
                for d in deltas:
                    c = choices[d.index]
                    seen = len(c.logprobs)
                    delta = _delta(c.add(d), splitters[d.index], d.finish_reason is not None)
                    lp = chat_logprobs(c.since(seen), strings) if req.logprobs and d.token_ids else None
                    ids = d.token_ids if req.return_token_ids else None
                    if delta.content or delta.reasoning or lp is not None or d.finish_reason is not None or ids:
                        out.append(ChatStreamChoice(index=d.index, delta=delta,
                                                    logprobs=lp, finish_reason=d.finish_reason,
                                                    token_ids=ids))
                if out:
                    yield chunk(out)
        if req.stream_options is not None and req.stream_options.include_usage:
            completion_tokens = sum(len(c.token_ids) for c in choices)
            yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=prompt_tokens + completion_tokens))
    except APIError as e:  # the engine stopped mid-stream: say so in the stream
        yield sse(error_body(e.status, e.message, None, e.code))
    yield DONE
