"""Tools and JSON output on the embedded SmolLM2 (its template ignores tools: the Hermes system
message renders them): forced calls parse and validate, and the tool's answer goes back in."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from .helpers import ServerProcess

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": WEATHER,
        },
    }
]


def test_tool_round_trip_and_json_schema(smollm2_server: ServerProcess) -> None:
    client = openai.OpenAI(
        base_url=smollm2_server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=120
    )
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(
            model="smollm2",
            messages=messages,
            tools=TOOLS,
            tool_choice=tool_choice,
            max_tokens=60,
            temperature=0,
        )
        choice = reply.choices[0]
        # "tool_calls" when the model chose to call (required); "stop" for a forced named call
        want = "tool_calls" if tool_choice == "required" else "stop"
        assert choice.finish_reason == want, choice.message
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    history = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    answer = client.chat.completions.create(
        model="smollm2", messages=history, tools=TOOLS, max_tokens=40, temperature=0
    )
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    person = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Invent a person: name and age."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": person}},
        max_tokens=60,
        temperature=0,
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), person)
