"""``infinite-llm bench paper``: the paper's two figures measured for real, and the simulator checked.

For 2, 4 and 8 in-process instances with small pools (so memory pressure appears at sizes
this CPU computes), each trace of ``sim.trace`` (scaled: prompts by ``--scale``, by default
this pool over an A100's LLaMA2-7B pool, outputs by ``--output-scale``) runs with borrowing
and with ``--no-borrow`` in the same process, same pools, same weights. Requests are driven
open loop through ``LLMEngine``: each is added when its arrival time has passed (refused when
its prompt + output exceeds the engine's ``max_model_len``), the engine steps otherwise. The
two modes of a trace run interleaved, one engine step each in turn, each on its own clock
(``bench.paper_run``), so a slow patch of this shared machine falls on both. Per run:
end-to-end throughput (requests/s, tokens/s), longest context served, refusals and
preemptions, TTFT/TPOT percentiles, locality. Per N, the longest context of each
mode is served on an idle cluster (its ``max_model_len``; one token more is refused).

Every instance step is timed with its features (``sim.placement.step_work``, computed as the
simulator computes them) and the simulator's ``LinearCosts`` are fitted to them by least
squares and saved (``--fit-out``, default ``~/.cache/infinite-llm/sim-fit.json``; the
``cpu-fitted`` preset of ``infinite-llm simulate``). Validation: each run is simulated with
costs fitted on the *other* runs (leave one run out) and its predicted throughput and longest
context are compared with the measured ones.

Threads default to 1: with other jobs on the machine, two OpenMP threads stall on each other.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from infinite_llm.bench.common import emit, format_table, machine_info
from infinite_llm.bench.paper_run import real_runs
from infinite_llm.sim.fit import (
    Samples,
    fit_document,
    fit_linear_costs,
    save_fit,
)
from infinite_llm.sim.metrics import ratio
from infinite_llm.sim.plots import plot_ratios
from infinite_llm.sim.presets import DEFAULT_FIT_PATH, PRESETS
from infinite_llm.sim.trace import TRACES, TraceRequest, generate_trace
from infinite_llm.sim.validate import VALIDATION_COLUMNS, validate, validation_rows

MODES = (("no_borrow", False), ("borrowing", True))
PROBE_OUTPUT_TOKENS = 4


def config_doc(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "instance_counts": args.instances,
        "kv_blocks_per_instance": args.kv_blocks,
        "block_size": args.block_size,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "lending_cap": 1.0,
        "heartbeat_interval_s": 0.02,
        "defrag_every_steps": 8,
        "threads": args.threads,
        "clock": args.clock,
    }


def workload_doc(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "traces": args.traces,
        "requests_per_instance": args.requests_per_instance,
        "rate_per_instance": args.rate_per_instance,
        "scale": args.scale,
        "output_scale": args.output_scale,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="infinite-llm bench paper",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default="smollm2", help="smollm2 (real compute) or tiny (a fast smoke run)"
    )
    p.add_argument("--instances", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument(
        "--traces",
        nargs="+",
        default=["chat", "docs", "longtail"],
        choices=sorted(TRACES),
        help="traces truncated to one instance's pool (both modes serve every request)",
    )
    p.add_argument(
        "--uncapped",
        nargs="*",
        default=["longtail"],
        choices=sorted(TRACES),
        help="traces also run untruncated (the baseline refuses what one pool cannot hold)",
    )
    p.add_argument("--kv-blocks", type=int, default=32, help="rBlocks per instance")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument(
        "--requests-per-instance",
        type=int,
        default=12,
        help="trace length; at 6, N=4 docs read 0.99-1.11 across seeds 0-4, too short for a steady ratio",
    )
    p.add_argument("--rate-per-instance", type=float, default=1.0, help="requests/s per instance")
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="prompt length scale (default: this pool / an A100 LLaMA2-7B pool)",
    )
    p.add_argument("--output-scale", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time of the run's own steps; cpu: this process's CPU time in them "
        "(robust to other jobs; needs --threads 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--run-timeout",
        type=float,
        default=900.0,
        help="seconds (on --clock) before a run is stopped",
    )
    p.add_argument(
        "--fit-out", type=Path, default=DEFAULT_FIT_PATH, help="where to save the fitted costs"
    )
    p.add_argument("--no-save-fit", action="store_true")
    p.add_argument(
        "--sim-replays",
        type=int,
        default=9,
        help="noisy simulator replays per run for the validation (median and range); 0: one exact",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="directory for bench-paper.png")
    args = p.parse_args(argv)
    if args.scale is None:
        args.scale = args.kv_blocks * args.block_size / PRESETS["paper-32xA100"].pool_tokens
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from infinite_llm import LLM, SamplingParams
    from infinite_llm.model.loader import load_model

    logging.getLogger("infinite_llm.llm_engine").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    loaded = load_model(args.model, progress=False)
    LLM(args.model, loaded_model=loaded, progress=False, kv_blocks_per_instance=8).generate(
        [[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False
    )  # warm up
    pool = args.kv_blocks * args.block_size
    plan = [
        (n, name, capped)
        for n in args.instances
        for name, capped in [("capacity", True)]
        + [(t, True) for t in args.traces]
        + [(t, False) for t in args.uncapped]
    ]
    bar = tqdm(total=2 * len(plan), desc="bench paper", unit="run")
    samples = Samples([], [], [])
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    for n, name, capped in plan:
        if name == "capacity":  # each mode's own longest request: nothing to compare step by step
            trace_name = "capacity"
            bar.set_postfix_str(f"N={n} {trace_name}")
            done = [
                run
                for mode in MODES
                for run in real_runs(
                    args,
                    loaded,
                    n,
                    [mode],
                    capacity_requests(pool, n, mode[1]),
                    f"N={n} {trace_name}",
                    samples,
                )
            ]
        else:
            trace = generate_trace(
                name,
                args.requests_per_instance * n,
                args.rate_per_instance * n,
                seed=args.seed,
                scale=args.scale,
                output_scale=args.output_scale,
                max_context=pool if capped else None,
            )
            trace_name = name if capped else f"{name}-uncapped"
            bar.set_postfix_str(f"N={n} {trace_name}")
            done = real_runs(
                args, loaded, n, MODES, list(trace.requests), f"N={n} {trace_name}", samples
            )
        for run in done:
            run["trace"] = trace_name
            runs.append(run)
        bar.update(len(done))
    bar.close()
    elapsed = time.perf_counter() - start
    return report(args, runs, samples, elapsed, load_before)


def capacity_requests(pool: int, n: int, borrowing: bool) -> list[TraceRequest]:
    """The longest request a mode accepts on ``n`` instances of ``pool`` tokens, then one token more."""
    longest = pool * (n if borrowing and n > 1 else 1)
    out_len = min(PROBE_OUTPUT_TOKENS, longest - 1)
    return [
        TraceRequest(0, 0.0, longest - out_len, out_len, "probe"),
        TraceRequest(1, 0.0, longest - out_len + 1, out_len, "probe"),
    ]


def starvation(base: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Why the baseline run was short of memory (empty: it was not): it preempted, filled a pool
    to 90 % or more, or refused requests that pooled memory served. A request longer than the
    whole cluster is refused by both modes; more memory per instance would not change that."""
    reasons = []
    if base["num_preemptions"] > 0:
        reasons.append("preempted")
    if base["peak_used_fraction"] >= 0.9:
        reasons.append("pool full")
    if base["num_refused"] > ours["num_refused"]:
        reasons.append("refused what borrowing served")
    return reasons


def report(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    samples: Samples,
    elapsed: float,
    load_before: tuple[float, float, float],
) -> int:
    costs, fit_report = fit_linear_costs(samples)
    doc = fit_document(costs, fit_report, config_doc(args), workload_doc(args), machine_info())
    fit_path = None if args.no_save_fit else str(save_fit(args.fit_out, doc))
    validation = validate(runs, samples, doc, args.sim_replays)
    by = {(r["instances"], r["trace"], r["mode"]): r["summary"] for r in runs}
    comparisons, capacity, rows = [], [], []
    for n in args.instances:
        base, ours = by[(n, "capacity", "no_borrow")], by[(n, "capacity", "borrowing")]
        ctx = ratio(ours["longest_context_served"], base["longest_context_served"])
        capacity.append(
            {
                "instances": n,
                "no_borrow": base["longest_context_served"],
                "borrowing": ours["longest_context_served"],
                "ratio": ctx,
                "ratio_over_n": ctx / n,
                "one_more_refused": base["num_refused"] == 1 and ours["num_refused"] == 1,
            }
        )
        for trace in [t for t in dict.fromkeys(r["trace"] for r in runs) if t != "capacity"]:
            b, o = by[(n, trace, "no_borrow")], by[(n, trace, "borrowing")]
            starved_by = starvation(b, o)
            starved = bool(starved_by)
            comp = {
                "instances": n,
                "trace": trace,
                "baseline_memory_starved": starved,
                "starved_by": starved_by,
                "throughput_ratio": ratio(o["tokens_per_s"], b["tokens_per_s"]),
                "requests_per_s_ratio": ratio(o["requests_per_s"], b["requests_per_s"]),
            }
            comparisons.append(comp)
            rows.append(
                {
                    "N": n,
                    "trace": trace,
                    "starved": ", ".join(starved_by) or "no",
                    "tok/s base": b["tokens_per_s"],
                    "tok/s ours": o["tokens_per_s"],
                    "x": comp["throughput_ratio"],
                    "refused b/o": f"{b['num_refused']}/{o['num_refused']}",
                    "preempt b/o": f"{b['num_preemptions']}/{o['num_preemptions']}",
                    "longest b/o": f"{b['longest_context_served']}/{o['longest_context_served']}",
                    "ttft50 b/o": f"{b['ttft_p50_s']:.1f}/{o['ttft_p50_s']:.1f}",
                    "tpot50 b/o": f"{b['tpot_p50_s']:.2f}/{o['tpot_p50_s']:.2f}",
                    "kv_local": o["kv_locality"],
                    "stopped b/o": f"{b['stopped'] or '-'}/{o['stopped'] or '-'}",
                }
            )
    errors = [
        abs(v[k])
        for v in validation
        for k in ("tokens_per_s_error", "longest_context_served_error")
        if v[k] is not None
    ]
    targets = {
        "context_ratio_at_least_0.95N": all(c["ratio_over_n"] >= 0.95 for c in capacity),
        "throughput_above_1_when_starved": all(
            c["throughput_ratio"] > 1 for c in comparisons if c["baseline_memory_starved"]
        ),
        "throughput_at_least_0.97_when_not_starved": all(
            c["throughput_ratio"] >= 0.97 for c in comparisons if not c["baseline_memory_starved"]
        ),
        "simulator_within_15pct": max(errors, default=0.0) <= 0.15,
    }
    result = {
        "bench": "paper",
        "model": args.model,
        "machine": machine_info(),
        "threads": args.threads,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "elapsed_s": elapsed,
        "config": config_doc(args),
        "workload": workload_doc(args) | {"uncapped": args.uncapped},
        "capacity": capacity,
        "comparisons": comparisons,
        "runs": [{k: v for k, v in r.items() if k != "requests"} for r in runs],
        "fit": {"path": fit_path, **doc["costs"], **fit_report},
        "validation": {
            "runs": validation,
            "max_abs_error": max(errors, default=0.0),
            "excluded": [v["label"] for v in validation if v["tokens_per_s_error"] is None],
        },
        "targets": targets,
    }
    if args.out is not None:
        traces = [t for t in dict.fromkeys(c["trace"] for c in comparisons)]
        pred = {v["label"]: v for v in validation}

        def predicted(n: int, trace: str) -> float:
            b, o = pred[f"N={n} {trace} no_borrow"], pred[f"N={n} {trace} borrowing"]
            return ratio(o["predicted_tokens_per_s"], b["predicted_tokens_per_s"])

        path = plot_ratios(
            args.out / "bench-paper.png",
            f"bench paper: {args.model}, {args.kv_blocks * args.block_size}-token pools",
            args.instances,
            {t: [c["throughput_ratio"] for c in comparisons if c["trace"] == t] for t in traces},
            [c["ratio"] for c in capacity],
            predicted_throughput={t: [predicted(n, t) for n in args.instances] for t in traces},
            predicted_context=[
                ratio(
                    pred[f"N={n} capacity borrowing"]["predicted_longest_context_served"],
                    pred[f"N={n} capacity no_borrow"]["predicted_longest_context_served"],
                )
                for n in args.instances
            ],
        )
        result["plot"] = str(path) if path else None
    table = format_table(
        rows,
        list(rows[0]),
        f"bench paper: {args.model}, pool {args.kv_blocks * args.block_size} "
        f"tokens/instance, ours vs no-borrow",
    )
    table += "\n\n" + format_table(
        capacity,
        ["instances", "no_borrow", "borrowing", "ratio", "ratio_over_n", "one_more_refused"],
        "longest context served",
    )
    table += "\n\n" + format_table(
        validation_rows(validation),
        VALIDATION_COLUMNS,
        f"validation: simulator (costs fitted on the other runs; median of {args.sim_replays} "
        "noisy replays) vs measured",
    )
    table += (
        f"\nfit: r2 {fit_report['r2']:.3f}, median step error {fit_report['median_abs_rel_err']:.1%}, "
        f"step noise sigma {fit_report['step_noise_sigma']:.3f}; "
        f"saved to {fit_path}; targets {targets}; load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    emit(result, table, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
