"""Bad input answers 4xx in the OpenAI error shape and harms nobody; disconnects free rBlocks."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from .conftest import SMALL_MAX_MODEL_LEN
from .helpers import ServerProcess, cluster, wait_clean

CHAT = [{"role": "user", "content": "hi"}]


def post(
    server: ServerProcess, path: str, body: Any = None, content: bytes | None = None
) -> httpx.Response:
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(
        server.base_url + path,
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )


def assert_error(
    response: httpx.Response, status: int, *words: str, param: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", ["invalid JSON"]),
        (b"", ["empty"]),
        (b"[1, 2]", ["JSON object"]),
        (b'{"prompt": "hi", "temperature": NaN}', ["NaN"]),
        (b"\xff\xfe", ["invalid JSON"]),
    ],
)
def test_malformed_bodies(tiny_server: ServerProcess, content: bytes, words: list[str]) -> None:
    assert_error(post(tiny_server, "/v1/completions", content=content), 400, *words)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({}, "prompt", ["Field required"]),
        ({"prompt": 12}, "prompt", ["must be a string"]),
        ({"prompt": "hi", "temperature": "hot"}, "temperature", ["valid number"]),
        ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens", ["integer"]),
        ({"prompt": "hi", "stream": "perhaps"}, "stream", ["boolean"]),
        ({"prompt": "hi", "stop": [1, 2]}, "stop", ["string"]),
        ({"prompt": "hi", "temperature": -0.5}, "temperature", ["temperature must be >= 0"]),
        ({"prompt": "hi", "top_p": 1.5}, "top_p", ["top_p"]),
        ({"prompt": "hi", "top_k": -3}, "top_k", ["top_k"]),
        ({"prompt": "hi", "min_p": 2}, "min_p", ["min_p"]),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", ["max_tokens must be at least 1"]),
        ({"prompt": "hi", "logprobs": 99}, "logprobs", ["logprobs"]),
        ({"prompt": "hi", "n": 0}, "n", ["n must be at least 1"]),
        ({"prompt": "hi", "n": 3, "best_of": 2}, "best_of", ["best_of must be at least n"]),
        ({"prompt": "hi", "best_of": 2, "stream": True}, "best_of", ["streaming"]),
        ({"prompt": "hi", "stop": ["ok", ""]}, "stop", ["stop strings must not be empty"]),
        ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty", ["[-2, 2]"]),
        ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty", ["greater than zero"]),
        ({"prompt": "hi", "logit_bias": {"100000": 1}}, "logit_bias", ["vocabulary"]),
        ({"prompt": "hi", "logit_bias": {"a": 1}}, "logit_bias", ["not a token id"]),
        ({"prompt": "hi", "stop_token_ids": [100000]}, "stop_token_ids", ["vocabulary"]),
        ({"prompt": "hi", "allowed_token_ids": [1, 100000]}, "allowed_token_ids", ["vocabulary"]),
        ({"prompt": "hi", "seed": 2**64}, "seed", ["64-bit"]),
        ({"prompt": "hi", "logprobs": -1}, "logprobs", ["max_logprobs"]),
        ({"prompt": "hi", "prompt_logprobs": -5}, "prompt_logprobs", ["-1"]),
        (
            {"prompt": "hi", "prompt_logprobs": 1, "stream": True},
            "prompt_logprobs",
            ["stream"],
        ),
        (
            {"prompt": "hi", "truncate_prompt_tokens": 5000},
            "truncate_prompt_tokens",
            ["max_model_len"],
        ),
        ({"prompt": "hi", "truncation_side": "middle"}, "truncation_side", ["left"]),
        ({"prompt": "hi", "suffix": "x"}, "suffix", ["not supported"]),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", ["stream"]),
        ({"prompt": ""}, "prompt", ["prompt is empty"]),
        ({"prompt": []}, "prompt", ["prompt is empty"]),
        ({"prompt": [5, 7, 100000]}, "prompt", ["out of range"]),
        ({"prompt": "x" * 2100}, "prompt", ["2100 tokens", "max_model_len is 2048"]),
        (
            {"prompt": "x" * 2000, "max_tokens": 100},
            "prompt",
            ["maximum context length is 2048", "2100"],
        ),
    ],
)
def test_completion_bad_fields_name_the_problem(
    tiny_server: ServerProcess, body: dict, param: str, words: list[str]
) -> None:
    assert_error(
        post(tiny_server, "/v1/completions", {"model": "tiny", **body}), 400, *words, param=param
    )


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": []}, "messages", ["at least 1"]),
        ({"messages": "hi"}, "messages", ["messages"]),
        ({"messages": [{"content": "no role"}]}, "messages", ["role"]),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages",
            ["only text"],
        ),
        ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs", ["requires logprobs"]),
        (
            {"messages": CHAT, "logprobs": True, "top_logprobs": 50},
            "top_logprobs",
            ["top_logprobs"],
        ),
        ({"messages": CHAT, "max_completion_tokens": -1}, "max_completion_tokens", ["at least 1"]),
        ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools", ["function"]),
        ({"messages": CHAT, "tool_choice": "sometimes"}, "tool_choice", ["required"]),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", ["role"]),
        (
            {
                "messages": [*CHAT, {"role": "assistant", "content": "Hel"}],
                "continue_final_message": True,
            },
            "continue_final_message",
            ["add_generation_prompt"],
        ),
        (
            {"messages": CHAT, "continue_final_message": True, "add_generation_prompt": False},
            "continue_final_message",
            ["assistant"],
        ),
        ({"messages": CHAT, "chat_template": "{{ messages }}"}, "chat_template", ["trust"]),
        (
            {"messages": CHAT, "chat_template_kwargs": {"tokenize": True}},
            "chat_template_kwargs",
            ["tokenize"],
        ),
        ({"messages": CHAT, "best_of": 2}, "best_of", ["/v1/completions"]),
        (
            {"messages": [{"role": "user", "content": "x" * 2100}]},
            "messages",
            ["max_model_len is 2048"],
        ),
    ],
)
def test_chat_bad_fields_name_the_problem(
    tiny_server: ServerProcess, body: dict, param: str, words: list[str]
) -> None:
    assert_error(post(tiny_server, "/v1/chat/completions", body), 400, *words, param=param)


def test_unknown_model_route_and_method(tiny_server: ServerProcess) -> None:
    assert_error(
        post(tiny_server, "/v1/completions", {"model": "gpt-4o", "prompt": "hi"}),
        404,
        "gpt-4o",
        param="model",
    )
    assert_error(
        post(tiny_server, "/v1/chat/completions", {"model": "nope", "messages": CHAT}), 404, "nope"
    )
    assert_error(httpx.get(tiny_server.base_url + "/v1/nothing"), 404, "/v1/nothing")
    assert_error(httpx.get(tiny_server.base_url + "/v1/completions"), 405)


def test_prompt_longer_than_the_cluster_can_hold(small_server: ServerProcess) -> None:
    """No --max-model-len: the limit is what one request could ever hold, borrowing included."""
    models = httpx.get(small_server.base_url + "/v1/models").json()
    assert models["data"][0]["max_model_len"] == SMALL_MAX_MODEL_LEN
    r = post(
        small_server,
        "/v1/completions",
        {"prompt": [5] * (SMALL_MAX_MODEL_LEN + 4), "max_tokens": 1},
    )
    assert_error(r, 400, f"max_model_len is {SMALL_MAX_MODEL_LEN}", param="prompt")
    wait_clean(small_server.base_url)


def test_oversized_bodies_are_refused(tiny_server: ServerProcess) -> None:
    big = json.dumps({"prompt": "x" * (17 << 20)}).encode()
    assert_error(post(tiny_server, "/v1/completions", content=big), 413, "larger than the limit")

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(20):
            yield b" " * (1 << 20)

    r = httpx.post(tiny_server.base_url + "/v1/completions", content=chunks(), timeout=60)
    assert_error(r, 413)


def test_bad_requests_leave_the_server_healthy(tiny_server: ServerProcess) -> None:
    # ignore_eos: a sampled answer may draw EOS early, which says nothing about health
    body = {"prompt": "still fine", "max_tokens": 4, "ignore_eos": True}
    r = post(tiny_server, "/v1/completions", body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(tiny_server.base_url + "/health").status_code == 200
    wait_clean(tiny_server.base_url)


def _running(server: ServerProcess) -> int:
    return cluster(server.base_url)["requests"]["running"]


def _wait_running(server: ServerProcess, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while _running(server) == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)


LONG = {
    "model": "tiny",
    "prompt": "a long one",
    "max_tokens": 2000,
    "ignore_eos": True,
    "temperature": 0,
}


def test_streaming_client_disconnect_aborts_and_frees(tiny_server: ServerProcess) -> None:
    with httpx.stream(
        "POST", tiny_server.base_url + "/v1/completions", json={**LONG, "stream": True}, timeout=60
    ) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert _running(tiny_server) == 1
    # Leaving the block closed the connection mid-stream: the request is aborted long before 2000 tokens.
    snap = wait_clean(tiny_server.base_url, timeout_s=10)
    assert snap["requests"]["running"] == 0


def test_non_streaming_client_disconnect_aborts_and_frees(tiny_server: ServerProcess) -> None:
    body = json.dumps(LONG).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", tiny_server.port)) as sock:
        sock.sendall(head + body)
        _wait_running(tiny_server)
    wait_clean(tiny_server.base_url, timeout_s=10)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("use_beam_search", True),
        ("length_penalty", 0.5),
        ("bad_words", ["hello"]),
        ("logprob_token_ids", [5]),
        ("spaces_between_special_tokens", False),
        ("priority", 3),
        ("kv_transfer_params", {"do_remote_decode": True}),
        ("vllm_xargs", {"a": 1}),
        ("mm_processor_kwargs", {"a": 1}),
        ("thinking_token_budget", 10),
        ("include_reasoning", False),
        ("return_token_offsets", True),
    ],
)
def test_vllm_fields_not_supported_are_refused_by_name(
    tiny_server: ServerProcess, name: str, value: object
) -> None:
    for path, body in (
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": CHAT}),
    ):
        response = post(tiny_server, path, {**body, "max_tokens": 2, name: value})
        assert_error(response, 400, name, "not supported", param=name)
        # The neutral value asks for nothing, so it is accepted.
    assert post(tiny_server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, name: None})


def test_unknown_fields_are_ignored_as_vllm_does(tiny_server: ServerProcess) -> None:
    response = post(tiny_server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "foo": 1})
    assert response.status_code == 200, response.text


def test_structured_outputs_fields_we_do_not_honour_are_refused(tiny_server: ServerProcess) -> None:
    body = {"prompt": "hi", "structured_outputs": {"json_object": True, "whitespace_pattern": " "}}
    response = post(tiny_server, "/v1/completions", body)
    assert response.status_code == 400 and "whitespace_pattern" in response.text
