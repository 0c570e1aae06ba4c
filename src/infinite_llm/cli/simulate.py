"""``infinite-llm simulate``: the paper's comparison at data-center scale on the simulator.

For each instance count, the preset's traces run with borrowing and with ``--no-borrow``
semantics (same pools, same scheduler and memory code, borrowing disabled), and the
longest context of each mode is served on an idle cluster. Prints a table (stderr with
``--json``) and one JSON object; ``--out DIR`` writes ``simulate-<preset>.png``.

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
        default=[],
        choices=sorted(TRACES),
        help="also run these traces untruncated (the baseline refuses what one instance cannot hold)",
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
    seeds = list(range(args.seed, args.seed + args.seeds))
    bar = tqdm(
        total=sweep_runs(len(counts), len(traces), len(args.uncapped), len(seeds)),
        desc="simulate",
        unit="run",
    )
    start = time.perf_counter()
    result = paper_sweep(
        preset,
        counts,
        traces,
        seeds=seeds,
        uncapped=args.uncapped,
        on_run=lambda label: bar.update(1),
    )
    bar.close()
    result["wall_s"] = time.perf_counter() - start
    result["cost_model"] = _cost_model_info(preset)
    table = _table(result, traces, args.uncapped)
    if args.out is not None:
        path = plot_ratios(
            args.out / f"simulate-{preset.name}.png",
            f"simulated: {preset.description}",
            counts,
            {name: [row["throughput_ratio"][name] for row in result["rows"]] for name in traces},
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
        for name in uncapped:
            comp = row["traces"][f"{name}-uncapped"]
            runs = [c["runs"] for c in comp["per_seed"]]
            line[f"{name}-uncapped_refused_base/ours"] = (
                f"{sum(r['no_borrow']['num_refused'] for r in runs)}/{sum(r['borrowing']['num_refused'] for r in runs)}"
            )
            line[f"{name}-uncapped_longest_ours"] = max(
                r["borrowing"]["longest_context_served"] for r in runs
            )
            line[f"{name}-uncapped_x"] = comp["throughput_ratio"]
            stopped = [f"{m}:{r[m]['stopped']}" for r in runs for m in r if r[m]["stopped"]]
            if stopped:
                line[f"{name}-uncapped_stopped"] = ",".join(stopped)
        rows.append(line)
    title = (
        f"simulate {result['preset']}: ours (borrowing) vs no-borrow, "
        f"pool {result['pool_tokens_per_instance']:,} tokens/instance"
    )
    table = format_table(rows, list(rows[0]), title)
    best = max((r["throughput_ratio"][t] for r in result["rows"] for t in traces), default=math.nan)
    return table + f"\nbest throughput ratio {best:.2f}x; simulated in {result['wall_s']:.0f} s"
