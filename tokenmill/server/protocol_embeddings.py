"""Request and response shapes of the encoder endpoints (pydantic v2, strict like
``protocol``: unknown fields are a 400 naming them).

* ``POST /v1/embeddings``: OpenAI's (``input`` a string, strings, token ids or lists of
  token ids; ``encoding_format`` float | base64; ``dimensions``), plus vLLM's
  ``truncate_prompt_tokens`` and ``add_special_tokens``;
* ``POST /v1/score``: vLLM's (``text_1`` one text or a list, ``text_2`` one text or a list:
  one against each, or pairwise when both are lists of the same length);
* ``POST /rerank`` and ``/v1/rerank``: Jina's / Cohere's as vLLM serves them (``query``,
  ``documents`` as strings or ``{"text": ...}``, ``top_n``, ``return_documents``).

Counts are bounded by ``limits`` (``MAX_EMBEDDING_INPUTS``, ``MAX_SCORE_DOCUMENTS``);
empty inputs are refused here; token ids are checked against the vocabulary, and lengths
against the model, by the handlers.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenmill.server.limits import (
    INT32_MAX,
    MAX_EMBEDDING_INPUTS,
    MAX_NAME_CHARS,
    MAX_SCORE_DOCUMENTS,
)
from tokenmill.server.protocol import ModelCard

Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Truncate = Annotated[int | None, Field(ge=-1, le=INT32_MAX)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x)


def _check_text(text: str, what: str) -> str:
    if not text:
        raise ValueError(f"{what} may not be an empty string")
    return text


class EmbeddingRequest(_Strict):
    model: Name | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=INT32_MAX)
    user: str | None = None
    truncate_prompt_tokens: Truncate = None
    add_special_tokens: bool = True

    @field_validator("input", mode="plain",
                     json_schema_input_type=str | list[str] | list[int] | list[list[int]])
    @classmethod
    def _check_input(cls, v: Any) -> Any:
        ok = isinstance(v, str) or (isinstance(v, list) and v and (
            all(isinstance(p, str) for p in v) or _is_ids(v)
            or all(_is_ids(p) for p in v)))
        if isinstance(v, list) and not v:
            raise ValueError("input may not be an empty list")
        if not ok:
            raise ValueError("input must be a string, a list of strings, a list of token "
                             "ids or a list of non-empty token id lists")
        if isinstance(v, str):
            _check_text(v, "input")
        elif isinstance(v[0], str):
            for text in v:
                _check_text(text, "each input")
        if isinstance(v, list) and not isinstance(v[0], int) and len(v) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"a request may hold at most {MAX_EMBEDDING_INPUTS} inputs, "
                             f"got {len(v)}")
        return v

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list: texts or token id lists."""
        v = self.input
        return [v] if isinstance(v, str) or isinstance(v[0], int) else list(v)


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


Texts = Annotated[list[Annotated[str, Field(min_length=1)]],
                  Field(min_length=1, max_length=MAX_SCORE_DOCUMENTS)]
Text = Annotated[str, Field(min_length=1)]


class ScoreRequest(_Strict):
    model: Name | None = None
    text_1: Text | Texts
    text_2: Text | Texts
    truncate_prompt_tokens: Truncate = None

    def pairs(self) -> list[tuple[str, str]]:
        """(query, document) pairs: one against each, or pairwise for two equal lists."""
        a = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        b = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        if len(a) == 1:
            return [(a[0], d) for d in b]
        if len(a) != len(b):
            raise ValueError(f"text_1 has {len(a)} texts and text_2 {len(b)}: give one "
                             "text_1, or as many as text_2")
        return list(zip(a, b, strict=True))


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: EmbeddingUsage


class DocumentObject(_Strict):
    text: Text


class RerankRequest(_Strict):
    model: Name | None = None
    query: Text
    documents: Annotated[list[Text | DocumentObject],
                         Field(min_length=1, max_length=MAX_SCORE_DOCUMENTS)]
    top_n: int | None = Field(None, ge=1, le=INT32_MAX)
    return_documents: bool = True
    truncate_prompt_tokens: Truncate = None

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class TaskModelCard(ModelCard):
    """A ``/v1/models`` entry that says what the model is served for: ``generate``
    (completions, chat, responses) or ``embed`` (embeddings, score, rerank)."""

    task: Literal["generate", "embed"]


class TaskModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TaskModelCard]
