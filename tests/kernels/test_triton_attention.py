"""The Triton attention kernels against the torch reference backend, on the CPU under
Triton's interpreter (``TRITON_INTERPRET=1``): mixed prefill/decode batches, chunks after
cached context, block boundaries, grouped-query attention, split-K decode with empty
splits. On a machine with CUDA the same cases also run compiled on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from tokenmill.engine.model_runner import ModelRunner  # noqa: E402
from tokenmill.engine.scheduler_output import ScheduledSequence, SchedulerOutput  # noqa: E402
from tokenmill.engine.sequence import Sequence  # noqa: E402
from tokenmill.layers.attention import TorchSDPABackend  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def interpreted():
    """The kernel module, interpreted on the CPU (conftest sets TRITON_INTERPRET)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not set (a GPU machine: see the compiled tests)")
    import tokenmill.layers.attention.triton as module

    return module


def make_step(specs, block_size, num_blocks, seed):
    """A step like the engine builds: one request per (context_len, new_tokens) spec, its
    blocks scattered over the pool; returns the runner's inputs and metadata."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    scheduled = []
    for i, (context, new) in enumerate(specs):
        total = context + new
        req = Sequence(f"r{i}", list(range(1, total + 1)), SamplingParams(max_tokens=1))
        req.block_ids = [free.pop() for _ in range(-(-total // block_size))]
        req.num_computed_tokens = context
        scheduled.append(ScheduledSequence(req, new))
    runner = ModelRunner.__new__(ModelRunner)
    runner.block_size, runner.device = block_size, "cpu"
    inp = runner.prepare(SchedulerOutput(scheduled=scheduled))
    return inp.positions, inp.attention


def check(module, specs, heads, kv_heads, dim, block_size=16, dtype=torch.float32,
          device="cpu", splits=None, seed=0, atol=2e-5, window=None):
    num_blocks = 64
    positions, meta = make_step(specs, block_size, num_blocks, seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = positions.numel()

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q = rand(t, heads, dim)
    qkv = rand(t, (heads + 2 * kv_heads) * dim)  # k, v as strided views, as in the model
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(t, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim:].view(t, kv_heads, dim)
    k_cache = rand(num_blocks * block_size, kv_heads, dim)
    v_cache = rand(num_blocks * block_size, kv_heads, dim)
    scale = dim ** -0.5

    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    want = TorchSDPABackend().forward(q, k, v, ref_k, ref_v, meta, scale, window=window)

    def on(x):
        return x.to(device)

    q_d, k_d, v_d = on(q), on(k), on(v)
    kc, vc = on(k_cache), on(v_cache)
    meta.slot_mapping = on(meta.slot_mapping)
    module.store_kv(k_d, v_d, kc, vc, meta.slot_mapping)
    assert torch.equal(kc.cpu(), ref_k) and torch.equal(vc.cpu(), ref_v)
    got = torch.empty_like(q_d)
    if meta.prefills:
        module.prefill_attention(q_d, kc, vc, got, meta, scale, window)
    if meta.num_decodes:
        module.decode_attention(q_d, kc, vc, got, meta, scale, splits=splits, window=window)
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=atol, rtol=atol)


MIXED = [(0, 37), (20, 9), (0, 1), (15, 1), (16, 1), (49, 1), (3, 16)]


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2), (6, 1)])
def test_mixed_batch_matches_reference(interpreted, heads, kv_heads):
    check(interpreted, MIXED, heads, kv_heads, dim=32)


@pytest.mark.parametrize("window,splits", [(5, None), (16, 4), (40, 2)])
def test_sliding_window_matches_reference(interpreted, window, splits):
    """Windows shorter than a block, one block, and most of the context: whole blocks
    skipped, splits over only the reachable blocks, tiles whose rows see disjoint keys."""
    check(interpreted, MIXED, 4, 2, dim=32, window=window, splits=splits)


def test_head_dim_not_a_power_of_two(interpreted):
    check(interpreted, [(5, 20), (30, 1)], heads=2, kv_heads=1, dim=24)


@pytest.mark.parametrize("splits", [1, 4, 16])
def test_split_k_decode_including_empty_splits(interpreted, splits):
    # 17 tokens are 2 blocks: with 4 or 16 splits most splits are empty
    check(interpreted, [(16, 1), (299, 1), (0, 1), (63, 1)], heads=4, kv_heads=2, dim=16,
          splits=splits)


def test_block_size_32_and_long_chunks(interpreted):
    check(interpreted, [(0, 70), (64, 40), (100, 1)], heads=2, kv_heads=2, dim=16,
          block_size=32)


def test_split_count_follows_context(interpreted):
    assert interpreted.num_splits(1) == 1
    assert interpreted.num_splits(257) == 2
    assert interpreted.num_splits(10**6) == interpreted.MAX_SPLITS


def test_padding_slots_are_skipped(interpreted):
    k = torch.randn(3, 2, 16)
    kc, vc = torch.zeros(8, 2, 16), torch.zeros(8, 2, 16)
    interpreted.store_kv(k, k, kc, vc, torch.tensor([5, -1, 0]))
    assert torch.equal(kc[5], k[0]) and torch.equal(kc[0], k[2])
    assert kc[1:5].abs().sum() == 0 and kc[6:].abs().sum() == 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_compiled_on_the_gpu(dtype, atol):
    import tokenmill.layers.attention.triton as compiled

    check(compiled, MIXED, heads=8, kv_heads=2, dim=64, dtype=dtype, device="cuda",
          atol=atol)
    check(compiled, [(3000, 1), (40, 1)], heads=8, kv_heads=2, dim=128, dtype=dtype,
          device="cuda", atol=atol)


def test_whole_model_greedy_tokens_with_the_triton_backend(interpreted, tiny_model_dir):
    """A tiny Llama through the engine with every layer on the Triton backend (chunked
    prefill, decodes, preemption-free): the same greedy tokens as the reference."""
    from tests.conftest import random_prompts
    from tokenmill import LLM

    prompts = random_prompts(4, 512, seed=9, min_len=5, max_len=40)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(backend):
        llm = LLM(tiny_model_dir("llama"), skip_tokenizer_init=True, kv_cache_memory="2MiB",
                  max_num_batched_tokens=32, show_progress=False)
        if backend is not None:
            for layer in llm.engine.runner.model.model.layers:
                layer.self_attn.backend = backend
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert run(interpreted.TritonAttentionBackend()) == run(TorchSDPABackend())
