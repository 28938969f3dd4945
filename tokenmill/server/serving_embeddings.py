"""``POST /v1/embeddings`` for an encoder served with ``--task embed``.

A request's inputs are tokenized off the event loop (texts) or checked against the
vocabulary (token ids), checked against the model's length (a 400 naming the limit, or
truncated when ``truncate_prompt_tokens`` asks), then handed to the encoder worker
(``AsyncEmbeddingEngine``), which runs them with whatever other requests are queued.
Vectors are pooled and normalized as the model's own config says; ``dimensions`` keeps
the first features and normalizes again, for Matryoshka models only (a 400 for others).
``base64`` is the float32 little-endian bytes, as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from dataclasses import dataclass

import numpy as np

from tokenmill.engine.embedding_engine import (
    AsyncEmbeddingEngine,
    EncoderInput,
    InputTooLongError,
)
from tokenmill.engine.pooling import finish
from tokenmill.server.errors import APIError, invalid_request, model_not_found
from tokenmill.server.protocol_embeddings import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)


def input_too_long(e: InputTooLongError, param: str) -> APIError:
    return APIError(400, f"This model's maximum input length is {e.limit} tokens, but "
                         f"{param}[{e.index}] has {e.length} tokens. Shorten it, or set "
                         "truncate_prompt_tokens to truncate it.", param=param,
                    code="context_length_exceeded")


@dataclass
class EncoderContext:
    """What the encoder handlers share: the worker, the served names."""

    engine: AsyncEmbeddingEngine
    model_names: list[str]

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise model_not_found(name)

    def fit(self, items: list[EncoderInput], truncate: int | None,
            param: str) -> list[EncoderInput]:
        try:
            return self.engine.engine.fit(items, truncate)
        except InputTooLongError as e:
            raise input_too_long(e, param) from None

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid_request(f"token id {bad} in '{param}' is outside the vocabulary "
                                  f"(0..{vocab - 1})", param)

    async def tokenize(self, texts: list[str], param: str,
                       add_special_tokens: bool = True) -> list[EncoderInput]:
        try:
            return await asyncio.to_thread(
                lambda: [self.engine.engine.tokenize(t, add_special_tokens) for t in texts])
        except ValueError as e:  # not valid Unicode
            raise invalid_request(f"Invalid value for '{param}': {e}", param) from e


class EmbeddingHandler:
    def __init__(self, ctx: EncoderContext) -> None:
        self.ctx = ctx

    async def create(self, body: EmbeddingRequest) -> EmbeddingResponse:
        ctx, engine = self.ctx, self.ctx.engine.engine
        ctx.check_model(body.model)
        if body.dimensions is not None:
            if not engine.pooling.matryoshka:
                raise invalid_request(f"This model ({engine.architecture}) does not support "
                                      "'dimensions': its vectors cannot be shortened.",
                                      "dimensions")
            if body.dimensions > engine.hidden_size:
                raise invalid_request(f"'dimensions' must be at most {engine.hidden_size} "
                                      "for this model.", "dimensions")
        raw = body.inputs()
        items: list[EncoderInput] = []
        if isinstance(raw[0], str):
            items = await ctx.tokenize(raw, "input", body.add_special_tokens)
            if not all(x.ids for x in items):
                raise invalid_request("An input has no tokens.", "input")
        else:
            for ids in raw:
                ctx.check_ids(ids, "input")
            items = [EncoderInput(tuple(ids)) for ids in raw]
        items = ctx.fit(items, body.truncate_prompt_tokens, "input")
        pooled = await ctx.engine.run("embed", items)
        vectors = finish(pooled, engine.pooling.normalize, body.dimensions).numpy()
        data = [EmbeddingData(index=i, embedding=_encode(v, body.encoding_format))
                for i, v in enumerate(vectors)]
        tokens = sum(len(x.ids) for x in items)
        return EmbeddingResponse(data=data, model=ctx.model_name,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
