"""``bench paper`` on the tiny model (a smoke run) and ``simulate`` on the costs it fitted."""

from __future__ import annotations

import json

import pytest

from infinite_llm.bench import paper
from infinite_llm.cli.main import main as cli_main


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    argv = [
        "--model",
        "tiny",
        "--instances",
        "2",
        "3",
        "--kv-blocks",
        "8",
        "--block-size",
        "8",
        "--requests-per-instance",
        "3",
        "--rate-per-instance",
        "100",
        "--output-scale",
        "0.05",
        "--fit-out",
        str(out / "fit.json"),
        "--out",
        str(out),
        "--json",
    ]
    return out, argv


def test_bench_paper_tiny_smoke(bench_run, capsys):
    out, argv = bench_run
    assert paper.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["ratio"] for c in result["capacity"]] == [
        2.0,
        3.0,
    ]  # pooled memory, proven by serving it
    assert all(c["one_more_refused"] for c in result["capacity"])
    traces = {c["trace"] for c in result["comparisons"]}
    assert traces == {"chat", "docs", "longtail", "longtail-uncapped"}
    assert len(result["runs"]) == 2 * 2 * 5  # N x (capacity + 3 traces + 1 uncapped) x modes
    for run in result["runs"]:
        s = run["summary"]
        assert s["num_requests"] == s["num_completed"] + s["num_refused"] + s["num_unfinished"]
        if s["stopped"] is None:
            assert s["num_unfinished"] == 0 and s["all_free_after"]
    assert len(result["validation"]["runs"]) == len(result["runs"])
    assert set(result["targets"]) >= {"context_ratio_at_least_0.95N", "simulator_within_15pct"}
    fit = json.loads((out / "fit.json").read_text())
    assert fit["config"]["kv_blocks_per_instance"] == 8 and len(fit["costs"]["coefficients"]) == 7
    assert (out / "bench-paper.png").is_file()


def test_simulate_on_the_fitted_costs(bench_run, capsys):
    out, _ = bench_run
    if not (out / "fit.json").is_file():
        pytest.skip("needs the bench run")
    assert (
        cli_main(
            [
                "simulate",
                "--preset",
                "cpu-fitted",
                "--fit",
                str(out / "fit.json"),
                "--instances",
                "2",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["preset"] == "cpu-fitted" and result["rows"][0]["max_context_ratio"] == 2.0


def test_simulate_cli_a100(tmp_path, capsys):
    assert (
        cli_main(
            [
                "simulate",
                "--preset",
                "a100-llama2-7b",
                "--instances",
                "2",
                "--trace",
                "chat",
                "--requests-per-instance",
                "4",
                "--json",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    row = result["rows"][0]
    assert (
        row["capacity"]["borrowing"]["served_tokens"]
        == 2 * row["capacity"]["no_borrow"]["served_tokens"]
    )
    assert (tmp_path / "simulate-a100-llama2-7b.png").is_file()


def test_interleaved_runs_keep_their_own_clocks():
    import time

    from infinite_llm.bench.paper_run import BenchClock, interleave

    clocks = [BenchClock("wall"), BenchClock("wall")]
    worked = [0.0, 0.0]

    def driver(i, steps, busy):
        clocks[i].restart()
        for _ in range(steps):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < busy:
                pass
            worked[i] += time.perf_counter() - t0
            yield
        return f"run {i}", clocks[i]()

    results = interleave([driver(0, 3, 0.02), driver(1, 6, 0.01)], clocks)
    assert [r[0] for r in results] == [
        "run 0",
        "run 1",
    ]  # in the drivers' order, not the finishing order
    for (_, elapsed), work in zip(results, worked, strict=True):
        # each clock saw its own work (and its turn's bookkeeping), not the other run's
        assert work <= elapsed < work + 0.015
    clock = BenchClock("cpu")
    clock.pause()
    frozen = clock()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.02:
        pass
    assert clock() == frozen
    clock.resume()
    clock.wait_until(frozen + 5.0)  # an idle wait passes at once
    assert clock() >= frozen + 5.0


def test_starvation_names_what_more_memory_would_change():
    base = {"num_preemptions": 0, "peak_used_fraction": 0.5, "num_refused": 2}
    assert (
        paper.starvation(base, {"num_refused": 2}) == []
    )  # longer than the whole cluster: both refuse
    assert paper.starvation(base, {"num_refused": 1}) == ["refused what borrowing served"]
    full = base | {"num_preemptions": 3, "peak_used_fraction": 0.95, "num_refused": 0}
    assert paper.starvation(full, {"num_refused": 0}) == ["preempted", "pool full"]
