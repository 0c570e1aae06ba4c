"""Tool calls out of generated text, as OpenAI chat deltas, streamed or not.

Every parser is fed the text as it streams (``feed``) and flushed at the end (``finish``); each
returns OpenAI delta dicts: ``{"content": ...}`` or ``{"tool_calls": [{"index", ...}]}``. A
whole answer is the fold of its deltas (``parse``), so streamed and non-streamed answers agree
by construction.

* ``HermesToolParser`` (``tool_choice`` auto): ``<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`` blocks become calls; text outside them streams as content. A block is held
  back until it closes, then sent as one delta (vLLM streams the arguments piecewise; one
  delta per call is the simple correct form). A block that does not parse, or never closes,
  is content.
* ``NamedToolParser``: the whole output is the arguments of the named function (the grammar
  made it so); its name goes first, the arguments stream as they come.
* ``RequiredToolParser``: the whole output is a JSON array of ``{"name", "parameters"}``
  (vLLM's form for ``required``); sent as calls when it is complete.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Protocol

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_delta(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {
        "tool_calls": [
            {
                "index": index,
                "id": new_call_id(),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ]
    }


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class ToolParser(Protocol):
    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas that ``text`` (the next piece of output) completes."""
        ...

    def finish(self) -> list[dict[str, Any]]:
        """The deltas still held back at the end of the output."""
        ...


class HermesToolParser:
    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self._num_calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        deltas: list[dict[str, Any]] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(TOOL_CALL_START)
                if start < 0:
                    # hold back a tail that may be the start of "<tool_call>"
                    keep = _partial_suffix(self._buffer, TOOL_CALL_START)
                    _content(deltas, self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return deltas
                _content(deltas, self._buffer[:start])
                self._buffer = self._buffer[start:]
                self._in_call = True
            end = self._buffer.find(TOOL_CALL_END)
            if end < 0:
                return deltas
            block = self._buffer[: end + len(TOOL_CALL_END)]
            self._buffer = self._buffer[end + len(TOOL_CALL_END) :]
            self._in_call = False
            call = _parse_call(block[len(TOOL_CALL_START) : end])
            if call is None:
                _content(deltas, block)
            else:
                deltas.append(call_delta(self._num_calls, *call))
                self._num_calls += 1

    def finish(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        _content(deltas, self._buffer)  # an unclosed block stays text
        self._buffer = ""
        return deltas


class NamedToolParser:
    def __init__(self, name: str) -> None:
        self.name = name
        self._started = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        deltas = []
        if not self._started:
            self._started = True
            deltas.append(call_delta(0, self.name, ""))
        if text:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        return deltas

    def finish(self) -> list[dict[str, Any]]:
        return [] if self._started else self.feed("")


class RequiredToolParser:
    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        return []

    def finish(self) -> list[dict[str, Any]]:
        try:
            calls = json.loads(self._buffer)
            deltas = [
                call_delta(i, c["name"], _arguments(c.get("parameters", c.get("arguments", {}))))
                for i, c in enumerate(calls)
            ]
        except (ValueError, TypeError, KeyError, AttributeError):  # cut short (length)
            deltas = [{"content": self._buffer}] if self._buffer else []
        self._buffer = ""
        return deltas


def parse(parser: ToolParser, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole output: (content, None if blank; the OpenAI ``tool_calls``)."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for delta in [*parser.feed(text), *parser.finish()]:
        content.append(delta.get("content", ""))
        for part in delta.get("tool_calls", ()):
            call = calls.get(part["index"])
            if call is None:
                calls[part["index"]] = {
                    "id": part["id"],
                    "type": "function",
                    "function": dict(part["function"]),
                }
            else:
                call["function"]["arguments"] += part["function"]["arguments"]
    text_out = "".join(content)
    return (text_out if text_out.strip() else None), [calls[i] for i in sorted(calls)]


def _parse_call(body: str) -> tuple[str, str] | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return call["name"], _arguments(arguments)


def _content(deltas: list[dict[str, Any]], text: str) -> None:
    if text:
        deltas.append({"content": text})


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
