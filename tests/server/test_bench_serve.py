"""``infinite-llm bench serve``: the open-loop client against a running server, and its figures."""

from __future__ import annotations

import json
import math

import pytest

from infinite_llm.bench import serve as bench_serve
from infinite_llm.bench import serve_report

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


def test_bench_serve_n_against_separate_requests(capsys: pytest.CaptureFixture[str]) -> None:
    """``--n 3``: a row for one request of three samples per prompt, a row for three separate
    requests per prompt, each with the rBlocks it held at its peak. Without a prefix cache
    the separate requests hold their prompt's 32 rBlocks each from their prefill on (192 for
    2 prompts), while the samples of a request share theirs: at most 32 + 3 x 17 per prompt."""
    server = "--model tiny --no-enable-prefix-caching --kv-blocks 512 --block-size 8"
    argv = ["--launch", "--server-args", server, "--num-prompts", "2", "--input-len", "256"]
    argv += ["--output-len", "128", "--n", "3", "--request-rate", "inf", "--json", "--no-progress"]
    code = bench_serve.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["n"] == 3
    shared, separate = result["results"]
    assert shared["server"] == "infinite-llm" and separate["server"] == "infinite-llm, 3 separate"
    assert shared["completed"] == 2 and shared["total_output_tokens"] == 2 * 3 * 128
    assert separate["completed"] == 2 * 3 and separate["total_output_tokens"] == 2 * 3 * 128
    assert separate["total_input_tokens"] == 3 * shared["total_input_tokens"]
    assert 0 < shared["peak_rblocks"] <= 2 * (32 + 3 * 17) < 2 * 3 * 32 <= separate["peak_rblocks"]
    (ratio,) = result["ratios"]
    assert ratio["peer"] == "infinite-llm, 3 separate"
    assert ratio["peak_rblocks_ours_over_peer"] == shared["peak_rblocks"] / separate["peak_rblocks"]


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
    (only,) = serve_report.ratios(rows)
    assert only == {
        "peer": "vllm",
        "request_rate": 4.0,
        "output_throughput_ours_over_peer": 0.9,
        "mean_ttft_ms_ours_over_peer": 1.25,
        "mean_tpot_ms_ours_over_peer": 0.8,
    }
