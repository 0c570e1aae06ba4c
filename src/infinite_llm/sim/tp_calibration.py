"""The tensor-parallel cost model's latency terms, fitted to published multi-GPU latencies.

A tensor-parallel instance divides each step's FLOPs and weight reads by its size t and adds
two all-reduces of the hidden states per layer (``InstanceSpec.allreduce_seconds``). The bytes
are a spec (NVLink); what no spec gives is how long a small all-reduce takes and how that grows
with t, so those two numbers are fitted here, by least squares on relative error, to a
published table of batch latencies on 1, 2, 4 and 8 A100-80GB SXM4 in one node, with the
engine's own per-step and per-request overheads fitted beside them (they are not used outside
the fit: the presets keep their stated overheads).

The table (``PUBLISHED``): NVIDIA NeMo Framework user guide, "Performance > Llama 2 >
Inference performance", https://docs.nvidia.com/nemo-framework/user-guide/latest/performance/llama.html
(TensorRT-LLM backend): LLaMA-2-7B, 128 input and 20 output tokens, batch 1-8, average latency
in ms. It is the only LLaMA-2 tensor-parallel sweep on A100 SXM we could reach; vLLM publishes
none for these GPUs. TensorRT-LLM's step is at least as fast as vLLM's, so a baseline priced on it
is, if anything, flattered. The same page's LLaMA-2-13B rows are not used: they contradict
themselves (13B at TP=1 faster than 7B; at TP=4 batch 1 slower than batch 2).

The fitted all-reduce latencies go into ``presets.A100_80GB``; a test refits and checks that
they agree and that the model predicts every published point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from infinite_llm.sim.costs import RooflineCosts, ShardLoad, StepWork
from infinite_llm.sim.specs import InstanceSpec

INPUT_TOKENS, OUTPUT_TOKENS = 128, 20


@dataclass(frozen=True)
class Point:
    batch: int
    tp: int
    latency_s: float


# LLaMA-2-7B on A100-80GB SXM4, average latency of a batch (128 in, 20 out), ms.
PUBLISHED: tuple[Point, ...] = tuple(
    Point(b, tp, ms / 1e3)
    for tp, row in (
        (1, (234.0, 249.6, 272.6, 329.5)),
        (2, (171.7, 180.3, 202.9, 237.6)),
        (4, (143.7, 149.9, 165.2, 196.4)),
        (8, (136.5, 143.3, 158.6, 181.9)),
    )
    for b, ms in zip((1, 2, 4, 8), row)
)


def batch_latency(spec: InstanceSpec, batch: int, block_size: int = 16) -> float:
    """Seconds for ``batch`` requests of ``INPUT_TOKENS`` in and ``OUTPUT_TOKENS`` out, prefilled
    in one step and decoded together, on one instance of ``spec``."""
    costs = RooflineCosts(spec, block_size)
    p = INPUT_TOKENS
    prefill = StepWork(0, batch, batch * p, batch, batch * p * (p + 1) // 2)
    seconds = costs.step(prefill).seconds
    for i in range(OUTPUT_TOKENS - 1):
        ctx = p + i + 1
        shard = ShardLoad(0, batch, batch * ctx, batch * ctx, batch)
        seconds += costs.step(StepWork(0, batch, batch, batch, batch, (shard,))).seconds
    return seconds


@dataclass(frozen=True)
class Fit:
    step_overhead_s: float
    per_seq_overhead_s: float
    allreduce_latency_s: float
    allreduce_latency_per_doubling_s: float
    max_rel_error: float


def _with(
    spec: InstanceSpec, tp: int, overhead: float, per_seq: float, beta: float, alpha: float
) -> InstanceSpec:
    device = replace(spec.device, allreduce_latency_s=beta, allreduce_latency_per_doubling_s=alpha)
    return replace(
        spec, tp_size=tp, device=device, step_overhead_s=overhead, per_seq_overhead_s=per_seq
    )


def predict(spec: InstanceSpec, point: Point) -> float:
    return batch_latency(replace(spec, tp_size=point.tp), point.batch)


def fit(spec: InstanceSpec, points: Sequence[Point] = PUBLISHED) -> Fit:
    """Least squares on relative error for (step overhead, per-request overhead, all-reduce
    latency at t = 2, its growth per doubling), with everything else from ``spec``. The latency
    is linear in the four, so each column is the model's latency with one at 1 s, the rest 0."""
    base = [batch_latency(_with(spec, p.tp, 0.0, 0.0, 0.0, 0.0), p.batch) for p in points]
    unit = [tuple(float(i == j) for j in range(4)) for i in range(4)]
    columns = [
        [batch_latency(_with(spec, p.tp, *u), p.batch) - b for p, b in zip(points, base)]
        for u in unit
    ]
    a = np.array(columns).T / np.array([p.latency_s for p in points])[:, None]
    y = np.array([(p.latency_s - b) / p.latency_s for p, b in zip(points, base)])
    (overhead, per_seq, beta, alpha), *_ = np.linalg.lstsq(a, y, rcond=None)
    fitted = _with(spec, 1, float(overhead), float(per_seq), float(beta), float(alpha))
    errors = [abs(predict(fitted, p) / p.latency_s - 1) for p in points]
    return Fit(float(overhead), float(per_seq), float(beta), float(alpha), max(errors))
