"""``bench channels``: round trips between two Ray actors, timed in the first, actors gone after."""

from __future__ import annotations

import pytest

from infinite_llm.bench.channels import ACTOR_PREFIX, measure_channels

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    """Ray up before the probe, so that it reuses it and its actors can be looked for after."""
    from infinite_llm.cluster.ray_runtime import init_ray

    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def test_round_trips_of_ray_call_zmq_ipc_the_engine_channel_and_the_pipe_floor() -> None:
    candidates = ["ray_call", "zmq_ipc", "engine_channel", "pipe_floor"]
    rows = measure_channels(payload_bytes=4096, num_calls=20, candidates=candidates)
    assert [r["candidate"] for r in rows] == candidates
    for row in rows:
        assert "error" not in row, row
        assert row["measured_in"] == "actor"
        assert row["median_us"] > 0
        assert row["p90_us"] >= row["median_us"] >= row["min_us"] > 0
    assert ray.is_initialized()  # reused, not shut down
    names = [n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]
    assert names == []


def test_a_failing_candidate_gets_a_row_with_its_error() -> None:
    rows = measure_channels(payload_bytes=64, num_calls=5, candidates=["no_such_channel"])
    assert rows[0]["candidate"] == "no_such_channel"
    assert "unknown candidate" in rows[0]["error"]
    assert "median_us" not in rows[0]
