"""Tools on ``/v1/chat/completions``: how ``tools`` and ``tool_choice`` shape the prompt, the
output constraint and the parsing of the answer.

* ``auto`` (the default with tools): the tools are rendered, the model may answer with
  ``<tool_call>`` blocks, which ``HermesToolParser`` turns into ``tool_calls``.
* ``required``: the output is constrained to a JSON array of one or more
  ``{"name": <a tool>, "parameters": <its parameters>}`` (vLLM's schema), so it always parses.
* a named function: the output is constrained to that function's parameters schema and
  returned as a call of it.
* ``none``: tools are neither rendered nor parsed.

Rendering is ``chat_tools``' (shared with ``LLM.chat``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from infinite_llm import chat_tools
from infinite_llm.server.errors import bad_request
from infinite_llm.server.tool_parsers import (
    HermesToolParser,
    NamedToolParser,
    RequiredToolParser,
    ToolParser,
    parse,
)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass(frozen=True)
class ToolSetup:
    """What a chat request's tools mean for it; ``mode``: auto, required or named."""

    tools: list[ChatTool]
    mode: str
    name: str | None = None

    def structured_source(self) -> dict[str, dict[str, Any]]:
        """The output constraint that forces the call (none for auto), as a source for
        ``structured.structured_outputs_from``."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.name)
            return {"tool_choice": {"json": _parameters(tool)}}
        if self.mode == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [t.function.name]},
                        "parameters": _parameters(t),
                    },
                    "required": ["name", "parameters"],
                }
                for t in self.tools
            ]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            return {"tool_choice": {"json": schema}}
        return {}

    def parser(self) -> ToolParser:
        if self.mode == "named":
            assert self.name is not None
            return NamedToolParser(self.name)
        if self.mode == "required":
            return RequiredToolParser()
        return HermesToolParser()


def assistant_message(
    setup: ToolSetup | None, text: str, finish_reason: str | None
) -> tuple[dict[str, Any], str | None]:
    """The answer's message and finish reason (``tool_finish_reason``)."""
    if setup is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = parse(setup.parser(), text)
    return {"role": "assistant", "content": content, "tool_calls": calls}, tool_finish_reason(
        setup, finish_reason, bool(calls)
    )


def tool_finish_reason(setup: ToolSetup, finish_reason: str | None, called: bool) -> str | None:
    """OpenAI's rule, as vLLM applies it: ``tool_calls`` when an answer stopped on calls it
    chose (``auto``, ``required``); ``stop`` for a named function's forced call."""
    if called and setup.mode != "named" and finish_reason == "stop":
        return "tool_calls"
    return finish_reason


def tool_setup(tools: list[ChatTool] | None, tool_choice: ToolChoice | None) -> ToolSetup | None:
    """None when the request has no tools to use (none given, or ``tool_choice`` none); 400 for
    a choice that names no given tool or needs tools that are not there."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if tool_choice == "none":
        return None
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        if name not in {t.function.name for t in tools}:
            raise bad_request(
                f"tool_choice names function {name!r}, which is not among the tools", "tool_choice"
            )
        return ToolSetup(tools, "named", name)
    return ToolSetup(tools, tool_choice or "auto")


def template_inputs(
    messages: list[dict[str, Any]], setup: ToolSetup | None, template: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra ``apply_chat_template`` arguments that render the tools (when
    ``setup``) and the history's tool calls and results (``chat_tools``)."""
    tools = [t.model_dump(exclude_none=True) for t in setup.tools] if setup else None
    return chat_tools.template_inputs(messages, tools, template)


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}
