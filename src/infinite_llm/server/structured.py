"""The request fields that constrain the output, as one ``StructuredOutputsParams``.

vLLM's ``structured_outputs`` object and its older ``guided_json``/``guided_regex``/
``guided_choice``/``guided_grammar`` on both endpoints; on chat also OpenAI's
``response_format`` and the forced tool calls (``tool_choice`` required or named, see
``tools.py``). At most one of them per request: two are a 400 naming both.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from infinite_llm.server.errors import bad_request
from infinite_llm.structured_outputs import StructuredOutputsParams

GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


class StructuredOutputsBody(BaseModel):
    """vLLM's ``structured_outputs`` request object: the fields we honour; any other of vLLM's
    (``whitespace_pattern``, ``structural_tag``, ...) is a 400 naming it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    # "schema" on the wire; a BaseModel already has a ``schema`` attribute
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


def guided_sources(body: Any) -> dict[str, dict[str, Any]]:
    """Request field -> ``StructuredOutputsParams`` arguments, for each constraining field set
    on a completions or chat body."""
    sources: dict[str, dict[str, Any]] = {}
    if body.structured_outputs is not None:
        sources["structured_outputs"] = body.structured_outputs.model_dump(
            exclude_none=True, by_alias=True
        )
    for name, kind in GUIDED_FIELDS.items():
        value = getattr(body, name)
        if value is not None:
            sources[name] = {kind: value}
    return sources


def response_format_source(response_format: Any) -> dict[str, dict[str, Any]]:
    """``response_format`` as a source (none for ``text``)."""
    if response_format is None or response_format.type == "text":
        return {}
    if response_format.type == "json_object":
        return {"response_format": {"json_object": True}}
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise bad_request(
            "response_format: type json_schema needs json_schema.schema", "response_format"
        )
    return {"response_format": {"json": spec.json_schema}}


def structured_outputs_from(sources: dict[str, dict[str, Any]]) -> StructuredOutputsParams | None:
    """The one constraint of a request; 400 for two at once or an invalid one, naming the field."""
    if not sources:
        return None
    if len(sources) > 1:
        names = list(sources)
        raise bad_request(
            f"{', '.join(names[:-1])} and {names[-1]} both constrain the output; give one",
            names[-1],
        )
    ((field, kwargs),) = sources.items()
    try:
        return StructuredOutputsParams(**kwargs)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        if field != "structured_outputs":  # "structured_outputs.json: why" -> "guided_json: why"
            message = f"{field}: {message.split(': ', 1)[-1]}"
        raise bad_request(message, field) from exc
