"""OpenAI-compatible request and response shapes (pydantic v2).

Requests are strict: a field we do not know is a 400 naming it (``extra="forbid"``), so a
typo or an unsupported feature is never silently ignored. Three kinds of fields exist:

* supported: OpenAI's sampling fields and vLLM's extras (top_k, min_p, ...), checked
  here for type and range and turned into ``SamplingParams`` by ``sampling_kwargs()``;
* accepted and ignored: fields the official client or frameworks send that cannot
  change the output (``user``, ``store``, ``metadata``, ``service_tier``, ...);
* declared but refused: OpenAI features that would change the output and that we do
  not implement (``functions``, ``audio``, ...). They are accepted only with a value that
  means "off"; anything else is a 400 naming them.

Structured outputs (``response_format``, ``structured_outputs``, ``guided_*``) and tools
have their shapes in ``protocol_structured.py``.

Every count, length and integer is bounded (``limits``: OpenAI's limits where it has them,
ranges the engine's tensors hold for the rest), floats must be finite, and assistant
``tool_calls`` have OpenAI's shape; the schema (``/openapi.json``) states the bounds.

Responses mirror OpenAI's objects field for field, plus vLLM's ``stop_reason`` (the stop
string or token id that ended a choice) and ``prompt_logprobs``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from tokenmill.server.json_bounds import TemplateKwargs, json_problem
from tokenmill.server.limits import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_JSON_DEPTH,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_NAME_CHARS,
    MAX_PRIORITY,
    MAX_PROMPTS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOOL_CALLS,
    METADATA_KEY_CHARS,
    METADATA_PAIRS,
    METADATA_VALUE_CHARS,
)
from tokenmill.server.protocol_structured import (
    DeltaToolCall,
    NamedToolChoice,
    StructuredFields,
    ToolCall,
    Tools,
)
from tokenmill.tokenizer.tokenizer import RESERVED_TEMPLATE_VARIABLES

Penalty = Annotated[float | None, Field(ge=-2.0, le=2.0)]
TopN = Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Count = Annotated[int | None, Field(ge=1, le=INT32_MAX)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)]
LogitBias = Annotated[dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]],
                      Field(max_length=MAX_LOGIT_BIAS,
                            json_schema_extra={"propertyNames": {"pattern": "^[0-9]{1,10}$"}})]
Metadata = Annotated[dict[Annotated[str, Field(max_length=METADATA_KEY_CHARS)],
                          Annotated[str, Field(max_length=METADATA_VALUE_CHARS)]],
                     Field(max_length=METADATA_PAIRS)]
TokenIds = Annotated[list[int], Field(min_length=1)]  # range-checked against the vocabulary
PromptField = (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
               | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])

# Field name -> test that its value means "feature off"; any other value is refused.
_OFF_VALUES: dict[str, Any] = {
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "verbosity": lambda v: v is None,
    "suffix": lambda v: not v,
}


def _no_reserved_kwargs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    reserved = sorted(RESERVED_TEMPLATE_VARIABLES & set(value or {}))
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {reserved}: the server sets "
                         "them (use the request's own fields)")
    return value


def _refuse_unless_off(value: Any, info: ValidationInfo) -> Any:
    try:
        off = bool(_OFF_VALUES[info.field_name](value))
    except Exception:  # a value of a shape nobody sends for "off"
        off = False
    if not off:
        shown = repr(value)
        shown = shown if len(shown) <= 100 else shown[:100] + "..."
        raise ValueError(f"'{info.field_name}' is not supported by this server "
                         f"(got {shown}); remove it from the request")
    return value


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # padding against side channels: ignored


class SamplingRequest(StructuredFields, OpenAIBaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Name | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: Count = None
    stop: Stop | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX - MAX_N)
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: LogitBias | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # ignored
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    # scheduling priority (lower runs first); non-zero only with --allow-request-priority
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: TopN = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams fields common to both endpoints (OpenAI defaults: temperature
        and top_p 1.0). Logprobs and max_tokens are endpoint-specific."""
        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return dict(
            n=self.n, temperature=pick(self.temperature, 1.0), top_p=pick(self.top_p, 1.0),
            top_k=pick(self.top_k, 0), min_p=pick(self.min_p, 0.0),
            presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0), seed=self.seed,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logit_bias=self.logit_bias,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            prompt_logprobs=self.prompt_logprobs)


# ---- /v1/completions ---------------------------------------------------------------


class CompletionRequest(SamplingRequest):
    # a string, strings, token ids or lists of token ids (at most MAX_PROMPTS prompts)
    prompt: PromptField
    echo: bool = False
    logprobs: TopN = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None

    _check_off = field_validator("suffix")(_refuse_unless_off)

    @field_validator("prompt", mode="plain", json_schema_input_type=PromptField)
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x)

        ok = isinstance(v, str) or (isinstance(v, list) and v and (
            all(isinstance(p, str) for p in v) or is_ids(v)
            or all(is_ids(p) for p in v)))
        if not ok:
            raise ValueError("prompt must be a string, a non-empty list of strings, a "
                             "non-empty list of token ids or a list of non-empty token id "
                             "lists")
        if isinstance(v, list) and not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"a request may hold at most {MAX_PROMPTS} prompts, got {len(v)}")
        return v

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of different from n is not supported; remove best_of")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, one entry per prompt."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionResponse(BaseModel):
    """A whole completion, and also the shape of each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions ----------------------------------------------------------


class AssistantFunctionCall(OpenAIBaseModel):
    name: str = Field(max_length=MAX_NAME_CHARS)
    # OpenAI sends the arguments as JSON text; an object is accepted too
    arguments: str | dict[str, Any] = ""

    @field_validator("arguments")
    @classmethod
    def _bounded_nesting(cls, v: str | dict[str, Any]) -> str | dict[str, Any]:
        """Templates get the arguments as an object (``tool_calling.prompt``): JSON text
        nested too deeply to parse safely is refused here."""
        if isinstance(v, str):
            try:
                parsed = json.loads(v)
            except RecursionError:
                raise ValueError(f"the arguments are nested more than {MAX_JSON_DEPTH} "
                                 "levels deep") from None
            except ValueError:
                return v  # not JSON: passed on as text
            problem = json_problem(parsed)
            if problem is not None:
                raise ValueError(f"the arguments {problem[1]}")
        return v


class AssistantToolCall(OpenAIBaseModel):
    """A call an earlier assistant turn made (OpenAI's shape)."""

    id: Name | None = None
    type: Literal["function"] = "function"
    function: AssistantFunctionCall
    index: int | None = Field(None, ge=0, le=MAX_TOOL_CALLS)  # sent by some clients


class ChatMessage(OpenAIBaseModel):
    """One message. ``developer`` is OpenAI's new name for ``system``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: Name | None = None
    tool_call_id: Name | None = None
    tool_calls: Annotated[list[AssistantToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}; only 'text' parts "
                                     "are supported")
                if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise ValueError(f"content part {i} must be {{'type': 'text', "
                                     "'text': '...'}")
        return v

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a message with role '{self.role}' needs 'content' (only an "
                             "assistant message with tool_calls may omit it)")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template expects it: text parts joined by newlines."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content)
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content or ""}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                msg[key] = getattr(self, key)
        if self.tool_calls is not None:
            msg["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        return msg


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count = None
    logprobs: bool | None = False
    top_logprobs: TopN = None
    # accepted and ignored: they cannot change the output
    store: bool | None = None
    metadata: Metadata | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM extras
    add_generation_prompt: bool = True
    chat_template_kwargs: TemplateKwargs | None = None
    # tools: OpenAI function tools (tool_choice defaults to "auto" when tools are given)
    tools: Tools | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # refused unless "off"
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None

    _check_off = field_validator(
        "functions", "function_call", "audio", "modalities", "prediction",
        "reasoning_effort", "web_search_options", "verbosity")(_refuse_unless_off)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return v

    _no_reserved_kwargs = field_validator("chat_template_kwargs")(_no_reserved_kwargs)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    # the think block's text, with --reasoning-parser (vLLM's name for it)
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_when_present(self, handler) -> dict[str, Any]:
        out = handler(self)
        if not self.tool_calls:
            out.pop("tool_calls", None)
        if self.reasoning_content is None:
            out.pop("reasoning_content", None)
        return out


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None


class DeltaMessage(BaseModel):
    """A streamed piece of a message; unset fields are left out (``delta: {}`` ends)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer
    def _drop_unset(self) -> dict[str, Any]:
        out = {k: v for k, v in (("role", self.role), ("content", self.content),
                                 ("reasoning_content", self.reasoning_content))
               if v is not None}
        if self.tool_calls:
            out["tool_calls"] = [t.model_dump() for t in self.tool_calls]
        return out


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---- models, tokenize, detokenize ----------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenmill"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: Name | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: Name | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    chat_template_kwargs: TemplateKwargs | None = None
    tools: Tools | None = None
    return_token_strs: bool = False

    _no_reserved_kwargs = field_validator("chat_template_kwargs")(_no_reserved_kwargs)


def _tokenize_kind(value: Any) -> str:
    has_messages = "messages" in value if isinstance(value, dict) else hasattr(value,
                                                                              "messages")
    return "tokenize-chat" if has_messages else "tokenize-prompt"


# POST /tokenize takes either shape; "messages" decides which (the tags contain "-", so
# error paths leave them out: see errors._param_path)
TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("tokenize-prompt")]
    | Annotated[TokenizeChatRequest, Tag("tokenize-chat")],
    Discriminator(_tokenize_kind)]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: Name | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str
