"""The paper's comparison on the simulator: borrowing vs the no-borrow baseline, per instance count.

For N instances and a trace (N x the preset's per-instance request count and rate), the same
trace runs twice on the same pools: borrowing off (vLLM-style: a request lives on its home
instance) and on. Two figures per N:

* throughput ratio: ours / baseline end-to-end tokens per second (``metrics``), the mean
  over seeds. The traces are truncated to what one instance holds, so both serve every
  request and the ratio compares like with like; ``uncapped`` traces also run untruncated,
  against both of a vLLM operator's options (``baselines``): the same layout, which refuses
  what one instance cannot hold (served tokens per second then count different work), and
  the devices regrouped into tensor-parallel instances that hold everything. Trace runs stop at the
  workload's horizon of simulated time (marked ``stopped``: several requests that each need a
  large share of the pooled memory can make the engine preempt and recompute them for hours).
* max-context ratio: the longest request each mode serves, proven by serving it on an idle
  cluster (prompt = longest - ``probe_output_tokens``, plus the output) and checking that one
  token more is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from infinite_llm.sim.baselines import (
    compute_bound,
    same_layout_entry,
    tp_baselines,
    with_utilization,
)
from infinite_llm.sim.metrics import ratio
from infinite_llm.sim.presets import Preset
from infinite_llm.sim.trace import Trace, TraceRequest, generate_trace

PROBE_OUTPUT_TOKENS = 16
MODES = (("no_borrow", False), ("borrowing", True))


def workload_trace(
    preset: Preset, trace_name: str, num_instances: int, *, seed: int = 0, capped: bool = True
) -> Trace:
    w = preset.workload
    return generate_trace(
        trace_name,
        w.requests_per_instance * num_instances,
        w.rate_per_instance * num_instances,
        seed=seed,
        scale=w.scale,
        output_scale=w.output_scale,
        max_context=preset.pool_tokens if capped else None,
    )


def capacity_probe(
    preset: Preset, num_instances: int, borrowing: bool, output_tokens: int = PROBE_OUTPUT_TOKENS
) -> dict[str, Any]:
    """Serve the longest request the mode accepts; one token more must be refused."""
    longest = preset.cluster_config(num_instances, borrowing).max_request_tokens
    output_tokens = min(output_tokens, longest - 1)
    probe = TraceRequest(0, 0.0, longest - output_tokens, output_tokens, "probe")
    over = TraceRequest(1, 0.0, longest - output_tokens + 1, output_tokens, "probe")
    result = preset.simulate(num_instances, borrowing, [probe, over])
    served, refused = result.records
    return {
        "max_request_tokens": longest,
        "served_tokens": served.num_tokens if served.completed else 0,
        "one_more_refused": refused.refused,
        "seconds": served.finish_s,
        "ttft_s": served.ttft_s,
        "kv_locality": result.totals.kv_locality,
        "all_free_after": result.all_free_after,
        "wall_s": result.wall_s,
    }


def compare(
    preset: Preset, num_instances: int, trace: Trace, on_run: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Both modes on one trace; summaries and the throughput ratios."""
    runs = {}
    for mode, borrowing in MODES:
        runs[mode] = with_utilization(
            preset.simulate(
                num_instances, borrowing, trace.requests, preset.workload.horizon_s
            ).summary(),
            num_instances,
        )
        if on_run is not None:
            on_run(mode)
    ours, base = runs["borrowing"], runs["no_borrow"]
    result = {
        "trace": trace.name,
        "capped_at_tokens": trace.max_context,
        "trace_stats": trace.stats(),
        "runs": runs,
        "throughput_ratio": ratio(ours["tokens_per_s"], base["tokens_per_s"]),
        "requests_per_s_ratio": ratio(ours["requests_per_s"], base["requests_per_s"]),
    }
    if trace.max_context is None:  # untruncated: against both of vLLM's ways to serve it
        tp = tp_baselines(preset, num_instances, trace, ours, base, on_run)
        result["baselines"] = {"same_layout": same_layout_entry(base, ours)} | (
            {} if tp is None else tp
        )
        # of what ours serves (a request is refused only when it cannot fit the cluster)
        result["compute_bound"] = compute_bound(
            preset, num_instances, trace, ours["longest_context_served"]
        )
    return result


def paper_sweep(
    preset: Preset,
    instance_counts: Sequence[int] | None = None,
    traces: Sequence[str] | None = None,
    *,
    seeds: Sequence[int] = (0,),
    uncapped: Sequence[str] = (),
    on_run: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Throughput and max-context ratios against the baseline for every instance count; each
    trace runs once per seed and the throughput ratio is the mean over seeds (min and max kept)."""
    counts = tuple(instance_counts or preset.instance_counts)
    names = tuple(traces or preset.workload.traces)
    variants = [(name, True) for name in names] + [(name, False) for name in uncapped]
    rows = []
    for n in counts:
        capacity = {}
        for mode, borrowing in MODES:
            capacity[mode] = capacity_probe(preset, n, borrowing)
            if on_run is not None:
                on_run(f"N={n} capacity {mode}")
        context_ratio = ratio(
            capacity["borrowing"]["served_tokens"], capacity["no_borrow"]["served_tokens"]
        )
        comparisons: dict[str, Any] = {}
        for name, capped in variants:
            per_seed = [
                compare(
                    preset, n, workload_trace(preset, name, n, seed=seed, capped=capped), on_run
                )
                for seed in seeds
            ]
            ratios = [c["throughput_ratio"] for c in per_seed]
            comparisons[name if capped else f"{name}-uncapped"] = {
                "throughput_ratio": sum(ratios) / len(ratios),
                "throughput_ratio_min": min(ratios),
                "throughput_ratio_max": max(ratios),
                "seeds": list(seeds),
                "per_seed": per_seed,
            } | ({} if capped else {"vs": _against_baselines(per_seed)})
        rows.append(
            {
                "instances": n,
                "capacity": capacity,
                "max_context_ratio": context_ratio,
                "max_context_ratio_over_n": context_ratio / n,
                "traces": comparisons,
                "throughput_ratio": {k: c["throughput_ratio"] for k, c in comparisons.items()},
            }
        )
    return {
        "preset": preset.name,
        "description": preset.description,
        "seeds": list(seeds),
        "pool_tokens_per_instance": preset.pool_tokens,
        "workload": preset.workload.__dict__ | {"traces": list(names), "uncapped": list(uncapped)},
        "rows": rows,
    }


def _against_baselines(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of ours / each baseline on an untruncated trace, with the TP sizes."""
    out: dict[str, Any] = {}
    for key in ("same_layout", "tp_sized", "tp_best"):
        entries = [c["baselines"][key] for c in per_seed if key in c.get("baselines", {})]
        if not entries:
            continue
        ratios = [e["throughput_ratio"] for e in entries]
        out[key] = {
            "throughput_ratio": sum(ratios) / len(ratios),
            "refused": sum(e["refused"] for e in entries),
            "refused_ours": sum(e["refused_ours"] for e in entries),
            "makespan_s": sum(e["run"]["makespan_s"] for e in entries) / len(entries),
            "utilization": sum(e["run"]["utilization"] for e in entries) / len(entries),
        } | ({"tp": sorted({e["tp"] for e in entries})} if "tp" in entries[0] else {})
    bounds = [c["compute_bound"] for c in per_seed if c.get("compute_bound")]
    if bounds:
        out["compute_bound"] = {
            "seconds_on_all_devices": sum(b["seconds_on_all_devices"] for b in bounds)
            / len(bounds),
            "attention_share": sum(b["attention_share"] for b in bounds) / len(bounds),
        }
    return out


def sweep_runs(num_counts: int, num_traces: int, num_uncapped: int, num_seeds: int = 1) -> int:
    """How many simulations ``paper_sweep`` runs (for a progress bar)."""
    return num_counts * 2 * (1 + num_seeds * (num_traces + num_uncapped))
