"""The tensor-parallel cost model (calibrated on published latencies) and the two baselines."""

from __future__ import annotations

from dataclasses import replace

import pytest

from infinite_llm.scheduler.scheduler import SchedulerConfig
from infinite_llm.sim import tp_calibration
from infinite_llm.sim.baselines import compute_bound, same_layout_entry, tp_baselines
from infinite_llm.sim.cluster import SimClusterConfig
from infinite_llm.sim.presets import A100_80GB, PRESETS, Preset, Workload, regrouped
from infinite_llm.sim.specs import DeviceSpec, InstanceSpec, ModelSpec, NetworkSpec
from infinite_llm.sim.trace import Trace, TraceRequest


def test_the_tp_model_predicts_every_published_point():
    """The presets' all-reduce latencies are the fit's, and with them (and the fitted engine
    overheads) every published LLaMA-2-7B latency on 1-8 A100s comes out within 3 %."""
    spec = PRESETS["paper-32xA100"].spec
    fit = tp_calibration.fit(spec)
    assert A100_80GB.allreduce_latency_s == pytest.approx(fit.allreduce_latency_s, rel=0.01)
    assert A100_80GB.allreduce_latency_per_doubling_s == pytest.approx(
        fit.allreduce_latency_per_doubling_s, rel=0.01
    )
    assert fit.max_rel_error < 0.03
    calibrated = replace(
        spec, step_overhead_s=fit.step_overhead_s, per_seq_overhead_s=fit.per_seq_overhead_s
    )
    for point in tp_calibration.PUBLISHED:
        assert tp_calibration.predict(calibrated, point) == pytest.approx(point.latency_s, rel=0.03)
    # the scaling itself, not only the points: 8 GPUs are 1.71x faster than 1 at batch 1
    one, eight = (tp_calibration.predict(calibrated, p) for p in tp_calibration.PUBLISHED[::12])
    assert one / eight == pytest.approx(234.0 / 136.5, rel=0.03)


def _spec(tp: int) -> InstanceSpec:
    device = DeviceSpec(
        "toy",
        memory_bytes=52_768,  # 20,000 B of weights + 64 tokens of KV at 512 B
        peak_flops=1e9,
        memory_bandwidth=1e9,
        flops_efficiency=1.0,
        bandwidth_efficiency=1.0,
        memory_utilization=1.0,
        activation_reserve_bytes=0.0,
        link_bandwidth=1e11,
        allreduce_latency_s=10e-6,
        allreduce_latency_per_doubling_s=5e-6,
        devices_per_node=8,
    )
    model = ModelSpec("toy", 10_000, 2, 64, 4, 4, 16, 10)  # KV 2*2*4*16*2 = 512 B a token
    network = NetworkSpec(bandwidth=25e9, latency_s=10e-6)
    return InstanceSpec(model, device, tp, network, step_overhead_s=1e-3, per_seq_overhead_s=0.0)


def test_allreduce_seconds_worked_by_hand():
    assert _spec(1).allreduce_seconds(1e6) == 0.0
    # 4 devices: 10 us + 5 us (one doubling past 2) + 2 * 3/4 * 1 MB over 100 GB/s = 15 us
    assert _spec(4).allreduce_seconds(1e6) == pytest.approx(30e-6)
    # 16 devices on two nodes of 8: 10 + 5 * 3 us, one network round trip (20 us) for the
    # node doubling, and 2 * 15/16 * 1 MB over the network's 25 GB/s = 75 us
    assert _spec(16).allreduce_seconds(1e6) == pytest.approx(120e-6)


def toy_preset() -> Preset:
    spec = _spec(1)
    cluster = SimClusterConfig(
        num_instances=4,
        num_blocks_per_instance=spec.num_blocks(4),
        block_size=4,
        lending_cap=1.0,
        scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8),
    )
    return Preset("toy", "toy", "parallel", cluster, (4,), Workload(horizon_s=60.0), spec=spec)


def test_regrouped_pools_hold_what_the_devices_hold_less_one_copy_of_the_weights():
    preset = toy_preset()
    assert preset.pool_tokens == 64
    two = regrouped(preset, 2)
    # 2 x 52,768 B less 20,000 B of weights = 85,536 B = 167 tokens, 41 rBlocks of 4
    assert two.spec.tp_size == 2 and two.cluster.num_blocks_per_instance == 41
    assert two.pool_tokens == 164 and two.name == "toy-tp2"
    assert regrouped(preset, 1) is preset
    fitted = replace(preset, spec=None)
    with pytest.raises(ValueError, match="no specs"):
        regrouped(fitted, 2)


def test_tp_baselines_size_the_group_to_the_longest_request():
    preset = toy_preset()
    # 150 + 10 tokens: more than one device's 64, less than two devices' 164
    reqs = (
        TraceRequest(0, 0.0, 40, 8, "t"),
        TraceRequest(1, 0.01, 150, 10, "t"),
        TraceRequest(2, 0.02, 20, 4, "t"),
    )
    trace = Trace("toy", 0, 100.0, 1.0, 1.0, None, reqs)
    ours = preset.simulate(4, True, reqs, 60.0).summary()
    same = preset.simulate(4, False, reqs, 60.0).summary()
    assert ours["num_refused"] == 0 and same["num_refused"] == 1
    result = tp_baselines(preset, 4, trace, ours, same)
    sized = result["tp_sized"]
    assert (sized["tp"], sized["instances"], sized["holds_longest"]) == (2, 2, True)
    assert sized["refused"] == 0 and sized["refused_ours"] == 0
    assert sized["throughput_ratio"] == pytest.approx(
        ours["tokens_per_s"] / sized["run"]["tokens_per_s"]
    )
    assert result["tried"][0] == 2 and result["longest_request_tokens"] == 160
    assert sized["run"]["last_finished"]["finish_s"] == sized["run"]["makespan_s"]
    run = sized["run"]  # 2 instances: their step time over 2 x makespan
    assert run["utilization"] == pytest.approx(run["busy_s"] / (2 * run["makespan_s"]))
    assert 0 < run["utilization"] <= 1
    best = result["tp_best"]
    assert best["run"]["tokens_per_s"] == max(
        best["run"]["tokens_per_s"], sized["run"]["tokens_per_s"]
    )
    entry = same_layout_entry(same, ours)
    assert entry["refused"] == 1 and entry["throughput_ratio"] == pytest.approx(
        ours["tokens_per_s"] / same["tokens_per_s"]
    )


def test_compute_bound_worked_by_hand():
    """Linears: 2 x (10,000 - 2 x 10 x 64) = 17,440 FLOPs a token; attention 4 x 4 x 16 x 2 =
    512 FLOPs a pair. (40, 8): 40 x 41 / 2 + 8 x (40 + 4.5) = 1,176 pairs; (20, 4): 210 +
    4 x 22.5 = 300; (150, 10) is over max_tokens and left out. On 4 devices of 1 GFLOP/s."""
    reqs = (
        TraceRequest(0, 0.0, 40, 8, "t"),
        TraceRequest(1, 0.01, 150, 10, "t"),
        TraceRequest(2, 0.02, 20, 4, "t"),
    )
    bound = compute_bound(toy_preset(), 4, Trace("toy", 0, 1.0, 1.0, 1.0, None, reqs), 100)
    linear, attention = (48 + 24) * 17_440, (1_176 + 300) * 512
    assert bound["linear_flops"] == pytest.approx(linear)
    assert bound["attention_flops"] == pytest.approx(attention)
    assert bound["seconds_on_all_devices"] == pytest.approx((linear + attention) / 4e9)
    assert bound["attention_share"] == pytest.approx(attention / (linear + attention))
