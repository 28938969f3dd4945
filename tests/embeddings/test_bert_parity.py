"""tokenmill's BERT encoder against transformers on tiny random checkpoints: embeddings
(mean pooling, normalized, several length-sorted batches), the cross-encoder head, token
types, the length limit and truncation, and ``LLM.embed`` / ``LLM.score``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.embeddings.tiny import tiny_bert
from tokenmill.engine.embedding_engine import (
    EmbeddingEngine,
    EmbeddingEngineConfig,
    EncoderInput,
    InputTooLongError,
)
from tokenmill.entrypoints.llm import LLM

TEXTS = ["the cat sat on the mat", "dog", "what color is the sky? the sky is blue",
         "fish swims in the sea " * 5, "unknown ##thing zebra", "paris"]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-embedder"))
    return folder, tiny_bert(folder)


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-cross"))
    return folder, tiny_bert(folder, classifier=True, seed=1)


def _hf_mean(model, item: EncoderInput) -> torch.Tensor:
    with torch.no_grad():
        h = model(input_ids=torch.tensor([item.ids])).last_hidden_state[0]
    return F.normalize(h.mean(0), dim=-1)


def test_embeddings_match_transformers_across_batches(embedder):
    folder, ref = embedder
    # a budget of 40 tokens cuts the mixed lengths into several batches
    engine = EmbeddingEngine(EmbeddingEngineConfig(folder, max_num_batched_tokens=40))
    items = engine.fit([engine.tokenize(t) for t in TEXTS], None)
    assert len(engine._batches([len(x.ids) for x in items])) > 1
    ours = engine.embed(items)
    want = torch.stack([_hf_mean(ref, x) for x in items])
    cos = F.cosine_similarity(ours, want)
    assert cos.min() >= 0.9999, cos
    assert torch.allclose(ours, want, atol=1e-5)
    # the vectors differ per input (a constant output would also be "normalized")
    assert F.cosine_similarity(ours[0], ours[1], dim=0) < 0.999
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_length_limit_and_truncation(embedder):
    folder, _ = embedder
    engine = EmbeddingEngine(EmbeddingEngineConfig(folder, max_model_len=8))
    long = engine.tokenize("the cat sat on the mat in the sea")
    assert len(long.ids) > 8
    with pytest.raises(InputTooLongError, match="at most 8 tokens"):
        engine.fit([engine.tokenize("dog"), long], None)
    cut = engine.fit([long], 5)[0]
    assert cut.ids == long.ids[:4] + long.ids[-1:]
    assert len(engine.fit([long], -1)[0].ids) == 8


def test_cross_encoder_matches_transformers(cross):
    folder, ref = cross
    engine = EmbeddingEngine(EmbeddingEngineConfig(folder))
    assert engine.is_cross_encoder and engine.pooling.mode == "cls"
    pairs = [("what is the capital of france", "paris is the capital"),
             ("the cat sat", "fish swims in the sea"), ("sky", "blue sky"),
             ("where is the dog", "the dog sat on the mat")]
    items = [engine.tokenize_pair(a, b) for a, b in pairs]
    assert all(1 in x.token_types for x in items)
    with torch.no_grad():
        want = torch.tensor([ref(input_ids=torch.tensor([x.ids]),
                                 token_type_ids=torch.tensor([x.token_types])).logits[0, 0]
                             for x in items])
        ours = engine.model.classify(engine.pooled(items, "cls"))[:, 0]
    assert torch.allclose(ours, want, atol=1e-4), (ours, want)
    assert want.std() > 1e-3  # the pairs are told apart, so the check can fail
    assert torch.allclose(engine.classify(items), torch.sigmoid(want), atol=1e-4)
    scores = engine.score(pairs[0][0], [b for _, b in pairs])
    first = engine.classify([engine.tokenize_pair(pairs[0][0], b) for _, b in pairs])
    assert torch.allclose(scores, first)


def test_llm_embed_and_score(embedder, cross):
    folder, ref = embedder
    llm = LLM(folder, show_progress=False)
    outs = llm.embed(["dog", "the cat sat on the mat"])
    assert [o.prompt_token_ids for o in outs] == [
        list(llm.get_tokenizer().encode(t)) for t in ("dog", "the cat sat on the mat")]
    got = torch.tensor(outs[1].outputs.embedding)
    want = _hf_mean(ref, EncoderInput(tuple(outs[1].prompt_token_ids)))
    assert F.cosine_similarity(got, want, dim=0) >= 0.9999
    by_ids = llm.embed([outs[0].prompt_token_ids])[0].outputs.embedding
    assert torch.allclose(torch.tensor(by_ids), torch.tensor(outs[0].outputs.embedding))
    with pytest.raises(ValueError, match="dimensions"):
        llm.embed("dog", dimensions=8)
    cos = llm.score("dog", ["dog", "the cat sat on the mat"])
    assert cos[0].outputs.score == pytest.approx(1.0, abs=1e-5)
    assert cos[1].outputs.score == pytest.approx(float(got @ torch.tensor(
        outs[0].outputs.embedding)), abs=1e-5)
    ranker = LLM(cross[0], show_progress=False)
    scored = ranker.score("sky", ["blue sky", "the cat"])
    assert all(0 < s.outputs.score < 1 for s in scored)
    with pytest.raises(ValueError, match="is an encoder.*--task embed"):
        LLM(folder, task="generate", load_format="dummy", show_progress=False).embed("x")


def test_quantized_at_load_runs_on_packed_weights(embedder):
    from tokenmill.gguf.quantize import Q8_0
    from tokenmill.layers.quantization import packable

    if not packable(Q8_0):
        pytest.skip("no packed CPU kernels on this machine")
    folder, _ = embedder
    plain = EmbeddingEngine(EmbeddingEngineConfig(folder))
    q8 = EmbeddingEngine(EmbeddingEngineConfig(folder, quantization="q8_0"))
    layer = q8.model.layers[0]
    assert all(m.packed is not None for m in (layer.qkv, layer.attn_out, layer.up, layer.down))
    assert q8.model.embeddings.word_embeddings.packed is None
    items = plain.fit([plain.tokenize(t) for t in TEXTS], None)
    a, b = plain.embed(items), q8.embed(items)
    assert not torch.equal(a, b)
    assert F.cosine_similarity(a, b).min() >= 0.999


def test_the_server_worker_merges_requests_and_bounds_its_queue(embedder):
    import asyncio

    from tokenmill.engine.async_engine import QueueFullError
    from tokenmill.engine.embedding_engine import AsyncEmbeddingEngine

    engine = EmbeddingEngine(EmbeddingEngineConfig(embedder[0]))
    items = engine.fit([engine.tokenize(t) for t in TEXTS], None)
    alone = engine.pooled(items)
    worker = AsyncEmbeddingEngine(engine, max_queued_inputs=4)
    worker.start()

    async def main():
        got = await asyncio.gather(worker.run("embed", items[:1]),
                                   worker.run("embed", items[1:4]))
        with pytest.raises(QueueFullError):
            await worker.run("embed", items[:5])
        return got

    try:
        first, rest = asyncio.run(main())
    finally:
        worker.shutdown()
    assert torch.allclose(torch.cat([first, rest]), alone[:4], atol=1e-5)
    assert not worker.is_running


def test_rerank_by_the_cross_encoder_head_over_http(cross):
    """/rerank and /v1/score on a cross-encoder app (in process): the classifier's
    scores, sorted, top_n, and the documents' indices."""
    from fastapi.testclient import TestClient

    from tokenmill.engine.embedding_engine import AsyncEmbeddingEngine
    from tokenmill.server.app import build_embedding_app

    engine = EmbeddingEngine(EmbeddingEngineConfig(cross[0]))
    docs = ["paris is the capital", "the cat sat", "fish swims in the sea", "blue sky"]
    want = engine.classify([engine.tokenize_pair("capital of france", d) for d in docs])
    app = build_embedding_app(AsyncEmbeddingEngine(engine), ["ce"])
    with TestClient(app) as client:
        r = client.post("/rerank", json={"query": "capital of france", "documents": docs,
                                         "top_n": 3})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        order = want.argsort(descending=True)[:3].tolist()
        assert [x["index"] for x in results] == order
        assert [x["relevance_score"] for x in results] == pytest.approx(
            want[order].tolist(), abs=1e-5)
        r = client.post("/v1/score", json={"text_1": "capital of france", "text_2": docs})
        assert [d["score"] for d in r.json()["data"]] == pytest.approx(want.tolist(),
                                                                       abs=1e-5)
