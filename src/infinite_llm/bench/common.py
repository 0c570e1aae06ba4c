"""Helpers every benchmark shares: memory bandwidth, peak RSS, tables, JSON output."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch


def read_bandwidth_samples(num_bytes: int = 1 << 30, repeats: int = 5) -> list[float]:
    """GB/s of each of ``repeats`` multithreaded sums over a buffer far beyond the caches."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32)  # written once: no page faults in the timing
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        samples.append(num_bytes / (time.perf_counter() - start) / 1e9)
    del x
    return samples


def measure_read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-``repeats`` read bandwidth in GB/s."""
    return max(read_bandwidth_samples(num_bytes, repeats))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)] if cells else [len(c) for c in columns]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)
    return "\n".join(lines)


def emit(result: dict[str, Any], table: str, as_json: bool) -> None:
    """The human table on stderr when JSON goes to stdout (so stdout stays one JSON object)."""
    if as_json:
        print(table, file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(table)
