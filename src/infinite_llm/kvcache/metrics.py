"""Memory-management metrics: borrow counters and latencies, locality, per-instance memory."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TypeVar

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.messages import Heartbeat

K = TypeVar("K", bound=Hashable)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100) of already sorted values; nan if empty."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    count: int
    mean_s: float
    p50_s: float
    p99_s: float
    max_s: float


class LatencyRecorder:
    """Keeps the last ``max_samples`` durations (seconds); thread-safe."""

    def __init__(self, max_samples: int = 100_000) -> None:
        self._samples: deque[float] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        with self._lock:
            self._samples.append(seconds)

    def record_all(self, seconds: Iterable[float]) -> None:
        with self._lock:
            self._samples.extend(seconds)

    def __len__(self) -> int:
        return len(self._samples)

    def summary(self) -> LatencySummary:
        with self._lock:
            values = sorted(self._samples)
        mean = sum(values) / len(values) if values else math.nan
        return LatencySummary(
            count=len(values),
            mean_s=mean,
            p50_s=percentile(values, 50),
            p99_s=percentile(values, 99),
            max_s=values[-1] if values else math.nan,
        )


@dataclass(slots=True)
class BorrowStats:
    """Counters of one debtor's (or a whole cluster's) borrow procedures; thread-safe adds."""

    num_borrows: int = 0  # calls to borrow()
    num_granted: int = 0  # calls that got every block asked for
    num_failed: int = 0  # calls that gave up (returned None)
    num_false_replies: int = 0  # creditors that answered false
    num_rounds: int = 0  # recommendations asked for
    num_split: int = 0  # grants assembled from several creditors
    num_blocks_borrowed: int = 0
    num_blocks_released: int = 0
    latency: LatencyRecorder = field(default_factory=LatencyRecorder)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, object]:
        with self._lock:
            out: dict[str, object] = {
                f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("num_")
            }
        out["latency"] = asdict(self.latency.summary())
        return out


@dataclass(frozen=True, slots=True)
class LocalityReport:
    """Fraction of rBlocks held on the request's home instance.

    ``mean`` averages per request (a request without rBlocks counts as fully local);
    ``overall`` is local rBlocks over all rBlocks.
    """

    per_request: dict[Hashable, float]
    mean: float
    overall: float
    num_local_blocks: int
    num_blocks: int


def locality(block_tables: Mapping[K, tuple[int, Iterable[BlockRef]]]) -> LocalityReport:
    """``block_tables``: request -> (home instance id, its rBlocks, e.g. a ``BlockTable``)."""
    per_request: dict[Hashable, float] = {}
    num_local = num_total = 0
    for req, (home_id, refs) in block_tables.items():
        refs = list(refs)
        local = sum(1 for r in refs if r.instance_id == home_id)
        per_request[req] = local / len(refs) if refs else 1.0
        num_local += local
        num_total += len(refs)
    mean = sum(per_request.values()) / len(per_request) if per_request else 1.0
    overall = num_local / num_total if num_total else 1.0
    return LocalityReport(per_request, mean, overall, num_local, num_total)


def memory_table(heartbeats: Iterable[Heartbeat]) -> list[dict[str, int]]:
    """One row per instance: free/used/lent/borrowed/lendable blocks, sorted by id."""
    return [
        {
            "instance_id": hb.instance_id,
            "num_blocks": hb.num_blocks,
            "num_free": hb.num_free,
            "num_used": hb.num_used,
            "num_lent": hb.num_lent,
            "num_borrowed": hb.num_borrowed,
            "lendable": hb.lendable,
        }
        for hb in sorted(heartbeats, key=lambda h: h.instance_id)
    ]


def format_memory_table(rows: Sequence[Mapping[str, int]]) -> str:
    """Plain-text table of ``memory_table`` rows."""
    cols = ["instance_id", "num_blocks", "num_free", "num_used", "num_lent", "num_borrowed"]
    head = "".join(f"{c:>13}" for c in cols)
    lines = [head] + ["".join(f"{row[c]:>13}" for c in cols) for row in rows]
    return "\n".join(lines)
