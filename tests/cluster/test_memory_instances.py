"""Memory instances: a pool and MicroAttention, no model. One model instance and three memory
instances serve a context 3.5x the model instance's own pool, exact against transformers; the
router never homes a request there; a memory instance that dies loses its rBlocks and the
requests that used them are recomputed, exact; sizes beyond the machine are refused."""

from __future__ import annotations

import pytest

from cluster.helpers import (
    GREEDY,
    assert_all_free,
    host_pool_before_memory,
    make_engine,
    run,
    tiny_block_bytes,
)
from conftest import hf_greedy, loaded_model, random_prompts
from infinite_llm.config import EngineConfig
from infinite_llm.sampling_params import SamplingParams


def expected(prompts, n=GREEDY.max_tokens):
    return [hf_greedy(loaded_model("tiny").model_dir, p, n) for p in prompts]


def test_three_memory_instances_hold_most_of_a_context_3_5x_the_model_pool() -> None:
    # The model instance: 12 rBlocks of 8 tokens (96 tokens); the request needs 43 (336 + 24).
    engine = make_engine(1, 12, block_size=8, budget=64, num_memory_instances=3)
    stats = engine.cluster.stats()
    assert [i["kind"] for i in stats["instances"]] == ["model", "memory", "memory", "memory"]
    assert engine.max_model_len == 4 * 12 * 8
    prompts = random_prompts(1, (336, 336), 256, seed=50)
    lent = []
    got = run(
        engine,
        prompts,
        on_step=lambda e, s: lent.append(sum(i["lent"] for i in e.cluster.stats()["instances"])),
    )
    assert got == expected(prompts)
    assert max(lent) >= 31  # all but the model pool's 12 of its 43 rBlocks
    assert_all_free(engine)


def test_requests_are_never_homed_on_a_memory_instance() -> None:
    engine = make_engine(1, 32, block_size=8, num_memory_instances=2)
    prompts = random_prompts(6, (10, 40), 256, seed=51)
    homes = [engine.cluster.core.route(len(p)) for p in prompts]
    assert homes == [0] * 6
    with pytest.raises(ValueError, match="memory instance"):
        engine.add_request(engine.make_request(prompts[0], GREEDY), home=1)
    assert run(engine, prompts) == expected(prompts)
    assert_all_free(engine)


def test_a_memory_instance_that_dies_takes_its_rblocks_and_the_request_is_recomputed() -> None:
    # 28 rBlocks needed: they fit the model pool and two memory pools, after one died
    engine = make_engine(1, 12, block_size=8, budget=64, num_memory_instances=3)
    engine.cluster.defrag_interval_steps = 10**9
    prompts = random_prompts(1, (200, 200), 256, seed=52)
    killed = []

    def kill_once(e, step):
        if not killed and e.cluster.stats()["instances"][1]["lent"]:
            killed.append(e.cluster.fail_instance(1))

    assert run(engine, prompts, on_step=kill_once) == expected(prompts)
    assert killed and killed[0]  # the request had rBlocks there
    assert [i["instance_id"] for i in engine.cluster.stats()["instances"]] == [0, 2, 3]
    assert_all_free(engine)


def test_pools_the_machine_cannot_hold_are_refused_at_start() -> None:
    from infinite_llm.llm_engine import LLMEngine

    config = EngineConfig(
        model="tiny", num_memory_instances=2, kv_memory_per_memory_instance=1 << 50
    )
    with pytest.raises(ValueError, match="available"):
        LLMEngine(config, loaded_model("tiny"), progress=False)


def test_memory_instances_need_borrowing() -> None:
    from infinite_llm.config import CacheConfig

    with pytest.raises(ValueError, match="borrowing"):
        EngineConfig(num_memory_instances=1, cache=CacheConfig(enable_borrowing=False))


def test_a_host_pool_extends_its_instance_and_is_borrowed_before_a_memory_instance() -> None:
    engine = make_engine(
        1,
        12,
        block_size=8,
        budget=64,
        num_memory_instances=1,
        host_kv_memory=24 * tiny_block_bytes(),
    )
    host_pool_before_memory(engine, expected)


def test_metrics_count_rblocks_per_tier() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from infinite_llm.server.metrics import ClusterCollector

    engine = make_engine(
        1, 12, block_size=8, num_memory_instances=2, host_kv_memory=tiny_block_bytes()
    )
    collector = ClusterCollector("tiny")
    collector.snapshot = engine.cluster.stats()
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    want = {("device", "free"): 12, ("memory", "free"): 24, ("host", "free"): 1}
    for (tier, state), n in want.items():
        line = (
            f'infinite_llm:rblocks_by_tier{{model_name="tiny",state="{state}",tier="{tier}"}} {n}.0'
        )
        assert line in text, text


def test_rblocks_on_a_memory_instance_move_up_to_a_model_pool_when_it_has_room() -> None:
    # Instance 1 is busy with a request of its own while instance 0's long request borrows: the
    # memory instance (2) lends. Once instance 1's request is done, defragmentation moves those
    # rBlocks up to instance 1's pool, live; the long request's tokens stay exact.
    engine = make_engine(2, 16, block_size=8, budget=64, num_memory_instances=1)
    engine.cluster.defrag_interval_steps = 4
    short = random_prompts(1, (100, 100), 256, seed=54)[0]  # 16 of instance 1's 16 rBlocks
    long = random_prompts(1, (200, 200), 256, seed=55)[0]  # 28 rBlocks: 12 borrowed
    lent = []
    got = run(
        engine,
        [short, long],
        params=[
            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
        ],
        homes=[1, 0],
        on_step=lambda e, s: lent.append(
            tuple(i["lent"] for i in e.cluster.stats()["instances"][1:])
        ),
    )
    assert got == [expected([short], 20)[0], expected([long], 48)[0]]
    assert max(mem for _, mem in lent) > 0, lent  # first on the memory instance (1 was full)
    promoted = next(k for k, (model, mem) in enumerate(lent) if model >= 12 and mem == 0)
    assert all(mem == 0 for _, mem in lent[promoted:]), lent  # up a tier, and there for good
    assert engine.cluster.core.num_migrated_blocks >= max(mem for _, mem in lent)
    assert_all_free(engine)


def test_a_request_the_survivors_cannot_hold_ends_with_an_error_instead_of_waiting() -> None:
    # 23 rBlocks needed (160 + 24 tokens), 12 on the model instance and 12 on the memory one:
    # once the memory instance dies no pool left can hold it. It ends with "error" at the next
    # step, the others go on, and a new request of that size is refused at once.
    engine = make_engine(1, 12, block_size=8, budget=64, num_memory_instances=1)
    long, short = random_prompts(2, (160, 160), 256, seed=56)[0], [5, 6, 7]
    for prompt, home in ((long, 0), (short, 0)):
        engine.add_request(engine.make_request(prompt, GREEDY), home=home)
    finished: dict[str, str] = {}
    while len(finished) < 2:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
        alive = 1 in engine.cluster.live_instance_ids()
        if alive and engine.cluster.stats()["instances"][1]["lent"]:
            engine.cluster.fail_instance(1)
        engine.check_integrity()
    assert sorted(finished.values()) == ["error", "length"]
    assert engine.cluster.max_request_tokens == 12 * 8
    with pytest.raises(ValueError, match="at most 96"):
        engine.add_request(engine.make_request(long[:80], GREEDY))
    assert_all_free(engine)
