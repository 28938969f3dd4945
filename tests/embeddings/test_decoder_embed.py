"""A decoder served as an embedder (``task="embed"``): a tiny random Llama against
transformers' final hidden state of each input's last token (normalized), batched with
mixed lengths; mean pooling on request through the folder's sentence-transformers config."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tests.embeddings.tiny import write_tokenizer
from tokenmill.entrypoints.llm import LLM

TEXTS = ["the cat sat on the mat", "dog", "what color is the sky? the sky is blue"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    vocab = write_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, initializer_range=0.2)
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def _hf_hidden(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_decoder_last_token_embeddings(tiny_llama):
    folder, ref = tiny_llama
    llm = LLM(folder, task="embed", show_progress=False)
    assert llm.embedder.pooling.mode == "last"
    outs = llm.embed(TEXTS)
    for out in outs:
        want = F.normalize(_hf_hidden(ref, out.prompt_token_ids)[-1], dim=-1)
        got = torch.tensor(out.outputs.embedding)
        assert F.cosine_similarity(got, want, dim=0) >= 0.9999
    assert F.cosine_similarity(torch.tensor(outs[0].outputs.embedding),
                               torch.tensor(outs[1].outputs.embedding), dim=0) < 0.999


def test_decoder_mean_pooling_from_the_folder(tiny_llama, tmp_path):
    folder, ref = tiny_llama
    for name in os.listdir(folder):
        os.symlink(os.path.join(folder, name), tmp_path / name)
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 1, "name": "1", "path": "1_Pooling",
          "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": True}))
    llm = LLM(str(tmp_path), task="embed", show_progress=False)
    assert llm.embedder.pooling.mode == "mean" and not llm.embedder.pooling.normalize
    out = llm.embed(TEXTS[0])[0]
    want = _hf_hidden(ref, out.prompt_token_ids).mean(0)
    assert torch.allclose(torch.tensor(out.outputs.embedding), want, atol=1e-5)


def test_a_generate_server_refuses_the_encoder_endpoints(tiny_llama):
    """Without --task embed a decoder is served for generation: /v1/embeddings, /v1/score
    and /rerank are 400s in OpenAI's shape, and /v1/models says "generate"."""
    import asyncio

    from fastapi.testclient import TestClient

    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.server.app import build_app

    engine = AsyncEngine.from_flags(model=tiny_llama[0], show_progress=False,
                                    kv_cache_memory="4MiB")
    try:
        client = TestClient(build_app(engine, ["tiny-llama"]))
        for path in ("/v1/embeddings", "/v1/score", "/rerank", "/v1/rerank"):
            r = client.post(path, json={"model": "tiny-llama", "input": "dog"})
            assert r.status_code == 400, (path, r.text)
            err = r.json()["error"]
            assert "--task embed" in err["message"] and err["type"] == "invalid_request_error"
        assert client.get("/v1/models").json()["data"][0]["task"] == "generate"
    finally:
        asyncio.run(engine.shutdown(timeout=10))
