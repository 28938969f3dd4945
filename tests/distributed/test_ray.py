"""``--distributed-executor-backend ray``: two replicas as Ray actors on a local cluster of
two one-CPU nodes (``ray.cluster_utils.Cluster``), one per node, serving through the
``DataParallelEngine`` interface. Skipped where Ray is not installed (``tokenmill[ray]``)."""

from __future__ import annotations

import asyncio

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from tokenmill.replicas.dp_engine import DataParallelEngine  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def test_replicas_are_ray_actors_on_both_nodes(cluster):
    engine = DataParallelEngine.from_flags(
        data_parallel_size=2, distributed_executor_backend="ray",
        kv_cache_memory="16MiB", max_model_len=256)

    async def go():
        engine.start()
        params = SamplingParams(max_tokens=4, temperature=0.0)

        async def one(i: int):
            last = None
            async for out in engine.generate(engine.tokenizer.encode(f"{i} Hello there"),
                                             params, f"r{i}"):
                last = out
            return last

        outs = await asyncio.gather(*(one(i) for i in range(4)))
        await asyncio.sleep(0.6)  # replicas report stats every 0.2 s
        stats = engine.replica_stats()
        await engine.shutdown(timeout=5)
        return outs, stats

    try:
        nodes = {r.node_id for r in engine.replicas}
        assert len(nodes) == 2, "each replica on its own node"
        outs, stats = asyncio.run(go())
    finally:
        for r in engine.replicas:
            r.stop(timeout=2)
    assert all(o.finished and len(o.outputs[0].token_ids) == 4 for o in outs)
    assert all(s.prefix_cache_queries > 0 for _, s in stats), stats
