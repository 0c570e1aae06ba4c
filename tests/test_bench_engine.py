"""``bench engine`` on the tiny model: the figures, the ratios and the same greedy tokens."""

from __future__ import annotations

import json

from infinite_llm.bench import engine


def test_bench_engine_tiny_smoke(capsys):
    argv = ["--model", "tiny", "--batch-sizes", "1", "3", "--prompt-len", "24", "--max-tokens", "6", "--json"]
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
    argv = ["--model", "tiny", "--batch-sizes", "1", "--prompt-len", "8", "--max-tokens", "3", "--no-hf", "--json"]
    assert engine.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    around = result["read_bandwidth_gb_s_around_batch1"]
    assert around is not None and around > 0
    assert result["bound_bandwidth_gb_s"] == around
    assert result["batch1_decode_limit_tok_s"] == around * 1e9 / result["weight_bytes"]


def test_decode_is_timed_over_the_second_half_of_the_tokens():
    """Chunked prefill overlaps the first decode steps with later prefill chunks: the decode
    rate comes from the generates of 32 and 64 tokens, not from 1 and 64."""
    r = engine._rates(4, 10, 64, t_prefill=2.0, t_half=5.0, t_total=7.0)
    assert r["prefill_tok_s"] == 4 * 10 / 2.0
    assert r["decode_tok_s"] == 4 * 32 / 2.0
    assert r["decode_step_ms"] == 2.0 / 32 * 1e3


def test_too_few_tokens_to_time_decode_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        engine.main(["--model", "tiny", "--max-tokens", "1", "--no-hf"])
    assert "at least 2" in capsys.readouterr().err

