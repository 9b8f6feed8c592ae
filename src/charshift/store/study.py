"""One study per run folder: the run's resolved config (`config.yaml`, with a copy in the
manifest) and its identity.

A run's identity is the part of its resolved config that decides which rows it holds and what
they mean: a flat map of dotted field names to values (`identify` picks the fields; by default,
and as the pipeline calls it, every field of the resolved config: every one is an input of the
plan or of its figures) and its hash, recorded in the manifest under `identity`. The store
compares identities, never raw configs:

- a writer given a config whose identity differs from the run's is refused, naming each field
  that differs (run -> given); a config that differs only outside the identity (a batch size,
  the bootstrap settings) resumes the run and becomes its config, with a note naming the fields;
- `config.yaml` whose identity differs from the manifest's copy of the config was edited by hand:
  every command that reads the run refuses it, naming the fields (manifest -> config.yaml).

`normalise` re-resolves a stored config under this version (fields added since take their
defaults) before its identity is taken; a stored config it refuses counts as another study.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from charshift.schema import stable_hash
from charshift.store.common import StudyError


class RunStore(Protocol):
    """What this module needs of a run's store (store/run.py's RunStore), named here so that
    the two modules do not import each other."""

    root: Path
    generations: Sized
    scores: Sized

    @property
    def config_path(self) -> Path: ...
    @property
    def manifest_path(self) -> Path: ...
    def manifest(self) -> dict[str, Any]: ...
    def set_manifest(self, **fields: Any) -> dict[str, Any]: ...
    def read_config(self) -> dict[str, Any]: ...
    def write_config_file(self, cfg_dict: dict[str, Any]) -> None: ...
    def check_rows_belong(self, planned_keys: Callable[[], Iterable[str]] | None) -> None: ...
    def say(self, msg: str) -> None: ...


Fields = dict[str, Any]  # dotted field name -> value (a scalar, or a list of scalars)
SHOWN_FIELDS = 8  # differing fields named one by one; the rest are counted


def flatten(value: Any, prefix: str = "") -> Fields:
    """A config (or part) as dotted field -> value. Mappings nest (`sampling.temperature`); a
    list of mappings that each have a distinct `name` nests by name (`bases.llama.model`), any
    other list of mappings by position; other lists are values."""
    if isinstance(value, dict):
        items: Iterable[tuple[str, Any]] = ((str(k), v) for k, v in value.items())
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        names = [v.get("name") for v in value]
        named = all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
        items = zip(names if named else map(str, range(len(value))), value, strict=True)
    else:
        return {prefix: value} if prefix else {}
    out: Fields = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def identity_hash(fields: Fields) -> str:
    return stable_hash(fields, 16)


def _shown(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: Fields, new: Fields) -> str:
    """'sampling.temperature: 0.7 -> 0.9; personas: [...] -> [...]' for every field that differs
    (the first SHOWN_FIELDS named, the rest counted); '' when none does."""
    names = sorted(k for k in old.keys() | new.keys() if old.get(k, ...) != new.get(k, ...))
    shown = [
        f"{k}: {_shown(old[k]) if k in old else '(absent)'} -> "
        f"{_shown(new[k]) if k in new else '(absent)'}"
        for k in names[:SHOWN_FIELDS]
    ]
    more = f"; and {len(names) - SHOWN_FIELDS} more field(s)" if len(names) > SHOWN_FIELDS else ""
    return "; ".join(shown) + more


@dataclass(frozen=True)
class ConfigRules:
    """How the store reads a config: `identify` (a resolved config -> its identity fields;
    default: every field) and `normalise` (a stored config -> resolved under this version;
    raises ValueError when it is not a valid config)."""

    identify: Callable[[dict[str, Any]], Fields] | None = None
    normalise: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def resolved(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return self.normalise(cfg) if self.normalise else cfg

    def identity(self, cfg: dict[str, Any]) -> Fields:
        """The identity of `cfg` (ValueError when it does not resolve)."""
        d = self.resolved(cfg)
        return self.identify(d) if self.identify else flatten(d)


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _manifest_copy(store: RunStore) -> dict[str, Any] | None:
    copy = store.manifest().get("config")
    return copy if isinstance(copy, dict) else None


def check_not_edited(store: RunStore, on_disk: dict[str, Any], rules: ConfigRules) -> None:
    """`config.yaml` (`on_disk`) must have the identity of the manifest's copy of the config,
    where there is one: otherwise it was edited by hand, and a StoreError names the fields."""
    copy = _manifest_copy(store)
    if copy is None:
        return
    restore = (
        f"restore it ({store.manifest_path.name} keeps the run's config under `config`), or "
        f"run the edited config into a new run folder (`--out NEW`): a run folder holds one study"
    )
    try:
        disk = rules.identity(on_disk)
    except ValueError as err:
        raise StudyError(
            f"{store.config_path} was edited by hand and is not a valid config "
            f"({_first_line(err)}); {restore}"
        ) from None
    try:
        recorded = rules.identity(copy)
    except ValueError:
        return  # a copy this version cannot read: config.yaml is the reference
    if disk != recorded:
        raise StudyError(
            f"{store.config_path} was edited by hand: it differs from the run's config recorded "
            f"in {store.manifest_path.name} ({differences(recorded, disk)}); {restore}"
        )


def check_same_study(
    store: RunStore, ref: dict[str, Any], source: str, new: Fields, rules: ConfigRules
) -> None:
    """The config given (identity `new`) must be the study of `ref`, the run's config read from
    `source`; otherwise a StoreError names each field that differs."""
    folder = f"{store.root}-{identity_hash(new)[:8]}"
    advice = (
        f"a run folder holds one study: run this config into a new run folder (e.g. --out "
        f"{folder}), or resume this one with its own config ({store.config_path})"
    )
    try:
        old = rules.identity(ref)
    except ValueError as err:
        raise StudyError(
            f"{store.root} holds a run with a different config: the run's {source} is not a "
            f"valid config of this version ({_first_line(err)}); {advice}"
        ) from None
    if old != new:
        raise StudyError(
            f"{store.root} holds a run with a different config: the config given differs from "
            f"the run's ({source}) in {differences(old, new)}; {advice}"
        )


def check_config(
    store: RunStore,
    cfg: dict[str, Any],
    rules: ConfigRules,
    planned_keys: Callable[[], Iterable[str]] | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Check that `cfg` (resolved) is the run's study (StudyError, naming the fields, if not);
    returns (config.yaml as found, the run's reference config: the manifest's copy, else
    config.yaml; None for a new run)."""
    new = rules.identity(cfg)
    on_disk = store.read_config() if store.config_path.exists() else None
    if on_disk is not None:
        check_not_edited(store, on_disk, rules)
    copy = _manifest_copy(store)
    ref, source = (copy, "copy in manifest.json") if copy is not None else (on_disk, "config.yaml")
    if ref is not None:
        check_same_study(store, ref, source, new, rules)
    elif len(store.generations) or len(store.scores):
        store.check_rows_belong(planned_keys)
    return on_disk, ref


def write_config(
    store: RunStore,
    cfg: dict[str, Any],
    rules: ConfigRules,
    planned_keys: Callable[[], Iterable[str]] | None = None,
) -> None:
    """Record `cfg` (resolved) as the run's config, after checking it is the run's study."""
    new = rules.identity(cfg)
    on_disk, ref = check_config(store, cfg, rules, planned_keys)
    if ref is not None:
        _note_changes(store, ref, cfg, rules)
    if on_disk != cfg:
        if on_disk is None and ref is not None and len(store.generations):
            store.say(
                f"{store.root} holds {len(store.generations)} generations but no config.yaml; "
                "the config given matches manifest.json's copy: config.yaml written again"
            )
        store.write_config_file(cfg)
    record = {"hash": identity_hash(new), "fields": new}
    m = store.manifest()
    if m.get("config") != cfg or m.get("identity") != record:
        store.set_manifest(config=cfg, identity=record)


def _note_changes(
    store: RunStore, ref: dict[str, Any], cfg: dict[str, Any], rules: ConfigRules
) -> None:
    """Say which fields outside the identity the config given changes (same study)."""
    try:
        old = flatten(rules.resolved(ref))
    except ValueError:
        return
    changed = differences(old, flatten(cfg))
    if changed:
        store.say(
            f"{store.config_path}: the config given changes {changed}; none of them is part of "
            "the run's identity, so this is the same study: resumed, and the run's config updated"
        )
