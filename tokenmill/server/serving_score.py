"""``POST /v1/score`` (vLLM's shape) and ``POST /rerank`` / ``/v1/rerank`` (Jina's and
Cohere's) for an encoder served with ``--task embed``.

A cross-encoder (``BertForSequenceClassification``) reads each (query, document) pair as
one input ``[CLS] query [SEP] document [SEP]`` and its classifier head gives the score
(``EmbeddingEngine.classify``); a bi-encoder embeds every distinct text once and scores a
pair by the cosine similarity of its two vectors. Rerank returns the documents sorted by
score, best first, cut to ``top_n``, each with its index in the request (and its text
when ``return_documents``).
"""

from __future__ import annotations

import torch

from tokenmill.server.errors import invalid_request
from tokenmill.server.protocol_embeddings import (
    EmbeddingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from tokenmill.server.serving_embeddings import EncoderContext, request_id


class ScoreHandler:
    def __init__(self, ctx: EncoderContext) -> None:
        self.ctx = ctx

    async def _scores(self, pairs: list[tuple[str, str]], truncate: int | None,
                      param: str) -> tuple[list[float], int]:
        """One score per pair, and the tokens read."""
        ctx, engine = self.ctx, self.ctx.engine.engine
        if engine.is_cross_encoder:
            try:
                items = [engine.tokenize_pair(a, b) for a, b in pairs]
            except (ValueError, TypeError) as e:
                raise invalid_request(f"Invalid value for '{param}': {e}", param) from e
            items = ctx.fit(items, truncate, param)
            scores = await ctx.engine.run("classify", items)
            return scores.tolist(), sum(len(x.ids) for x in items)
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        items = ctx.fit(await ctx.tokenize(texts, param), truncate, param)
        vectors = torch.nn.functional.normalize(await ctx.engine.run("embed", items), dim=-1)
        at = {t: i for i, t in enumerate(texts)}
        scores = [float(vectors[at[a]] @ vectors[at[b]]) for a, b in pairs]
        return scores, sum(len(x.ids) for x in items)

    async def score(self, body: ScoreRequest) -> ScoreResponse:
        self.ctx.check_model(body.model)
        try:
            pairs = body.pairs()
        except ValueError as e:
            raise invalid_request(str(e), "text_1") from None
        scores, tokens = await self._scores(pairs, body.truncate_prompt_tokens, "text_2")
        return ScoreResponse(
            id=request_id("score"), model=self.ctx.model_name,
            data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    async def rerank(self, body: RerankRequest) -> RerankResponse:
        self.ctx.check_model(body.model)
        docs = body.texts()
        scores, tokens = await self._scores([(body.query, d) for d in docs],
                                            body.truncate_prompt_tokens, "documents")
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:body.top_n]
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document=RerankDocument(text=docs[i])
                                if body.return_documents else None) for i in order]
        return RerankResponse(id=request_id("rerank"), model=self.ctx.model_name,
                              usage=RerankUsage(total_tokens=tokens), results=results)
