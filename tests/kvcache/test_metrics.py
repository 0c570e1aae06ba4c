"""Metrics: locality, percentiles, latency summaries, counters, memory table."""

from __future__ import annotations

import math

from infinite_llm.kvcache import BlockRef, BlockTable, BorrowStats, RManager, locality
from infinite_llm.kvcache.metrics import (
    LatencyRecorder,
    format_memory_table,
    memory_table,
    percentile,
)


def test_locality_exact():
    r = BlockRef
    report = locality(
        {
            "a": (0, BlockTable([r(0, 1), r(0, 2), r(1, 0), r(2, 5)])),
            "b": (1, [r(1, 3)]),
            "c": (2, []),
        }
    )
    assert report.per_request == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert report.mean == 2.5 / 3
    assert report.overall == 3 / 5
    assert (report.num_local_blocks, report.num_blocks) == (3, 5)
    assert locality({}).overall == 1.0


def test_percentile_interpolates():
    assert math.isnan(percentile([], 50))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([5.0], 99) == 5.0


def test_latency_recorder_keeps_last_samples():
    rec = LatencyRecorder(max_samples=3)
    for s in (9.0, 1.0, 2.0, 3.0):
        rec.record(s)
    summary = rec.summary()
    assert (summary.count, summary.mean_s, summary.p50_s, summary.max_s) == (3, 2.0, 2.0, 3.0)


def test_borrow_stats_add_and_dict():
    stats = BorrowStats()
    stats.add(num_borrows=2, num_false_replies=1)
    stats.latency.record(0.5)
    d = stats.as_dict()
    assert d["num_borrows"] == 2 and d["num_false_replies"] == 1 and d["num_failed"] == 0
    assert d["latency"]["p50_s"] == 0.5


def test_memory_table_rows():
    ms = [RManager(1, 8), RManager(0, 4)]
    ms[0].allocate(3)
    rows = memory_table(m.heartbeat() for m in ms)
    assert [(row["instance_id"], row["num_free"], row["num_used"]) for row in rows] == [
        (0, 4, 0),
        (1, 5, 3),
    ]
    text = format_memory_table(rows)
    assert len(text.splitlines()) == 3 and "num_borrowed" in text
