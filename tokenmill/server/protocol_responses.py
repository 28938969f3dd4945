"""Request and response shapes of OpenAI's Responses API (``/v1/responses``), pydantic v2.

Requests are strict like the other endpoints (an unknown field is a 400 naming it) and
bounded: at most ``MAX_INPUT_ITEMS`` input items and ``MAX_CONTENT_PARTS`` parts per
message; strings are bounded by the body size (``--max-request-body-bytes``), tools and
schemas by ``MAX_JSON_BYTES`` (``protocol_structured``).

Input items: messages (``role`` user / system / developer / assistant, content a string or
``input_text`` / ``output_text`` parts), ``function_call`` and ``function_call_output``,
and ``reasoning`` items (accepted so a client can send a response's output back as
input; their text is not shown to the model again, as chat templates drop old thoughts).
Fields that cannot change the output (``user``, ``metadata``, ``include``, ...) are
accepted; features that would and are not implemented (``background``, built-in tools,
``max_tool_calls``, ``top_logprobs``) are accepted only when "off".

The response objects mirror OpenAI's field for field; ``output`` holds ``reasoning``,
``message`` and ``function_call`` items.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator

from tokenmill.server.json_bounds import JsonObject, TemplateKwargs
from tokenmill.server.limits import MAX_NAME_CHARS, MAX_TOOLS
from tokenmill.server.protocol import Count, Metadata, Name, OpenAIBaseModel
from tokenmill.server.protocol_structured import FUNCTION_NAME

MAX_INPUT_ITEMS = 4096     # items in one request's input
MAX_CONTENT_PARTS = 256    # parts of one message


# ---- input items -------------------------------------------------------------------------


class InputText(OpenAIBaseModel):
    type: Literal["input_text", "output_text"]
    text: str
    # what an output_text part carries when a response's output is sent back: ignored
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class MessageItem(OpenAIBaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | Annotated[list[InputText], Field(max_length=MAX_CONTENT_PARTS)]
    id: Name | None = None
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class FunctionCallItem(OpenAIBaseModel):
    type: Literal["function_call"]
    call_id: Name
    name: str = Field(max_length=MAX_NAME_CHARS)
    arguments: str
    id: Name | None = None
    status: str | None = None


class FunctionCallOutputItem(OpenAIBaseModel):
    type: Literal["function_call_output"]
    call_id: Name
    output: str
    id: Name | None = None
    status: str | None = None


class ReasoningInputItem(OpenAIBaseModel):
    type: Literal["reasoning"]
    id: Name | None = None
    summary: list[Any] = Field(default_factory=list, max_length=MAX_CONTENT_PARTS)
    content: list[Any] | None = Field(None, max_length=MAX_CONTENT_PARTS)
    encrypted_content: str | None = None
    status: str | None = None


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(
        value, "type", "message")
    return kind if kind in ("function_call", "function_call_output", "reasoning") else "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningInputItem, Tag("reasoning")],
    Discriminator(_item_kind)]


# ---- tools, text format -------------------------------------------------------------------


class FunctionTool(OpenAIBaseModel):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class NamedFunctionChoice(OpenAIBaseModel):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class TextFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=FUNCTION_NAME)
    schema_: JsonObject | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(OpenAIBaseModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # cannot change the output


class ReasoningConfig(OpenAIBaseModel):
    """Accepted and ignored: a local model thinks as its template and weights make it."""

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(OpenAIBaseModel):
    model: Name | None = None
    # the list first, so that a bad item's error names its field
    input: Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS)] | str
    instructions: str | None = None
    max_output_tokens: Count = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: Name | None = None
    # accepted and ignored: they cannot change the output
    metadata: Metadata | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    include: list[str] | None = Field(None, max_length=16)
    reasoning: ReasoningConfig | None = None
    truncation: Literal["disabled"] | None = None
    # accepted only when "off"
    background: Literal[False] | None = None
    max_tool_calls: None = None
    top_logprobs: Literal[0] | None = None
    # vLLM's extra
    chat_template_kwargs: TemplateKwargs | None = None

    @field_validator("text")
    @classmethod
    def _schema_given(cls, v: TextConfig | None) -> TextConfig | None:
        fmt = v.format if v is not None else None
        if fmt is not None and fmt.type == "json_schema" and (fmt.schema_ is None
                                                               or fmt.name is None):
            raise ValueError("text.format of type json_schema needs 'name' and 'schema'")
        return v


# ---- response objects ---------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


Status = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Status
    content: list[OutputText]


class ReasoningItem(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: Status


class FunctionCallOutput(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Status


OutputItem = OutputMessage | ReasoningItem | FunctionCallOutput


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
