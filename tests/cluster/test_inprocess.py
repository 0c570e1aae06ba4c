"""One request served across many instances in one process: exact, leak-free, deadlock-free."""

from __future__ import annotations

import random

import pytest

from cluster.helpers import GREEDY, assert_all_free, assert_prefix_cached, make_engine, run
from conftest import hf_greedy, loaded_model, random_prompts
from infinite_llm.kvcache.messages import Recommendation
from infinite_llm.sampling_params import SamplingParams


def expected(prompts, n=24, model="tiny"):
    return [hf_greedy(loaded_model(model).model_dir, p, n) for p in prompts]


def test_context_three_times_one_pool_is_exact() -> None:
    # 4 instances x 16 blocks x 8 tokens = 128 tokens per pool; the request needs ~3x that.
    engine = make_engine(num_instances=4, num_blocks=16, block_size=8, budget=48)
    prompts = random_prompts(1, (360, 360), 256, seed=20)
    seen_remote = []
    got = run(
        engine,
        prompts,
        homes=[0],
        on_step=lambda e, s: seen_remote.append(e.cluster.stats()["instances"][0]["borrowed"]),
    )
    assert max(seen_remote) >= 32, "the request should hold most of its rBlocks on creditors"
    assert got == expected(prompts)
    assert_all_free(engine)


def test_no_borrow_baseline_refuses_what_one_instance_cannot_hold() -> None:
    engine = make_engine(num_instances=4, num_blocks=16, block_size=8, borrowing=False)
    assert engine.max_model_len == 128
    with pytest.raises(ValueError, match="max_model_len is 128"):
        engine.make_request(list(range(3, 203)), GREEDY)
    borrowing = make_engine(num_instances=4, num_blocks=16, block_size=8, borrowing=True)
    assert borrowing.max_model_len == 4 * 128


def test_mutual_borrowing_finishes() -> None:
    # Each instance homes a request bigger than its own pool: A borrows from B and B from A.
    engine = make_engine(num_instances=2, num_blocks=24, block_size=8, budget=32)
    prompts = random_prompts(2, (150, 150), 256, seed=21)
    got = run(
        engine,
        prompts,
        params=SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        homes=[0, 1],
        timeout_s=120,
    )
    assert got == expected(prompts, 40)
    assert_all_free(engine)


def test_whole_cluster_full_preempts_and_finishes_exact() -> None:
    engine = make_engine(num_instances=3, num_blocks=12, block_size=8, budget=64)
    prompts = random_prompts(9, (30, 90), 256, seed=22)
    got = run(engine, prompts)
    stats = engine.cluster.stats()
    assert sum(i["preemptions"] for i in stats["instances"]) > 0
    assert got == expected(prompts)
    assert_all_free(engine)


def test_every_home_outgrown_at_once_finishes_exact() -> None:
    # Three requests, each bigger than its home pool, all prefilling at once: every pool fills
    # in the same steps. Without cluster-wide order each instance preempted its own request
    # and re-admitted it into the pool it had just freed, forever; now the youngest yields.
    engine = make_engine(num_instances=3, num_blocks=12, block_size=8, budget=32)
    prompts = random_prompts(3, (120, 120), 256, seed=23)  # 120 + 24 tokens > 96 per pool
    got = run(engine, prompts, homes=[0, 1, 2], timeout_s=120)
    assert got == expected(prompts)
    assert_all_free(engine)


def test_small_requests_yield_to_one_longer_than_its_home_pool() -> None:
    # 2 pools of 96 tokens. The long request (130 + 24 tokens) needs both; the short ones keep
    # coming and growing beside it. Preempting it would recompute a pool's worth of prefill, so
    # the short ones yield (scheduler module, *Rank*): they are preempted, it never is.
    engine = make_engine(num_instances=2, num_blocks=12, block_size=8, budget=32)
    long_prompt = random_prompts(1, (130, 130), 256, seed=24)
    short = random_prompts(6, (10, 24), 256, seed=25)
    prompts = short[:2] + long_prompt + short[2:]
    preemptions: dict[str, tuple[int, int]] = {}  # request id: (prompt length, preemptions)

    def watch(e, _step) -> None:
        for inst in e.cluster.instances.values():
            for r in inst.scheduler.requests.values():
                preemptions[r.request_id] = (r.num_prompt_tokens, r.num_preemptions)

    got = run(engine, prompts, homes=[0, 1, 0, 1, 0, 1, 0], on_step=watch)
    assert len(preemptions) == len(prompts)
    assert [n for length, n in preemptions.values() if length == 130] == [0], preemptions
    assert sum(n for _, n in preemptions.values()) > 0, preemptions
    assert got == expected(prompts)
    assert_all_free(engine)


def test_two_requests_each_longer_than_a_pool_take_turns_without_preemption() -> None:
    # 2 pools of 96 tokens; each long request needs 110 + 24 tokens, so both cannot be in at
    # once. The younger waits (the gManager sees no room for its prompt) instead of prefilling
    # what fits its home pool, running out and preempting itself, again and again.
    engine = make_engine(num_instances=2, num_blocks=12, block_size=8, budget=32)
    prompts = random_prompts(2, (110, 110), 256, seed=26) + random_prompts(3, (8, 20), 256, seed=27)
    preemptions: dict[str, tuple[int, int]] = {}

    def watch(e, _step) -> None:
        for inst in e.cluster.instances.values():
            for r in inst.scheduler.requests.values():
                preemptions[r.request_id] = (r.num_prompt_tokens, r.num_preemptions)

    got = run(engine, prompts, homes=[0, 1, 0, 1, 0], on_step=watch)
    assert [n for length, n in preemptions.values() if length == 110] == [0, 0], preemptions
    assert got == expected(prompts)
    assert_all_free(engine)


def test_a_short_request_elsewhere_starts_while_a_long_prompt_goes_in() -> None:
    # 3 pools of 128 tokens; the long request (250 + 24 tokens) borrows from both others and
    # prefills 16 tokens a step. A short request that arrives on instance 2 meanwhile fits that
    # pool's free rBlocks, so it is admitted at once instead of waiting for the whole prompt
    # (scheduler module: only requests that would have to borrow wait for it).
    engine = make_engine(num_instances=3, num_blocks=16, block_size=8, budget=16)
    long_prompt = random_prompts(1, (250, 250), 256, seed=28)[0]
    short_prompt = random_prompts(1, (12, 12), 256, seed=29)[0]
    long_req = engine.make_request(long_prompt, GREEDY)
    engine.add_request(long_req, home=0)
    done: dict[str, list[int]] = {}
    first_token: dict[str, int] = {}
    prompt_in_at = None
    short_req = None
    for step in range(1, 400):
        if step == 3:  # the long prompt is going in
            assert 0 < long_req.num_computed_tokens < len(long_prompt)
            short_req = engine.make_request(short_prompt, GREEDY)
            engine.add_request(short_req, home=2)
        for out in engine.step():
            first_token.setdefault(out.request_id, step)
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        if prompt_in_at is None and long_req.num_computed_tokens >= len(long_prompt):
            prompt_in_at = step
        engine.check_integrity()
        if len(done) == 2:
            break
    assert short_req is not None and prompt_in_at is not None
    assert first_token[short_req.request_id] < prompt_in_at, (first_token, prompt_in_at)
    got = [done[long_req.request_id], done[short_req.request_id]]
    assert got == expected([long_prompt, short_prompt])
    assert_all_free(engine)


def test_creditor_failure_mid_generation_keeps_output() -> None:
    engine = make_engine(num_instances=3, num_blocks=16, block_size=8, budget=48)
    prompts = random_prompts(2, (200, 200), 256, seed=23)
    killed = []

    def kill_creditor(e, step):
        if killed:
            return
        stats = e.cluster.stats()["instances"]
        lenders = [s["instance_id"] for s in stats if s["lent"] > 0 and s["instance_id"] != 0]
        if lenders and step > 20:
            killed.append(e.cluster.fail_instance(lenders[0]))

    got = run(
        engine,
        prompts,
        params=SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        homes=[0, 0],
        on_step=kill_creditor,
    )
    assert killed and killed[0], "a creditor holding rBlocks should have died mid-generation"
    assert got == expected(prompts, 30)
    assert_all_free(engine)


def test_home_failure_rehomes_requests() -> None:
    engine = make_engine(num_instances=3, num_blocks=32, block_size=8, budget=48)
    prompts = random_prompts(3, (40, 80), 256, seed=24)
    killed = []

    def kill_home(e, step):
        if step == 6 and not killed:
            killed.append(e.cluster.fail_instance(1))

    got = run(engine, prompts, homes=[0, 1, 1], on_step=kill_home)
    assert len(killed[0]) == 2
    assert got == expected(prompts)
    assert_all_free(engine)


def test_defragmentation_of_a_debt_cycle_keeps_decoding_exact() -> None:
    # Stage a debt cycle 0->1->2->0 (a debtor lends what an earlier request freed), then swap it.
    engine = make_engine(num_instances=3, num_blocks=32, block_size=8, budget=512)
    cluster = engine.cluster
    cluster.defrag_interval_steps = 10**9  # only when this test says so
    real_recommend = cluster.gmanager.recommend
    cluster.gmanager.recommend = lambda d, n: Recommendation(  # the next instance first
        d, n, ((d + 1) % 3, *[c for c in real_recommend(d, n).creditor_ids if c != (d + 1) % 3])
    )
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    filler = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    # r0 (home 0) starts beside a filler and borrows from 1; r1 (home 1) then outgrows pool 1 and
    # borrows from 2; once the filler is gone, r2 (home 2) outgrows pool 2 and borrows from 0.
    prompts = [random_prompts(1, (n, n), 256, seed=25 + n)[0] for n in (100, 240, 240, 200)]
    plan = [(3, 0, filler), (0, 0, params)]  # (prompt, home, params) added up front
    later = {"r1": (1, 1, params), "r2": (2, 2, params)}
    ids: dict[int, str] = {}

    def add(i: int, home: int, p: SamplingParams) -> None:
        request = engine.make_request(prompts[i], p)
        engine.add_request(request, home=home)
        ids[i] = request.request_id

    for item in plan:
        add(*item)
    done: dict[str, list[int]] = {}
    moved = 0
    for _ in range(400):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        engine.check_integrity()
        edges = {
            (x["debtor"], x["creditor"]): x["blocks"]
            for x in cluster.stats()["ledger"]
            if x["blocks"]
        }
        if "r1" in later and (0, 1) in edges:
            add(*later.pop("r1"))
        elif "r2" in later and ids[3] in done and (1, 2) in edges:
            add(*later.pop("r2"))
        if not moved and {(0, 1), (1, 2), (2, 0)} <= set(edges):
            remote_before = sum(i["borrowed"] for i in cluster.stats()["instances"])
            moved = cluster.defragment(with_repatriation=False)
            remote_after = sum(i["borrowed"] for i in cluster.stats()["instances"])
            assert moved == 3 * min(edges[(0, 1)], edges[(1, 2)], edges[(2, 0)])
            assert remote_after == remote_before - moved
            engine.check_integrity()
        if len(done) == 4:
            break
    assert moved > 0, "a debt cycle should have formed and been swapped away"
    for i in range(3):
        assert done[ids[i]] == expected([prompts[i]], 40)[0]
    assert_all_free(engine)


def test_randomized_workload_with_aborts_never_leaks() -> None:
    rng = random.Random(26)
    engine = make_engine(num_instances=3, num_blocks=14, block_size=4, budget=40)
    live: list[str] = []
    for step in range(160):
        if step < 120 and rng.random() < 0.3:
            n = rng.randint(1, 60)
            request = engine.make_request(
                [rng.randrange(3, 256) for _ in range(n)],
                SamplingParams(
                    temperature=rng.choice([0.0, 1.0]),
                    seed=step,
                    max_tokens=rng.randint(1, 40),
                    ignore_eos=True,
                ),
            )
            engine.add_request(request)
            live.append(request.request_id)
        if live and rng.random() < 0.1:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
        engine.check_integrity()
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_integrity()
    assert_all_free(engine)


def _route_one_step_apart(engine, prompts, done: dict, ids: list) -> list[int]:
    """Add the requests one engine step apart (each admitted before the next arrives)."""
    homes = []
    for prompt in prompts:
        request = engine.make_request(prompt, GREEDY)
        engine.add_request(request)
        ids.append(request.request_id)
        homes.append(request.home_instance_id)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        engine.cluster.send_heartbeats(force=True)
        engine.check_integrity()
    return homes


def test_requests_pack_into_one_batch_and_borrow_before_a_second_instance_steps() -> None:
    """In one process the instances share the device: routed requests join the busiest
    instance's batch while it (borrowing: the cluster) has room, and stay exact."""
    prompts = random_prompts(4, (56, 56), 256, seed=23)  # 7 rBlocks each, 10 with the output
    for borrowing, want in ((True, [0, 0, 0, 0]), (False, [0, 0, 1, 1])):
        engine = make_engine(3, num_blocks=16, block_size=8, budget=256, borrowing=borrowing)
        done: dict[str, list[int]] = {}
        ids: list[str] = []
        # borrowing: all four on instance 0 (40 rBlocks, 16 at home, the rest borrowed);
        # without it, room is the home pool's: the third request opens a second batch
        assert _route_one_step_apart(engine, prompts, done, ids) == want
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            engine.check_integrity()
        assert [done[i] for i in ids] == expected(prompts)
        assert_all_free(engine)


def test_step_in_parts_hands_out_each_instance_as_it_steps() -> None:
    """An instance's outputs come out before the next instance steps (a server sends them at
    once), and the parts of a step are exactly ``step()``'s outputs."""
    prompts = random_prompts(2, (20, 20), 256, seed=24)
    engine = make_engine(2, num_blocks=32, block_size=8, budget=256, borrowing=False)
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(prompt, GREEDY, f"r{i}"), home=i)
    second = engine.cluster.instances[1].scheduler.requests["r1"]
    parts = engine.step_in_parts()
    first = next(parts)
    assert [o.request_id for o in first] == ["r0"] and second.num_computed_tokens == 0
    assert [o.request_id for o in next(parts)] == ["r1"] and second.num_computed_tokens == 20
    assert next(parts, None) is None
    done: dict[str, list[int]] = {o.request_id: o.outputs[0].token_ids for o in first}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out.outputs[0].token_ids
    assert [done["r0"], done["r1"]] == expected(prompts)
    assert_all_free(engine)


def test_stats_show_cached_rblocks_and_prefix_cache_counters() -> None:
    assert_prefix_cached(make_engine(num_instances=2, num_blocks=16, block_size=8))
    off = make_engine(num_instances=1, num_blocks=16, block_size=8, prefix_caching=False)
    run(off, [list(range(3, 48))] * 2, homes=[0, 0])
    (inst,) = off.cluster.stats()["instances"]
    assert inst["cached"] == inst["prefix_cache_hits"] == 0 and inst["cached_block_ids"] == []
