"""The memory micro-benchmark runs, reports every figure, and leaves managers intact.

(It lives here because it measures kvcache/; the CLI wiring is tested with the CLI.)
"""

from __future__ import annotations

import json

from infinite_llm.bench.memory import main, run_memory_bench


def test_run_memory_bench_small():
    report = run_memory_bench((4, 16), duration_s=0.02, num_threads=2, blocks_per_instance=64)
    assert [r["num_instances"] for r in report["results"]] == [4, 16]
    for row in report["results"]:
        for name in ("recommend", "recommend_mt", "lend_round", "lend_round_mt"):
            r = row[name]
            assert r["count"] > 0 and r["per_s"] > 0 and 0 < r["p50_us"] <= r["p99_us"], r
        assert row["recommend_mt"]["threads"] == 2
        assert row["gmanager"]["num_queries"] == row["recommend"]["count"]
    assert report["target"]["met"] is None  # no 1024-instance row


def test_main_json(capsys):
    assert main(["--json", "--instances", "3", "--duration", "0.01", "--blocks", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["num_instances"] == [3]
    assert report["results"][0]["lend_round"]["count"] > 0


def test_main_table(capsys):
    assert main(["--instances", "3", "--duration", "0.01", "--blocks", "32"]) == 0
    out = capsys.readouterr().out
    assert "recommend_mt" in out and "lend_round" in out
