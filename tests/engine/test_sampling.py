"""SamplingParams validation, the sampler's logits processing, and seeded sampling."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.engine.model_runner import sampling_metadata
from tokenmill.engine.sampler import Sampler
from tokenmill.engine.sequence import Sequence


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("max_tokens", 0), ("min_tokens", -1), ("logprobs", 21),
    ("prompt_logprobs", -1), ("stop", [""]), ("stop_token_ids", [-3]),
    ("logit_bias", {5: 200.0}),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=2)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value", [
    ("top_k", 10**20), ("top_k", 2**31), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("n", 129), ("n", True), ("n", 2.0), ("temperature", NAN), ("temperature", INF),
    ("top_p", NAN), ("min_p", NAN), ("presence_penalty", NAN), ("frequency_penalty", INF),
    ("repetition_penalty", NAN), ("max_tokens", 2**63), ("min_tokens", 2**63),
    ("logprobs", True), ("prompt_logprobs", 2**70), ("stop_token_ids", [2**63]),
    ("stop_token_ids", list(range(1025))), ("stop_token_ids", "12"),
    ("logit_bias", {2**63: 1.0}), ("logit_bias", {INF: 1.0}), ("logit_bias", {1: NAN}),
    ("logit_bias", {"1e400": 1.0}), ("logit_bias", dict.fromkeys(range(1025), 1.0)),
    ("stop", ["x"] * 65), ("stop", ["x" * 1025]), ("stop", ["x" * 1000] * 17), ("stop", 5),
])
def test_every_value_fits_what_it_becomes(field, value):
    """A value a tensor, a generator or a loop cannot take is a ValueError naming the
    field, whatever the temperature (top_k=1e20 once killed the engine thread)."""
    for temperature in (0.0, 1.0):
        kwargs = {"temperature": temperature, field: value}
        with pytest.raises(ValueError, match=field.split("_")[0]):
            SamplingParams(**kwargs)


def test_the_largest_accepted_values_work():
    p = SamplingParams(top_k=2**31 - 1, seed=2**63 - 1, n=128, logprobs=20,
                       stop=["x" * 1024] * 16, logit_bias=dict.fromkeys(range(1024), 1.0))
    assert p.top_k == 2**31 - 1 and p.seed == 2**63 - 1
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(logit_bias={"7": 2}).logit_bias == {7: 2.0}


def test_top_k_above_the_vocabulary_is_clamped_when_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(vocab_size=4, seed=3)
    p = SamplingParams(temperature=1.0, top_k=2**31 - 1)
    assert sampler(logits, batch([request(p)])).token_ids[0] in range(4)
    p.top_k = 10**20  # past validation: the sampler still builds no tensor from it
    assert sampler(logits, batch([request(p)])).token_ids[0] in range(4)


def batch(seqs: list[Sequence]):
    """The sampler's view of these sequences, as the model runner builds it."""
    return sampling_metadata(seqs)


def request(params: SamplingParams, prompt=(1, 2, 3), output=()) -> Sequence:
    r = Sequence("r", list(prompt), params, eos_token_ids=frozenset({0}))
    r.output_token_ids = list(output)
    return r


def test_processing_bias_min_tokens_and_penalties():
    sampler = Sampler(vocab_size=6)
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0, 0.0]])
    greedy = SamplingParams(temperature=0)
    assert sampler(logits, batch([request(greedy)])).token_ids == [4]
    biased = SamplingParams(temperature=0, logit_bias={2: 10.0})
    assert sampler(logits, batch([request(biased)])).token_ids == [2]
    # EOS (0) is the argmax but banned until min_tokens are out.
    eos_first = torch.tensor([[9.0, 2.0, -1.0, 0.5, 3.0, 0.0]])
    assert sampler(eos_first, batch([request(SamplingParams(temperature=0, min_tokens=2),
                                             output=[3])])).token_ids == [4]
    assert sampler(eos_first, batch([request(SamplingParams(temperature=0, min_tokens=1),
                                             output=[3])])).token_ids == [0]
    # repetition penalty: seen tokens' positive logits divided, negative multiplied
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    processed = sampler._process(logits.clone(), batch([request(p, prompt=[4, 2])]).rows)
    assert processed[0, 4].item() == 1.5 and processed[0, 2].item() == -2.0
    assert processed[0, 1].item() == 2.0
    # frequency and presence penalties count the output only
    p = SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.25)
    processed = sampler._process(logits.clone(),
                                 batch([request(p, prompt=[1], output=[4, 4, 3])]).rows)
    assert processed[0, 4].item() == pytest.approx(3.0 - 1.0 - 0.25)
    assert processed[0, 3].item() == pytest.approx(0.5 - 0.5 - 0.25)
    assert processed[0, 1].item() == 2.0


def test_random_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    probs = torch.softmax(logits[0] / 0.8, -1)
    sampler = Sampler(vocab_size=4, seed=1)
    params = SamplingParams(temperature=0.8)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts[sampler(logits, batch([request(params)])).token_ids[0]] += 1
    assert torch.allclose(counts / n, probs, atol=0.03)


def test_top_k_top_p_min_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(vocab_size=4, seed=2)

    def seen(params):
        return {sampler(logits, batch([request(params)])).token_ids[0] for _ in range(300)}

    assert seen(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert seen(SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}
    assert seen(SamplingParams(temperature=1.0, top_p=0.1)) == {0}
    assert seen(SamplingParams(temperature=1.0, min_p=0.5)) == {0, 1}


def test_logprobs_have_ranks_and_the_chosen_token():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    params = SamplingParams(temperature=0, logprobs=2, logit_bias={3: 50})
    out = Sampler(vocab_size=4)(logits, batch([request(params)]))
    entry = out.logprobs[0]
    lsm = torch.log_softmax(logits[0], -1)
    assert out.token_ids == [3]
    assert entry[3].rank == 4 and math.isclose(entry[3].logprob, lsm[3].item(), rel_tol=1e-6)
    assert entry[2].rank == 1 and entry[1].rank == 2 and 0 not in entry


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return LLM(tiny_model_dir("qwen2"), skip_tokenizer_init=True, kv_cache_memory="8MiB",
               show_progress=False)


def test_seed_gives_the_same_tokens_whatever_the_batch(tiny_llm):
    prompts = random_prompts(6, 512, seed=11, min_len=3, max_len=40)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=20,
                            ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    alone = tiny_llm.generate([prompts[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = tiny_llm.generate(prompts, [seeded] + [other] * 5, use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone
    again = tiny_llm.generate([prompts[3], prompts[0]], [other, seeded], use_tqdm=False)
    assert again[1].outputs[0].token_ids == alone


def test_n_completions_stop_token_ids_and_length(tiny_llm):
    prompt = random_prompts(1, 512, seed=5, min_len=10, max_len=10)[0]
    out = tiny_llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7,
                                                     max_tokens=12, ignore_eos=True),
                            use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                        ignore_eos=True), use_tqdm=False)
    tokens = greedy[0].outputs[0].token_ids
    stop_at = tokens[4]
    first = tokens.index(stop_at)
    stopped = tiny_llm.generate([prompt], SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at]),
        use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == tokens[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at


def test_prompt_logprobs_match_transformers(tiny_llm, tiny_model_dir):
    import transformers as tf

    prompt = random_prompts(1, 512, seed=9, min_len=30, max_len=30)[0]
    # chunk the prompt across steps too
    llm = LLM(tiny_model_dir("qwen2"), skip_tokenizer_init=True, kv_cache_memory="8MiB",
              max_num_batched_tokens=8, show_progress=False)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3),
                       use_tqdm=False)[0]
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"), dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert prompt[pos] in entry
        assert len([t for t, lp in entry.items() if lp.rank <= 3]) == 3
        for tok, lp in entry.items():
            assert abs(lp.logprob - ref[pos - 1, tok].item()) < 1e-3


def test_n_sequences_share_the_big_fields(tiny_llm):
    """n sequences are shallow copies: logit_bias, its tensors, stop strings and stop ids
    exist once per request (a deep copy per sequence cost 753 MiB for 2 x 128)."""
    bias = dict.fromkeys(range(500), 0.5)
    params = SamplingParams(n=8, seed=7, temperature=1.0, logit_bias=bias,
                            stop_token_ids=list(range(400, 500)))
    seqs = tiny_llm.engine.make_request([1, 2, 3], params).sequences
    first = seqs[0]
    for s in seqs[1:]:
        assert s.sampling_params.logit_bias is first.sampling_params.logit_bias
        assert s.logit_bias[0] is first.logit_bias[0] and s.logit_bias[1] is first.logit_bias[1]
        assert s.sampling_params.stop_token_ids is first.sampling_params.stop_token_ids
    assert [s.sampling_params.seed for s in seqs] == list(range(7, 15))
    assert all(s.sampling_params.n == 1 for s in seqs)
    assert params.n == 8 and params.seed == 7  # the caller's params are untouched
    assert first.logit_bias[0].tolist() == list(range(500))
