"""Provenance: a run's `manifest.json` (package versions, git commit, python and platform, the
command line, seeds, model and adapter provenance, events with their times, what was skipped) and
the facts it records about this installation.

The manifest is shared by every writer of a run (shards included): each change is read, merged
and written atomically under the run's shared-files lock. A damaged manifest is read as empty
with a note; the next change sets the damaged file aside (`manifest.damaged-TIME.json`) and
starts a new one.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from charshift.fileio import atomic_write_text
from charshift.store.common import StoreError, now, write_error
from charshift.store.locks import shared_files_lock

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
SHARED_FILES = ("manifest.json", "config.yaml")  # written by every writer of a run, under the lock


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


class Manifest:
    """The manifest of the run in `root`. `say` reports what was found (a damaged file);
    `writable=False` refuses every change."""

    def __init__(self, root: Path, say: Callable[[str], None], writable: bool) -> None:
        self.root = Path(root)
        self.path = self.root / "manifest.json"
        self.say = say
        self.writable = writable
        self._warned = False

    def _read(self) -> tuple[dict[str, Any], str | None]:
        """(manifest, what is wrong with it or None)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}, None
        except OSError as err:
            raise StoreError(f"could not read {self.path}: {err.strerror}") from err
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            return {}, f"not valid JSON ({str(err).splitlines()[0]})"
        if not isinstance(data, dict):
            return {}, f"not a JSON object ({type(data).__name__})"
        return data, None

    def read(self) -> dict[str, Any]:
        """The manifest ({} when there is none, or it is damaged: said once)."""
        m, problem = self._read()
        if problem and not self._warned:
            self._warned = True
            self.say(
                f"{self.path} is damaged ({problem}); read as empty, so this run's "
                "provenance is incomplete"
            )
        return m

    def recorded(self, field: str) -> dict[str, str]:
        """The name -> text map recorded under `field`, read back typed: {} when there is none;
        entries that are not text are left out."""
        found = self.read().get(field)
        if not isinstance(found, dict):
            return {}
        return {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, str)}

    def update(self, fields: dict[str, Any], merge: bool = True) -> dict[str, Any]:
        """Set `fields` (None removes a field); with `merge`, a dict merges into a dict."""

        def change(m: dict[str, Any]) -> None:
            for k, v in fields.items():
                if v is None:
                    m.pop(k, None)
                elif merge and isinstance(v, dict) and isinstance(m.get(k), dict):
                    m[k].update(v)
                else:
                    m[k] = v

        return self.modify(change)

    def log_event(self, event: str, **data: Any) -> None:
        entry = {"time": now(), "event": event, **data}
        self.modify(lambda m: m.setdefault("events", []).append(entry))

    def modify(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, change and write the manifest atomically, under the shared-files lock."""
        if not self.writable:
            raise StoreError(f"{self.root}: opened read-only")
        with shared_files_lock(self.root, SHARED_FILES):
            m = self._for_update()
            change(m)
            m["updated"] = now()
            atomic_write_text(self.path, json.dumps(m, indent=2, default=str), error=write_error)
            return m

    def _for_update(self) -> dict[str, Any]:
        m, problem = self._read()
        if problem:
            aside = self.root / f"manifest.damaged-{_dt.datetime.now():%Y%m%d-%H%M%S-%f}.json"
            try:
                os.replace(self.path, aside)
            except OSError as err:
                raise write_error(self.path, err) from err
            self.say(f"{self.path} was damaged ({problem}); set aside as {aside.name}")
        if not m:
            m = {
                "created": now(),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "argv": sys.argv,
            }
        m.setdefault("packages", package_versions())
        m.setdefault("git_commit", git_commit())
        return m
