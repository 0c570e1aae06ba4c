"""On CUDA, Ray gives each model instance's actor a GPU of its own: its bundle holds one and
its actor asks for it, so Ray sets the actor's ``CUDA_VISIBLE_DEVICES``; lenders (memory
instances, host pools) take none. Checked on a local Ray runtime that declares two GPUs (Ray
schedules declared GPUs whether or not the machine has them)."""

from __future__ import annotations

import os

import pytest

from infinite_llm.cluster.layout import Lender, PoolLayout
from infinite_llm.kvcache.tiers import Tier

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def gpu_runtime():
    if ray.is_initialized():
        pytest.skip("a Ray runtime is already up in this process")
    ray.init(num_cpus=6, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_model_instances_get_a_gpu_each_and_lenders_none(gpu_runtime) -> None:
    from infinite_llm.cluster.ray_placement import InstancePlacement

    layout = PoolLayout(
        num_instances=2,
        model_blocks=8,
        lenders=(Lender(2, 8, Tier.MEMORY), Lender(3, 8, Tier.HOST, host_of=0)),
        borrowing=True,
        lending_cap=0.5,
    )
    placement = InstancePlacement(layout, gpus=True)
    try:
        # instance 0's bundle also holds its host pool's CPU
        assert placement.bundles == [{"CPU": 2, "GPU": 1}, {"CPU": 1, "GPU": 1}, {"CPU": 1}]
        assert [placement.options(i)["num_gpus"] for i in range(4)] == [1, 1, 0, 0]

        @ray.remote
        class Probe:
            def visible(self) -> tuple[list, str]:
                return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES", "")

        seen = [
            ray.get(Probe.options(**placement.options(i)).remote().visible.remote())
            for i in range(4)
        ]
        gpus = [ids for ids, _ in seen]
        assert all(len(ids) == 1 for ids in gpus[:2]) and gpus[0] != gpus[1]
        assert gpus[2:] == [[], []]
        assert all(env == str(ids[0]) for ids, env in seen[:2])
    finally:
        placement.remove()
    cpu_only = InstancePlacement(layout)
    try:
        assert cpu_only.bundles == [{"CPU": 2}, {"CPU": 1}, {"CPU": 1}]
        assert all(cpu_only.options(i)["num_gpus"] == 0 for i in range(4))
    finally:
        cpu_only.remove()
