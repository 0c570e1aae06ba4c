"""Tools in a chat prompt: how a conversation with ``tools`` (OpenAI's function schemas) and
past tool calls and results is rendered by a model's chat template. Shared by ``LLM.chat`` and
the OpenAI server (``server/tools.py``, which adds the output constraint and the parsing).

A chat template that knows tools (its source mentions ``tools``) gets them through
``apply_chat_template(tools=...)``, and the history's calls with their arguments as objects, as
Hugging Face templates expect. Otherwise (SmolLM2's template ignores tools, calls and tool
messages) they are written into the messages in the Hermes style: the signatures in a
``<tools>`` block of the system message with the instruction to answer with ``<tool_call>``
blocks, past calls as those blocks in the assistant's content, tool results in
``<tool_response>`` blocks.
"""

from __future__ import annotations

import json
from typing import Any

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user "
    "query. Don't make assumptions about what values to plug into functions. Here are the "
    "available tools: <tools>\n{tools}\n</tools>\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags as "
    'follows:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call>"
)


def template_inputs(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra ``apply_chat_template`` arguments that render ``tools`` (None or
    empty: none offered) and the history's tool calls and results, for the model's
    ``template``."""
    if "tools" in template:  # the template renders tools itself
        rendered = [_with_argument_objects(m) for m in messages]
        return rendered, ({"tools": tools} if tools else {})
    rendered = [_hermes_message(m) for m in messages]
    if tools:
        signatures = "\n".join(json.dumps(t) for t in tools)
        system = HERMES_SYSTEM.format(tools=signatures)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": f"{rendered[0]['content']}\n\n{system}"}
        else:
            rendered.insert(0, {"role": "system", "content": system})
    return rendered, {}


def _with_argument_objects(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        function = dict(call.get("function", {}))
        function["arguments"] = _loads(function.get("arguments"))
        fixed.append({**call, "function": function})
    return {**message, "tool_calls": fixed}


def _hermes_message(message: dict[str, Any]) -> dict[str, Any]:
    if message["role"] == "tool":
        return {
            "role": "tool",
            "content": f"<tool_response>\n{message['content']}\n</tool_response>",
        }
    calls = message.get("tool_calls")
    if not calls:
        return message
    blocks = [
        "<tool_call>\n"
        + json.dumps(
            {
                "name": call.get("function", {}).get("name"),
                "arguments": _loads(call.get("function", {}).get("arguments")),
            }
        )
        + "\n</tool_call>"
        for call in calls
    ]
    content = "\n".join([message["content"], *blocks] if message["content"] else blocks)
    return {"role": message["role"], "content": content}


def _loads(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments if arguments is not None else {}
