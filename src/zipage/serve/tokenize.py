"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's server's): the served model's tokenizer over HTTP.

``/tokenize`` takes a completions prompt (``prompt``, with ``add_special_tokens``, default true) or chat
``messages`` (through the chat template, as ``/v1/chat/completions`` renders them: ``add_generation_prompt``,
``continue_final_message``, ``chat_template_kwargs``) and answers ``{"count", "max_model_len", "tokens"}``,
with ``token_strs`` where ``return_token_strs`` asks. ``/detokenize`` takes ``tokens`` and answers
``{"prompt"}``. Both need the API key when the server has one.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field

from .chat import chat_prompt
from .completions import tokenize_all
from .errors import APIError
from .generation import ServeConfig, check_model, off_loop
from .protocol import ChatCompletionRequest, ChatMessage, OpenAIModel

MAX_TOKENS = 1 << 22  # ids one /detokenize request may send


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # (default: true for a prompt; false for messages, the template's own)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False
    # what the chat endpoint refuses, refused here too (a count without them would not be the chat's prompt)
    tools: list[Any] | None = None
    chat_template: Any = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_TOKENS)


class DetokenizeResponse(BaseModel):
    prompt: str


def _tokens(req: TokenizeRequest, tokenizer: Any) -> list[int]:
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt (a string) or messages (a chat), not both or neither",
                       param="prompt" if req.prompt is not None else "messages")
    if req.messages is not None:
        if not req.messages:
            raise APIError(400, "messages is empty", param="messages")
        chat = ChatCompletionRequest(messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                                     continue_final_message=req.continue_final_message,
                                     chat_template_kwargs=req.chat_template_kwargs, tools=req.tools,
                                     chat_template=req.chat_template)
        field = chat.unsupported()
        if field is not None:
            raise APIError(400, f"`{field}` is not supported by this server", param=field, code="unsupported")
        if not req.add_special_tokens:
            return chat_prompt(chat, tokenizer)
        # (vLLM's meaning: the rendered chat tokenized with the tokenizer's own special tokens added)
        return tokenize_all([chat_prompt(chat, tokenizer, tokenize=False)], tokenizer)[0]
    return tokenize_all([req.prompt], tokenizer, add_special_tokens=req.add_special_tokens is not False)[0]


async def tokenize(req: TokenizeRequest, raw: Request, config: ServeConfig) -> TokenizeResponse:
    check_model(config, req.model)
    tokenizer = config.tokenizer
    ids = await off_loop(raw, _tokens, req, tokenizer)
    strs = await off_loop(raw, tokenizer.convert_ids_to_tokens, ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=config.max_model_len, tokens=ids,
                            token_strs=list(strs) if strs is not None else None)


async def detokenize(req: DetokenizeRequest, raw: Request, config: ServeConfig) -> DetokenizeResponse:
    check_model(config, req.model)
    tokenizer = config.tokenizer
    vocab = len(tokenizer)
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    text = await off_loop(raw, tokenizer.decode, req.tokens)
    return DetokenizeResponse(prompt=text)
