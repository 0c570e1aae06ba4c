"""``bench distributed``'s report: ratios within each workload, the targets, the tables, the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infinite_llm.bench.common import format_table
from infinite_llm.sim.plots import pyplot

# What the data plane is held to (per-layer wire time, spread steps against all local).
TARGETS = {
    "ray_layer_wire_ms": 0.3,
    "ray_2_instances_vs_local_x": 1.2,
    "ray_4_instances_vs_local_x": 1.3,
    "inprocess_vs_local_x": 1.15,
}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per workload: each row's step against its backend's all-local step and the in-process
    one, and whether its tokens equal the in-process all-local run's."""
    for workload in dict.fromkeys(r["workload"] for r in rows):
        group = [r for r in rows if r["workload"] == workload]
        local = {r["backend"]: r for r in group if r["instances"] == 1}
        reference = local.get("inprocess") or group[0]
        for r in group:
            own = local.get(r["backend"])
            r["vs_local_x"] = r["step_ms"] / own["step_ms"] if own else None
            r["vs_inprocess_local_x"] = (
                r["step_ms"] / reference["step_ms"] if reference["instances"] == 1 else None
            )
            r["same_tokens"] = r["tokens"] == reference["tokens"]


def target_checks(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each target against the measured figures of every workload (None where not measured)."""
    out: dict[str, Any] = {}
    for r in results:
        key = f"{r['workload']} {r['backend']} x{r['instances']}"
        if r.get("placement", "model") != "model":
            key += f" ({r['placement']})"
        if r["backend"] == "ray" and r["instances"] > 1:
            wire = r.get("layer_wire_ms")
            out[f"{key} layer wire <= {TARGETS['ray_layer_wire_ms']} ms"] = (
                None if wire is None else wire <= TARGETS["ray_layer_wire_ms"]
            )
            limit = TARGETS.get(f"ray_{r['instances']}_instances_vs_local_x")
            if limit is not None and r["vs_local_x"] is not None:
                out[f"{key} <= {limit}x local"] = r["vs_local_x"] <= limit
        if r["backend"] == "inprocess" and r["instances"] > 1 and r["vs_local_x"] is not None:
            out[f"{key} <= {TARGETS['inprocess_vs_local_x']}x local"] = (
                r["vs_local_x"] <= TARGETS["inprocess_vs_local_x"]
            )
    return out


def tables(results: list[dict[str, Any]], model: str, steps: int) -> str:
    columns = [
        "workload",
        "backend",
        "instances",
        "placement",
        "step_ms",
        "step_ms_min",
        "step_ms_max",
        "vs_local_x",
        "vs_inprocess_local_x",
        "threads",
        "remote_ma_per_step",
        "bytes_out_per_step",
        "bytes_back_per_step",
        "same_tokens",
    ]
    text = format_table(
        results,
        columns,
        f"bench distributed ({model}, workload = batch x context, median of {steps} decode "
        "steps; threads: the home's, Ray)",
    )
    ray_rows = [r for r in results if r["backend"] == "ray" and r["instances"] > 1]
    if ray_rows:
        text += "\n\n" + format_table(
            ray_rows,
            [
                "workload",
                "instances",
                "placement",
                "layer_round_trip_ms",
                "layer_remote_wait_ms",
                "layer_wire_ms",
                "creditor_ma_ms",
                "channel_ms",
                "noop_call_ms",
                "payload_call_ms",
                "layer_payload_bytes",
                "steps_exchanged_in_c",
            ],
            "ray, per layer: round trip (sends -> every reply); remote wait (after the local "
            "share); wire (the channels' own time, neither side's compute); creditor's time; "
            "a bare round trip on the channel and a Ray actor call with one layer's payload; "
            "the share of whole-step decodes whose layers crossed in C",
        )
    return text


def write_plot(results: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Step time against all local, per workload, backend and instance count; None without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        group = [
            r
            for r in results
            if r["workload"] == workload and r.get("placement", "model") == "model"
        ]
        backends = list(dict.fromkeys(r["backend"] for r in group))
        counts = sorted({r["instances"] for r in group})
        width = 0.8 / max(1, len(backends))
        for b, backend in enumerate(backends):
            rows = {r["instances"]: r for r in group if r["backend"] == backend}
            xs = [c + (b - (len(backends) - 1) / 2) * width for c in range(len(counts))]
            ys = [rows[n]["step_ms"] if n in rows else 0 for n in counts]
            bars = ax.bar(xs, ys, width, label=backend)
            for bar, n in zip(bars, counts):
                ratio = rows.get(n, {}).get("vs_local_x")
                if ratio:
                    ax.annotate(
                        f"{ratio:.2f}x",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
        ax.set_xticks(range(len(counts)), [f"{n} instance{'s' if n > 1 else ''}" for n in counts])
        ax.set_ylabel("decode step (ms, median)")
        batch, context = workload.split("x")
        ax.set_title(f"batch {batch}, context {context}: KV over N pools")
        ax.legend()
    fig.tight_layout()
    path = out_dir / "distributed.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
