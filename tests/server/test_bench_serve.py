"""``infinite-llm bench serve``: the open-loop client against a running server, and its figures."""

from __future__ import annotations

import json
import math

import pytest

from infinite_llm.bench import serve as bench_serve

from .helpers import ServerProcess, wait_clean


def test_arrivals_are_poisson_or_all_at_once() -> None:
    assert bench_serve.arrival_delays(4, math.inf, 0) == [0.0] * 4
    delays = bench_serve.arrival_delays(2000, 50.0, 0)
    assert delays[0] == 0.0 and delays == sorted(delays)
    assert delays[-1] / len(delays) == pytest.approx(1 / 50, rel=0.1)  # mean gap = 1 / rate


def test_bench_serve_reports_vllm_figures(
    tiny_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code = bench_serve.main(
        [
            "--base-url",
            tiny_server.base_url + "/v1",
            "--tokenizer",
            "tiny",
            "--num-prompts",
            "6",
            "--input-len",
            "24",
            "--output-len",
            "8",
            "--request-rate",
            "20",
            "inf",
            "--json",
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert (
        result["bench"] == "serve"
        and result["model"] == "tiny"
        and result["config"]["vocab_size"] == 320
    )
    assert [r["request_rate"] for r in result["results"]] == [20.0, "inf"]
    for row in result["results"]:
        assert row["completed"] == 6 and row["failed"] == 0
        assert (
            row["total_input_tokens"] == 6 * 24 and row["total_output_tokens"] == 6 * 8
        )  # ignore_eos honoured
        for name in ("ttft", "tpot", "itl", "e2el"):
            for stat in ("mean", "median", "p90", "p99"):
                assert row[f"{stat}_{name}_ms"] > 0
        assert row["p99_e2el_ms"] >= row["median_e2el_ms"] >= row["median_ttft_ms"]
        assert row["request_throughput"] > 0 and row["output_throughput"] > 0
        # each rate (and the warm-up) has its own prompts: the server's prefix cache finds none
        assert row["total_cached_tokens"] == 0
    assert "bench serve: tiny" in err  # the human table goes to stderr with --json
    wait_clean(tiny_server.base_url)


def test_bench_serve_n_counts_every_sample(
    tiny_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--base-url", tiny_server.base_url, "--tokenizer", "tiny", "--num-prompts", "2"]
    argv += ["--input-len", "16", "--output-len", "4", "--n", "3", "--json", "--no-progress"]
    code = bench_serve.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["n"] == 3
    (row,) = result["results"]
    assert row["completed"] == 2 and row["total_output_tokens"] == 2 * 3 * 4
    wait_clean(tiny_server.base_url)


def test_ratios_pair_each_peer_row_with_ours_at_its_rate() -> None:
    rows = [
        {
            "server": "infinite-llm",
            "request_rate": 4.0,
            "output_throughput": 90.0,
            "mean_ttft_ms": 4000.0,
            "mean_tpot_ms": 200.0,
        },
        {
            "server": "infinite-llm",
            "request_rate": "inf",
            "output_throughput": 100.0,
            "mean_ttft_ms": 8000.0,
            "mean_tpot_ms": 180.0,
        },
        {
            "server": "vllm",
            "request_rate": 4.0,
            "output_throughput": 100.0,
            "mean_ttft_ms": 3200.0,
            "mean_tpot_ms": 250.0,
        },
    ]
    (only,) = bench_serve.ratios(rows)
    assert only == {
        "peer": "vllm",
        "request_rate": 4.0,
        "output_throughput_ours_over_peer": 0.9,
        "mean_ttft_ms_ours_over_peer": 1.25,
        "mean_tpot_ms_ours_over_peer": 0.8,
    }
