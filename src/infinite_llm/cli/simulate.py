"""``infinite-llm simulate``: the paper's comparison at data-center scale on the simulator.

For each instance count, the preset's traces run with borrowing and with ``--no-borrow``
semantics (same pools, same scheduler and memory code, borrowing disabled), truncated to one
instance's pool so both serve everything; then untruncated (``--uncapped``, by default the
same traces) against both of a vLLM operator's options: the same layout, which refuses what
one instance cannot hold, and the same devices regrouped into tensor-parallel instances that
hold the longest request (``sim.baselines``). The longest context of each mode is served on an
idle cluster. Prints a table (stderr with ``--json``) and one JSON object; ``--out DIR``
writes ``simulate-<preset>.png``.

    infinite-llm simulate --preset paper-32xA100 --json
    infinite-llm simulate --preset a100-llama2-70b --instances 2 4 8 --trace longtail
    infinite-llm simulate --preset cpu-fitted --fit ~/.cache/infinite-llm/sim-fit.json
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from infinite_llm.bench.common import emit, format_table
from infinite_llm.sim.baselines import tp_sizes
from infinite_llm.sim.plots import plot_ratios
from infinite_llm.sim.presets import PRESET_NAMES, get_preset
from infinite_llm.sim.sweep import paper_sweep, sweep_runs
from infinite_llm.sim.trace import TRACES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate borrowing vs no-borrow on a modelled cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="paper-32xA100", choices=PRESET_NAMES)
    p.add_argument(
        "--instances", type=int, nargs="+", default=None, help="default: the preset's sweep"
    )
    p.add_argument(
        "--trace",
        nargs="+",
        default=None,
        choices=sorted(TRACES),
        help="traces truncated to one instance's pool (default: the preset's)",
    )
    p.add_argument(
        "--uncapped",
        nargs="*",
        default=None,
        choices=sorted(TRACES),
        help="also run these traces untruncated, against the same-layout and the "
        "tensor-parallel baselines (default: the --trace ones; none: give the flag alone)",
    )
    p.add_argument("--requests-per-instance", type=int, default=None)
    p.add_argument(
        "--rate-per-instance",
        type=float,
        default=None,
        help="requests/s per instance (inf: all at 0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="traces per (N, trace), seeds --seed.. (ratios averaged)",
    )
    p.add_argument("--fit", type=Path, default=None, help="fitted costs for --preset cpu-fitted")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="directory for the PNG plot")


def run(args: argparse.Namespace) -> int:
    preset = get_preset(args.preset, args.fit)
    workload = preset.workload
    if args.requests_per_instance is not None:
        workload = replace(workload, requests_per_instance=args.requests_per_instance)
    if args.rate_per_instance is not None:
        workload = replace(workload, rate_per_instance=args.rate_per_instance)
    preset = replace(preset, workload=workload)
    counts = args.instances or list(preset.instance_counts)
    traces = args.trace or list(workload.traces)
    uncapped = traces if args.uncapped is None else list(args.uncapped)
    seeds = list(range(args.seed, args.seed + args.seeds))
    # at most: the tensor-parallel layouts stop doubling once throughput falls
    tp_runs = sum(len(tp_sizes(preset, n)) for n in counts) if preset.spec is not None else 0
    bar = tqdm(
        total=sweep_runs(len(counts), len(traces), len(uncapped), len(seeds))
        + tp_runs * len(uncapped) * len(seeds),
        desc="simulate",
        unit="run",
    )
    start = time.perf_counter()
    result = paper_sweep(
        preset,
        counts,
        traces,
        seeds=seeds,
        uncapped=uncapped,
        on_run=lambda label: bar.update(1),
    )
    bar.total = bar.n
    bar.close()
    result["wall_s"] = time.perf_counter() - start
    result["cost_model"] = _cost_model_info(preset)
    table = _table(result, traces, uncapped)
    if args.out is not None:
        series = {
            name: [row["throughput_ratio"][name] for row in result["rows"]] for name in traces
        }
        for name in uncapped:
            # against the same layout only where it refuses something (else: the line above)
            refuses = any(
                row["traces"][f"{name}-uncapped"]["vs"]["same_layout"]["refused"]
                for row in result["rows"]
            )
            for key, label in (("same_layout", "same layout"), ("tp_sized", "TP-sized")):
                if key == "same_layout" and not refuses:
                    continue
                series[f"{name} untruncated vs {label}"] = [
                    row["traces"][f"{name}-uncapped"]["vs"]
                    .get(key, {})
                    .get("throughput_ratio", math.nan)
                    for row in result["rows"]
                ]
        path = plot_ratios(
            args.out / f"simulate-{preset.name}.png",
            f"simulated: {preset.description}",
            counts,
            series,
            [row["max_context_ratio"] for row in result["rows"]],
        )
        result["plot"] = str(path) if path else None
    emit(result, table, args.json)
    return 0


def _cost_model_info(preset: Any) -> dict[str, Any]:
    if preset.spec is not None:
        spec = preset.spec
        return {
            "kind": "roofline",
            "model": spec.model.name,
            "device": spec.device.name,
            "tp_size": spec.tp_size,
            "network_gbit_s": spec.network.bandwidth * 8 / 1e9,
            "network_latency_us": spec.network.latency_s * 1e6,
            "kv_pool_tokens_per_instance": preset.pool_tokens,
            "execution": preset.execution,
        }
    return {
        "kind": "fitted",
        "coefficients": preset.linear.as_dict(),
        "cluster_step_s": preset.linear.cluster_step_s,
        "execution": preset.execution,
        **preset.source,
    }


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def _table(result: dict[str, Any], traces: list[str], uncapped: list[str]) -> str:
    rows = []
    for row in result["rows"]:
        cap = row["capacity"]
        line: dict[str, Any] = {
            "N": row["instances"],
            "ctx_no_borrow": cap["no_borrow"]["served_tokens"],
            "ctx_borrowing": cap["borrowing"]["served_tokens"],
            "ctx_x": row["max_context_ratio"],
        }
        for name in traces:
            comp = row["traces"][name]
            runs = [c["runs"] for c in comp["per_seed"]]
            line[f"{name}_tok/s_base"] = _mean(r["no_borrow"]["tokens_per_s"] for r in runs)
            line[f"{name}_tok/s_ours"] = _mean(r["borrowing"]["tokens_per_s"] for r in runs)
            line[f"{name}_x"] = comp["throughput_ratio"]
            if len(runs) > 1:
                line[f"{name}_x_range"] = (
                    f"{comp['throughput_ratio_min']:.2f}-{comp['throughput_ratio_max']:.2f}"
                )
        rows.append(line)
    title = (
        f"simulate {result['preset']}: ours (borrowing) vs no-borrow, traces truncated to one "
        f"instance's pool ({result['pool_tokens_per_instance']:,} tokens)"
    )
    table = format_table(rows, list(rows[0]), title)
    if uncapped:
        table += "\n\n" + _baselines_table(result, uncapped)
    best = max((r["throughput_ratio"][t] for r in result["rows"] for t in traces), default=math.nan)
    return table + f"\nbest throughput ratio {best:.2f}x; simulated in {result['wall_s']:.0f} s"


def _baselines_table(result: dict[str, Any], uncapped: list[str]) -> str:
    """Untruncated traces: ours against the same layout and the tensor-parallel layouts."""
    rows = []
    for row in result["rows"]:
        for name in uncapped:
            comp = row["traces"][f"{name}-uncapped"]
            runs = [c["runs"] for c in comp["per_seed"]]
            vs = comp["vs"]
            line: dict[str, Any] = {
                "N": row["instances"],
                "trace": name,
                "longest": max(c["trace_stats"]["context_max"] for c in comp["per_seed"]),
                "refused_ours": vs["same_layout"]["refused_ours"],
                "tok/s_ours": _mean(r["borrowing"]["tokens_per_s"] for r in runs),
                "makespan_s_ours": _mean(r["borrowing"]["makespan_s"] for r in runs),
                "busy_ours": _mean(r["borrowing"]["utilization"] for r in runs),
                "last_ours_tokens": max(
                    (r["borrowing"]["last_finished"] or {}).get("tokens", 0) for r in runs
                ),
                "x_same_layout": vs["same_layout"]["throughput_ratio"],
                "refused_same": vs["same_layout"]["refused"],
            }
            for key, label in (("tp_sized", "tp_sized"), ("tp_best", "tp_best")):
                if key in vs:
                    line[f"{label}_TP"] = "/".join(str(t) for t in vs[key]["tp"])
                    line[f"x_{label}"] = vs[key]["throughput_ratio"]
                    line[f"makespan_s_{label}"] = vs[key]["makespan_s"]
                    line[f"busy_{label}"] = vs[key]["utilization"]
                    line[f"refused_{label}"] = vs[key]["refused"]
            if "compute_bound" in vs:
                line["bound_s"] = vs["compute_bound"]["seconds_on_all_devices"]
                line["attn_share"] = vs["compute_bound"]["attention_share"]
            stopped = [f"{m}:{r[m]['stopped']}" for r in runs for m in r if r[m]["stopped"]]
            if stopped:
                line["stopped"] = ",".join(stopped)
            rows.append(line)
    columns = list(dict.fromkeys(k for line in rows for k in line))
    title = (
        "untruncated traces: ours against vLLM's two options, the same layout (refuses what "
        "one instance cannot hold) and the devices regrouped by tensor parallelism (TP-sized: "
        "the smallest group that holds the longest request; TP-best: the group size of the "
        "baseline's best throughput); x = ours / baseline tokens per second; bound_s: the "
        "trace's FLOPs on all devices at the model's FLOP rate (no layout's makespan is "
        "shorter), attn_share: attention's part of them; busy: the instances' step time over "
        "instances x makespan"
    )
    return format_table(rows, columns, title)
