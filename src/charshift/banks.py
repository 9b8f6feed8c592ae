"""Item banks of every kind the run renders: the one validator, the selection and the provenance.

A bank is the scenario bank (`scenarios:`) or a scaffold's item bank (`items: {KIND: ...}`),
bundled or a user's own YAML file (`path`). `load` is the ONE validator, used by the run and by
`charshift scenarios validate` / `charshift items validate` alike: the bank's schema (every
problem collected, naming the item and field), the worlds its items name (the agentic
scaffolds': scenarios of the scenario bank), and every item rendered in every slice of its kind
(a renderer's error names the item and the slice). `BankSource` records where the bank came from
and the sha256 of its bytes, for the manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charshift import items, scenarios, slices
from charshift.config import BankConfig, RunConfig
from charshift.items import BankSource, ItemError
from charshift.render import render
from charshift.scenarios import Scenario, ScenarioError
from charshift.slices import RenderContext

SCENARIO_KIND = "scenario"


@dataclass
class Bank:
    """A validated bank: its items, where it came from, and the worlds its items may name."""

    kind: str
    items: list[Any]
    source: BankSource
    worlds: dict[str, Scenario] = field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        return sorted({it.domain for it in self.items})


def _scenario_bank(path: str | Path | None) -> Bank:
    raw, source = items.read_bank_file("scenarios.yaml", path, "scenario bank")
    bank = scenarios.load_bank(Path(path) if path is not None else None)
    digest = hashlib.sha256(raw).hexdigest()
    return Bank(SCENARIO_KIND, bank, BankSource(SCENARIO_KIND, source, digest, len(bank)))


def _check_renders(bank: Bank) -> None:
    """Render every item in every slice of the bank's kind; collect what fails."""
    ctx = RenderContext(worlds=bank.worlds)
    problems = []
    for it in bank.items:
        for sl in slices.names(items=bank.kind):
            try:
                render(sl, it, ctx)
            except (ValueError, KeyError) as err:
                problems.append(f"  {bank.kind} item {it.id!r}, slice {sl}: {err}")
    if problems:
        raise ItemError(f"invalid {bank.kind} bank ({bank.source.source}):\n" + "\n".join(problems))


def load(
    kind: str, path: str | Path | None = None, *, scenarios_path: str | Path | None = None
) -> Bank:
    """The validated bank of `kind` (bundled, or the user's file at `path`). The agentic
    kinds' worlds come from the scenario bank at `scenarios_path` (default: the bundled one)."""
    if kind == SCENARIO_KIND:
        bank = _scenario_bank(path)
    else:
        loaded, source = items.load_items(kind, path)
        bank = Bank(kind, loaded, source)
        if items.KINDS[kind].worlds:
            bank.worlds = {s.id: s for s in _scenario_bank(scenarios_path).items}
    _check_renders(bank)
    return bank


def selection(cfg: RunConfig, kind: str) -> BankConfig:
    """The run's selection of bank `kind` (`scenarios:` or `items.KIND`; default: all)."""
    if kind == SCENARIO_KIND:
        return cfg.scenarios
    return cfg.items.get(kind) or BankConfig()


def select(bank: Bank, sel: BankConfig) -> list[Any]:
    """The items `sel` picks (ids, then a seeded sample of n), in bank order."""
    what = "scenario" if bank.kind == SCENARIO_KIND else f"{bank.kind} item"
    return scenarios.select_items(bank.items, sel.ids, sel.n, sel.seed, what)


def for_run(cfg: RunConfig) -> dict[str, Bank]:
    """Every bank the run's slices render (ID prompts aside), validated, by kind."""
    out: dict[str, Bank] = {}
    for kind in slices.item_kinds(cfg.slices):
        if kind == "prompt":
            continue
        try:
            out[kind] = load(kind, selection(cfg, kind).path, scenarios_path=cfg.scenarios.path)
        except ScenarioError as err:
            where = "scenarios.path" if kind == SCENARIO_KIND else f"items.{kind}.path"
            raise type(err)(f"{where}: {err}") from None
    return out


def provenance(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """kind -> {source, sha256, items} of every bank the run renders (for the manifest); the
    scenario bank is included when an agentic scaffold's worlds come from it."""
    banks = for_run(cfg)
    worlds = any(items.KINDS[k].worlds for k in banks if k in items.KINDS)
    if worlds and SCENARIO_KIND not in banks:
        banks[SCENARIO_KIND] = _scenario_bank(cfg.scenarios.path)
    return {k: b.source.to_dict() for k, b in banks.items()}
