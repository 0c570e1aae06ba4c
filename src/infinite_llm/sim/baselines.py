"""The two ways a vLLM operator serves a trace whose longest request exceeds one instance.

vLLM cannot put one request's KV on two instances, so with the same devices an operator either

* keeps the layout (the *same-layout* baseline, ``--no-borrow``): every request longer than
  one instance's pool is refused, and throughput counts only what is served; or
* regroups the devices into fewer, larger tensor-parallel instances (*TP-sized*): instances of
  t devices, t the smallest power of two whose pool holds the trace's longest request (the
  whole cluster at most: then it too refuses what does not fit). Each step's FLOPs and weight
  reads divide by t and two all-reduces per layer are added (``InstanceSpec.allreduce_seconds``,
  latencies fitted in ``tp_calibration``). Fewer instances serve the same arrivals.

``tp_baselines`` runs the TP-sized layout and the larger ones (t doubling while throughput
rises: beyond the need, a larger group only trades data parallelism for all-reduces), and
reports ours against the TP-sized one and against the best. Each run's summary names the
request that finished last (``last_finished``): on a long tail, a very long prompt whose
prefill sets the makespan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infinite_llm.sim.metrics import ratio
from infinite_llm.sim.presets import Preset, regrouped
from infinite_llm.sim.trace import Trace


def with_utilization(summary: dict[str, Any], num_instances: int) -> dict[str, Any]:
    """``summary`` with ``utilization``: the instances' busy time over instances x makespan
    (what share of the cluster's time its steps took; idle instances are what a layout that
    serializes work loses)."""
    span = num_instances * summary["makespan_s"]
    return summary | {"utilization": summary.get("busy_s", 0.0) / span if span > 0 else 0.0}


def _entry(layout: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    return {
        **layout,
        "throughput_ratio": ratio(ours["tokens_per_s"], layout["run"]["tokens_per_s"]),
        "refused": layout["run"]["num_refused"],
        "refused_ours": ours["num_refused"],
    }


def tp_sizes(preset: Preset, num_instances: int) -> list[int]:
    """Group sizes a cluster of ``num_instances`` of ``preset`` can be regrouped into."""
    assert preset.spec is not None
    base = preset.spec.tp_size
    devices = num_instances * base
    sizes = []
    t = base
    while t <= devices:
        if devices % t == 0:
            sizes.append(t)
        t *= 2
    return sizes


def tp_baselines(
    preset: Preset,
    num_instances: int,
    trace: Trace,
    ours: dict[str, Any],
    same_layout: dict[str, Any],
    on_run: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Ours (``ours``: the borrowing run's summary on ``trace``) against the same devices
    regrouped by tensor parallelism; ``same_layout`` is the no-borrow run on ``trace``
    (reused where the TP-sized layout is the preset's own). None for presets without specs."""
    if preset.spec is None:
        return None
    longest = max((r.num_tokens for r in trace.requests), default=0)
    sizes = tp_sizes(preset, num_instances)
    devices = num_instances * preset.spec.tp_size
    holding = [t for t in sizes if regrouped(preset, t).pool_tokens >= longest]
    sized = holding[0] if holding else sizes[-1]
    layouts: dict[int, dict[str, Any]] = {}
    for t in sizes[sizes.index(sized) :]:
        group = regrouped(preset, t)
        if t == preset.spec.tp_size:
            run = same_layout
        else:
            summary = group.simulate(
                devices // t, False, trace.requests, preset.workload.horizon_s
            ).summary()
            run = with_utilization(summary, devices // t)
            if on_run is not None:
                on_run(f"N={num_instances} {trace.name} TP={t}")
        layouts[t] = {
            "tp": t,
            "instances": devices // t,
            "pool_tokens_per_instance": group.pool_tokens,
            "holds_longest": group.pool_tokens >= longest,
            "run": run,
        }
        if len(layouts) > 1 and run["tokens_per_s"] <= layouts[t // 2]["run"]["tokens_per_s"]:
            break
    best = max(layouts, key=lambda t: layouts[t]["run"]["tokens_per_s"])
    return {
        "longest_request_tokens": longest,
        "tp_sized": _entry(layouts[sized], ours),
        "tp_best": _entry(layouts[best], ours),
        "tried": sorted(layouts),
    }


def same_layout_entry(same_layout: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Ours against the same instances with borrowing off, on the untruncated trace."""
    return _entry({"run": same_layout}, ours)


def compute_bound(
    preset: Preset, num_instances: int, trace: Trace, max_tokens: int
) -> dict[str, Any] | None:
    """The FLOPs of the trace's requests of at most ``max_tokens`` (what a layout serves) under
    the cost model, split into linears and attention (each prompt's causal pairs and each output
    token's pairs over its context), and the seconds they need on all the cluster's devices at
    the model's FLOP rate: a lower bound on the makespan of any layout serving them, and which
    of the two costs dominates it. None for presets without specs."""
    if preset.spec is None:
        return None
    m = preset.spec.model
    linear = attention = 0.0
    for r in trace.requests:
        if r.num_tokens > max_tokens:
            continue
        linear += r.num_tokens * m.linear_flops_per_token
        pairs = r.prompt_len * (r.prompt_len + 1) / 2 + r.output_len * (
            r.prompt_len + (r.output_len + 1) / 2
        )
        attention += pairs * m.attention_flops_per_pair
    devices = num_instances * preset.spec.tp_size
    rate = devices * preset.spec.device.effective_flops
    return {
        "linear_flops": linear,
        "attention_flops": attention,
        "attention_share": attention / (linear + attention) if linear + attention else 0.0,
        "seconds_on_all_devices": (linear + attention) / rate,
    }
