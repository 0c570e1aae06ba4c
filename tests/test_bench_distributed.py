"""``bench distributed``: both workloads in one run, ratios within each, tokens equal, targets."""

from __future__ import annotations

import json

import pytest

from infinite_llm.bench.distributed import main


def _run(capsys, *extra: str) -> dict:
    argv = ["--model", "tiny", "--instances", "1", "2", "--workloads", "1x96", "2x40"]
    argv += ["--steps", "3", "--warmup", "1", "--block-size", "8", "--json", *extra]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_in_process_workloads_in_one_run(capsys, tmp_path) -> None:
    result = _run(capsys, "--backends", "inprocess", "--out", str(tmp_path))
    assert result["workloads"] == ["1x96", "2x40"]
    rows = result["results"]
    assert [(r["workload"], r["instances"], r["placement"]) for r in rows] == [
        (workload, n, placement)
        for workload in ("1x96", "2x40")
        for n, placement in ((1, "model"), (2, "model"), (2, "memory"), (2, "host"))
    ]
    for r in rows:
        assert r["same_tokens"] and r["step_ms"] > 0
        assert (r["remote_ma_per_step"] > 0) == (r["instances"] > 1)
        if r["placement"] != "model":  # half the KV on the memory instance or the host pool
            assert r["bytes_out_per_step"] > 0 and r["blocks_per_instance"][1] > 0
    assert any("inprocess x2" in k for k in result["target_checks"])
    assert (tmp_path / "distributed.png").stat().st_size > 0


@pytest.mark.ray
def test_ray_rows_carry_the_data_plane_figures(capsys) -> None:
    pytest.importorskip("ray")
    result = _run(capsys, "--backends", "ray")
    spread = [r for r in result["results"] if r["instances"] == 2]
    assert [r["placement"] for r in spread] == ["model", "memory", "host"] * 2
    for r in spread:
        assert r["same_tokens"] and r["bytes_out_per_step"] > 0
        assert r["layer_wire_ms"] > 0 and r["channel_ms"] > 0 and r["noop_call_ms"] > 0
        assert r["threads"] >= 1
        # one node: every whole-step decode with remote shards crossed its layers in C
        assert r["steps_exchanged_in_c"] == 1.0
