"""nomic-embed-text-v1.5 (F16 GGUF, fetched by the project's recipe) against a reference
written here in plain torch from the file's weights as read by gguf-py (not tokenmill's
reader): the nomic-bert forward (token-type embeddings, LayerNorm, rotary NeoX attention
with base 1000, SwiGLU, post-LayerNorm), mean pooling and normalization, one input at a
time; ours runs them batched with mixed lengths. Cosine >= 0.9999 for every input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenmill.engine.embedding_engine import EmbeddingEngine, EmbeddingEngineConfig
from tokenmill.loader.pypi_models import fetch

pytestmark = pytest.mark.slow

TEXTS = ["search_query: What is TSNE?",
         "search_document: t-distributed stochastic neighbor embedding (t-SNE) is a "
         "statistical method for visualizing high-dimensional data. " * 4,
         "search_document: Ünïcödé café — 東京 🙂",
         "search_document: The cat sat on the mat."]


class Reference:
    """nomic-bert in plain torch, one sequence at a time, float32."""

    def __init__(self, path: str) -> None:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        self.w = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(
            [int(d) for d in reversed(t.shape.tolist())]) for t in reader.tensors}

        def field(name):
            f = reader.fields[name]
            return f.parts[f.data[0]][0].item()

        self.layers = int(field("nomic-bert.block_count"))
        self.heads = int(field("nomic-bert.attention.head_count"))
        self.eps = float(field("nomic-bert.attention.layer_norm_epsilon"))
        self.base = float(field("nomic-bert.rope.freq_base"))

    def ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"],
                            self.eps)

    def rope(self, x):  # x [H, L, D]: rotate-half form
        d = x.shape[-1]
        inv = 1.0 / self.base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv[None]
        cos, sin = ang.cos().float(), ang.sin().float()
        a, b = x[..., :d // 2], x[..., d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def embed(self, ids: list[int]) -> torch.Tensor:
        w = self.w
        x = w["token_embd.weight"][ids] + w["token_types.weight"][0]
        x = self.ln(x, "token_embd_norm")
        n, h = x.shape
        hd = h // self.heads
        for i in range(self.layers):
            p = f"blk.{i}."
            q, k, v = (x @ w[p + "attn_qkv.weight"].T).split(h, dim=-1)
            q, k, v = (t.view(n, self.heads, hd).transpose(0, 1) for t in (q, k, v))
            q, k = self.rope(q), self.rope(k)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1) @ v
            x = self.ln(x + att.transpose(0, 1).reshape(n, h) @ w[p + "attn_output.weight"].T,
                        p + "attn_output_norm")
            ff = F.silu(x @ w[p + "ffn_gate.weight"].T) * (x @ w[p + "ffn_up.weight"].T)
            x = self.ln(x + ff @ w[p + "ffn_down.weight"].T, p + "layer_output_norm")
        return F.normalize(x.mean(0), dim=-1)


@pytest.fixture(scope="module")
def nomic():
    path = str(fetch("nomic-embed-text-v1.5-f16"))
    return EmbeddingEngine(EmbeddingEngineConfig(path, max_num_batched_tokens=512)), path


def test_matches_a_plain_torch_reference(nomic):
    engine, path = nomic
    assert engine.pooling.mode == "mean" and engine.pooling.matryoshka
    items = engine.fit([engine.tokenize(t) for t in TEXTS], None)
    ours = engine.embed(items)
    ref = Reference(path)
    with torch.inference_mode():
        want = torch.stack([ref.embed(list(x.ids)) for x in items])
    cos = F.cosine_similarity(ours, want)
    assert cos.min() >= 0.9999, cos
    # and the model means something: the t-SNE query is nearest the t-SNE document
    assert int((ours[1:] @ ours[0]).argmax()) == 0
    half = engine.embed(items, dimensions=256)
    assert torch.allclose(half, F.normalize(ours[:, :256], dim=-1), atol=1e-6)


def test_gguf_wordpiece_matches_bert_uncased(nomic):
    """The GGUF's WordPiece vocabulary is bert-base-uncased's, as all-MiniLM's
    tokenizer.json is: the two tokenizers agree."""
    from tokenizers import Tokenizer

    engine, _ = nomic
    ref = Tokenizer.from_file(str(fetch("all-minilm-l6-v2") / "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    for text in TEXTS:
        assert list(engine.tokenize(text).ids) == ref.encode(text).ids, text


def test_quantized_at_load(nomic):
    """--quantization q8_0 on the F16 GGUF: the layer matrices packed, close to float
    (not a parity test: a bound on what 8-bit weights and activations cost)."""
    from tokenmill.gguf.quantize import Q8_0
    from tokenmill.layers.quantization import packable

    if not packable(Q8_0):
        pytest.skip("no packed CPU kernels on this machine")
    engine, path = nomic
    q8 = EmbeddingEngine(EmbeddingEngineConfig(path, quantization="q8_0"))
    assert q8.model.blk[0].attn_qkv.packed is not None
    items = engine.fit([engine.tokenize(t) for t in TEXTS[:1] + TEXTS[2:]], None)
    # activations are rounded to 8 bits too (as llama.cpp does): ~0.9985 over 12 layers
    assert F.cosine_similarity(engine.embed(items), q8.embed(items)).min() >= 0.998
