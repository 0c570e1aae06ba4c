"""What ``bench prefix`` reports of one server's run: TTFT percentiles (all turns, first turns,
later turns), throughput, the prefix-cache hit rate the server claims, the repeat probe, and the
ratios of ours to every other server; a table and a plot of TTFT per turn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infinite_llm.bench.serve import RequestResult
from infinite_llm.sim.plots import pyplot


@dataclass(frozen=True)
class TurnRecord:
    """One request of the trace: whose, which turn (1: the first question on the document),
    its prompt's length in the trace, and what the client saw."""

    user_id: int
    turn: int
    num_prompt_tokens: int
    result: RequestResult


@dataclass(frozen=True)
class ServerRun:
    """Everything measured on one server: the repeat probe (the same prompt twice in a row,
    before the trace) and the trace's requests; ``makespan_s`` from the first user's start to
    the last answer."""

    server: str
    repeat_cold: RequestResult
    repeat_warm: RequestResult
    records: list[TurnRecord]
    makespan_s: float


def stats_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean, p50, p90 and p99 in ms (numpy's linear interpolation, as ``bench serve``)."""
    ms = np.array(values_s, dtype=float) * 1e3
    out: dict[str, float | None] = {"mean": float(ms.mean()) if ms.size else None}
    for q in (50, 90, 99):
        out[f"p{q}"] = float(np.percentile(ms, q)) if ms.size else None
    return out


def _mean_ms(values_s: Sequence[float]) -> float | None:
    return float(np.mean(values_s)) * 1e3 if len(values_s) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def summarize(run: ServerRun) -> dict[str, Any]:
    """The server's row. Failed requests count in ``failed`` only. ``hit_rate``: cached prompt
    tokens / prompt tokens over the requests whose server reported cached tokens (None when
    none did)."""
    ok = [r for r in run.records if r.result.ok]
    turns = sorted({r.turn for r in run.records})
    num_prompt = sum(r.num_prompt_tokens for r in ok)
    num_out = sum(r.result.num_output_tokens for r in ok)
    reported = [r for r in ok if r.result.num_cached_tokens is not None]
    num_cached = sum(r.result.num_cached_tokens or 0 for r in reported) if reported else None
    row: dict[str, Any] = {
        "server": run.server,
        "requests": len(run.records),
        "failed": len(run.records) - len(ok),
        "makespan_s": run.makespan_s,
    }
    for stat, value in stats_ms([r.result.ttft_s for r in ok]).items():
        row[f"{stat}_ttft_ms"] = value
    row["first_turn_ttft_ms"] = _mean_ms([r.result.ttft_s for r in ok if r.turn == 1])
    row["later_turn_ttft_ms"] = _mean_ms([r.result.ttft_s for r in ok if r.turn > 1])
    row["ttft_by_turn_ms"] = [_mean_ms([r.result.ttft_s for r in ok if r.turn == t]) for t in turns]
    row["mean_latency_ms"] = _mean_ms([r.result.latency_s for r in ok])
    row["prompt_tokens"] = num_prompt
    row["output_tokens"] = num_out
    row["cached_tokens"] = num_cached
    reported_prompt = sum(r.num_prompt_tokens for r in reported)
    row["hit_rate"] = num_cached / reported_prompt if num_cached is not None else None
    row["output_throughput"] = num_out / run.makespan_s if run.makespan_s > 0 else None
    row["total_token_throughput"] = (
        (num_prompt + num_out) / run.makespan_s if run.makespan_s > 0 else None
    )
    cold, warm = run.repeat_cold, run.repeat_warm
    row["repeat_cold_ttft_ms"] = cold.ttft_s * 1e3 if cold.ok else None
    row["repeat_warm_ttft_ms"] = warm.ttft_s * 1e3 if warm.ok else None
    row["repeat_cold_over_warm"] = _ratio(row["repeat_cold_ttft_ms"], row["repeat_warm_ttft_ms"])
    row["repeat_warm_cached_tokens"] = warm.num_cached_tokens
    errors = sorted({r.result.error for r in run.records if not r.result.ok})
    errors += [f"repeat probe: {p.error}" for p in (cold, warm) if not p.ok]
    if errors:
        row["errors"] = errors[:5]
    row["requests_detail"] = [
        {
            "user": r.user_id,
            "turn": r.turn,
            "ok": r.result.ok,
            "ttft_ms": r.result.ttft_s * 1e3 if r.result.ok else None,
            "latency_ms": r.result.latency_s * 1e3 if r.result.ok else None,
            "prompt_tokens": r.num_prompt_tokens,
            "cached_tokens": r.result.num_cached_tokens,
            "output_tokens": r.result.num_output_tokens,
        }
        for r in run.records
    ]
    return row


RATIO_KEYS = (
    "mean_ttft_ms",
    "p50_ttft_ms",
    "p99_ttft_ms",
    "later_turn_ttft_ms",
    "repeat_warm_ttft_ms",
    "output_throughput",
    "makespan_s",
)


def ratios(rows: Sequence[dict[str, Any]], ours: str = "ours") -> list[dict[str, Any]]:
    """Per other server: ours / theirs for each of ``RATIO_KEYS`` both have (TTFT and makespan:
    below 1 is ours faster; throughput: above 1). The issue's target is
    ``repeat_warm_ttft_ms_ours_over_peer`` at most 1 against vLLM. A server with a failed
    request did other work than the rest and is compared with nothing."""

    def complete(row: dict[str, Any]) -> bool:
        return not row.get("failed") and not row.get("errors")

    base = next((row for row in rows if row["server"] == ours), None)
    if base is None or not complete(base):
        return []
    out = []
    for row in rows:
        if row is base or not complete(row):
            continue
        entry: dict[str, Any] = {"peer": row["server"]}
        for key in RATIO_KEYS:
            value = _ratio(base.get(key), row.get(key))
            if value is not None:
                entry[f"{key}_ours_over_peer"] = value
        out.append(entry)
    return out


# fmt: off
COLUMNS = ["server", "requests", "failed", "makespan_s", "mean_ttft_ms", "p50_ttft_ms",
           "p90_ttft_ms", "p99_ttft_ms", "first_turn_ttft_ms", "later_turn_ttft_ms",
           "output_throughput", "total_token_throughput", "hit_rate", "repeat_cold_ttft_ms",
           "repeat_warm_ttft_ms", "repeat_cold_over_warm"]
# fmt: on


def write_plot(rows: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """``prefix.png``: mean TTFT per turn, one line per server, and the repeat probe's cold and
    warm TTFT; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (turns_ax, probe_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        ys = row["ttft_by_turn_ms"]
        turns_ax.plot(range(1, len(ys) + 1), ys, marker="o", label=row["server"])
    turns_ax.set_xlabel("turn (1: first question on the document)")
    turns_ax.set_ylabel("TTFT (ms, mean over users)")
    turns_ax.set_title("TTFT per turn")
    turns_ax.xaxis.get_major_locator().set_params(integer=True)
    turns_ax.legend()
    width = 0.4
    xs = np.arange(len(rows))
    for offset, key, label in (
        (-width / 2, "repeat_cold_ttft_ms", "cold"),
        (width / 2, "repeat_warm_ttft_ms", "warm"),
    ):
        probe_ax.bar(xs + offset, [row[key] or 0 for row in rows], width, label=label)
    probe_ax.set_xticks(xs, [row["server"] for row in rows])
    probe_ax.set_ylabel("TTFT (ms)")
    probe_ax.set_title("repeat probe: one prompt sent twice")
    probe_ax.legend()
    fig.tight_layout()
    path = out_dir / "prefix.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
