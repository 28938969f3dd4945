"""The encoder endpoints end to end on one real ``tokenmill serve`` of a tiny random BERT
embedder: ``/v1/embeddings`` through the OpenAI client (float and base64 agree, against
the offline engine), ``/v1/score``, ``/rerank`` and ``/v1/rerank``, ``/v1/models`` naming
the task, and a clean 400 in OpenAI's shape for every bad input."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

from tests.embeddings.tiny import tiny_bert
from tests.server.fixture import error_of, names, post, running_server
from tokenmill.engine.embedding_engine import EmbeddingEngine, EmbeddingEngineConfig

NAME = "tiny-embed"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-embed"))
    tiny_bert(folder, max_positions=32)
    with running_server(folder, "--served-model-name", NAME) as server:
        yield server, EmbeddingEngine(EmbeddingEngineConfig(folder))


@pytest.fixture(scope="module")
def client(served):
    server, _ = served
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def test_embeddings_through_the_openai_client(served, client):
    _, engine = served
    texts = ["the cat sat on the mat", "dog", "what color is the sky"]
    got = client.embeddings.create(model=NAME, input=texts)
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == NAME
    vectors = np.array([d.embedding for d in got.data])
    want = engine.embed(engine.fit([engine.tokenize(t) for t in texts], None)).numpy()
    assert np.allclose(vectors, want, atol=1e-5)
    tokens = sum(len(engine.tokenize(t).ids) for t in texts)
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
    # the client asks for base64 by default when none is given and decodes it itself;
    # here the raw base64 strings are decoded by hand
    raw = post(served[0], "/v1/embeddings", {"model": NAME, "input": texts,
                                            "encoding_format": "base64"}).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                        for d in raw["data"]])
    assert np.array_equal(decoded, vectors.astype("<f4"))
    ids = [list(engine.tokenize(t).ids) for t in texts]
    by_ids = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    assert np.allclose([d.embedding for d in by_ids.data], vectors, atol=1e-6)
    one = client.embeddings.create(model=NAME, input=ids[1], encoding_format="float")
    assert np.allclose(one.data[0].embedding, vectors[1], atol=1e-6)


def test_score_and_rerank(served):
    server, engine = served
    docs = ["the dog sat", "fish swims in the sea", "the cat sat on the mat"]
    vec = engine.embed(engine.fit([engine.tokenize(t) for t in ["cat on a mat", *docs]],
                                  None)).numpy()
    cos = vec[1:] @ vec[0]
    r = post(server, "/v1/score", {"model": NAME, "text_1": "cat on a mat", "text_2": docs})
    assert r.status_code == 200, r.text
    assert np.allclose([d["score"] for d in r.json()["data"]], cos, atol=1e-5)
    order = list(np.argsort(-cos))
    for path in ("/rerank", "/v1/rerank"):
        r = post(server, path, {"model": NAME, "query": "cat on a mat", "top_n": 2,
                                "documents": [docs[0], {"text": docs[1]}, docs[2]]})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == order[:2]
        assert results[0]["document"]["text"] == docs[order[0]]
        assert results[0]["relevance_score"] == pytest.approx(cos[order[0]], abs=1e-5)
    r = post(server, "/rerank", {"query": "cat", "documents": docs,
                                 "return_documents": False})
    assert all(x["document"] is None for x in r.json()["results"])


def test_models_say_what_they_do(served, client):
    assert [m.to_dict()["task"] for m in client.models.list().data] == ["embed"]
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user",
                                                              "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model=NAME, prompt="hi")


BAD = [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["dog", ""]}, "input"),
    ({"input": [[1, 2, 10**6]]}, "input"),
    ({"input": [-1, 3]}, "input"),
    ({"input": "the cat sat on the mat " * 10}, "input"),  # 62 tokens, the model takes 32
    ({"input": "dog", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "dog", "dimensions": 8}, "dimensions"),
    ({"input": "dog", "dimensions": 0}, "dimensions"),
    ({"input": ["dog"] * 2049}, "input"),
    ({"input": "dog", "colour": 1}, "colour"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p + str(i) for i, (_, p) in enumerate(BAD)])
def test_bad_embedding_inputs_are_400s(served, body, param):
    err = error_of(post(served[0], "/v1/embeddings", {"model": NAME, **body}), 400)
    assert names(err, param), err


def test_too_long_names_the_limit_and_truncation_works(served):
    server, _ = served
    long = "the cat sat on the mat " * 10
    err = error_of(post(server, "/v1/embeddings", {"input": long}), 400)
    assert "32" in err["message"] and err["code"] == "context_length_exceeded"
    r = post(server, "/v1/embeddings", {"input": long, "truncate_prompt_tokens": 32})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 32


def test_bad_score_and_rerank_inputs_are_400s(served):
    server, _ = served
    cases = [("/rerank", {"query": "cat", "documents": ["d"] * 10_000}, "documents"),
             ("/rerank", {"query": "cat", "documents": []}, "documents"),
             ("/rerank", {"query": "", "documents": ["d"]}, "query"),
             ("/rerank", {"query": "cat", "documents": ["d"], "top_n": 0}, "top_n"),
             ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_1"),
             ("/v1/score", {"text_1": "a", "text_2": []}, "text_2")]
    for path, body, param in cases:
        err = error_of(post(server, path, body), 400)
        assert names(err, param), (path, body, err)
    err = error_of(post(server, "/v1/embeddings", {"model": "other", "input": "x"}), 404)
    assert err["code"] == "model_not_found"


def test_bench_serve_embeddings(served, capsys):
    """``tokenmill bench serve --endpoint embeddings`` against the shared server."""
    from tokenmill.cli import main

    server, _ = served
    assert main(["bench", "serve", "--endpoint", "embeddings", "--base-url", server.base_url,
                 "--num-prompts", "10", "--input-len", "2", "--embed-batch", "4",
                 "--max-concurrency", "2"]) == 0
    out = capsys.readouterr().out
    assert "inputs/s" in out and "(3 requests)" in out
    tokens = float(out.split("tokens/s")[1].split()[0])
    assert tokens > 0
