"""What a command left undone, so that its exit status tells the truth.

After `run`, `generate` or a shard, `record_completion` counts, over the rows of its plan (of its
shard): the adapters skipped (missing, gated, refused by the engine), the rows not generated (by
base / stage / persona), the rows that ended in an error (a server error, a timeout, an engine's
`error` finish; `--retry-errors` redoes them) and, where the command scored, the outputs not
scored. The record goes into the manifest under `completion` (one entry per scope: `run`, or
`shard I/N`) and the command exits non-zero with its summary unless `--allow-skipped` is given.
A shard's scores are not counted: scoring units read rows across shards, so the unsharded run that
finishes the shards checks them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from charshift import units
from charshift.config import RunConfig
from charshift.planning import build_plan, select_shard
from charshift.schema import NULL_PERSONA
from charshift.store import RunStore, retryable
from charshift.store.provenance import Manifest

SHOWN = 12  # groups named one by one in a summary; the rest are counted


@dataclass(frozen=True)
class Completion:
    """What one command's scope (`run` or `shard I/N`) left undone."""

    scope: str
    planned: int
    skipped_adapters: dict[str, str] = field(default_factory=dict)  # base/adapter -> why
    not_generated: dict[str, int] = field(default_factory=dict)  # base/stage/persona -> rows
    error_rows: int = 0
    not_scored: int | None = None  # None: this command did not score

    @property
    def complete(self) -> bool:
        return not (self.skipped_adapters or self.not_generated or self.error_rows) and not (
            self.not_scored
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def summary(self, run: str) -> list[str]:
        """A head line, one line per group of missing rows, and what to do (empty if complete)."""
        if self.complete:
            return []
        missing = sum(self.not_generated.values())
        head = f"{self.scope} of {run} is incomplete: {missing} of {self.planned} planned rows "
        head += f"not generated, {self.error_rows} ended in an error"
        head += "" if self.not_scored is None else f", {self.not_scored} outputs not scored"
        lines = [head]
        lines += [f"  skipped adapter {a}: {why}" for a, why in self.skipped_adapters.items()]
        groups = sorted(self.not_generated.items())
        lines += [f"  {g}: {n} rows not generated" for g, n in groups[:SHOWN]]
        if len(groups) > SHOWN:
            lines.append(f"  and {len(groups) - SHOWN} more groups")
        return lines + [_advice(self)]


def _advice(c: Completion) -> str:
    what = []
    if c.error_rows:
        what.append("rerun with --retry-errors to redo the error rows")
    if c.not_generated or c.not_scored:
        what.append("rerun the same command to resume")
    if c.skipped_adapters:
        what.append("fix or remove the skipped adapters' stages or personas")
    return "  (" + "; ".join(what) + "; or pass --allow-skipped to accept a run with gaps)"


def _scope(store: RunStore) -> str:
    return "run" if store.shard is None else f"shard {store.shard[0]}/{store.shard[1]}"


def completion(cfg: RunConfig, store: RunStore, scored: bool) -> Completion:
    """What the rows of the store's scope lack now (pure over the store; builds the plan)."""
    rows = select_shard(build_plan(cfg).rows, store.shard)
    missing: Counter[str] = Counter()
    errors = 0
    for r in rows:
        g = store.generations.get(r.key)
        if g is None:
            persona = r.condition.persona or NULL_PERSONA
            missing[f"{r.condition.base}/{r.condition.stage}/{persona}"] += 1
        errors += g is not None and retryable(g)
    lacking = {  # adapters with rows still missing: a skip that a later run repaired is over
        f"{r.condition.base}/{r.adapter.name}"
        for r in rows
        if r.adapter is not None and r.key not in store.generations
    }
    skipped = {k: v for k, v in store.recorded("skipped_adapters").items() if k in lacking}
    unscored = _not_scored(cfg, store, {r.key for r in rows}) if scored else None
    return Completion(_scope(store), len(rows), skipped, dict(missing), errors, unscored)


def _not_scored(cfg: RunConfig, store: RunStore, keys: set[str]) -> int:
    """Units with an output and no score by their base's classifier, among the rows `keys`."""
    cids = store.recorded("classifier_ids")
    n = 0
    for g, unit, text in units.row_units(store.generations, cfg.scoring.text == "raw"):
        if text and g.key in keys:
            cid = cids.get(g.base)
            n += cid is None or (g.key, cid, unit, units.text_hash(text)) not in store.scores
    return n


def record_completion(cfg: RunConfig, store: RunStore, scored: bool) -> Completion:
    """`completion`, recorded in the manifest under `completion.<scope>`."""
    c = completion(cfg, store, scored)
    store.update_manifest(completion={c.scope: c.to_dict()})
    return c


def recorded_completion(root: Path, scope: str = "run") -> Completion | None:
    """The completion a command recorded in run directory `root` for `scope` (None when there
    is none); reads the manifest only."""
    found = Manifest(Path(root), lambda _msg: None, writable=False).read().get("completion")
    entry = found.get(scope) if isinstance(found, dict) else None
    return Completion.from_dict(entry) if isinstance(entry, dict) else None
