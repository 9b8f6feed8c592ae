"""The email scenario bank: its schema, loading with validation, and deterministic selection.

A scenario is one neutral business situation that every email slice renders: the chat slices hand
its facts to the model in the user turn, the agentic slice hides them in the simulated tools (each
fact names the tool and the record title it is filed under). Because every slice renders the same
scenario, a scenario id pairs rows across formats.

Scenarios say nothing about style or tone on purpose: any persona in the email must come from the
model, not from the situation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from charshift.config import parse_yaml
from charshift.schema import stable_hash

ToolName = Literal["directory", "calendar", "documents", "chat", "tickets", "policies"]
TOOL_NAMES: tuple[str, ...] = ("directory", "calendar", "documents", "chat", "tickets", "policies")

DEFAULT_DATE = "Tuesday, 3 June 2025"

_EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}$")
_SLUG_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


_T = TypeVar("_T", bound=_HasId)


class ScenarioError(ValueError):
    """A problem in a scenario bank, naming the scenario id and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _nonblank(v: str) -> str:
    if not v or not v.strip():
        raise ValueError("must not be empty")
    return v.strip()


class Person(_Strict):
    """A directory entry: the sender, a recipient, a cc or a distractor."""

    name: str
    role: str
    email: str
    organisation: str | None = None

    @field_validator("name", "role")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        v = v.strip()
        if not _EMAIL_RE.match(v):
            raise ValueError(f"{v!r} does not look like an email address")
        return v


class Fact(_Strict):
    """One fact the email needs, filed in one tool under a searchable record title."""

    id: str
    text: str
    tool: ToolName
    title: str

    @field_validator("id", "text", "title")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)


class Record(_Strict):
    """An irrelevant record a tool also holds (a distractor for the search tools)."""

    title: str
    text: str

    @field_validator("title", "text")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)


class Scenario(_Strict):
    id: str
    domain: str
    organisation: str
    sender: Person
    recipients: list[Person] = Field(min_length=1)
    cc: list[Person] = Field(default_factory=list)
    topic: str
    goal: str
    facts: list[Fact] = Field(min_length=4)
    must_cover: list[str] = Field(min_length=3)
    people: list[Person] = Field(default_factory=list)
    distractors: dict[ToolName, list[Record]] = Field(default_factory=dict)
    date: str = DEFAULT_DATE

    @field_validator("id")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG_RE.match(v):
            raise ValueError(f"{v!r} is not a slug (lowercase letters, digits and '-')")
        return v

    @field_validator("domain", "organisation", "topic", "goal", "date")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)

    @field_validator("must_cover")
    @classmethod
    def _points(cls, v: list[str]) -> list[str]:
        return [_nonblank(p) for p in v]

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        ids = [f.id for f in self.facts]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"facts: duplicate fact ids {dup}")
        tools = {f.tool for f in self.facts}
        if len(tools) < 3:
            raise ValueError(f"facts: spread over {sorted(tools)}; need at least 3 different tools")
        entries = self.directory
        emails = [p.email.lower() for p in entries]
        dup = sorted({e for e in emails if emails.count(e) > 1})
        if dup:
            raise ValueError(f"people: duplicate email addresses {dup}")
        names = [" ".join(p.name.lower().split()) for p in entries]
        for who in [*self.recipients, *self.cc]:
            key = " ".join(who.name.lower().split())
            if names.count(key) != 1:
                raise ValueError(
                    f"recipients: {who.name!r} does not resolve to exactly one directory entry"
                )
        return self

    @property
    def directory(self) -> list[Person]:
        """Everyone the directory knows: sender, recipients, cc, then the extra people."""
        return [self.sender, *self.recipients, *self.cc, *self.people]

    def recipient_names(self) -> str:
        """'A', 'A and B', 'A, B and C' from the recipients' names."""
        names = [p.name for p in self.recipients]
        if len(names) == 1:
            return names[0]
        return ", ".join(names[:-1]) + " and " + names[-1]


def _format_error(err: ValidationError, sid: str, index: int) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(scenario)"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  scenario {sid!r} (#{index}): {loc}: {msg}")
    return lines


def parse_bank(data: Any, source: str = "<data>") -> list[Scenario]:
    """Validate a parsed bank (a list, or a mapping with a `scenarios` list); collect every error."""
    if isinstance(data, dict):
        extra = sorted(set(data) - {"scenarios"})
        if extra:
            raise ScenarioError(f"scenario bank {source}: unknown top-level key(s) {extra}")
        data = data.get("scenarios")
    if not isinstance(data, list) or not data:
        raise ScenarioError(f"scenario bank {source}: expected a non-empty list of scenarios")
    problems: list[str] = []
    out: list[Scenario] = []
    for i, raw in enumerate(data):
        sid = raw.get("id", f"<no id, #{i}>") if isinstance(raw, dict) else f"<#{i}>"
        try:
            out.append(Scenario.model_validate(raw))
        except ValidationError as err:
            problems.extend(_format_error(err, str(sid), i))
    seen: set[str] = set()
    for s in out:
        if s.id in seen:
            problems.append(f"  scenario {s.id!r}: id: duplicate scenario id")
        seen.add(s.id)
    if problems:
        raise ScenarioError(f"invalid scenario bank ({source}):\n" + "\n".join(problems))
    return out


def load_bank(path: Path | None = None) -> list[Scenario]:
    """The bundled bank (package data), or a user's own YAML bank at `path`."""
    if path is None:
        f = resources.files("charshift") / "data" / "scenarios.yaml"
        text, source = f.read_text(encoding="utf-8"), "bundled scenarios.yaml"
    else:
        p = Path(path)
        if p.is_dir():
            raise ScenarioError(f"scenario bank {p} is a folder, not a YAML file")
        if not p.is_file():
            raise ScenarioError(f"scenario bank not found: {p}")
        text, source = _read_text(p), str(p)
    return parse_bank(parse_yaml(text, source, "scenario bank", ScenarioError), source)


def _read_text(p: Path) -> str:
    """A bank file's text; a ScenarioError naming the line of a byte that is not UTF-8."""
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ScenarioError(f"scenario bank {p} cannot be read: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ScenarioError(
            f"scenario bank {p} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line})"
        ) from None


def select_scenarios(
    bank: list[Scenario],
    ids: list[str] | None = None,
    n: int | None = None,
    seed: int = 0,
) -> list[Scenario]:
    """Pick scenarios deterministically (`select_items`)."""
    return select_items(bank, ids, n, seed, "scenario")


def select_items(
    bank: Sequence[_T], ids: list[str] | None, n: int | None, seed: int, what: str
) -> list[_T]:
    """Pick items (anything with an `id`) of a bank deterministically.

    `ids` picks those items (in the order given). `n` then takes a seeded sample of that size,
    chosen by a per-item hash of (seed, id) so the choice does not depend on the bank's order;
    the sample is returned in bank order. `what` names the bank in errors.
    """
    chosen = list(bank)
    if ids is not None:
        by_id = {s.id: s for s in bank}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ScenarioError(f"unknown {what} id(s) {unknown}")
        chosen = [by_id[i] for i in dict.fromkeys(ids)]
    if n is not None:
        if n < 1 or n > len(chosen):
            raise ScenarioError(f"cannot select n={n} {what}s from {len(chosen)}")
        keep = set(sorted((s.id for s in chosen), key=lambda i: stable_hash([seed, i]))[:n])
        chosen = [s for s in chosen if s.id in keep]
    return chosen


def get_scenario(bank: list[Scenario], scenario_id: str) -> Scenario:
    """The scenario with this id, or a ScenarioError listing a few known ids."""
    for s in bank:
        if s.id == scenario_id:
            return s
    raise ScenarioError(
        f"unknown scenario id {scenario_id!r}; e.g. {[s.id for s in bank[:5]]} "
        f"({len(bank)} in the bank)"
    )
