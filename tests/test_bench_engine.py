"""``bench engine`` on the tiny model: the figures, the ratios and the same greedy tokens."""

from __future__ import annotations

import json

import pytest

from infinite_llm.bench import engine, engine_timing


def test_bench_engine_tiny_smoke(capsys):
    argv = [
        "--model",
        "tiny",
        "--batch-sizes",
        "1",
        "3",
        "--prompt-len",
        "24",
        "--max-tokens",
        "6",
        "--json",
    ]
    assert engine.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["read_bandwidth_gb_s"] > 0
    # the tiny model's embedding is too small to probe memory: the bound uses the start figure
    assert result["read_bandwidth_gb_s_around_batch1"] is None
    assert result["bound_bandwidth_gb_s"] == result["read_bandwidth_gb_s"]
    assert result["batch1_decode_limit_tok_s"] == result["batch1_decode_limit_tok_s_start"]
    ours, hf = result["engines"]["infinite-llm"], result["engines"]["transformers"]
    for b in ("1", "3"):
        assert ours[b]["decode_tok_s"] > 0 and ours[b]["prefill_tok_s"] > 0
        assert hf[b]["ours_decode_x"] > 0
        assert hf[b]["same_tokens"] == 1.0  # greedy on the same weights: token for token


def test_bound_uses_the_bandwidth_read_around_the_batch1_run(capsys, monkeypatch):
    monkeypatch.setattr(engine, "MIN_PROBE_BYTES", 0)  # let the tiny embedding serve as the probe
    argv = [
        "--model",
        "tiny",
        "--batch-sizes",
        "1",
        "--prompt-len",
        "8",
        "--max-tokens",
        "3",
        "--no-hf",
        "--json",
    ]
    assert engine.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    around = result["read_bandwidth_gb_s_around_batch1"]
    assert around is not None and around > 0
    assert result["bound_bandwidth_gb_s"] == around
    assert result["batch1_decode_limit_tok_s"] == around * 1e9 / result["weight_bytes"]


def test_decode_rate_counts_only_full_batch_steps_after_the_last_first_token():
    """Chunked prefill: requests 0-1 start at step 0, requests 2-3 at step 1 (while 0-1 decode),
    the batch decodes whole from step 2, and requests finish one by one at the end."""
    steps = [(1.0, 2, 2), (2.5, 4, 2), (2.7, 4, 0), (3.0, 4, 0), (3.2, 4, 0), (3.3, 2, 0)]
    r = engine_timing.decode_rate(steps, 4)
    assert (
        r["decode_steps"] == 3
    )  # steps 2, 3 and 4; step 1 holds prefill chunks, step 5 is partial
    assert r["decode_tok_s"] == pytest.approx(4 * 3 / (3.2 - 2.5))
    assert r["decode_step_ms"] == pytest.approx((3.2 - 2.5) / 3 * 1e3)
    assert r["decode_step_ms_median"] == pytest.approx(0.2 * 1e3)


def test_decode_rate_without_a_full_batch_step_is_none():
    # batch 4, two tokens each, the last two requests start after the first two are done
    steps = [(1.0, 2, 2), (1.5, 2, 0), (2.0, 2, 2), (2.4, 2, 0)]
    assert engine_timing.decode_rate(steps, 4) == {
        "decode_tok_s": None,
        "decode_step_ms": None,
        "decode_step_ms_median": None,
        "decode_steps": 0,
    }


def test_every_engine_reports_its_steps(capsys):
    """ours and transformers each time 1 prefill step and max_tokens - 1 full-batch decode steps
    (no chunking at this size)."""
    argv = [
        "--model",
        "tiny",
        "--batch-sizes",
        "2",
        "--prompt-len",
        "8",
        "--max-tokens",
        "5",
        "--json",
    ]
    assert engine.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("infinite-llm", "transformers"):
        r = result["engines"][name]["2"]
        assert r["decode_steps"] == 4, name
        assert r["decode_tok_s"] == pytest.approx(2 / (r["decode_step_ms"] / 1e3))


def test_too_few_tokens_to_time_decode_is_refused(capsys):
    with pytest.raises(SystemExit):
        engine.main(["--model", "tiny", "--max-tokens", "1", "--no-hf"])
    assert "at least 2" in capsys.readouterr().err


def test_an_interrupted_timed_run_leaves_nothing_behind():
    from infinite_llm import LLM, SamplingParams

    llm = LLM("tiny", progress=False)
    step, calls = llm.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    llm.engine.step = failing_step
    with pytest.raises(KeyboardInterrupt):
        engine._stepped_ours(
            llm, [[5, 6, 7], [8, 9]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        )
    llm.engine.step = step
    assert not llm.engine.has_unfinished_requests()
    llm.check_integrity()
    assert llm.engine.cluster.stats()["instances"][0]["used"] == 0  # every rBlock back in the pool
