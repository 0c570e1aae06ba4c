"""``bench prefix``: the multi-turn trace, the report's figures, and a run against a launched
tiny-model server."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from infinite_llm.bench import prefix
from infinite_llm.bench.prefix_report import ServerRun, TurnRecord, ratios, summarize
from infinite_llm.bench.prefix_trace import TraceConfig, make_trace
from infinite_llm.bench.serve import RequestResult

SMALL = TraceConfig(
    num_docs=2, doc_len=40, num_users=3, turns=3, question_len=5, output_len=4, repeat_len=24
)


def test_trace_is_fixed_by_its_seed() -> None:
    assert make_trace(SMALL, 320) == make_trace(SMALL, 320)
    other = make_trace(replace(SMALL, seed=1), 320)
    assert other.users[0].prompts[0] != make_trace(SMALL, 320).users[0].prompts[0]


def test_trace_prompts_are_growing_transcripts_over_shared_documents() -> None:
    trace = make_trace(SMALL, 320)
    assert [u.doc_id for u in trace.users] == [0, 1, 0]  # user u reads document u % num_docs
    docs = {u.doc_id: u.prompts[0][: SMALL.doc_len] for u in trace.users}
    assert docs[0] != docs[1]
    for user in trace.users:
        assert user.start_delay_s == 0.0  # no --stagger: all at once
        assert len(user.prompts) == SMALL.turns
        for t, prompt in enumerate(user.prompts):
            # doc + q1 + a1 + ... + q(t+1)
            assert (
                len(prompt) == SMALL.doc_len + (t + 1) * SMALL.question_len + t * SMALL.output_len
            )
            assert prompt[: SMALL.doc_len] == docs[user.doc_id]
            if t > 0:
                assert prompt[: len(user.prompts[t - 1])] == user.prompts[t - 1]
            assert all(80 <= token < 240 for token in prompt)  # away from special tokens
    # two users on one document share it, not their questions
    first, third = trace.users[0].prompts[0], trace.users[2].prompts[0]
    assert first[SMALL.doc_len :] != third[SMALL.doc_len :]
    assert len(trace.users[0].prompts[-1]) == SMALL.max_prompt_len()
    assert len(trace.repeat_prompt) == SMALL.repeat_len and trace.num_requests == 9


def test_staggered_users_start_within_the_window() -> None:
    trace = make_trace(replace(SMALL, stagger_s=2.0), 320)
    delays = [u.start_delay_s for u in trace.users]
    assert all(0.0 <= d <= 2.0 for d in delays) and len(set(delays)) == 3


def ok(ttft_s: float, prompt: int, cached: int | None, latency_s: float = 1.0) -> RequestResult:
    return RequestResult(
        ok=True,
        ttft_s=ttft_s,
        latency_s=latency_s,
        num_output_tokens=4,
        num_prompt_tokens=prompt,
        num_cached_tokens=cached,
    )


def test_summary_of_hand_made_results() -> None:
    records = [
        TurnRecord(0, 1, 100, ok(0.1, 100, 0)),
        TurnRecord(1, 1, 100, ok(0.3, 100, 0)),
        TurnRecord(0, 2, 150, ok(0.2, 150, 100)),
        TurnRecord(1, 2, 150, ok(0.4, 150, 120)),
        TurnRecord(2, 1, 100, RequestResult(error="HTTP 500")),
    ]
    run = ServerRun("ours", ok(0.5, 64, 0), ok(0.1, 64, 48), records, makespan_s=2.0)
    row = summarize(run)
    assert (row["requests"], row["failed"], row["errors"]) == (5, 1, ["HTTP 500"])
    assert row["mean_ttft_ms"] == pytest.approx(250)
    assert row["p50_ttft_ms"] == pytest.approx(250)
    assert row["p90_ttft_ms"] == pytest.approx(370)  # linear: 300 + 0.7 * 100
    assert row["p99_ttft_ms"] == pytest.approx(397)
    assert row["first_turn_ttft_ms"] == pytest.approx(200)
    assert row["later_turn_ttft_ms"] == pytest.approx(300)
    assert row["ttft_by_turn_ms"] == pytest.approx([200, 300])
    assert (row["prompt_tokens"], row["output_tokens"], row["cached_tokens"]) == (500, 16, 220)
    assert row["hit_rate"] == pytest.approx(220 / 500)
    assert row["output_throughput"] == pytest.approx(8.0)
    assert row["total_token_throughput"] == pytest.approx(258.0)
    assert row["repeat_cold_ttft_ms"] == pytest.approx(500)
    assert row["repeat_warm_ttft_ms"] == pytest.approx(100)
    assert row["repeat_cold_over_warm"] == pytest.approx(5.0)
    assert row["repeat_warm_cached_tokens"] == 48
    assert [r["turn"] for r in row["requests_detail"]] == [1, 1, 2, 2, 1]
    assert row["requests_detail"][-1]["ttft_ms"] is None


def test_hit_rate_is_null_when_the_server_reports_no_cached_tokens() -> None:
    records = [TurnRecord(0, 1, 100, ok(0.1, 100, None))]
    row = summarize(ServerRun("ours", ok(0.5, 64, None), ok(0.4, 64, None), records, 1.0))
    assert row["cached_tokens"] is None and row["hit_rate"] is None
    assert row["later_turn_ttft_ms"] is None and "errors" not in row


def test_ratios_are_ours_over_each_other_server() -> None:
    rows = [
        {"server": "ours", "mean_ttft_ms": 100.0, "repeat_warm_ttft_ms": 50.0, "makespan_s": 8.0},
        {"server": "ours-no-cache", "mean_ttft_ms": 400.0, "makespan_s": 10.0},
        {"server": "vllm", "mean_ttft_ms": 80.0, "repeat_warm_ttft_ms": 40.0, "makespan_s": 8.0},
    ]
    assert ratios(rows) == [
        {
            "peer": "ours-no-cache",
            "mean_ttft_ms_ours_over_peer": 0.25,
            "makespan_s_ours_over_peer": 0.8,
        },
        {
            "peer": "vllm",
            "mean_ttft_ms_ours_over_peer": 1.25,
            "repeat_warm_ttft_ms_ours_over_peer": 1.25,
            "makespan_s_ours_over_peer": 1.0,
        },
    ]
    assert ratios(rows[1:]) == []  # nothing to compare with without ours
    failed = {**rows[2], "failed": 12}
    assert [r["peer"] for r in ratios([*rows[:2], failed])] == ["ours-no-cache"]
    assert ratios([{**rows[0], "errors": ["repeat probe: HTTP 500"]}, rows[2]]) == []


TINY_SIZES = ["--num-docs", "2", "--doc-len", "48", "--num-users", "3", "--turns", "2"]
TINY_SIZES += ["--question-len", "6", "--output-len", "4", "--repeat-len", "32", "--no-progress"]


def test_bench_prefix_against_launched_tiny_servers(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    argv = ["--launch", "--server-args", "--model tiny --block-size 8"]
    code = prefix.main([*argv, *TINY_SIZES, "--json", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["bench"] == "prefix" and result["model"] == "tiny"
    assert result["config"]["vocab_size"] == 320 and result["config"]["turns"] == 2
    assert result["server_errors"] == []
    assert [row["server"] for row in result["results"]] == ["ours", "ours-no-cache"]
    (ratio,) = result["ratios"]
    assert ratio["peer"] == "ours-no-cache" and ratio["mean_ttft_ms_ours_over_peer"] > 0
    for row in result["results"]:
        assert row["requests"] == 6 and row["failed"] == 0 and "errors" not in row
        assert row["output_tokens"] == 6 * 4  # ignore_eos honoured
        for key in ("p50_ttft_ms", "p99_ttft_ms", "first_turn_ttft_ms", "later_turn_ttft_ms"):
            assert row[key] > 0
        assert row["repeat_cold_ttft_ms"] > 0 and row["repeat_warm_ttft_ms"] > 0
        assert row["output_throughput"] > 0 and row["makespan_s"] > 0
        assert row["hit_rate"] is None or 0 <= row["hit_rate"] <= 1
        details = row["requests_detail"]
        assert all(d["ok"] for d in details)
        assert sorted(d["turn"] for d in details) == [1, 1, 1, 2, 2, 2]
        assert {d["prompt_tokens"] for d in details} == {48 + 6, 48 + 6 + 4 + 6}
    assert (tmp_path / "prefix.png").stat().st_size > 0
    assert "bench prefix: tiny" in err


def test_a_launched_server_that_does_not_come_up_fails_the_bench(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--launch", "--server-args", "--model tiny --no-such-flag", "--no-baseline"]
    assert prefix.main([*argv, *TINY_SIZES, "--json"]) == 1
    out, err = capsys.readouterr()
    (error,) = json.loads(out)["server_errors"]
    assert error["server"] == "ours" and "exited with 2" in error["error"]
    assert "unrecognized arguments: --no-such-flag" in err  # the end of its log, shown
