"""The request fields OpenAI and vLLM document, each doing what they document: penalties,
logit_bias, allowed tokens, echo, prompt logprobs, token ids, truncation, the chat template's
fields; streamed and whole answers agree field for field (text offsets included)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from conftest import loaded_model
from infinite_llm import LLM, SamplingParams
from infinite_llm.config import CacheConfig, EngineConfig
from infinite_llm.llm_engine import LLMEngine
from infinite_llm.server.app import create_app
from infinite_llm.server.settings import ServerSettings

from .helpers import ServerProcess, ThreadServer, wait_clean

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=tiny_server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=60
    )


def post(base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(base_url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def stream(base_url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    with httpx.stream(
        "POST", base_url + path, json={**body, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def offline_tokens(llm: LLM, prompt: Any, **kwargs: Any) -> list[int]:
    params = SamplingParams(temperature=0, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize(
    "fields",
    [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 1.8},
        {"logit_bias": {"101": 30}},
        {"allowed_token_ids": [101, 102, 103]},
        {"truncate_prompt_tokens": 5},
    ],
)
def test_sampling_fields_change_the_answer_as_offline(
    tiny_server: ServerProcess, offline_llm: LLM, fields: dict[str, Any]
) -> None:
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    base = post(tiny_server.base_url, "/v1/completions", {**body, "return_token_ids": True})
    got = post(
        tiny_server.base_url, "/v1/completions", {**body, **fields, "return_token_ids": True}
    )
    (plain,), (choice,) = base["choices"], got["choices"]
    assert choice["token_ids"] != plain["token_ids"]  # the field changed the answer...
    assert choice["token_ids"] == offline_tokens(  # ...exactly as SamplingParams does offline
        offline_llm, PROMPT, max_tokens=24, ignore_eos=True, **fields
    )


def test_penalties_through_the_openai_client(client: openai.OpenAI) -> None:
    def repeats(**kwargs: Any) -> int:
        r = client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=40,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
            **kwargs,
        )
        tokens = r.choices[0].logprobs.tokens  # "token_id:<id>": distinct tokens, distinct names
        return len(tokens) - len(set(tokens))

    base = repeats()
    assert repeats(frequency_penalty=2.0) < base
    assert repeats(presence_penalty=2.0) < base
    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={"101": 100}
    )
    assert r.choices[0].text == "e" * 5  # token 101 is "e" in the tiny byte vocabulary


def test_echo_puts_the_prompt_first(tiny_server: ServerProcess) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 1}
    plain = post(tiny_server.base_url, "/v1/completions", {**body, "echo": False})
    got = post(tiny_server.base_url, "/v1/completions", body)
    choice = got["choices"][0]
    assert choice["text"] == PROMPT + plain["choices"][0]["text"]
    logprobs = choice["logprobs"]
    n = len(PROMPT)  # one token per character in the tiny vocabulary
    assert "".join(logprobs["tokens"][:n]) == PROMPT
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert logprobs["text_offset"][:3] == [0, 1, 2]
    assert logprobs["tokens"][n:] == plain["choices"][0]["logprobs"]["tokens"]
    assert got["usage"]["completion_tokens"] == 6
    # max_tokens 0: the prompt alone, scored.
    scored = post(tiny_server.base_url, "/v1/completions", {**body, "max_tokens": 0})
    assert scored["choices"][0]["text"] == PROMPT
    assert scored["choices"][0]["logprobs"]["token_logprobs"][1:] == logprobs["token_logprobs"][1:n]
    assert scored["usage"]["completion_tokens"] == 0
    wait_clean(tiny_server.base_url)


def joined(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Completion choices from streamed chunks, by index: texts and logprob lists concatenated."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            got = out.setdefault(choice["index"], {"text": "", "token_ids": [], "logprobs": None})
            got["text"] += choice["text"]
            got["token_ids"] += choice.get("token_ids") or []
            if "prompt_token_ids" in choice:
                got["prompt_token_ids"] = choice["prompt_token_ids"]
            if choice["logprobs"] is not None:
                if got["logprobs"] is None:
                    got["logprobs"] = {k: [] for k in choice["logprobs"]}
                for key, values in choice["logprobs"].items():
                    got["logprobs"][key] += values
            if choice["finish_reason"] is not None:
                got["finish_reason"] = choice["finish_reason"]
    return out


@pytest.mark.parametrize(("echo", "n"), [(False, 1), (True, 1), (True, 2)])
def test_streamed_and_whole_agree_field_for_field_with_stop_strings(
    tiny_server: ServerProcess, offline_llm: LLM, echo: bool, n: int
) -> None:
    text = (
        offline_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[
            0
        ]
        .outputs[0]
        .text
    )
    # Stop strings that start like pieces of the answer but never match hold text back as the
    # tokens come: the streamed offsets must still count the tokens' own text.
    for stop in ([text[5] + "\x01"], [text[3:5] + "\x01", text[9]], ["\n\n"]):
        body = {
            "prompt": PROMPT,
            "max_tokens": 30,
            "temperature": 0.8 if n > 1 else 0,
            "seed": 3,
            "n": n,
            "logprobs": 2,
            "stop": stop,
            "echo": echo,
            "return_token_ids": True,
        }
        whole = post(tiny_server.base_url, "/v1/completions", body)["choices"]
        streamed = joined(stream(tiny_server.base_url, "/v1/completions", body))
        assert sorted(streamed) == [c["index"] for c in whole] == list(range(n))
        for choice in whole:
            got = streamed[choice["index"]]
            for key in ("text", "token_ids", "prompt_token_ids", "finish_reason"):
                assert got[key] == choice[key], (stop, key)
            assert got["logprobs"] == choice["logprobs"], stop


def test_return_token_ids_and_tokens_as_ids(tiny_server: ServerProcess, offline_llm: LLM) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    got = post(
        tiny_server.base_url,
        "/v1/completions",
        {**body, "return_token_ids": True, "logprobs": 1, "return_tokens_as_token_ids": True},
    )
    choice = got["choices"][0]
    assert choice["prompt_token_ids"] == offline_llm.get_tokenizer().encode(PROMPT)
    assert choice["token_ids"] == offline_tokens(offline_llm, PROMPT, max_tokens=8, ignore_eos=True)
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    for top in choice["logprobs"]["top_logprobs"]:
        assert all(key.startswith("token_id:") for key in top)


def test_prompt_logprobs_and_request_id(tiny_server: ServerProcess) -> None:
    got = post(
        tiny_server.base_url,
        "/v1/completions",
        {"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 1, "request_id": "mine-1"},
    )
    assert got["id"] == "cmpl-mine-1"
    entries = got["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(PROMPT) and entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        token = str(ord(PROMPT[position]))
        assert entry[token]["decoded_token"] == PROMPT[position] and entry[token]["logprob"] <= 0
        assert len(entry) in (1, 2)
        # vLLM's Logprob fields: the top one ranks 1, the prompt's token its own rank
        first = max(entry.values(), key=lambda e: e["logprob"])
        assert first["rank"] == 1
        if len(entry) == 2:
            assert entry[token]["rank"] >= 2 and entry[token]["logprob"] < first["logprob"]


def test_chat_fields(tiny_server: ServerProcess, offline_llm: LLM) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yes"}]
    body = {
        "messages": messages,
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "add_generation_prompt": False,
        "continue_final_message": True,
        "echo": True,
        "return_token_ids": True,
        "prompt_logprobs": 0,
        "request_id": "chat-7",
    }
    got = post(tiny_server.base_url, "/v1/chat/completions", body)
    tokenizer = offline_llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert got["id"] == "chatcmpl-chat-7"
    assert got["prompt_token_ids"] == prompt
    assert tokenizer.decode(prompt).endswith("assistant: Yes")  # open, not closed
    (choice,) = got["choices"]
    expected = offline_tokens(offline_llm, prompt, max_tokens=6, ignore_eos=True)
    assert choice["token_ids"] == expected
    assert choice["message"]["content"] == "Yes" + tokenizer.decode(expected)
    assert len(got["prompt_logprobs"]) == len(prompt)
    chunks = stream(tiny_server.base_url, "/v1/chat/completions", {**body, "prompt_logprobs": None})
    assert chunks[0]["prompt_token_ids"] == prompt
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == choice["message"]["content"]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == expected


@pytest.fixture
def trusting_server() -> Iterator[ThreadServer]:
    config = EngineConfig(
        model="tiny", max_logprobs=-1, cache=CacheConfig(block_size=8, num_blocks=64)
    )
    engine = LLMEngine(config, loaded_model("tiny"), progress=False)
    server = ThreadServer(
        create_app(
            engine, ServerSettings(served_model_names=("tiny",), trust_request_chat_template=True)
        )
    )
    yield server
    server.stop()


def test_request_chat_template_and_every_logprob(trusting_server: ThreadServer) -> None:
    url = trusting_server.base_url
    got = post(
        url,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ greeting }}",
            "chat_template_kwargs": {"greeting": "!?"},
            "return_token_ids": True,
            "logprobs": True,
            "top_logprobs": -1,
        },
    )
    assert got["prompt_token_ids"] == [ord(c) for c in "hi!?"]
    for entry in got["choices"][0]["logprobs"]["content"]:
        assert len(entry["top_logprobs"]) == 320  # the whole tiny vocabulary


def test_response_format_on_completions(tiny_server: ServerProcess) -> None:
    # vLLM takes response_format on /v1/completions too: the answer must be the JSON object.
    got = post(
        tiny_server.base_url,
        "/v1/completions",
        {
            "prompt": PROMPT,
            "max_tokens": 40,
            "temperature": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "pick",
                    "schema": {
                        "type": "object",
                        "properties": {"a": {"enum": ["x", "y"]}},
                        "required": ["a"],
                        "additionalProperties": False,
                    },
                },
            },
        },
    )
    assert json.loads(got["choices"][0]["text"])["a"] in ("x", "y")
