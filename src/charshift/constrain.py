r"""Constrained decoding: a grammar enforces the tool-call envelope, string fields stay free text.

Small models (SmolLM2-135M) almost never write a parseable tool call when the JSON protocol is only
described in the prompt. With `rollout.tool_protocol: constrained`, each tool turn instead carries
`GenRequest.json_schema = tool_call_schema(tools)`: the reply must be one JSON object
``{"name": <one of the episode's tools>, "arguments": {...}}`` whose arguments match that tool's
parameter schema (required arguments present, no unknown ones). A string's content is free: any
Unicode text (llguidance compiles a plain string to `(?s:.*)` under JSON quoting), so an email body
is the model's own words. Only its spelling as JSON is fixed, to the canonical one: `"`, `\` and
control characters escaped (`\n`, `\"`, `\u001b`, ...), every other character written as itself
(`Ü`, not `\u00dc`; the general `\uXXXX` form needs llguidance >= 1.8, which vLLM 0.33 excludes).

Backends honour `json_schema` in their own way:
  - HF: `row_constraint` builds a per-row grammar matcher (llguidance, the library behind
    vLLM's and SGLang's "guidance" structured-output backends); the decode loop masks that row's
    logits before sampling, advances the matcher with the sampled token, and finishes the row
    with reason "stop" once the grammar is complete.
  - vLLM: `SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))`.
  - OpenAI-compatible servers: `response_format: {"type": "json_schema", ...}`.

Why llguidance and not xgrammar: both are maintained and used by vLLM and SGLang; llguidance is
one self-contained wheel with no Python dependencies, while xgrammar pulls in triton and
apache-tvm-ffi (hundreds of MB on Linux), too heavy for a core dependency of a CPU-first tool.

Layout: the HF grammar fixes the whitespace between JSON tokens to the separators of the prompt's
example call (``", "`` and ``": "``, nothing else), so a model cannot spend its budget on
whitespace; servers use their own JSON layout defaults. Object properties come in the schema's
order (llguidance's JSON compiler does so): `name` before `arguments`, and a tool's arguments in
the order its spec lists them (send_email: to, subject, body, cc), as the prompt's example shows.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# What the HF grammar allows between JSON tokens: exactly the prompt example's separators.
JSON_LAYOUT: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
# Name of the schema in an OpenAI `response_format` (a label the server requires, not a constraint).
SCHEMA_NAME = "tool_call"
_MAX_CACHED_GRAMMARS = 64


class ConstraintError(ValueError):
    """A schema or tokenizer that cannot be turned into a decoding grammar."""


# --------------------------------------------------------------------------------------------
# the schema of one tool call
# --------------------------------------------------------------------------------------------


def _tool_function(tool: dict[str, Any], where: str) -> dict[str, Any]:
    """The function part of a tool spec: OpenAI's `{"type": "function", "function": {...}}` or flat."""
    if not isinstance(tool, dict):
        raise ValueError(f"{where}: a tool spec must be a dict, got {type(tool).__name__}")
    fn = tool.get("function", tool)
    if not isinstance(fn, dict):
        raise ValueError(f"{where}.function: must be a dict")
    return fn


def _arguments_schema(fn: dict[str, Any], where: str) -> dict[str, Any]:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise ValueError(f"{where}.parameters: must be a JSON schema of type object")
    props = params.get("properties") or {}
    if not isinstance(props, dict):
        raise ValueError(f"{where}.parameters.properties: must be a dict")
    required = list(params.get("required") or [])
    unknown = [r for r in required if r not in props]
    if unknown:
        raise ValueError(f"{where}.parameters.required: {unknown} are not among its properties")
    out = copy.deepcopy(params)
    out.update(
        type="object",
        properties=copy.deepcopy(props),
        required=required,
        additionalProperties=False,
    )
    return out


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call of one of `tools` (OpenAI-format specs, or flat ones).

    `anyOf` over the tools; each branch is an object with exactly `name` (that tool's name as a
    `const`) and `arguments` (the tool's parameter schema with its required fields required and
    no other keys). String parameters keep whatever their own schema says; the tool specs of
    charshift.formats put no constraint on string content.
    """
    if not tools:
        raise ValueError("tool_call_schema: no tools given")
    branches: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        fn = _tool_function(tool, where)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: the tool has no name")
        if name in seen:
            raise ValueError(f"{where}: duplicate tool name {name!r}")
        seen.add(name)
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": _arguments_schema(fn, where)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return {"anyOf": branches}


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI `response_format` field that asks a server to enforce `schema`."""
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": schema}}


# --------------------------------------------------------------------------------------------
# the per-row grammar state of the HF backend
# --------------------------------------------------------------------------------------------


def _first_line(matcher: Any) -> str:
    """The matcher's error without the parser state and grammar it appends."""
    return str(matcher.get_error()).strip().split("\n", 1)[0]


class RowConstraint:
    """One row's grammar state: mask its logits, advance with its token, say when it is complete.

    The matcher's mask covers the tokenizer's vocabulary; logits may be wider (a model's padded
    embedding rows: never allowed) or narrower (tokenizer entries the model lacks: never chosen).
    Special tokens are never allowed except the end-of-turn tokens, and those only where the
    grammar is complete. Should the grammar ever allow no token of the model (an internal error of
    the matcher), the row is told to stop and `error` says why, so a broken call is never passed
    off as a finished one.
    """

    def __init__(self, matcher: Any, stop_ids: Collection[int]) -> None:
        self._matcher = matcher
        self._stop_ids = sorted(stop_ids)
        self._error: str | None = None

    @property
    def done(self) -> bool:
        """True once nothing but the end of the turn can follow (or the grammar failed)."""
        return self._error is not None or bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """True when the text so far is a complete document of the grammar."""
        return self._error is None and bool(self._matcher.is_accepting())

    @property
    def error(self) -> str | None:
        return self._error

    def allowed(self, width: int) -> torch.Tensor:
        """A bool vector over `width` token ids: those the grammar allows next."""
        import torch

        bias = self._matcher.compute_logit_bias()  # one byte per tokenizer token: 0 or 200
        n = min(width, len(bias))
        mask = torch.zeros(width, dtype=torch.bool)
        if n:
            mask[:n] = torch.frombuffer(bytearray(bias[:n]), dtype=torch.uint8) > 0
        if not bool(mask.any()):
            self._error = self._error or (
                f"grammar error: {_first_line(self._matcher)}"
                if self._matcher.is_error()
                else "the grammar allows no token of the model's vocabulary"
            )
            for t in self._stop_ids:
                if t < width:
                    mask[t] = True
            if not bool(mask.any()):
                mask[:] = True  # the row ends after this token anyway (`done` is now true)
        return mask

    def mask_(self, logits_row: torch.Tensor) -> None:
        """Set the logits of every token the grammar forbids to -inf, in place (1-D row)."""
        allowed = self.allowed(logits_row.shape[-1]).to(logits_row.device)
        logits_row.masked_fill_(~allowed, float("-inf"))

    def accept(self, token_id: int) -> None:
        """Advance the grammar with the sampled token."""
        if self._error is None and not self._matcher.consume_token(int(token_id)):
            self._error = f"grammar rejected token {token_id}: {_first_line(self._matcher)}"


class _Compiled:
    """A tokenizer's llguidance view and its compiled grammars (a pristine matcher per schema)."""

    def __init__(self, tokenizer: Any, stop_ids: tuple[int, ...]) -> None:
        import llguidance.hf

        try:
            self.lltok = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(stop_ids))
        except ValueError as err:  # a slow (Python) tokenizer
            raise ConstraintError(
                f"constrained decoding needs a fast tokenizer: {type(tokenizer).__name__}: {err}"
            ) from err
        self.ref = weakref.ref(tokenizer)
        self.stop_ids = stop_ids
        self.matchers: OrderedDict[str, Any] = OrderedDict()

    def matcher(self, schema: dict[str, Any]) -> Any:
        from llguidance import LLMatcher

        key = json.dumps(
            schema, separators=(",", ":")
        )  # key order matters: properties come in order
        if key in self.matchers:
            self.matchers.move_to_end(key)
            return self.matchers[key]
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=dict(JSON_LAYOUT))
        except ValueError as err:
            raise ConstraintError(f"json_schema: {err}") from err
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise ConstraintError(f"json_schema cannot be compiled: {'; '.join(messages)}")
        for message in messages:
            log.warning("json_schema: %s", message)
        matcher = LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"json_schema cannot be compiled: {_first_line(matcher)}")
        self.matchers[key] = matcher
        while len(self.matchers) > _MAX_CACHED_GRAMMARS:
            self.matchers.popitem(last=False)
        return matcher


_LOCK = threading.Lock()
_COMPILED: dict[tuple[int, tuple[int, ...]], _Compiled] = {}


def _compiled_for(tokenizer: Any, stop_ids: tuple[int, ...]) -> _Compiled:
    key = (id(tokenizer), stop_ids)
    found = _COMPILED.get(key)
    if found is None or found.ref() is not tokenizer:  # new, or an old tokenizer's reused id
        for k in [k for k, v in _COMPILED.items() if v.ref() is None]:
            del _COMPILED[k]
        found = _COMPILED[key] = _Compiled(tokenizer, stop_ids)
    return found


def row_constraint(
    tokenizer: Any, schema: dict[str, Any], stop_ids: Collection[int]
) -> RowConstraint:
    """A fresh grammar state for one row that must produce a JSON document matching `schema`.

    `tokenizer`: the backend's (fast) HF tokenizer. `stop_ids`: the end-of-turn tokens the row
    may end with once the document is complete. The tokenizer's llguidance view (~0.3 s for a
    50k vocabulary) and each schema's grammar are built once and cached; a row gets a copy.
    Raises ConstraintError (a ValueError) for a schema or tokenizer it cannot use.
    """
    if not isinstance(schema, dict):
        raise ConstraintError(f"json_schema must be a dict, got {type(schema).__name__}")
    stops = tuple(sorted({int(t) for t in stop_ids}))
    with _LOCK:
        template = _compiled_for(tokenizer, stops).matcher(schema)
        return RowConstraint(template.deep_copy(), stops)


__all__ = [
    "JSON_LAYOUT",
    "ConstraintError",
    "RowConstraint",
    "response_format",
    "row_constraint",
    "tool_call_schema",
]
