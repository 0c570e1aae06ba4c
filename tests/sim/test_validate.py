"""The simulator's validation: noisy replays (``NoisyCosts``) and leave-one-out predictions."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from infinite_llm.sim.costs import NoisyCosts, ShardLoad, StepWork, features
from infinite_llm.sim.fit import (
    MigrationSample,
    OverheadSample,
    Samples,
    StepSample,
    fit_linear_costs,
)
from infinite_llm.sim.presets import preset_from_fit
from infinite_llm.sim.simulator import simulate
from infinite_llm.sim.trace import generate_trace
from infinite_llm.sim.validate import validate

from .helpers import unit_costs

WORK = StepWork(0, 2, 10, 2, 30, (ShardLoad(0, 2, 100, 500, 0), ShardLoad(1, 1, 50, 50, 0)))


def test_noisy_costs_mean_one_seeded_and_exact_at_zero():
    base = unit_costs()
    exact = base.step(WORK).seconds
    draws = [NoisyCosts(base, 0.1, seed=3) for _ in range(2)]
    a, b = ([m.step(WORK).seconds for _ in range(20_000)] for m in draws)
    assert a == b  # same seed, same sequence
    assert statistics.fmean(a) == pytest.approx(exact, rel=0.005)  # mean-one factor
    assert statistics.pstdev(math.log(x / exact) for x in a) == pytest.approx(0.1, rel=0.03)
    assert NoisyCosts(base, 0.0, seed=5).step(WORK).seconds == exact
    assert NoisyCosts(base, 0.1, seed=4).migrate_seconds(3) == base.migrate_seconds(3)
    with pytest.raises(ValueError, match="sigma"):
        NoisyCosts(base, -0.1, seed=0)


def test_creditor_time_scales_with_its_step():
    class TwoPart:
        cluster_step_s = 0.0

        def step(self, work):
            from infinite_llm.sim.costs import StepCost

            return StepCost(1.0, {1: 0.25})

        def migrate_seconds(self, n):
            return 0.0

    cost = NoisyCosts(TwoPart(), 0.2, seed=1).step(WORK)
    assert cost.seconds != 1.0 and cost.creditor_seconds[1] == pytest.approx(cost.seconds / 4)


def step_samples(truth, sigma: float, n: int = 400) -> list[StepSample]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        seqs = rng.randint(1, 8)
        shards = [ShardLoad(0, seqs, rng.randint(0, 400), rng.randint(0, 20_000), 0)]
        shards += [ShardLoad(i, 1, 16, 16, 0) for i in range(1, rng.randint(1, 3))]
        work = StepWork(0, seqs, rng.randint(1, 16), seqs, rng.randint(0, 50), tuple(shards))
        noise = math.exp(rng.gauss(0.0, sigma)) if sigma else 1.0
        out.append(StepSample("other", tuple(features(work)), truth.step(work).seconds * noise))
    return out


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_fit_reports_the_step_noise(sigma):
    _, report = fit_linear_costs(Samples(step_samples(unit_costs(), sigma), [], []))
    assert report["step_noise_sigma"] == pytest.approx(sigma, abs=0.015)


def fit_doc(truth) -> dict:
    return {
        "costs": {
            "coefficients": truth.as_dict(),
            "cluster_step_s": truth.cluster_step_s,
            "migrate_block_s": truth.migrate_block_s,
        },
        "config": {
            "model": "tiny",
            "instance_counts": [2],
            "kv_blocks_per_instance": 12,
            "block_size": 4,
            "max_num_batched_tokens": 16,
            "max_num_seqs": 8,
        },
        "workload": {
            "traces": ["longtail"],
            "requests_per_instance": 8,
            "rate_per_instance": 20.0,
            "scale": 0.001,
            "output_scale": 0.05,
        },
    }


def measured_run(truth, borrowing: bool) -> dict:
    """A 'real' run: the exact simulator on the true costs stands in for the engine."""
    doc = fit_doc(truth)
    trace = generate_trace(
        "longtail", 16, 40.0, seed=1, scale=0.001, output_scale=0.05, max_context=48
    )
    config = preset_from_fit(doc).cluster_config(2, borrowing)
    summary = simulate(config, truth, list(trace.requests), execution="serial").summary()
    mode = "borrowing" if borrowing else "no_borrow"
    return {"label": f"N=2 longtail {mode}", "instances": 2, "mode": mode,
            "requests": list(trace.requests), "summary": summary}  # fmt: skip


def test_exact_samples_predict_the_run_exactly():
    """Costs fitted on noise-free samples of the true costs are the true costs: one exact
    replay and every noisy replay (sigma 0) reproduce the measured run."""
    truth = unit_costs()
    runs = [measured_run(truth, b) for b in (False, True)]
    samples = Samples(
        step_samples(truth, 0.0),
        [OverheadSample("other", truth.cluster_step_s)],
        [MigrationSample("other", 10, 10 * truth.migrate_block_s)],
    )
    for replays in (0, 3):
        for v in validate(runs, samples, fit_doc(truth), replays=replays):
            assert v["replays"] == max(replays, 1) and v["replays_stopped"] == 0
            assert v["predicted_stopped"] is None
            for key in ("tokens_per_s", "longest_context_served", "makespan_s"):
                assert abs(v[f"{key}_error"]) < 1e-6, (v["label"], key)
                lo, hi = v[f"predicted_{key}_range"]
                assert hi - lo <= 1e-9 * hi


def test_noisy_replays_give_a_median_and_a_range():
    truth = unit_costs()
    runs = [measured_run(truth, True)]
    samples = Samples(step_samples(truth, 0.1), [OverheadSample("other", 1e-4)], [])
    (v,) = validate(runs, samples, fit_doc(truth), replays=7)
    lo, hi = v["predicted_tokens_per_s_range"]
    assert v["replays"] == 7 and lo < v["predicted_tokens_per_s"] < hi
    assert abs(v["tokens_per_s_error"]) < 0.15
