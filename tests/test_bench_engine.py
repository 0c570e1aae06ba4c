"""``bench engine`` on the tiny model: the figures, the ratios and the same greedy tokens."""

from __future__ import annotations

import json

from infinite_llm.bench import engine


def test_bench_engine_tiny_smoke(capsys):
    argv = ["--model", "tiny", "--batch-sizes", "1", "3", "--prompt-len", "24", "--max-tokens", "6", "--json"]
    assert engine.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["read_bandwidth_gb_s"] > 0
    ours, hf = result["engines"]["infinite-llm"], result["engines"]["transformers"]
    for b in ("1", "3"):
        assert ours[b]["decode_tok_s"] > 0 and ours[b]["prefill_tok_s"] > 0
        assert hf[b]["ours_decode_x"] > 0
        assert hf[b]["same_tokens"] == 1.0  # greedy on the same weights: token for token
