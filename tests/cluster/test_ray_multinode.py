"""Two Ray nodes on this machine (``ray.cluster_utils.Cluster``): instances placed one per node,
a request whose rBlocks live on both nodes, its per-layer traffic on the ZeroMQ channel."""

from __future__ import annotations

import pytest

from cluster.helpers import assert_all_free, make_engine, run
from conftest import hf_greedy, loaded_model, random_prompts
from infinite_llm.sampling_params import SamplingParams

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_request_spread_over_two_nodes_is_exact(two_nodes) -> None:
    engine = make_engine(
        num_instances=2,
        num_blocks=16,
        block_size=8,
        budget=64,
        backend="ray",
        ray_address=two_nodes.address,
    )
    try:
        engine.cluster.defrag_interval_steps = 10**9  # keep the rBlocks where they were borrowed
        prompts = random_prompts(1, (180, 180), 256, seed=41)  # 180 + 40 tokens > 128 per pool
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        borrowed = []
        got = run(
            engine,
            prompts,
            params=params,
            homes=[0],
            on_step=lambda e, s: borrowed.append(e.cluster.stats()["instances"][0]["borrowed"]),
        )
        stats = engine.cluster.stats()
        nodes = stats["ray"]["nodes"]
        assert len(set(nodes.values())) == 2, f"one instance per node: {nodes}"
        assert max(borrowed) > 0, "the request should hold rBlocks on the other node"
        assert stats["ray"]["zmq_channels"] >= 1 and stats["remote_ma_calls"] > 0, stats["ray"]
        want = hf_greedy(loaded_model("tiny").model_dir, prompts[0], 40)
        assert got == [want]
        assert_all_free(engine)
    finally:
        engine.shutdown()
