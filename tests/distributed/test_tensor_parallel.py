"""The model sharded over two torch.distributed (gloo) ranks gives TP=1's greedy tokens.

Each rank is a spawned process that joins a gloo group and runs the same offline
generation (``LLM.generate``, same prompts in the same order): the layers load their
rank's heads and MLP columns, the row-parallel layers all-reduce, and every rank's
scheduler takes the same decisions, so the ranks step in lockstep. This checks the
sharding and the all-reduces; serving with ``--tensor-parallel-size`` is not built.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import socket

from tokenmill.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 42, 7, 8, 250], [300, 2, 11], list(range(40, 70))]
PARAMS = dict(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)


def _generate(model_dir: str):
    from tokenmill.entrypoints.llm import LLM

    llm = LLM(model_dir, skip_tokenizer_init=True, kv_cache_memory="4MiB",
              show_progress=False)
    attn = llm.engine.runner.model.model.layers[0].self_attn
    # this rank's share: the KV cache holds as many heads as the layer
    assert llm.engine.model_config.num_kv_heads == attn.num_kv_heads
    outs = llm.generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False)
    return attn.num_heads, [(o.outputs[0].token_ids,
             [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids,
                                             strict=True)]) for o in outs]


def _rank_main(rank: int, world: int, port: int, model_dir: str) -> None:
    """A rank in a spawned process (rank 0 is the test's own process)."""
    import torch

    torch.set_num_threads(1)
    with _group(rank, world, port):
        _generate(model_dir)


@contextlib.contextmanager
def _group(rank: int, world: int, port: int):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_matches_tp1(tiny_model_dir):
    from tokenmill.distributed import tp_size

    model_dir = tiny_model_dir("llama")  # 4 query heads, 2 KV heads, MLP 128
    reference = _generate(model_dir)
    port = _free_port()
    peer = mp.get_context("spawn").Process(target=_rank_main, args=(1, 2, port, model_dir))
    peer.start()
    try:
        with _group(0, 2, port):
            assert tp_size() == 2
            sharded = _generate(model_dir)
    finally:
        peer.join(60)
    assert peer.exitcode == 0
    assert tp_size() == 1
    assert reference[0] == 4 and sharded[0] == 2  # query heads on this rank
    for (ref_ids, ref_lp), (ids, lp) in zip(reference[1], sharded[1], strict=True):
        assert ids == ref_ids
        assert max(abs(a - b) for a, b in zip(lp, ref_lp, strict=True)) < 1e-4
