"""What a request may be: prompts as strings, token ids, tensors or arrays; checked by name."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ..config import ZipageConfig
from .sampling import ENGINE_BUDGET, SamplingParams


def is_array(x: Any) -> bool:
    """A torch tensor or a numpy array (numpy is not imported for the check)."""
    return isinstance(x, torch.Tensor) or (hasattr(x, "ndim") and hasattr(x, "shape") and hasattr(x, "tolist")
                                          and hasattr(x, "dtype"))


def is_token(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


PROMPT_KEYS = ("prompt", "prompt_token_ids")  # vLLM's TextPrompt and TokensPrompt


def as_prompt_list(prompts: Any) -> list[Any]:
    """``generate()``'s prompts as a list: one prompt (a string, token ids, a 1-D tensor, a ``{"prompt": ...}``
    or ``{"prompt_token_ids": ...}`` dict) or many."""
    if isinstance(prompts, (str, Mapping)) or (is_array(prompts) and prompts.ndim <= 1) or (
        isinstance(prompts, (list, tuple)) and prompts and is_token(prompts[0])
    ):
        return [prompts]
    try:
        return list(prompts)
    except TypeError:
        raise TypeError(f"generate() takes a prompt or a list of prompts, got prompts={prompts!r:.80} "
                        f"({type(prompts).__name__})") from None


def unwrap_prompt(prompt: Any) -> Any:
    """A ``{"prompt": text}`` or ``{"prompt_token_ids": ids}`` dict (vLLM's prompt dicts) as its text or ids."""
    if not isinstance(prompt, Mapping):
        return prompt
    keys = [k for k in prompt if k in PROMPT_KEYS]
    other = sorted(str(k) for k in prompt if k not in PROMPT_KEYS)
    if len(keys) != 1 or other:
        hint = " (chat messages: pass the user's text with chat=True)" if "content" in prompt else ""
        raise TypeError(f"a prompt dict holds exactly one of {list(PROMPT_KEYS)}, got keys {sorted(map(str, prompt))}"
                        f"{hint}")
    value = prompt[keys[0]]
    if keys[0] == "prompt" and not isinstance(value, str):
        raise TypeError(f"a prompt dict's 'prompt' is a string, got {type(value).__name__}")
    if keys[0] == "prompt_token_ids" and isinstance(value, str):
        raise TypeError("a prompt dict's 'prompt_token_ids' is a list of token ids, got a string")
    return value


def tokenize(tokenizer: Any, prompt: Any, chat: bool) -> tuple[list[int], str | None]:
    """Token ids of a prompt, and its text when it was a string."""
    prompt = unwrap_prompt(prompt)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer: LLM(model, tokenizer) or pass token ids")
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(prompt)["input_ids"]
        return [int(t) for t in ids], prompt
    if chat:
        raise ValueError("chat=True applies the chat template to a string prompt; this prompt is not a string "
                         f"({type(prompt).__name__}): apply the template yourself, or pass the text")
    if is_array(prompt):  # a torch tensor or a numpy array of token ids
        if prompt.ndim != 1:
            raise TypeError(f"a tensor prompt must be 1-D token ids, got prompt of shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)):
        for i, t in enumerate(prompt):
            if not is_token(t):
                raise TypeError(f"prompt token ids must be ints, got prompt[{i}]={t!r} ({type(t).__name__})")
        return [int(t) for t in prompt], None
    raise TypeError(f"a prompt is a string or a list of token ids, "
                    f"got prompt={prompt!r:.80} ({type(prompt).__name__})")


def chat_conversations(messages: Any) -> list[list[Mapping]]:
    """``LLM.chat``'s messages as a list of conversations: one conversation (a list of ``{"role", "content"}``
    dicts) or a list of them. Every message is checked here, each error naming where it is."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError("chat() takes a conversation (a non-empty list of {'role': ..., 'content': ...} dicts) or a "
                        f"list of conversations, got messages={messages!r:.80}")
    conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
    for c, conv in enumerate(conversations):
        if isinstance(conv, (str, Mapping)) or not isinstance(conv, (list, tuple)) or not conv:
            raise TypeError(f"chat() conversation {c} must be a non-empty list of message dicts, got {conv!r:.80}")
        for m, msg in enumerate(conv):
            where = f"chat() conversation {c}, message {m}"
            if not isinstance(msg, Mapping):
                raise TypeError(f"{where} must be a dict with 'role' and 'content', got {msg!r:.80}")
            if not isinstance(msg.get("role"), str):
                raise TypeError(f"{where} needs a string 'role' (system, user, assistant, ...), got {msg!r:.80}")
            if "content" not in msg:
                raise TypeError(f"{where} has no 'content': {msg!r:.80}")
    return [[_text_message(msg, f"chat() conversation {c}, message {m}") for m, msg in enumerate(conv)]
            for c, conv in enumerate(conversations)]


def _text_message(msg: Mapping, where: str) -> Mapping:
    """A message whose content is a list of OpenAI-style parts (``{"type": "text", "text": ...}``) as one whose
    content is their text joined by newlines, as the server does; other part types are refused (text only)."""
    content = msg["content"]
    if not isinstance(content, (list, tuple)):
        return msg
    texts = []
    for i, part in enumerate(content):
        if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise TypeError(f"{where}: content part {i} is {kind!r}; only text parts "
                            "({'type': 'text', 'text': ...}) are taken")
        texts.append(part["text"])
    return {**msg, "content": "\n".join(texts)}


def render_chat(tokenizer: Any, conversation: list[Mapping], add_generation_prompt: bool, chat_template: str | None,
                template_kwargs: dict) -> tuple[list[int], str]:
    """A conversation through the tokenizer's chat template: its token ids and its text (the ids are the text's
    encoding without special tokens added, as the template writes them itself)."""
    if tokenizer is None:
        raise ValueError("chat() needs a tokenizer: LLM(model, tokenizer)")
    taken = sorted({"tokenize", "add_generation_prompt", "conversation", "chat_template", "return_dict"}
                   & set(template_kwargs))
    if taken:
        raise ValueError(f"chat_template_kwargs {taken}: chat() sets these itself (add_generation_prompt and "
                         "chat_template are chat()'s own arguments)")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template: pass chat_template=..., or use generate()")
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, chat_template=chat_template, **template_kwargs)
    except Exception as e:  # a template that refuses these messages (roles out of order, ...)
        raise ValueError(f"the chat template refused the messages: {e}") from e
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(t) for t in ids], text


def check_request(ids: list[int], params: Any, request_id: Any, *, vocab: int, max_model_len: int,
                  has_tokenizer: bool) -> None:
    """Refuse a request before it touches the engine; every error names what is wrong."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    params.validate()
    if request_id is not None and not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, got request_id={request_id!r} ({type(request_id).__name__})")
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer")
    if not ids:
        raise ValueError("the prompt is empty")
    outside = [t for t in ids if not 0 <= t < vocab]
    if outside:
        raise ValueError(f"prompt token ids must lie in 0..{vocab - 1}, got {outside[0]} "
                         f"at position {ids.index(outside[0])}")
    outside = [t for t in params.stop_token_ids if t >= vocab]
    if outside:
        raise ValueError(f"SamplingParams.stop_token_ids={params.stop_token_ids!r} is invalid: "
                         f"token id {outside[0]} is outside the vocabulary 0..{vocab - 1}")
    outside = [t for t in params.allowed_token_ids or () if t >= vocab]
    if outside:
        raise ValueError(f"SamplingParams.allowed_token_ids is invalid: token id {outside[0]} is outside the "
                         f"vocabulary 0..{vocab - 1}")
    outside = [t for t in params.logit_bias or () if t >= vocab]
    if outside:
        raise ValueError(f"SamplingParams.logit_bias is invalid: token id {outside[0]} is outside the vocabulary "
                         f"0..{vocab - 1}")
    if len(ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {max_model_len}")
    if params.logprobs is not None and params.logprobs > vocab:
        raise ValueError(f"SamplingParams.logprobs={params.logprobs} is invalid: the vocabulary has {vocab} tokens")


def resolve_budget(params: SamplingParams, config: ZipageConfig | None) -> int | None:
    """A request's KV budget: its own (``None``: full KV) or, by default, the engine's.

    An engine built with ``budget=None`` has no compression machinery (query slots, scorer), so
    it serves full KV only: a request asking for a budget is refused rather than silently
    served in full."""
    budget = params.budget
    if budget is ENGINE_BUDGET:
        return config.budget if config is not None else None
    if budget is None:
        return None
    if config is None:
        raise ValueError(f"SamplingParams.budget={budget} is invalid: this engine was built with budget=None "
                         "(full KV) and cannot compress; build it with LLM(budget=B) to serve per-request "
                         "budgets (budget=None, full KV, is accepted)")
    low = config.kept_last + config.sinks
    if budget < low:
        what = "window" if config.kept_last == config.window else "exact_tail - 1"
        raise ValueError(f"SamplingParams.budget={budget} is invalid: must be >= {what} + sinks = {low} "
                         "(the tokens a compression always keeps)")
    return int(budget)
