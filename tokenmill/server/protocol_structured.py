"""Request and response shapes for structured outputs and tool calls (OpenAI's and vLLM's).

Constraints can come in four spellings, at most one per request:

* OpenAI's ``response_format``: ``{"type": "text" | "json_object"}`` or
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``
  (also vLLM's ``{"type": "structural_tag", "format": {...}}``);
* vLLM's ``structured_outputs`` object (``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``, ``structural_tag``, ``disable_any_whitespace``), plus our
  ``max_whitespace`` (the bound on consecutive whitespace inside JSON);
* vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``;
* on chat, ``tools`` with ``tool_choice`` ``required`` or a named function.

Schemas, grammars, regexes, structural tags and tool definitions are each bounded to
``MAX_JSON_BYTES`` (64 KiB) of JSON or text (``limits``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_serializer,
    model_validator,
)

from tokenmill.server.json_bounds import JsonObject, JsonText, bounded_json
from tokenmill.server.limits import (
    MAX_CHOICES,
    MAX_JSON_BYTES,
    MAX_STOP_CHARS,
    MAX_TOOLS,
    MAX_WHITESPACE,
)

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
Choices = Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]],
                    Field(max_length=MAX_CHOICES)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class JsonSchemaSpec(_Strict):
    name: str = Field("response", pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=MAX_JSON_BYTES)
    schema_: JsonObject = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaSpec | None = None
    format: JsonObject | None = None  # structural_tag

    @model_validator(mode="after")
    def _spec_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs 'json_schema': "
                             "{'name': ..., 'schema': {...}}")
        if self.type == "structural_tag" and self.format is None:
            raise ValueError("response_format of type structural_tag needs 'format'")
        return self


class StructuredOutputsRequest(_Strict):
    json_: JsonText | JsonObject | None = Field(None, alias="json")
    regex: JsonText | None = None
    choice: Choices | None = None
    grammar: JsonText | None = None
    json_object: bool | None = None
    structural_tag: JsonText | JsonObject | None = None
    disable_any_whitespace: bool = False
    max_whitespace: int | None = Field(None, ge=1, le=MAX_WHITESPACE)
    # vLLM fields that do not change anything here
    disable_fallback: bool | None = None
    disable_additional_properties: bool | None = None
    backend: Literal["auto", "xgrammar"] | None = None


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=MAX_JSON_BYTES)
    parameters: JsonObject | None = None
    strict: bool | None = None


class ChatTool(_Strict):
    """One tool; its definition is at most MAX_JSON_BYTES of JSON."""

    type: Literal["function"] = "function"
    function: FunctionDefinition

    @model_validator(mode="after")
    def _bounded(self) -> ChatTool:
        bounded_json().func(self.model_dump(exclude_none=True))
        return self


Tools = Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)]


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


# ---- responses ---------------------------------------------------------------------------


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer
    def _drop_unset(self) -> dict[str, Any]:
        return {k: v for k, v in (("name", self.name), ("arguments", self.arguments))
                if v is not None}


class DeltaToolCall(BaseModel):
    """A streamed piece of a tool call: the first names it (with its id), the rest add
    argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer
    def _drop_unset(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"], out["type"] = self.id, "function"
        out["function"] = self.function.model_dump()
        return out


class StructuredFields(BaseModel):
    """The constraint fields, shared by /v1/completions and /v1/chat/completions."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: JsonText | JsonObject | None = None
    guided_regex: JsonText | None = None
    guided_choice: Choices | None = None
    guided_grammar: JsonText | None = None
    guided_decoding_backend: Literal["auto", "xgrammar"] | None = None
    guided_whitespace_pattern: None = None  # not supported: any value is refused
