"""The simulator: deterministic, loses nothing, refuses exactly what cannot fit, stays
consistent (its predictions against hand-worked figures: ``test_predictions``)."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from infinite_llm.sim.presets import PRESETS, Preset, Workload
from infinite_llm.sim.simulator import simulate
from infinite_llm.sim.sweep import capacity_probe, paper_sweep
from infinite_llm.sim.trace import TraceRequest, generate_trace

from .helpers import (
    requests,
    small_config,
    unit_costs,
)


def random_requests(n: int, max_len: int, seed: int, rate: float = 50.0) -> list[TraceRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        p = rng.randint(1, max_len - 1)
        out.append(TraceRequest(i, t, p, rng.randint(1, min(12, max_len - p)), "rand"))
    return out


def outcome(result):
    return [
        (r.home, r.refused, r.first_token_s, r.finish_s, r.num_preemptions) for r in result.records
    ]


def approx(x):
    """Equal up to float rounding: hand-worked seconds are sums of a few round numbers."""
    return pytest.approx(x, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("execution", ["parallel", "serial"])
def test_same_seed_same_result(execution):
    reqs = random_requests(40, 48, seed=1)
    a = simulate(small_config(), unit_costs(), reqs, execution=execution)
    b = simulate(small_config(), unit_costs(), reqs, execution=execution)
    assert outcome(a) == outcome(b)
    assert a.summary()["tokens_per_s"] == b.summary()["tokens_per_s"]
    c = simulate(small_config(), unit_costs(), random_requests(40, 48, seed=2), execution=execution)
    assert outcome(a) != outcome(c)


@pytest.mark.parametrize("execution", ["parallel", "serial"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_borrowing_never_loses_a_request(execution, seed):
    config = small_config(num_instances=3, num_blocks=12)  # 48 tokens a pool, 144 pooled
    reqs = random_requests(30, 48, seed=seed, rate=200.0)  # far more than fits at once
    result = simulate(config, unit_costs(), reqs, execution=execution, integrity_every=1)
    summary = result.summary()
    assert not result.livelock
    assert summary["num_completed"] == len(reqs)
    assert summary["num_refused"] == summary["num_unfinished"] == 0
    assert result.all_free_after
    assert summary["borrows"] > 0 and summary["kv_locality"] < 1.0
    assert all(
        r.first_token_s is not None and r.finish_s >= r.first_token_s >= r.arrival_s
        for r in result.records
    )


def test_baseline_refuses_what_one_instance_cannot_hold_ours_serves_pooled():
    reqs = requests((40, 8), (50, 8), (120, 20), (150, 10), (20, 4))  # pools: 48 tokens, 144 pooled
    base = simulate(small_config(borrowing=False), unit_costs(), reqs)
    ours = simulate(small_config(borrowing=True), unit_costs(), reqs)
    assert [r.refused for r in base.records] == [False, True, True, True, False]
    assert [r.refused for r in ours.records] == [False, False, False, True, False]
    assert ours.summary()["longest_context_served"] == 140
    assert base.summary()["longest_context_served"] == 48
    assert base.all_free_after and ours.all_free_after


def small_preset(**workload) -> Preset:
    return Preset(
        "small",
        "test",
        "parallel",
        small_config(),
        (2, 3),
        Workload(**workload),
        linear=unit_costs(),
    )


def test_capacity_probe_serves_the_pooled_memory():
    preset = small_preset()
    for n in (2, 3):
        base, ours = capacity_probe(preset, n, False), capacity_probe(preset, n, True)
        assert base["served_tokens"] == 48 and ours["served_tokens"] == 48 * n
        assert base["one_more_refused"] and ours["one_more_refused"]
        assert ours["all_free_after"]


def test_capacity_probe_times_are_the_hand_computed_ones():
    """N = 2, ``unit_costs`` (10 ms a step, 1 ms a new token, 1 us a cached token, 0.5 ms a
    remote call); the probe is the longest request with 16 output tokens.

    Baseline, 48 tokens (prompt 32): chunks of 16 with 0 and 16 cached, 2 x 0.026 + 16e-6 =
    0.052016 to the first token; 15 decodes reading 32..46 cached tokens, 15 x 0.011 +
    585e-6 = 0.165585; finish 0.217601.
    Borrowing, 96 tokens (prompt 80, home pool 48): 5 chunks of 16 with 0, 16, ..., 64 cached
    (160e-6 in all); only the last reads borrowed context (64 = 48 home + 16 on instance 1: one
    remote call): 5 x 0.026 + 160e-6 + 0.0005 = 0.13066 to the first token; 15 decodes reading
    80..94 cached tokens, each with one remote call: 15 x 0.0115 + 1305e-6 = 0.173805; finish
    0.304465. Locality: home tokens read (0 + 16 + 32 + 48 + 48 + 15 x 48 = 864) over all
    read (160 + 1305 = 1465)."""
    preset = small_preset()
    base, ours = capacity_probe(preset, 2, False), capacity_probe(preset, 2, True)
    assert (base["ttft_s"], base["seconds"]) == (approx(0.052016), approx(0.217601))
    assert base["kv_locality"] == 1.0
    assert (ours["ttft_s"], ours["seconds"]) == (approx(0.13066), approx(0.304465))
    assert ours["kv_locality"] == approx(864 / 1465)


def test_a_request_spread_over_more_pools_than_one_borrow_may_split_is_served():
    # 12 pools: the longest request borrows from 11 creditors, more than one borrow may split
    # over (GManagerConfig.max_split_creditors = 8); admitted a chunk at a time, it is served.
    ours = capacity_probe(small_preset(), 12, True)
    assert ours["served_tokens"] == 48 * 12 and ours["one_more_refused"] and ours["all_free_after"]


def test_paper_sweep_reports_ratios():
    preset = small_preset(
        traces=("chat", "longtail"),
        requests_per_instance=6,
        rate_per_instance=20.0,
        scale=48 / 117_648,
        output_scale=0.02,
    )
    result = paper_sweep(preset, seeds=(0, 1), uncapped=("longtail",))
    assert [row["instances"] for row in result["rows"]] == [2, 3]
    for row in result["rows"]:
        assert row["max_context_ratio"] == row["instances"]
        assert set(row["throughput_ratio"]) == {"chat", "longtail", "longtail-uncapped"}
        assert row["capacity"]["no_borrow"]["served_tokens"] == 48
        assert row["capacity"]["borrowing"]["served_tokens"] == 48 * row["instances"]
        for name, comp in row["traces"].items():
            assert len(comp["per_seed"]) == 2
            ratios = [
                c["runs"]["borrowing"]["tokens_per_s"] / c["runs"]["no_borrow"]["tokens_per_s"]
                for c in comp["per_seed"]
            ]
            assert [c["throughput_ratio"] for c in comp["per_seed"]] == [approx(r) for r in ratios]
            assert comp["throughput_ratio"] == approx(sum(ratios) / 2)
            assert row["throughput_ratio"][name] == comp["throughput_ratio"]
            assert (comp["throughput_ratio_min"], comp["throughput_ratio_max"]) == (
                approx(min(ratios)),
                approx(max(ratios)),
            )
            for seed_comp in comp["per_seed"]:
                for run in seed_comp["runs"].values():
                    assert (
                        run["num_completed"] + run["num_refused"] + run["num_unfinished"]
                        == run["num_requests"]
                    )
                    if not run["livelock"]:
                        assert run["num_unfinished"] == 0 and run["all_free_after"]


def test_defragmentation_restores_locality_in_serial_runs():
    config = dataclasses.replace(small_config(num_instances=3, num_blocks=16), defrag_every_steps=2)
    reqs = random_requests(40, 64, seed=5, rate=100.0)
    result = simulate(config, unit_costs(), reqs, execution="serial", integrity_every=1)
    assert result.summary()["migrated_blocks"] > 0
    assert result.all_free_after
    never = dataclasses.replace(config, defrag_every_steps=10**9)
    without = simulate(never, unit_costs(), reqs, execution="serial")
    assert without.summary()["migrated_blocks"] == 0
    assert result.summary()["kv_locality"] > without.summary()["kv_locality"]
    assert (
        result.summary()["remote_ma_calls_per_step"] < without.summary()["remote_ma_calls_per_step"]
    )


def test_scales_to_a_million_token_context_quickly():
    preset = PRESETS["paper-32xA100"]
    start = time.perf_counter()
    probe = capacity_probe(preset, 8, True)
    assert probe["served_tokens"] == 8 * preset.pool_tokens > 900_000
    assert probe["one_more_refused"] and probe["all_free_after"]
    assert time.perf_counter() - start < 30


def test_a100_presets_run_a_trace():
    preset = PRESETS["a100-llama2-70b"]
    trace = generate_trace("longtail", 16, 8.0, seed=0, max_context=preset.pool_tokens)
    tokens = sum(r.num_tokens for r in trace.requests)
    for borrowing in (False, True):
        result = simulate(preset.cluster_config(2, borrowing), preset.costs(), trace.requests)
        s = result.summary()
        assert s["num_completed"] == 16 and s["num_refused"] == 0
        # end to end: every served token over the makespan, from t = 0 to the last finish
        assert s["makespan_s"] == max(r.finish_s for r in result.records)
        assert s["tokens_per_s"] == approx(tokens / s["makespan_s"])
        assert all(r.first_token_s > r.arrival_s for r in result.records)


@pytest.mark.parametrize("execution", ["parallel", "serial"])
def test_requests_larger_than_a_pool_at_once_finish(execution):
    reqs = requests((60, 4), (60, 4), (60, 4), gap=0.0)  # 48-token pools, 144 pooled
    result = simulate(small_config(), unit_costs(), reqs, execution=execution, integrity_every=1)
    assert not result.livelock and result.summary()["num_completed"] == 3
    assert result.all_free_after


@pytest.mark.parametrize("execution", ["parallel", "serial"])
@pytest.mark.parametrize("seed", range(12))
def test_outgrown_pools_never_livelock(execution, seed):
    # A few requests of 30-140 tokens (pools of 48, 144 pooled) arriving at once or close
    # together: homes are outgrown at the same time, the case where instances used to starve
    # each other. With cluster-wide order every request finishes.
    rnd = random.Random(seed)
    lengths = [(rnd.randint(30, 100), rnd.randint(1, 40)) for _ in range(rnd.randint(3, 8))]
    reqs = requests(*[(p, o) for p, o in lengths if p + o <= 144], gap=rnd.choice([0.0, 0.005]))
    result = simulate(small_config(), unit_costs(), reqs, execution=execution, integrity_every=1)
    assert not result.livelock
    assert result.summary()["num_completed"] == len(reqs)
    assert result.all_free_after


@pytest.mark.parametrize(
    ("n", "blocks", "cap", "borrow"),
    [
        (1, 10, 1.0, True),
        (3, 12, 1.0, True),
        (4, 7, 0.5, True),
        (4, 7, 0.29, True),
        (5, 9, 1.0, False),
    ],
)
def test_capacity_rule_is_the_engines(n, blocks, cap, borrow):
    from infinite_llm.cluster.base import max_request_blocks

    config = dataclasses.replace(
        small_config(num_instances=n, num_blocks=blocks, borrowing=borrow), lending_cap=cap
    )
    borrowing = borrow and n > 1
    expected = (
        max_request_blocks(blocks, n, cap if borrowing else 0.0, borrowing) * config.block_size
    )
    assert config.max_request_tokens == expected


def test_sim_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, infinite_llm.sim, infinite_llm.sim.sweep, infinite_llm.sim.validate; print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )


def test_serial_execution_packs_requests_parallel_spreads_them():
    """Instances stepping in turn on one device (serial) share one batch while it has room,
    as ``InProcessCluster`` routes; on devices of their own (parallel) requests spread."""
    reqs = [TraceRequest(i, 0.01 * i, 8, 4, "chat") for i in range(4)]  # 1 rBlock each
    serial = simulate(small_config(num_instances=3), unit_costs(), reqs, execution="serial")
    parallel = simulate(small_config(num_instances=3), unit_costs(), reqs, execution="parallel")
    assert {r.home for r in serial.records} == {0}
    assert {r.home for r in parallel.records} == {0, 1, 2}
    assert all(r.finish_s is not None for r in serial.records + parallel.records)
    # Each request is a prompt step and 3 decodes. Serial: request i joins the shared batch at
    # cluster step i + 1 (each lasts over 10 ms, the arrival gap), the last decodes at step 7,
    # one instance step each. Parallel: 4 x 4 = 16 steps, less one: the fourth request (routed
    # to instance 0) prefills in the step of the first one's last decode.
    assert serial.summary()["num_steps"] == serial.extra["num_cluster_steps"] == 7
    assert parallel.summary()["num_steps"] == 15
