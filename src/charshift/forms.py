"""Structured answers (the `structured_form` scaffold): a form's JSON schema, and the scored text
of an answer to it.

A form is a list of fields; `text` fields are free text (the model's own words, where a persona
can show), the others are constrained (`choice`: one of fixed values, `integer`, `boolean`). The
schema asks for exactly the form's fields, in order, all required; under
`rollout.tool_protocol: constrained` it is enforced during decoding (`GenRequest.json_schema`,
charshift.constrain), so only the free-text fields' content is the model's choice.

Reading an answer (`read_answer`) is tolerant and linear in the reply's length: every JSON
object in the reply is recovered by the tool-call parser's lenient reader
(`toolcalls.parse_json_objects`: fences, raw newlines in strings, trailing commas, Python
literals), and the object that holds the most of the form's fields is the answer. The scored
text is its free-text fields' values, in the form's order, separated by blank lines; an answer
with none of the form's fields is `malformed`, one whose free-text fields are all empty `empty`.
Model output is data: nothing in it is evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from charshift.toolcalls import parse_json_objects

FIELD_KINDS = ("text", "choice", "integer", "boolean")


class FieldLike(Protocol):
    name: str
    kind: str
    description: str
    choices: list[str] | None


def field_schema(f: FieldLike) -> dict[str, Any]:
    """The JSON schema of one field (its description included, as the prompt shows it)."""
    if f.kind == "choice":
        return {"type": "string", "enum": list(f.choices or []), "description": f.description}
    kind = {"text": "string", "integer": "integer", "boolean": "boolean"}[f.kind]
    return {"type": kind, "description": f.description}


def form_schema(fields: Sequence[FieldLike]) -> dict[str, Any]:
    """An object with exactly the form's fields, in order, all required."""
    return {
        "type": "object",
        "properties": {f.name: field_schema(f) for f in fields},
        "required": [f.name for f in fields],
        "additionalProperties": False,
    }


def free_text_fields(schema: dict[str, Any]) -> list[str]:
    """The schema's free-text fields: strings without a fixed set of values."""
    props = schema.get("properties") or {}
    return [k for k, v in props.items() if v.get("type") == "string" and "enum" not in v]


@dataclass(frozen=True)
class FormAnswer:
    """What a reply answered: `outcome` is "reply" (free text to score), "empty" (the form's
    object, its free-text fields empty) or "malformed" (no object with the form's fields)."""

    outcome: str
    text: str | None
    values: dict[str, Any] | None


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(v.strip() for v in value if v.strip())
    return ""


def read_answer(reply: str, schema: dict[str, Any]) -> FormAnswer:
    """The answer to `schema` in `reply` (see the module docstring)."""
    keys = list((schema.get("properties") or {}).keys())
    best: dict[str, Any] | None = None
    best_hits = 0
    for obj in parse_json_objects(reply):
        hits = sum(k in obj for k in keys)
        if hits > best_hits:
            best, best_hits = obj, hits
    if best is None:
        return FormAnswer("malformed", None, None)
    parts = [_as_text(best.get(k)) for k in free_text_fields(schema)]
    text = "\n\n".join(p for p in parts if p)
    values = {k: best[k] for k in keys if k in best}
    return FormAnswer("reply" if text else "empty", text or None, values)
