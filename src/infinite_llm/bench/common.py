"""Helpers every benchmark shares: memory bandwidth, timing, peak RSS, tables, JSON output."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def read_bandwidth_samples(num_bytes: int = 1 << 30, repeats: int = 5) -> list[float]:
    """GB/s of each of ``repeats`` multithreaded sums over a buffer far beyond the caches."""
    x = torch.ones(
        num_bytes // 4, dtype=torch.float32
    )  # written once: no page faults in the timing
    return tensor_read_samples(x, repeats)


def tensor_read_samples(t: torch.Tensor, repeats: int = 5) -> list[float]:
    """GB/s of ``repeats`` sums over a tensor already in memory (no allocation, so no page
    faults and no growth of the peak RSS a benchmark reports); only meaningful where the tensor
    is several times the last-level cache."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        t.sum()
        samples.append(t.nbytes / (time.perf_counter() - start) / 1e9)
    return samples


def measure_read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-``repeats`` read bandwidth in GB/s."""
    return max(read_bandwidth_samples(num_bytes, repeats))


def time_alternating(
    fns: Sequence[Callable[[], object]],
    budget_s: float,
    min_repeats: int = 5,
    flush: Callable[[], object] | None = None,
) -> list[list[float]]:
    """Seconds per call of each of ``fns``, called in turn (after a warm-up of each) so that
    whatever else runs on the machine meanwhile weighs on all alike. ``flush`` runs before
    every timed call, outside the timing."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    t_start = time.perf_counter()
    while len(times[0]) < min_repeats or (
        time.perf_counter() - t_start < budget_s and len(times[0]) < 200
    ):
        for fn, out in zip(fns, times):
            if flush is not None:
                flush()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return times


class CacheFlusher:
    """A read of ``mib`` MiB (several times the last-level cache) that evicts the KV a call
    left there: in a decode step the other layers' KV and all the weights pass through the
    caches between two visits of one layer's KV, so every MA reads from memory. Without it a
    call would find part of the previous call's data in the cache, and which call ran before
    which would decide the comparison.

    Each read is timed, so the flushes double as samples of the machine's read bandwidth taken
    between the kernel calls (``samples``, GB/s): on a shared machine the bandwidth moves by
    a third within minutes, and a figure measured once at the start of a run may belong to
    another moment than the kernel's."""

    def __init__(self, mib: int) -> None:
        self.buffer = torch.ones(mib << 18, dtype=torch.float32)
        self.samples: list[float] = []

    def __call__(self) -> None:
        self.samples += tensor_read_samples(self.buffer, 1)


def cache_flusher(mib: int) -> CacheFlusher | None:
    """The flusher for ``mib`` MiB; None for 0."""
    return CacheFlusher(mib) if mib > 0 else None


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
    widths = (
        [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        if cells
        else [len(c) for c in columns]
    )
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
