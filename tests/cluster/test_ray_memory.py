"""Memory actors on Ray: a pool, its RManager and its debtors' MicroAttention in a process of
its own, without the model's weights. One model actor and three memory actors serve a context
3.5x the model actor's pool, exact against transformers; a memory actor's resident memory is
its pool and the runtime, not the weights; a memory actor killed mid-generation loses its
rBlocks and the request is recomputed, exact; a host pool is such an actor too, on its model
actor's node, borrowed first."""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import pytest

from cluster.helpers import (
    GREEDY,
    assert_all_free,
    host_pool_before_memory,
    lender_killer,
    run,
    tiny_block_bytes,
)
from conftest import hf_greedy, loaded_model, random_prompts
from infinite_llm.model.loader.tiny import TINY_PRESETS, write_tiny_model
from infinite_llm.sampling_params import SamplingParams

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

MB = 1 << 20


def expected(prompts, n=24, model="tiny"):
    return [hf_greedy(loaded_model(model).model_dir, p, n) for p in prompts]


def test_three_memory_actors_hold_most_of_a_context_3_5x_the_model_pool(ray_engine) -> None:
    # The model actor: 12 rBlocks of 8 tokens (96 tokens); the request needs 43 (336 + 24).
    engine = ray_engine(
        num_instances=1, num_blocks=12, block_size=8, budget=64, num_memory_instances=3
    )
    cluster = engine.cluster
    stats = cluster.stats()
    assert [i["kind"] for i in stats["instances"]] == ["model", "memory", "memory", "memory"]
    assert [i["tier"] for i in stats["instances"]] == ["device", "memory", "memory", "memory"]
    assert engine.max_model_len == 4 * 12 * 8
    assert list(cluster.members.loads()) == [0], "the router sees the model actor alone"
    with pytest.raises(ValueError, match="memory instance"):
        engine.add_request(engine.make_request([5, 6, 7], SamplingParams(max_tokens=2)), home=1)
    prompts = random_prompts(1, (336, 336), 256, seed=50)
    lent = []
    got = run(
        engine,
        prompts,
        on_step=lambda e, s: lent.append([i["lent"] for i in e.cluster.stats()["instances"][1:]]),
    )
    assert got == expected(prompts)
    assert max(sum(x) for x in lent) >= 31  # all but the model pool's 12 of its 43 rBlocks
    assert all(max(x[j] for x in lent) > 0 for j in range(3)), "each memory actor lent"
    assert cluster.stats()["remote_ma_calls"] > 0
    assert_all_free(engine)


@pytest.fixture(scope="module")
def weighty_model(tmp_path_factory) -> str:
    """A random model with 224 MB of float32 weights (the tiny model's few hundred KB would not
    show in a process's resident memory); 64 KiB per 8-token rBlock."""
    arch = replace(
        TINY_PRESETS["llama"],
        hidden_size=512,
        intermediate_size=4096,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
    )
    return write_tiny_model(str(tmp_path_factory.mktemp("weighty")), arch)


def test_a_memory_actor_holds_its_pool_and_no_weights(ray_engine, weighty_model) -> None:
    pool = 64 * MB
    engine = ray_engine(
        model=weighty_model,
        num_instances=1,
        num_blocks=16,
        block_size=8,
        num_memory_instances=1,
        kv_memory_per_memory_instance=pool,
    )
    cluster = engine.cluster
    assert cluster.stats()["instances"][1]["num_blocks"] == pool // (64 << 10)
    # a request that borrows, so the memory actor has served MicroAttention too
    prompts = random_prompts(1, (150, 150), 256, seed=53)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    run(engine, prompts, params, check_every_step=False)
    assert cluster.stats()["remote_ma_calls"] > 0
    model_actor, memory_actor = cluster._actors.values()
    no_model = ray.get(
        memory_actor.__ray_call__.remote(
            lambda actor: (actor.instance.runner, "transformers" in sys.modules)
        )
    )
    assert no_model == (None, False), "no runner, and the tokenizer's transformers not imported"
    model_rss, memory_rss = ray.get(
        [a.resident_bytes.remote() for a in (model_actor, memory_actor)]
    )
    print(f"RSS: model actor {model_rss / MB:.0f} MB, memory actor {memory_rss / MB:.0f} MB")
    # The runtime (torch, Ray) is most of it: a pool's pages are committed only as rBlocks are
    # written (``kv_pool.empty_kv``), so the whole pool is a generous allowance.
    assert memory_rss - pool < 400 * MB, (memory_rss, model_rss)
    assert memory_rss < model_rss - 150 * MB, (memory_rss, model_rss)
    assert_all_free(engine)


def test_a_memory_actor_killed_mid_generation_is_recomputed_exact(ray_engine) -> None:
    # 28 rBlocks needed: they fit the model pool and two memory pools, after one died.
    engine = ray_engine(
        num_instances=1, num_blocks=12, block_size=8, budget=64, num_memory_instances=3
    )
    prompts = random_prompts(1, (200, 200), 256, seed=52)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    kill_a_lender, killed = lender_killer()

    got = run(engine, prompts, params, on_step=kill_a_lender)
    assert killed and killed[0] >= 1, "a memory actor holding rBlocks should have died"
    stats = engine.cluster.stats()
    assert stats["failed_instances"] == 1
    assert killed[0] not in engine.cluster.instance_ids
    assert [i["kind"] for i in stats["instances"]] == ["model", "memory", "memory"]
    assert stats["instances"][0]["preemptions"] > 0, "the request that lost rBlocks is recomputed"
    assert got == expected(prompts, 30)
    assert_all_free(engine)


def test_a_host_pool_actor_is_borrowed_before_a_memory_actor(ray_engine) -> None:
    # As in process (``host_pool_before_memory``), the host pool on its model actor's node.
    engine = ray_engine(
        num_instances=1,
        num_blocks=12,
        block_size=8,
        budget=64,
        num_memory_instances=1,
        host_kv_memory=24 * tiny_block_bytes(),
    )
    nodes = engine.cluster.stats()["ray"]["nodes"]
    assert nodes[2] == nodes[0], "a host pool lives on its model instance's node"
    host_pool_before_memory(engine, expected)


def test_a_request_the_surviving_actors_cannot_hold_ends_with_an_error(ray_engine) -> None:
    # As in process: 23 rBlocks needed, 12 on the model actor and 12 on the memory actor; the
    # memory actor crashes, the next step finds it dead and the request ends with "error".
    engine = ray_engine(
        num_instances=1, num_blocks=12, block_size=8, budget=64, num_memory_instances=1
    )
    request = engine.make_request(random_prompts(1, (160, 160), 256, seed=56)[0], GREEDY)
    engine.add_request(request, home=0)
    reasons, killed = [], False
    deadline = time.monotonic() + 120
    while not reasons:
        assert time.monotonic() < deadline, "the request neither finished nor failed"
        reasons = [o.outputs[0].finish_reason for o in engine.step() if o.finished]
        if not killed and engine.cluster.stats()["instances"][1]["lent"]:
            engine.cluster.kill_instance(1)
            killed = True
    assert killed and reasons == ["error"]
    assert engine.cluster.max_request_tokens == 12 * 8
    assert_all_free(engine)
