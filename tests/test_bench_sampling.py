"""``bench sampling``: n samples of one request against n separate requests (figures' keys)."""

from __future__ import annotations

import json

import pytest

from infinite_llm.bench import parallel_sampling


def test_bench_sampling_reports_memory_and_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "tiny", "--kv-blocks", "64", "--block-size", "8"]
    argv += ["--n", "4", "--input-len", "60", "--output-len", "4", "--json"]
    assert parallel_sampling.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bench"] == "sampling" and result["config"]["n"] == 4
    shared, separate = result["results"]
    assert (shared["mode"], separate["mode"]) == ("n=4", "4 x n=1")
    for row in (shared, separate):
        assert row["output_tokens"] == 16 and row["output_throughput"] > 0
    # 60 tokens + 4: 7 full prompt rBlocks held once, then one own rBlock per sample; the
    # first sample's 8th fills at its 4th token (64 tokens); separate: 8 rBlocks each
    assert shared["peak_used_blocks"] == 7 + 1 + 3 and separate["peak_used_blocks"] == 4 * 8
    assert result["memory_ratio"] == pytest.approx(32 / 11)
    assert result["throughput_ratio"] > 0
