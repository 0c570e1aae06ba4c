"""Server settings and failures, on apps served from a thread of this process: ``--api-key``
(401), ``--max-waiting-requests`` (503), body limit (413), and engine errors (500, then serving on)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from conftest import loaded_model
from infinite_llm.config import CacheConfig, EngineConfig
from infinite_llm.llm_engine import LLMEngine
from infinite_llm.server.app import create_app
from infinite_llm.server.settings import ServerSettings

from .helpers import ThreadServer, wait_clean


def make_engine() -> LLMEngine:
    config = EngineConfig(
        model="tiny", num_instances=2, cache=CacheConfig(block_size=8, num_blocks=64)
    )
    return LLMEngine(config, loaded_model("tiny"), progress=False)


@pytest.fixture
def serve() -> Iterator:
    servers: list[ThreadServer] = []

    def start(engine: LLMEngine, **settings) -> ThreadServer:
        server = ThreadServer(
            create_app(engine, ServerSettings(served_model_names=("tiny",), **settings))
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_api_key_guards_v1_only(serve) -> None:
    server = serve(make_engine(), api_key="sekrit")
    url = server.base_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401
    auth = {"Authorization": "Bearer sekrit"}
    assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
    assert httpx.get(url + "/v1/cluster", headers=auth).status_code == 200
    for open_path in ("/health", "/metrics", "/dashboard"):
        assert httpx.get(url + open_path).status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
    assert (
        client.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens
        == 3
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_small_body_limit(serve) -> None:
    server = serve(make_engine(), max_body_bytes=1000)
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x" * 2000})
    assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x" * 100, "max_tokens": 2})
    assert r.status_code == 200


def test_full_waiting_queue_answers_503(serve) -> None:
    engine = make_engine()
    gate = threading.Event()
    real_parts = engine.step_in_parts

    def gated_parts():
        gate.wait()
        yield from real_parts()

    engine.step_in_parts = gated_parts  # the engine thread stalls: accepted requests stay waiting
    server = serve(engine, max_waiting_requests=2)
    url = server.base_url + "/v1/completions"
    results: list[int] = []

    def send() -> None:
        results.append(
            httpx.post(url, json={"prompt": "wait", "max_tokens": 3}, timeout=60).status_code
        )

    senders = [threading.Thread(target=send) for _ in range(2)]
    for t in senders:
        t.start()
    wait_until(
        lambda: (
            httpx.get(server.base_url + "/metrics").text.count(
                'infinite_llm:num_requests_waiting{model_name="tiny"} 2.0'
            )
            == 1
        )
    )
    r = httpx.post(url, json={"prompt": "one too many", "max_tokens": 3})
    assert r.status_code == 503 and "overloaded" in r.json()["error"]["message"]
    gate.set()
    for t in senders:
        t.join()
    assert results == [200, 200]
    wait_clean(server.base_url)


def test_engine_errors_fail_the_requests_in_flight_and_serving_goes_on(serve) -> None:
    engine = make_engine()
    real_parts = engine.step_in_parts
    failures = {"left": 0}

    def flaky_parts():
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected failure")
        yield from real_parts()

    engine.step_in_parts = flaky_parts
    server = serve(engine)
    url = server.base_url + "/v1/completions"
    failures["left"] = 1
    r = httpx.post(url, json={"prompt": "doomed", "max_tokens": 5}, timeout=60)
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
    failures["left"] = 1
    with httpx.stream(
        "POST", url, json={"prompt": "doomed too", "max_tokens": 5, "stream": True}, timeout=60
    ) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert (
        "injected failure" in json.loads(events[0])["error"]["message"] and events[-1] == "[DONE]"
    )
    r = httpx.post(url, json={"prompt": "fine again", "max_tokens": 5}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    snap = wait_clean(server.base_url)
    assert snap["num_step_errors"] == 2


def wait_until(condition, timeout_s: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_drain_ends_streams_in_flight_at_once(serve) -> None:
    """What SIGINT/SIGTERM do first in `infinite-llm serve`: streams end with an error event and
    [DONE], their requests are aborted, new requests get 503."""
    engine = make_engine()
    server = serve(engine)
    app_engine = server.server.config.app.state.server.engine
    body = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        app_engine.drain_threadsafe()
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert "shutting down" in json.loads(rest[-2])["error"]["message"] and rest[-1] == "[DONE]"
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "late"})
    assert r.status_code == 503
    wait_until(
        lambda: all(
            i.rmanager.num_free_blocks == i.rmanager.num_blocks
            for i in engine.cluster.instances.values()
        )
    )
