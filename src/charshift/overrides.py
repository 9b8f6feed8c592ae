"""Command-line overrides of a run config: `--set KEY=VALUE`, `--limit N`, `--personas`,
`--slices` (pure: a config in, a validated config out).

Every override edits the config's data and the result is validated exactly like a config file
(`config.parse_config`), so a bad key or value is the same named error a file would give.
`--slices` means exactly those slices (opt-in blocks off). `--set` takes a dotted key (`stats.n_boot`, `bases.0.model`: a number indexes a list) and a
YAML value (`200`, `0.5`, `true`, `[a, b]`, `null`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from charshift import banks
from charshift import slices as slice_registry
from charshift.config import ConfigError, RunConfig, parse_config


@dataclass(frozen=True)
class Overrides:
    """What the command line changes; empty fields change nothing."""

    sets: Sequence[str] = field(default_factory=tuple)  # KEY=VALUE, in the order given
    limit: int | None = None  # at most this many items per bank (ID prompts, scenarios, items)
    personas: Sequence[str] = field(default_factory=tuple)
    slices: Sequence[str] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return bool(self.sets or self.limit is not None or self.personas or self.slices)


def split_list(text: str | None, option: str) -> list[str]:
    """A comma-separated option value (`--personas a,b`); empty items are refused."""
    if text is None:
        return []
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise ConfigError(f"{option} {text!r}: an empty name; give names separated by commas")
    return items


def _parse_set(text: str) -> tuple[list[str], Any]:
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set {text!r}: give KEY=VALUE (e.g. --set stats.n_boot=200)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def _child(node: Any, part: str, key: str) -> Any:
    """The container at `part` of `node`, created as a mapping where absent (validation names
    an unknown key)."""
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
        return node[int(part)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {part!r} is inside a value that is not a mapping")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def set_key(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set the dotted key `parts` of a config's data to `value`."""
    key = ".".join(parts)
    node: Any = data
    for part in parts[:-1]:
        node = _child(node, part, key)
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {key}: {parts[-2]!r} is not a mapping")


def limit_banks(data: dict[str, Any], n: int, sizes: dict[str, int]) -> None:
    """At most `n` items of every bank: ID prompts for evaluation, and each bank the run renders
    (`sizes`: kind -> items its selection picks now), as a seeded sample of min(n, size)."""
    if n < 1:
        raise ConfigError(f"--limit {n}: give at least 1")
    data["id_prompts"]["n_eval"] = min(int(data["id_prompts"]["n_eval"]), n)
    for kind, size in sizes.items():
        if kind == banks.SCENARIO_KIND:
            bank = data["scenarios"]
        else:
            bank = data.setdefault("items", {}).setdefault(kind, {})
        bank["n"] = min(n, size)


def _edit(data: dict[str, Any], o: Overrides) -> list[str]:
    """Apply --set, --personas and --slices to `data`; returns the options as given."""
    given = []
    for text in o.sets:
        parts, value = _parse_set(text)
        set_key(data, parts, value)
        given.append(f"--set {text}")
    if o.personas:
        data["personas"] = list(o.personas)
        given.append("--personas " + ",".join(o.personas))
    if o.slices:
        _only_slices(data, list(o.slices))
        given.append("--slices " + ",".join(o.slices))
    return given


def _only_slices(data: dict[str, Any], chosen: list[str]) -> None:
    """Exactly `chosen` slices: opt-in blocks are switched off (an enabled one would add its
    slices back), and an `items:` selection no remaining slice can render is dropped, as is a
    per-slice token budget (`sampling.max_tokens_by_slice`) of a slice left out."""
    data["slices"] = chosen
    blocks = data.get("opt_in") or {}
    for block in blocks.values():
        block["enabled"] = False
    offered = set(chosen).union(*(b.get("slices", []) for b in blocks.values()))
    data["items"] = {
        kind: sel
        for kind, sel in (data.get("items") or {}).items()
        if any(s in offered for s in slice_registry.names(items=kind))
    }
    sampling = data.get("sampling") or {}
    if sampling.get("max_tokens_by_slice"):
        budgets = sampling["max_tokens_by_slice"]
        sampling["max_tokens_by_slice"] = {k: v for k, v in budgets.items() if k in offered}


def apply_overrides(cfg: RunConfig, o: Overrides) -> RunConfig:
    """`cfg` with the overrides applied, validated like a config file (ConfigError naming the
    key and the option). `--limit` reads the run's banks to know their sizes."""
    if not o:
        return cfg
    data = cfg.model_dump(mode="json")
    given = _edit(data, o)
    if o.limit is None:
        return parse_config(data, "config with " + " ".join(given))
    edited = parse_config(data, "config with " + " ".join(given))
    sizes = {
        kind: len(banks.select(bank, banks.selection(edited, kind)))
        for kind, bank in banks.for_run(edited).items()
    }
    limit_banks(data, o.limit, sizes)
    given.append(f"--limit {o.limit}")
    return parse_config(data, "config with " + " ".join(given))
