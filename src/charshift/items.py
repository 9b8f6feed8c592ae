"""The scaffolds' item banks: one schema per item kind, loading with validation, hashing.

Each scaffold (`charshift.slices.scaffold`) is rendered, with its chat control, from one bank of
its own kind (`KINDS`): the bundled `data/items/KIND.yaml`, or a user's YAML file
(`items: {KIND: {path: FILE}}` in a run config). An item id is a slug; in a run it becomes
`KIND:ID`, so a scaffold and its control pair by item. The kinds of the two agentic scaffolds
do not hold a world of their own: an item names one (`world`), a scenario of the run's scenario
bank, whose people and records the tool simulator serves unchanged.

Items say nothing about style or tone on purpose: any persona in the output must come from the
model. Every problem in a bank is collected and reported at once, naming the item and field
(`ItemError`); the run and `charshift items validate` use the same validator
(`charshift.banks`), which also renders every item in every slice of its kind.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from charshift.config import ConfigError, parse_yaml
from charshift.scenarios import (  # one strict base and one blank check for every bank
    ScenarioError,
    _nonblank,
    _Strict,
)
from charshift.tools import REGISTRY

_SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MAX_BANK_BYTES = 8 << 20


class ItemError(ScenarioError):
    """A problem in an item bank, naming the bank, the item id and the field."""


class Item(_Strict):
    """What every item has: a slug id and a domain (the bank's coverage is counted by it)."""

    id: str
    domain: str

    @field_validator("id")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError(f"{v!r} is not a slug (lowercase letters, digits and '-')")
        return v

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return _nonblank(v)


class ReviewItem(Item):
    """code_review: a change (title, the author's description, a unified diff) and the
    reviewer's task for it."""

    language: str
    title: str
    description: str
    diff: str
    task: str

    @field_validator("language", "title", "description", "task")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)

    @field_validator("diff")
    @classmethod
    def _diff(cls, v: str) -> str:
        lines = v.strip("\n").split("\n")
        if not any(x.startswith("@@") for x in lines):
            raise ValueError("is not a unified diff (no '@@' hunk header)")
        changed = [x for x in lines if x[:1] in "+-" and not x.startswith(("+++", "---"))]
        if not changed:
            raise ValueError("changes no line (no '+' or '-' line)")
        return v.strip("\n")


class FormField(_Strict):
    """One field of a form: `text` is free text (scored); `choice` one of `choices`."""

    name: str
    kind: Literal["text", "choice", "integer", "boolean"]
    description: str
    choices: list[str] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _FIELD_NAME.match(v):
            raise ValueError(f"{v!r} is not a field name (a-z, digits, '_', at most 40)")
        return v

    @field_validator("description")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)

    @model_validator(mode="after")
    def _choices(self) -> FormField:
        if (self.kind == "choice") != (self.choices is not None):
            raise ValueError("choices: given for, and only for, a field of kind 'choice'")
        if self.choices is not None and len(set(self.choices)) < 2:
            raise ValueError("choices: at least two different values")
        return self


class FormItem(Item):
    """structured_form: a request, and the form (a title and its fields) the answer fills."""

    form: str
    request: str
    fields: list[FormField] = Field(min_length=3)

    @field_validator("form", "request")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)

    @model_validator(mode="after")
    def _fields(self) -> FormItem:
        names = [f.name for f in self.fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"fields: duplicate field names {dup}")
        if sum(f.kind == "text" for f in self.fields) < 2:
            raise ValueError("fields: at least two free-text fields (kind 'text'), to score")
        return self


class DebateItem(Item):
    """multi_agent_debate: a motion and Agent B's opening argument on it."""

    motion: str
    opening: str

    @field_validator("motion", "opening")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)


class RoleplayItem(Item):
    """adversarial_roleplay: a scene (the model's role, in the second person), the in-scene
    request of turn 1, the follow-up of turn 2, and the pressure that turn 2 of the scaffold
    puts before the follow-up."""

    scene: str
    request: str
    follow_up: str
    pressure: str

    @field_validator("scene", "request", "follow_up", "pressure")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)


class ToolStep(_Strict):
    """One search already made in an agentic_tools trajectory: a registered tool taking a
    `query`, and the query."""

    tool: str
    query: str

    @field_validator("tool")
    @classmethod
    def _tool(cls, v: str) -> str:
        searchable = [t.name for t in REGISTRY.values() if "query" in t.properties]
        if v not in searchable:
            raise ValueError(f"{v!r} is not a search tool; one of {searchable}")
        return v

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        return _nonblank(v)


class WorldItem(Item):
    """An item set in a world: a scenario of the run's scenario bank (its id)."""

    world: str


class ToolsItem(WorldItem):
    """agentic_tools: the principal's question and the searches already made to answer it."""

    question: str
    steps: list[ToolStep] = Field(min_length=2)

    @field_validator("question")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)


class ActionItem(WorldItem):
    """agentic_actions: an underspecified task for the agent to carry out with the tools."""

    task: str

    @field_validator("task")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)


@dataclass(frozen=True)
class ItemKind:
    """One bank: its item schema and the bundled file (`data/items/FILE`)."""

    name: str
    model: type[Item]
    file: str

    @property
    def worlds(self) -> bool:
        """Its items name a world of the scenario bank."""
        return issubclass(self.model, WorldItem)


KINDS: dict[str, ItemKind] = {
    k.name: k
    for k in (
        ItemKind("code_review", ReviewItem, "code_review.yaml"),
        ItemKind("structured_form", FormItem, "structured_form.yaml"),
        ItemKind("multi_agent_debate", DebateItem, "multi_agent_debate.yaml"),
        ItemKind("adversarial_roleplay", RoleplayItem, "adversarial_roleplay.yaml"),
        ItemKind("agentic_tools", ToolsItem, "agentic_tools.yaml"),
        ItemKind("agentic_actions", ActionItem, "agentic_actions.yaml"),
    )
}


@dataclass(frozen=True)
class BankSource:
    """Where a bank came from and the sha256 of its bytes (recorded in the manifest)."""

    kind: str
    source: str
    sha256: str
    n_items: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "items": self.n_items}


def read_bank_file(resource: str, path: str | Path | None, what: str) -> tuple[bytes, str]:
    """(bytes, source) of a bundled bank (`data/RESOURCE`) or of a user's file at `path`."""
    if path is None:
        f = resources.files("charshift") / "data" / resource
        return f.read_bytes(), f"bundled {resource}"
    p = Path(path)
    if not p.is_file():
        raise ItemError(f"{what} not found: {p}")
    if p.stat().st_size > MAX_BANK_BYTES:
        raise ItemError(f"{what} {p} is larger than {MAX_BANK_BYTES} bytes")
    return p.read_bytes(), str(p)


def _entries(data: Any, source: str) -> list[Any]:
    if isinstance(data, dict):
        extra = sorted(set(data) - {"items"})
        if extra:
            raise ItemError(f"item bank {source}: unknown top-level key(s) {extra}")
        data = data.get("items")
    if not isinstance(data, list) or not data:
        raise ItemError(f"item bank {source}: expected a non-empty list of items")
    return data


def _problems(err: ValidationError, kind: str, iid: str, index: int) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(item)"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        out.append(f"  {kind} item {iid!r} (#{index}): {loc}: {msg}")
    return out


def parse_items(kind: str, data: Any, source: str = "<data>") -> list[Item]:
    """Validate a parsed bank of `kind` (a list, or a mapping with an `items` list); every
    problem is collected into one ItemError."""
    model = KINDS[kind].model
    problems: list[str] = []
    out: list[Item] = []
    for i, raw in enumerate(_entries(data, source)):
        iid = str(raw.get("id", f"<no id, #{i}>")) if isinstance(raw, dict) else f"<#{i}>"
        try:
            out.append(model.model_validate(raw))
        except ValidationError as err:
            problems += _problems(err, kind, iid, i)
    ids = [it.id for it in out]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    problems += [f"  {kind} item {d!r}: id: duplicate item id" for d in dups]
    if problems:
        raise ItemError(f"invalid {kind} item bank ({source}):\n" + "\n".join(problems))
    return out


def load_items(kind: str, path: str | Path | None = None) -> tuple[list[Item], BankSource]:
    """The items of bank `kind` (bundled, or the user's file at `path`), schema-checked, with
    the bank's source and hash. Rendering checks are `charshift.banks`."""
    if kind not in KINDS:
        raise ItemError(f"unknown item bank {kind!r}; known: {list(KINDS)}")
    raw, source = read_bank_file(f"items/{KINDS[kind].file}", path, f"{kind} item bank")
    try:
        data = parse_yaml(raw.decode("utf-8-sig"), source)
    except (ConfigError, UnicodeDecodeError) as err:
        raise ItemError(f"{kind} item bank {source} cannot be read: {err}") from None
    items = parse_items(kind, data, source)
    digest = hashlib.sha256(raw).hexdigest()
    return items, BankSource(kind, source, digest, len(items))
