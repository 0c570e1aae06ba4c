"""Simulator presets: A100 instances of LLaMA2 7B/13B/70B, the paper's 32-GPU sweep, and this
machine (costs fitted to real runs).

Parameter sources (every number is a spec or a stated assumption; none is tuned to a result):

* A100-SXM4-80GB: 80 GiB HBM2e, 2,039 GB/s, 312 TFLOP/s dense FP16/BF16 tensor core,
  NVLink 3 at 600 GB/s per GPU (300 GB/s each way) -- NVIDIA A100 datasheet.
  Efficiencies: 60% of peak FLOP/s for the step's matmuls and attention (cuBLAS reaches
  70-80% on large GEMMs; serving engines report 50-60% model FLOP utilisation in prefill),
  80% of peak bandwidth for weight and KV reads (paged-attention and GEMV kernels reach
  70-85%). The engine may use 90% of memory (vLLM's ``gpu_memory_utilization`` default) less
  2 GiB per GPU for activations; the weights take the rest before the KV pool.
  A small all-reduce over NVLink: 15.6 us on 2 GPUs, 10.8 us more per doubling (fitted in
  ``tp_calibration`` to published LLaMA-2-7B latencies on 1-8 A100s: every point within 2 %);
  8 GPUs a node, a larger tensor-parallel group crosses the network below.
* Network between instances: 200 Gb/s (25 GB/s) per instance, 10 us one way (InfiniBand
  HDR hardware is 1-2 us; the rest is the messaging software). A remote MA costs a round
  trip per layer per creditor plus its bytes (queries out; partial outputs + lse back; new
  K,V written to a remote rBlock).
* LLaMA2 (Touvron et al. 2023, Hugging Face configs): 7B = 6.74e9 params, 32 layers, hidden
  4096, 32 heads (MHA); 13B = 13.0e9, 40 layers, 5120, 40 heads; 70B = 69.0e9, 80 layers,
  8192, 64 heads with 8 KV heads (GQA); head_dim 128, vocabulary 32,000; fp16 weights and KV.
* Tensor parallelism (what 32 A100s need): 7B fits one GPU with 62 GB left for KV (118K
  tokens at 0.5 MiB/token), so TP=1 and 32 instances on 32 GPUs -- the paper's 2..32
  instances. 13B on one GPU leaves 49 GB (60K tokens at 0.78 MiB/token); TP=2 gives 124 GB
  (152K tokens) and twice the bandwidth per instance, 16 instances at most. 70B (138 GB of
  weights) needs at least TP=2, where only 12 GB (38K tokens) would remain for KV; TP=4
  leaves 163 GB (496K tokens at 0.31 MiB/token, GQA), 8 instances at most.
* Engine settings (vLLM defaults of the paper's time): rBlocks of 16 tokens, at most 256
  running requests and 2,048 batched tokens per step (chunked prefill); 2 ms of CPU work
  per step plus 10 us per request (an assumption, the same for both modes); heartbeats
  every 100 ms and defragmentation every 250 ms (about every 8 steps, as in-process).
* Borrowing lends any free rBlock (lending cap 1.0, the engine's default), so one request can
  grow to the whole cluster's pool; the baseline is the same cluster with borrowing off.
* Workload: 64 requests per instance arriving at 16 per second per instance (Poisson), above
  what one instance serves even of short chat (about 7 per second here), so throughput
  measures capacity, as serving benchmarks do. A trace run stops after an hour of simulated
  time (only thrashing runs of the untruncated long tail get there).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from infinite_llm.scheduler.scheduler import SchedulerConfig
from infinite_llm.sim.cluster import SimClusterConfig
from infinite_llm.sim.costs import FEATURES, CostModel, LinearCosts, RooflineCosts
from infinite_llm.sim.metrics import SimResult
from infinite_llm.sim.simulator import simulate
from infinite_llm.sim.specs import DeviceSpec, InstanceSpec, ModelSpec, NetworkSpec
from infinite_llm.sim.trace import TraceRequest

GiB = 1 << 30

A100_80GB = DeviceSpec(
    name="A100-SXM4-80GB",
    memory_bytes=80 * GiB,
    peak_flops=312e12,
    memory_bandwidth=2.039e12,
    flops_efficiency=0.6,
    bandwidth_efficiency=0.8,
    memory_utilization=0.9,
    activation_reserve_bytes=2 * GiB,
    link_bandwidth=300e9,
    allreduce_latency_s=15.6e-6,  # tp_calibration.fit
    allreduce_latency_per_doubling_s=10.8e-6,
    devices_per_node=8,
)
NETWORK_200G = NetworkSpec(bandwidth=200e9 / 8, latency_s=10e-6)

LLAMA2_7B = ModelSpec("llama2-7b", 6.74e9, 32, 4096, 32, 32, 128, 32_000)
LLAMA2_13B = ModelSpec("llama2-13b", 13.0e9, 40, 5120, 40, 40, 128, 32_000)
LLAMA2_70B = ModelSpec("llama2-70b", 69.0e9, 80, 8192, 64, 8, 128, 32_000)

DEFAULT_FIT_PATH = Path(os.path.expanduser("~/.cache/infinite-llm/sim-fit.json"))


@dataclass(frozen=True)
class Workload:
    """How a sweep builds its traces for N instances: N x the per-instance request count and
    rate; lengths scaled by ``scale`` (prompts) and ``output_scale`` (outputs)."""

    traces: tuple[str, ...] = ("chat", "longtail")
    requests_per_instance: int = 64
    rate_per_instance: float = 4.0
    scale: float = 1.0
    output_scale: float = 1.0
    horizon_s: float = 3600.0  # a trace run stops after this much simulated time


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    execution: str  # "parallel" (an instance per device) or "serial" (one device, in turn)
    cluster: SimClusterConfig  # num_instances is replaced per run
    instance_counts: tuple[int, ...]
    workload: Workload
    spec: InstanceSpec | None = None  # roofline costs from specs
    linear: LinearCosts | None = None  # or fitted costs
    source: dict[str, Any] = field(default_factory=dict)

    def costs(self) -> CostModel:
        if self.spec is not None:
            return RooflineCosts(self.spec, self.cluster.block_size)
        assert self.linear is not None
        return self.linear

    def cluster_config(self, num_instances: int, enable_borrowing: bool = True) -> SimClusterConfig:
        return replace(self.cluster, num_instances=num_instances, enable_borrowing=enable_borrowing)

    def simulate(
        self,
        num_instances: int,
        borrowing: bool,
        requests: Sequence[TraceRequest],
        horizon_s: float = math.inf,
    ) -> SimResult:
        """``requests`` on ``num_instances`` of this preset, borrowing on or off."""
        return simulate(
            self.cluster_config(num_instances, borrowing),
            self.costs(),
            requests,
            execution=self.execution,
            horizon_s=horizon_s,
        )

    @property
    def pool_tokens(self) -> int:
        return self.cluster.num_blocks_per_instance * self.cluster.block_size


def regrouped(preset: Preset, tp_size: int) -> Preset:
    """The same devices as instances of ``tp_size`` devices each (tensor parallelism), with the
    pool such an instance has: the vLLM operator's way to hold a request longer than one
    instance. Roofline presets only (a fitted preset has no model of tensor parallelism)."""
    if preset.spec is None:
        raise ValueError(f"preset {preset.name!r} has no specs to regroup by tensor parallelism")
    if tp_size == preset.spec.tp_size:
        return preset
    spec = replace(preset.spec, tp_size=tp_size)
    cluster = replace(
        preset.cluster, num_blocks_per_instance=spec.num_blocks(preset.cluster.block_size)
    )
    return replace(preset, name=f"{preset.name}-tp{tp_size}", spec=spec, cluster=cluster)


def a100_preset(
    name: str, model: ModelSpec, tp_size: int, instance_counts: tuple[int, ...], description: str
) -> Preset:
    spec = InstanceSpec(
        model, A100_80GB, tp_size, NETWORK_200G, step_overhead_s=2e-3, per_seq_overhead_s=10e-6
    )
    block_size = 16
    cluster = SimClusterConfig(
        num_instances=instance_counts[0],
        num_blocks_per_instance=spec.num_blocks(block_size),
        block_size=block_size,
        lending_cap=1.0,
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=256),
        heartbeat_interval_s=0.1,
        defrag_interval_s=0.25,
    )
    return Preset(
        name,
        description,
        "parallel",
        cluster,
        instance_counts,
        Workload(traces=("chat", "docs", "longtail"), rate_per_instance=16.0),
        spec=spec,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        a100_preset(
            "a100-llama2-7b", LLAMA2_7B, 1, (2, 4, 8), "LLaMA2-7B, TP=1 per A100-80GB instance"
        ),
        a100_preset(
            "a100-llama2-13b",
            LLAMA2_13B,
            2,
            (2, 4, 8),
            "LLaMA2-13B, TP=2 (two A100-80GB per instance)",
        ),
        a100_preset(
            "a100-llama2-70b",
            LLAMA2_70B,
            4,
            (2, 4, 8),
            "LLaMA2-70B, TP=4 (four A100-80GB per instance)",
        ),
        a100_preset(
            "paper-32xA100",
            LLAMA2_7B,
            1,
            (2, 4, 8, 16, 32),
            "the paper's sweep: 2..32 instances of LLaMA2-7B on 32 A100-80GB (TP=1)",
        ),
    )
}


# -- this machine: costs fitted by ``bench paper`` -------------------------------------------


def fitted_preset(path: str | os.PathLike[str] | None = None) -> Preset:
    """The preset ``bench paper`` wrote: its pools, scheduler, workload and fitted costs."""
    path = Path(path) if path is not None else DEFAULT_FIT_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"no fitted costs at {path}: run `infinite-llm bench paper` on this machine first "
            f"(it writes them), or pass --fit PATH"
        )
    data = json.loads(path.read_text())
    return preset_from_fit(data, str(path))


def preset_from_fit(data: dict[str, Any], source: str = "") -> Preset:
    cfg = data["config"]
    costs = data["costs"]
    linear = LinearCosts(
        tuple(float(costs["coefficients"][f]) for f in FEATURES),
        cluster_step_s=float(costs["cluster_step_s"]),
        migrate_block_s=float(costs["migrate_block_s"]),
    )
    cluster = SimClusterConfig(
        num_instances=cfg["instance_counts"][0],
        num_blocks_per_instance=cfg["kv_blocks_per_instance"],
        block_size=cfg["block_size"],
        lending_cap=cfg.get("lending_cap", 1.0),
        scheduler=SchedulerConfig(cfg["max_num_batched_tokens"], cfg["max_num_seqs"]),
        heartbeat_interval_s=cfg.get("heartbeat_interval_s", 0.02),
        defrag_every_steps=cfg.get("defrag_every_steps", 8),
    )
    w = data["workload"]
    workload = Workload(
        tuple(w["traces"]),
        w["requests_per_instance"],
        w["rate_per_instance"],
        w["scale"],
        w["output_scale"],
    )
    return Preset(
        "cpu-fitted",
        f"this machine ({cfg['model']}, in-process, instances in turn), fitted costs",
        "serial",
        cluster,
        tuple(cfg["instance_counts"]),
        workload,
        linear=linear,
        source={"path": source, "fit": data.get("fit", {}), "machine": data.get("machine", {})},
    )


def get_preset(name: str, fit_path: str | os.PathLike[str] | None = None) -> Preset:
    if name == "cpu-fitted":
        return fitted_preset(fit_path)
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}; choose from {', '.join([*PRESETS, 'cpu-fitted'])}"
        )
    return PRESETS[name]


PRESET_NAMES = (*PRESETS, "cpu-fitted")
