"""Cost models: the roofline's shape from specs, and the least-squares fit."""

from __future__ import annotations

import random

import numpy as np
import pytest

from infinite_llm.sim.costs import (
    FEATURES,
    LinearCosts,
    RooflineCosts,
    ShardLoad,
    StepWork,
    features,
)
from infinite_llm.sim.fit import OverheadSample, Samples, StepSample, fit_linear_costs, nnls
from infinite_llm.sim.presets import LLAMA2_7B, PRESETS


def roofline() -> RooflineCosts:
    return RooflineCosts(PRESETS["paper-32xA100"].spec, 16)


def test_decode_step_reads_weights_and_kv():
    costs = roofline()
    spec = costs.spec
    one = costs.step(StepWork(0, 1, 1, 1, 1, (ShardLoad(0, 1, 1000, 1000, 1),))).seconds
    weights = LLAMA2_7B.weight_bytes_read_per_step / spec.bandwidth
    assert weights < one < weights * 1.5  # batch-1 decode is bound by reading the weights
    kv = StepWork(0, 1, 1, 1, 1, (ShardLoad(0, 1, 100_000, 100_000, 1),))
    extra = costs.step(kv).seconds - one
    assert extra == pytest.approx(99_000 * LLAMA2_7B.kv_bytes_per_token / spec.bandwidth, rel=1e-6)


def test_remote_shards_run_in_parallel_and_cost_their_creditors():
    costs = roofline()
    local = StepWork(0, 1, 1, 1, 1, (ShardLoad(0, 1, 200_000, 200_000, 1),))
    split = StepWork(
        0, 1, 1, 1, 1, (ShardLoad(0, 1, 100_000, 100_000, 1), ShardLoad(1, 1, 100_000, 100_000, 0))
    )
    a, b = costs.step(local), costs.step(split)
    assert b.seconds < a.seconds  # half the KV read on another device at the same time
    assert set(b.creditor_seconds) == {1}
    assert b.creditor_seconds[1] == pytest.approx(costs.attention_seconds(100_000, 100_000))
    tiny = StepWork(0, 1, 1, 1, 1, (ShardLoad(0, 1, 16, 16, 1), ShardLoad(1, 1, 16, 16, 0)))
    alone = StepWork(0, 1, 1, 1, 1, (ShardLoad(0, 1, 32, 32, 1),))
    # a small remote shard costs at least a round trip per layer
    assert (
        costs.step(tiny).seconds - costs.step(alone).seconds
        > 0.9 * 32 * costs.spec.network.round_trip_s
    )


def test_prefill_is_compute_bound():
    costs = roofline()
    prefill = StepWork(0, 1, 2048, 1, 2048 * 2049 // 2)
    flops = 2048 * LLAMA2_7B.linear_flops_per_token
    assert costs.step(prefill).seconds > flops / costs.spec.flops


def test_tensor_parallel_instances_hold_more_kv():
    assert PRESETS["a100-llama2-13b"].spec.tp_size == 2
    assert PRESETS["a100-llama2-70b"].pool_tokens > 3 * PRESETS["paper-32xA100"].pool_tokens


def test_nnls_recovers_nonnegative_coefficients():
    rng = np.random.default_rng(0)
    a = np.column_stack([np.ones(300), rng.uniform(0, 100, 300), rng.uniform(0, 1e6, 300)])
    truth = np.array([0.05, 0.002, 3e-7])
    x = nnls(a, a @ truth)
    assert np.allclose(x, truth, rtol=1e-6)
    x = nnls(a, a @ np.array([0.05, -0.001, 3e-7]))  # a negative truth is clamped at 0
    assert (x >= 0).all() and x[1] == 0


def test_fit_linear_costs_from_samples():
    truth = LinearCosts((0.07, 0.004, 0.009, 0.0, 5e-6, 1e-6, 0.01))
    rng = random.Random(0)
    steps = []
    for _ in range(200):
        new, seqs = rng.randint(1, 128), rng.randint(1, 8)
        shards = [ShardLoad(0, seqs, rng.randint(0, 4000), rng.randint(0, 200_000), 0)]
        shards += [
            ShardLoad(i, 1, 64, 64, 0) for i in range(1, rng.randint(1, 3))
        ]  # 0 to 2 remote calls
        work = StepWork(0, seqs, new, seqs, new * 3, tuple(shards))
        steps.append(
            StepSample(
                "r", tuple(features(work)), truth.step(work).seconds * rng.uniform(0.98, 1.02)
            )
        )
    costs, report = fit_linear_costs(Samples(steps, [OverheadSample("r", 0.001)], []))
    assert report["r2"] > 0.99
    assert costs.as_dict()["step"] == pytest.approx(0.07, rel=0.05)
    assert costs.as_dict()["new_tokens"] == pytest.approx(0.004, rel=0.05)
    assert costs.cluster_step_s == pytest.approx(0.001)
    assert len(costs.coefficients) == len(FEATURES)
