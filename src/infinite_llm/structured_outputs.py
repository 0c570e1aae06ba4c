"""``StructuredOutputsParams``: the constraint a request's output must match (vLLM's names).

Exactly one of ``json`` (a JSON schema, as a dict or a JSON string), ``json_object`` (any JSON
object), ``regex``, ``choice`` (one of a list of strings) or ``grammar`` (a Lark grammar, or
llama.cpp's GBNF, which is converted to Lark). Each is turned into one llguidance grammar
(``grammar_spec``) and checked by llguidance when the params are made, without a tokenizer, so
a bad schema, regex or grammar is a ``ValueError`` naming the field before any request runs.
The engine side (matchers, token masks) is ``engine/structured.py``.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any

import llguidance

# JSON is generated as json.dumps writes it (", " and ": ", no other whitespace): given free
# whitespace (llguidance's default), a small model may emit tabs and newlines until max_tokens.
# A schema's own "x-guidance" options override these.
_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
FIELDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    grammar_spec: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in FIELDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, "
                f"grammar (got {', '.join(given) or 'none'})"
            )
        (name,) = given
        try:
            spec = _grammar_spec(name, getattr(self, name))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"structured_outputs.{name}: {exc}") from exc
        error = llguidance.LLMatcher.validate_grammar(spec, None)
        if error:
            raise ValueError(f"structured_outputs.{name}: {error.strip()}")
        object.__setattr__(self, "grammar_spec", spec)

    @property
    def kind(self) -> str:
        """The field that is set: ``json``, ``json_object``, ``regex``, ``choice`` or ``grammar``."""
        return next(name for name in FIELDS if getattr(self, name) not in (None, False))


def _grammar_spec(name: str, value: Any) -> str:
    """The llguidance grammar (a JSON string) for one constraint; raises ValueError/TypeError."""
    Matcher = llguidance.LLMatcher
    if name == "json":
        if isinstance(value, str):
            try:
                value = _json.loads(value)
            except _json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from exc
        if not isinstance(value, (dict, bool)):
            raise TypeError("must be a JSON schema (an object)")
        return Matcher.grammar_from_json_schema(value, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
    if name == "json_object":
        if value is not True:
            raise TypeError("must be true")
        return Matcher.grammar_from_json_schema(_ANY_OBJECT, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
    if name == "regex":
        if not isinstance(value, str) or not value:
            raise TypeError("must be a non-empty string")
        return Matcher.grammar_from_regex(value)
    if name == "choice":
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(c, str) and c for c in value)
        ):
            raise TypeError("must be a non-empty list of non-empty strings")
        # Lark string literals take JSON's escapes.
        return Matcher.grammar_from_lark("start: " + " | ".join(_json.dumps(c) for c in value))
    if not isinstance(value, str) or not value.strip():
        raise TypeError("must be a non-empty string")
    return llguidance.grammar_from("grammar", value)  # Lark, or GBNF converted to Lark
