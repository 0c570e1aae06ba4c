"""Tool-call parsing on crafted outputs (streamed piece by piece and whole), and the rendering of
tools and of a tool-call history into the chat template's messages."""

from __future__ import annotations

import json

import pytest

from infinite_llm.server.tool_parsers import (
    HermesToolParser,
    NamedToolParser,
    RequiredToolParser,
    parse,
)
from infinite_llm.server.tools import ChatTool, NamedToolChoice, template_inputs, tool_setup

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [
    ChatTool.model_validate(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    )
]


def streamed(parser, text: str, piece: int) -> list[dict]:
    deltas = []
    for i in range(0, len(text), piece):
        deltas += parser.feed(text[i : i + piece])
    return deltas + parser.finish()


def test_calls_and_the_text_around_them() -> None:
    text = f"Let me check.\n{CALL}\n{CALL.replace('Paris', 'Oslo')}"
    content, calls = parse(HermesToolParser(), text)
    assert content == "Let me check.\n\n"
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris"},
        {"city": "Oslo"},
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_only_a_call_has_no_content_and_plain_text_has_no_calls() -> None:
    assert parse(HermesToolParser(), CALL)[0] is None
    assert parse(HermesToolParser(), "Hello <tool it is") == ("Hello <tool it is", [])


def test_a_broken_or_unclosed_block_stays_text() -> None:
    broken = "<tool_call>{not json}</tool_call>"
    assert parse(HermesToolParser(), broken) == (broken, [])
    unclosed = 'Hi <tool_call>{"name": "f"'
    assert parse(HermesToolParser(), unclosed) == (unclosed, [])


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streaming_deltas_agree_with_the_whole(piece: int) -> None:
    text = f"Sure <tool_call maybe? {CALL} and done"
    deltas = streamed(HermesToolParser(), text, piece)
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Sure <tool_call maybe?  and done"
    (call,) = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]  # one delta per call
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # nothing of a call's markup leaks into the content, whatever the cut
    assert "<tool_call>" not in content and "</tool_call>" not in content


def test_calls_stream_with_increasing_indexes() -> None:
    deltas = streamed(HermesToolParser(), CALL + CALL, 5)
    assert [d["tool_calls"][0]["index"] for d in deltas if "tool_calls" in d] == [0, 1]


def test_named_streams_arguments_after_the_name() -> None:
    deltas = streamed(NamedToolParser("get_weather"), '{"city": "Rome"}', 4)
    first = deltas[0]["tool_calls"][0]
    assert first["function"] == {"name": "get_weather", "arguments": ""} and first["id"]
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas)
    assert args == '{"city": "Rome"}'
    _, calls = parse(NamedToolParser("get_weather"), '{"city": "Rome"}')
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}


def test_required_parses_the_array_when_complete() -> None:
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]'
    assert RequiredToolParser().feed(text) == []
    content, calls = parse(RequiredToolParser(), text)
    assert content is None and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    assert parse(RequiredToolParser(), '[{"name": "a", "param') == ('[{"name": "a", "param', [])


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def test_hermes_rendering_for_a_template_without_tools() -> None:
    setup = tool_setup(TOOLS, "auto")
    messages, kwargs = template_inputs(HISTORY, setup, "{{ messages }}")
    assert kwargs == {}
    assert messages[0]["role"] == "system" and "<tools>" in messages[0]["content"]
    assert '"name": "get_weather"' in messages[0]["content"]
    assert "<tool_call>" in messages[0]["content"]
    assert messages[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert messages[3] == {
        "role": "tool",
        "content": "<tool_response>\nsunny, 21 C\n</tool_response>",
    }
    # tool_choice none: no tools block, the history still renders
    messages, _ = template_inputs(HISTORY, tool_setup(TOOLS, "none"), "{{ messages }}")
    assert messages[0]["role"] == "user" and "<tool_call>" in messages[1]["content"]


def test_a_template_with_tools_gets_them_and_argument_objects() -> None:
    setup = tool_setup(TOOLS, "required")
    messages, kwargs = template_inputs(HISTORY, setup, "{% for t in tools %}{% endfor %}")
    assert kwargs["tools"][0]["function"]["name"] == "get_weather"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2]["tool_call_id"] == "call_1"


def test_tool_choice_checks() -> None:
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "nope"}})
    with pytest.raises(Exception, match="nope"):
        tool_setup(TOOLS, named)
    with pytest.raises(Exception, match="tool_choice needs tools"):
        tool_setup(None, "required")
    assert tool_setup(TOOLS, None).mode == "auto" and tool_setup(None, "auto") is None
