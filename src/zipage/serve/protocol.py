"""The OpenAI API's request and response bodies, field by field (pydantic models).

Requests accept the fields OpenAI's clients send. Fields of OpenAI's API or vLLM's server that
change what a request means and that zipage does not implement (tools and functions, structured
or guided outputs, beam search, prompt log-probabilities, ...) are refused with a 400 naming them
(``unsupported``) rather than silently ignored; other unknown fields are ignored, as vLLM's server
ignores them. vLLM's extra sampling fields (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ``stop_token_ids``, ``allowed_token_ids``,
``include_stop_str_in_output``, ``return_token_ids``) and zipage's ``budget`` come through the
client's ``extra_body``, as top-level fields.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_serializer, model_validator


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """``null`` for a field whose default is not null means the default (OpenAI's fields are nullable and its
        clients send ``null`` for an argument given as ``None``); fields whose default is null keep it (``budget``:
        null is full KV, left out the server's)."""
        if isinstance(data, dict):
            fields = cls.model_fields
            nulls = [k for k, v in data.items()
                     if v is None and k in fields and not fields[k].is_required() and fields[k].default is not None]
            if nulls:
                data = {k: v for k, v in data.items() if k not in nulls}
        return data


# ----------------------------------------------------------------------------- errors
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ----------------------------------------------------------------------------- models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "zipage"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- requests
class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # (vLLM's: with include_usage, every chunk carries the usage so far)


# Bounds on what one request may ask the engine thread to check at every token (a stop list of thousands held
# the engine, and every other request with it, for minutes)
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 16384  # characters of all the stop strings together
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # tokens a request may bias
MAX_ALLOWED_TOKEN_IDS = 1 << 18  # tokens a request may allow (more than any vocabulary)


class SamplingFields(OpenAIModel):
    """What both endpoints share: OpenAI's sampling fields, vLLM's extras and zipage's budget."""

    model: str | None = None
    n: int = Field(default=1, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)  # {"token id": bias}
    allowed_token_ids: list[StrictInt] | None = Field(default=None, max_length=MAX_ALLOWED_TOKEN_IDS)  # vLLM's
    # vLLM's extra sampling fields
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
        chars = len(value) if isinstance(value, str) else sum(len(s) for s in value or ())
        if chars > MAX_STOP_CHARS:
            raise ValueError(f"at most {MAX_STOP_CHARS} characters of stop strings in all, got {chars}")
        return value
    return_token_ids: bool = False
    # zipage: tokens of KV kept per sample after a compression; null for full KV; absent: the server's
    budget: int | None = Field(default=None, ge=1)
    # fields of OpenAI's API or vLLM's server that zipage does not implement: refused when set
    use_beam_search: Any = None
    prompt_logprobs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    logits_processors: Any = None
    bad_words: Any = None

    UNIMPLEMENTED: ClassVar[tuple[str, ...]] = (
        "use_beam_search", "prompt_logprobs", "guided_json", "guided_regex", "guided_choice",
        "guided_grammar", "structured_outputs", "logits_processors", "bad_words")

    def unsupported(self) -> str | None:
        """The first field set to something zipage does not implement (left out, null, false or empty: unset)."""
        for name in self.UNIMPLEMENTED:
            value = getattr(self, name, None)
            if value is None or value is False or (isinstance(value, (str, list, dict)) and not value):
                continue  # (0 is set: prompt_logprobs=0 asks for the prompt's own log-probabilities)
            return name
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            return "response_format"
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return super().unsupported()


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # an earlier answer's thinking, as --reasoning-parser returned it (templates such as Qwen3's render it)
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # (as vLLM's server joins text parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    # vLLM's: the last message is left open and the answer continues it (with add_generation_prompt: false)
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more variables for the template (enable_thinking)

    functions: Any = None
    function_call: Any = None
    prediction: Any = None
    audio: Any = None
    chat_template: Any = None  # (vLLM's: a template given by the request; refused, as vLLM does by default)
    echo: Any = None  # (vLLM's: the last message repeated in the answer)

    UNIMPLEMENTED: ClassVar[tuple[str, ...]] = SamplingFields.UNIMPLEMENTED + (
        "functions", "prediction", "audio", "chat_template", "echo")

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.function_call not in (None, "none"):
            return "function_call"
        if self.tool_choice not in (None, "none"):
            return "tool_choice"
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            return "response_format"
        return super().unsupported()


# ----------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # return_token_ids


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    prompt_token_ids: list[list[int]] | None = None  # return_token_ids: one list per prompt


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    # --reasoning-parser: the thinking (reasoning_content: the same, under the name older clients read); left out
    # of the JSON where null, so a server without a parser answers as before
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _leave_out_null_thinking(self, handler):
        out = handler(self)
        for key in ("reasoning", "reasoning_content"):
            if out.get(key, "") is None:
                del out[key]
        return out


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
