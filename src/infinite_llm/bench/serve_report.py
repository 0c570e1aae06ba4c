"""``bench serve``'s figures: a run's row (vLLM's ``benchmark_serving`` statistics, the prompt
tokens found in the server's prefix cache, its peak rBlocks), ours over every other row at the
same rate, and the table's columns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from infinite_llm.bench.serve import RequestResult

# fmt: off
COLUMNS = ["server", "request_rate", "completed", "failed", "duration_s", "request_throughput",
           "output_throughput", "total_token_throughput", "total_cached_tokens", "peak_rblocks",
           "mean_ttft_ms", "p99_ttft_ms",
           "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms"]
# fmt: on


def summarize(
    results: Sequence[RequestResult],
    duration: float,
    input_len: int,
    rate: float,
    peak: int | None = None,
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    num_in = input_len * len(ok)
    num_out = sum(r.num_output_tokens for r in ok)
    row: dict[str, Any] = {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": num_in / duration,
        "output_throughput": num_out / duration,
        "total_token_throughput": (num_in + num_out) / duration,
        # prompt tokens the server found in its prefix cache (None: it does not report them)
        "total_cached_tokens": None
        if any(r.num_cached_tokens is None for r in ok)
        else sum(r.num_cached_tokens or 0 for r in ok),
        "peak_rblocks": peak,
    }
    tpot = [
        (r.latency_s - r.ttft_s) / (r.num_output_tokens - 1) for r in ok if r.num_output_tokens > 1
    ]
    series = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": tpot,
        "itl": [x for r in ok for x in r.itl_s],
        "e2el": [r.latency_s for r in ok],
    }
    for name, values in series.items():
        ms = np.array(values) * 1e3
        for stat, fn in (("mean", np.mean), ("median", np.median)):
            row[f"{stat}_{name}_ms"] = float(fn(ms)) if ms.size else None
        for q in (90, 99):
            row[f"p{q}_{name}_ms"] = float(np.percentile(ms, q)) if ms.size else None
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        row["errors"] = errors[:5]
    return row


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per other row (a peer, or ours as ``--n`` separate requests) and rate: ours / its output
    throughput, mean TTFT, mean TPOT and peak rBlocks (where both report them)."""
    ours = {row["request_rate"]: row for row in rows if row["server"] == "infinite-llm"}
    out = []
    for row in rows:
        base = ours.get(row["request_rate"])
        if row["server"] == "infinite-llm" or base is None:
            continue
        entry: dict[str, Any] = {"peer": row["server"], "request_rate": row["request_rate"]}
        for key in ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "peak_rblocks"):
            if base.get(key) and row.get(key):
                entry[f"{key}_ours_over_peer"] = base[key] / row[key]
        out.append(entry)
    return out
