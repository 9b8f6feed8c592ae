"""The run directory: resolved config, manifest, and append-only keyed JSONL tables.

Layout of a run directory:
    config.yaml          the resolved config (every default filled in)
    manifest.json        package versions, git commit, model/adapter provenance, seeds, times
    generations.jsonl    one GenerationRow per line, keyed
    scores.jsonl         one ScoreRow per line, keyed by (generation key, classifier, unit,
                         scored text hash)
    classifier/          a classifier trained in the run (demo), with train_report.json
    metrics.csv ...      statistics tables;  report/index.html, report.md

Crash safety: rows are appended and flushed (fsync) batch by batch, never rewritten. A process killed
mid-write can leave a cut-off last line; `JsonlTable` detects it on open, truncates the file to the
last complete line, and the row is redone. Re-running the same command skips finished keys.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from charshift.schema import GenerationRow, ScoreRow

R = TypeVar("R", GenerationRow, ScoreRow)

# A score is looked up by the generation, the classifier, the unit scored and the scored text's
# hash: a changed text (a length cut that moved) misses and is scored again.
SCORE_KEY = ("key", "classifier", "unit", "text_hash")

PACKAGES = (
    "charshift",
    "torch",
    "transformers",
    "peft",
    "tokenizers",
    "datasets",
    "numpy",
    "scikit-learn",
    "pydantic",
    "vllm",
)


class StoreError(RuntimeError):
    pass


def jsonl_objects(
    lines: Iterable[str], source: str, error: type[Exception] = ValueError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of a JSONL text; a line that is not
    a JSON object raises `error` naming `source` and the line. Used by every JSONL input reader."""
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise error(f"{source} line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise error(f"{source} line {n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


class JsonlTable(Generic[R]):
    """An append-only JSONL file of typed records (`record_type`, a schema dataclass with
    `to_dict` / `from_dict`) keyed by the attributes `key_fields`. Rows are written and read back
    as the same records."""

    def __init__(
        self, path: Path, record_type: type[R], key_fields: tuple[str, ...] = ("key",)
    ) -> None:
        self.path = Path(path)
        self.record_type = record_type
        self.key_fields = key_fields
        self.repaired_bytes = 0
        self._rows: dict[tuple, R] = {}
        self._load()

    def _key(self, row: R) -> tuple:
        return tuple(getattr(row, f) for f in self.key_fields)

    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        good_end = 0
        pos = 0
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            if nl == -1:  # a last line with no newline: cut off mid-write
                break
            line = raw[pos:nl]
            if line.strip():
                try:
                    row = self.record_type.from_dict(json.loads(line), str(self.path))
                except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                    break  # corrupt line: keep what came before, redo the rest
                self._rows[self._key(row)] = row
            good_end = nl + 1
            pos = nl + 1
        if good_end < len(raw):
            self.repaired_bytes = len(raw) - good_end
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def __contains__(self, key: Any) -> bool:
        return (key if isinstance(key, tuple) else (key,)) in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: Any) -> R | None:
        return self._rows.get(key if isinstance(key, tuple) else (key,))

    def rows(self) -> list[R]:
        return list(self._rows.values())

    def __iter__(self) -> Iterator[R]:
        return iter(self._rows.values())

    def append(self, rows: Iterable[R]) -> int:
        """Append records whose keys are new; returns how many were written."""
        new = []
        for r in rows:
            k = self._key(r)
            if k in self._rows:
                continue
            self._rows[k] = r
            new.append(r)
        if not new:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = "".join(json.dumps(r.to_dict(), ensure_ascii=False, default=str) + "\n" for r in new)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        return len(new)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return res.stdout.strip() + ("+dirty" if dirty else "")


class RunStore:
    """One run directory."""

    def __init__(self, root: str | Path, create: bool = True) -> None:
        self.root = Path(root)
        if not create and not (self.root / "config.yaml").is_file():
            raise StoreError(f"{self.root} is not a charshift run directory (no config.yaml)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.generations: JsonlTable[GenerationRow] = JsonlTable(
            self.root / "generations.jsonl", GenerationRow, ("key",)
        )
        self.scores: JsonlTable[ScoreRow] = JsonlTable(
            self.root / "scores.jsonl", ScoreRow, SCORE_KEY
        )

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def write_config(self, cfg_dict: dict[str, Any]) -> None:
        """Write the resolved config; a resumed run must have the same config."""
        text = yaml.safe_dump(cfg_dict, sort_keys=False, allow_unicode=True)
        if self.config_path.exists():
            old = yaml.safe_load(self.config_path.read_text())
            if old != cfg_dict:
                raise StoreError(
                    f"{self.root} holds a run with a different config; use another --out or "
                    f"delete it (diff the resolved config in {self.config_path})"
                )
            return
        _atomic_write(self.config_path, text)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.exists():
            raise StoreError(f"{self.root} is not a charshift run directory (no config.yaml)")
        return yaml.safe_load(self.config_path.read_text())

    def manifest(self) -> dict[str, Any]:
        if self.manifest_path.exists():
            return json.loads(self.manifest_path.read_text())
        return {}

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        m = self.manifest()
        if not m:
            m = {
                "created": _now(),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "argv": sys.argv,
            }
        m.setdefault("packages", package_versions())
        m.setdefault("git_commit", git_commit())
        for k, v in fields.items():
            if isinstance(v, dict) and isinstance(m.get(k), dict):
                m[k].update(v)
            else:
                m[k] = v
        m["updated"] = _now()
        _atomic_write(self.manifest_path, json.dumps(m, indent=2, default=str))
        return m

    def log_event(self, event: str, **data: Any) -> None:
        """Start/end times of steps, appended to the manifest's event list."""
        m = self.manifest()
        events = m.get("events", [])
        events.append({"time": _now(), "event": event, **data})
        self.update_manifest(events=events)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
