"""Structured output and tool calls through the official ``openai`` client against a real
``serve`` process on the tiny model (random weights: only the grammar makes its output valid)."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from .helpers import ServerProcess

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "size": {"enum": ["s", "m", "l"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"type": "string", "maxLength": 6},
    },
    "required": ["ok", "size", "count", "tag"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer", "maximum": 9, "minimum": 0}},
                "required": ["a"],
            },
        },
    },
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=tiny_server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=60
    )


def chat(client: openai.OpenAI, stream: bool = False, **kwargs):
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 120, "temperature": 0} | kwargs
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                got = calls.setdefault(call.index, {"id": call.id, "name": None, "arguments": ""})
                got["name"] = got["name"] or call.function.name
                got["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def complete(client: openai.OpenAI, stream: bool = False, **kwargs) -> tuple[str, str]:
    kwargs = {"model": "tiny", "prompt": "hello", "max_tokens": 80, "temperature": 0} | kwargs
    if not stream:
        choice = client.completions.create(**kwargs).choices[0]
        return choice.text, choice.finish_reason
    text, finish = "", None
    for chunk in client.completions.create(stream=True, **kwargs):
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def test_json_schema_response_validates_streamed_or_not(client: openai.OpenAI) -> None:
    choice = chat(client, response_format=json_schema_format(SCHEMA))
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert chat(client, stream=True, response_format=json_schema_format(SCHEMA)) == (
        choice.message.content,
        [],
        "stop",
    )
    sampled = chat(client, response_format=json_schema_format(SCHEMA), temperature=1.0, seed=5)
    jsonschema.validate(json.loads(sampled.message.content), SCHEMA)


def test_json_object_parses(client: openai.OpenAI) -> None:
    # the tiny model's strings would run on: extra_body's max_tokens is generous, and the
    # grammar must close the object if it stops
    choice = chat(client, response_format={"type": "json_object"}, max_tokens=200)
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    assert choice.message.content.startswith("{")


@pytest.mark.parametrize(
    "extra",
    [
        {"structured_outputs": {"choice": ["red", "green", "blue"]}},
        {"guided_choice": ["red", "green", "blue"]},
    ],
)
def test_choice_on_both_endpoints(client: openai.OpenAI, extra: dict) -> None:
    text, finish = complete(client, extra_body=extra)
    assert text in ("red", "green", "blue") and finish == "stop"
    assert complete(client, stream=True, extra_body=extra) == (text, finish)
    choice = chat(client, extra_body=extra)
    assert choice.message.content in ("red", "green", "blue")


@pytest.mark.parametrize(
    "extra",
    [
        {"guided_regex": r"[a-f]{3}-[0-9]{2,3}"},
        {"structured_outputs": {"regex": r"[a-f]{3}-[0-9]{2,3}"}},
    ],
)
def test_regex_matches(client: openai.OpenAI, extra: dict) -> None:
    for temperature in (0.0, 1.0):
        text, finish = complete(client, temperature=temperature, seed=1, extra_body=extra)
        assert re.fullmatch(r"[a-f]{3}-[0-9]{2,3}", text) and finish == "stop"
        assert complete(client, True, temperature=temperature, seed=1, extra_body=extra) == (
            text,
            finish,
        )


def test_guided_json_and_grammar(client: openai.OpenAI) -> None:
    text, _ = complete(client, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(text), SCHEMA)
    text, _ = complete(client, extra_body={"guided_grammar": 'start: "(" ("x" | "y")+ ")"'})
    assert re.fullmatch(r"\([xy]+\)", text)
    text, _ = complete(client, extra_body={"structured_outputs": {"grammar": 'root ::= "a" | "b"'}})
    assert text in ("a", "b")


def test_named_tool_call_round_trip(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = chat(client, tools=TOOLS, tool_choice=named)
    # OpenAI (and vLLM): a named function's forced call finishes with "stop"
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    content, calls, finish = chat(client, stream=True, tools=TOOLS, tool_choice=named)
    assert content == "" and finish == "stop"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", call.function.arguments)
    ]
    # the call and its result go back into the history, render, and the model answers
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    answer = chat(client, messages=history, tools=TOOLS, max_tokens=8, tool_choice="none")
    assert answer.finish_reason == "length" and answer.message.content
    assert answer.message.tool_calls in (None, [])


def test_required_tool_calls_validate(client: openai.OpenAI) -> None:
    choice = chat(client, tools=TOOLS, tool_choice="required", max_tokens=200)
    assert choice.finish_reason == "tool_calls", choice.message.content
    assert choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    content, calls, finish = chat(
        client, stream=True, tools=TOOLS, tool_choice="required", max_tokens=200
    )
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls
    ]


def test_streamed_tool_calls_carry_every_token_logprob(client: openai.OpenAI) -> None:
    """Tokens a tool parser holds back (until a call parses) still reach the client: their
    logprobs ride on the next chunk, so a stream carries the whole answer's logprobs."""
    kwargs = {"tools": TOOLS, "tool_choice": "required", "max_tokens": 200, "logprobs": True}
    kwargs["top_logprobs"] = 2
    whole = chat(client, **kwargs).logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, stream=True, **kwargs
    ):
        for choice in chunk.choices:
            streamed += choice.logprobs.content if choice.logprobs else []
    assert len(whole) > 3
    assert [(e.token, e.logprob, len(e.top_logprobs)) for e in streamed] == [
        (e.token, e.logprob, len(e.top_logprobs)) for e in whole
    ]


def bad(client: openai.OpenAI, endpoint: str = "chat", **kwargs) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            chat(client, **kwargs)
        else:
            complete(client, **kwargs)
    return info.value


def test_bad_inputs_are_400s_naming_the_field(client: openai.OpenAI) -> None:
    err = bad(client, response_format=json_schema_format({"type": "nonsense"}))
    assert err.body["param"] == "response_format" and "Invalid type" in err.body["message"]
    err = bad(client, "completions", extra_body={"guided_regex": "a(b"})
    assert err.body["param"] == "guided_regex"
    err = bad(
        client,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "unknown_fn"}},
    )
    assert err.body["param"] == "tool_choice" and "unknown_fn" in err.body["message"]
    err = bad(client, response_format={"type": "json_object"}, extra_body={"guided_regex": "a"})
    assert "guided_regex" in err.body["message"] and "response_format" in err.body["message"]
    err = bad(client, "completions", extra_body={"guided_json": SCHEMA, "guided_choice": ["a"]})
    assert "guided_json" in err.body["message"] and "guided_choice" in err.body["message"]
    err = bad(client, extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}})
    assert err.body["param"] == "structured_outputs" and "regex, choice" in err.body["message"]
    err = bad(
        client,
        tools=TOOLS,
        tool_choice="required",
        response_format={"type": "json_object"},
    )
    assert "tool_choice" in err.body["message"]
    err = bad(client, tool_choice="required")
    assert err.body["param"] == "tool_choice"
