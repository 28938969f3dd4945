"""Speculative decoding is lossless: greedy tokens identical to speculation off (alone,
batched, with prefix-cache hits and preemption), seeded sampled tokens identical, the
unseeded token distribution unchanged, and no KV block leaked."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_prompts
from tests.engine.test_invariance import run_engine  # also checks no block is leaked
from tokenmill import LLM, SamplingParams
from tokenmill.config import SpeculativeConfig

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
SUFFIX = {"method": "suffix", "num_speculative_tokens": 6}


def make(path: str, spec: dict | None, **kw) -> LLM:
    kw.setdefault("kv_cache_memory", "4MiB")
    kw.setdefault("quantization", "q8_0")  # packed weights: the fused C decode path
    return LLM(path, skip_tokenizer_init=True, show_progress=False, speculative_config=spec,
               **kw)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    path = tiny_model_dir("llama")
    # each prompt repeats its own random text: proposals from it get accepted
    prompts = [p + p + p[:3] for p in random_prompts(32, 512, seed=5, min_len=4, max_len=20)]
    off = make(path, None)
    reference = [run_engine(off, [p])[0] for p in prompts]
    return path, prompts, reference


@pytest.mark.parametrize("spec", [NGRAM, SUFFIX], ids=["ngram", "suffix"])
def test_greedy_identical_alone_and_batched(setup, spec):
    path, prompts, reference = setup
    llm = make(path, spec)
    assert [run_engine(llm, [p])[0] for p in prompts[:6]] == reference[:6]
    assert run_engine(llm, prompts[:8]) == reference[:8]
    assert run_engine(llm, prompts) == reference  # 32, and cache hits from the above
    stats = llm.engine.spec.stats
    assert stats.num_accepted_tokens > 0
    assert stats.num_draft_tokens > stats.num_accepted_tokens  # rejections happened too
    assert llm.engine.block_manager.num_hit_tokens > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_identical_with_preemption(setup, method):
    path, prompts, reference = setup
    spec = NGRAM if method == "ngram" else {"method": "draft_model", "model": path,
                                            "num_speculative_tokens": 3}
    llm = make(path, spec, kv_cache_memory=8 * 16 * 512, max_model_len=96,
               max_num_batched_tokens=48)
    assert run_engine(llm, prompts) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.spec.stats.num_accepted_tokens > 0


def test_min_tokens_and_stop_tokens_identical(setup):
    """Rows of one step ban stop tokens by their own position's min_tokens count."""
    path, prompts, reference = setup
    common = max(set(t for r in reference for t in r[:12]),
                 key=lambda t: sum(r[:12].count(t) for r in reference))
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=6,
                            stop_token_ids=[common])
    outs = [run_engine(make(path, spec), prompts[:16], params) for spec in (None, NGRAM)]
    assert outs[0] == outs[1]
    assert any(len(o) < 24 for o in outs[0]) and any(common in o[:6] for o in reference[:16])


def test_seeded_sampling_identical(setup):
    path, prompts, _ = setup
    params = [SamplingParams(temperature=0.2, top_p=0.9, max_tokens=20, ignore_eos=True,
                             seed=s, logprobs=2) for s in range(4)]
    outs = {}
    for spec in (None, NGRAM):
        engine = make(path, spec).engine
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:4], params, strict=True)]
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    o = out.outputs[0]
                    done[out.request_id] = (o.token_ids, [sorted(e.items()) for e in o.logprobs])
        outs[spec is None] = [done[i] for i in ids]
        if spec is not None:
            assert engine.spec.stats.num_accepted_tokens > 0
    assert outs[True] == outs[False]


def test_unseeded_distribution_matches(setup):
    """Tokens sampled after a repeated prompt, with and without speculation (different
    engine seeds): the total-variation distance of the empirical distributions of the
    4th token is small, and speculation did accept proposals on the way."""
    path, prompts, _ = setup
    prompt = prompts[3]
    n = 300
    params = SamplingParams(temperature=0.15, max_tokens=5, ignore_eos=True)
    counts = []
    wide = {**NGRAM, "max_batch_rows": 10_000}  # no batch-size off-switch
    for spec, seed in ((None, 11), (wide, 12)):
        llm = make(path, spec, seed=seed)
        outs = run_engine(llm, [prompt] * n, params)
        counts.append(torch.bincount(torch.tensor([o[3] for o in outs]), minlength=512))
        if spec is not None:
            assert llm.engine.spec.stats.num_accepted_tokens > 0
    p, q = (c.float() / n for c in counts)
    tv = 0.5 * (p - q).abs().sum().item()
    assert tv < 0.15


def test_config_errors():
    assert SpeculativeConfig.parse(None) is None
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}')
    assert cfg.num_speculative_tokens == 3
    for bad, words in (("{", "valid JSON"), ({"method": "eagle"}, "method"),
                       ({"method": "ngram"}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, ">= 1"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "x": 1}, "unknown"),
                       ({"method": "ngram", "num_speculative_tokens": 2,
                         "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "exceed")):
        with pytest.raises(ValueError, match=words):
            SpeculativeConfig.parse(bad)


@pytest.mark.parametrize("arch", ["llama", "qwen2"], ids=["same-model", "other-model"])
def test_draft_model_greedy_identical(setup, tiny_model_dir, arch):
    """A draft that is the target itself (everything accepted) or another tiny model with
    the same vocabulary (mostly rejected): the same tokens, and the draft's own pool
    freed at the end."""
    path, prompts, reference = setup
    spec = {"method": "draft_model", "model": tiny_model_dir(arch),
            "num_speculative_tokens": 3}
    llm = make(path, spec)
    assert run_engine(llm, prompts[:8]) == reference[:8]
    stats = llm.engine.spec.stats
    assert stats.num_draft_tokens > 0
    if arch == "llama":
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    draft = llm.engine.spec.proposer.blocks
    assert draft.num_free_blocks == draft.pool.num_blocks


def test_draft_with_another_vocabulary_is_refused(setup, tmp_path):
    import transformers as tf

    from tests.conftest import TINY

    tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**TINY, "vocab_size": 300})
                                        ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocabulary"):
        make(setup[0], {"method": "draft_model", "model": str(tmp_path),
                        "num_speculative_tokens": 2})
