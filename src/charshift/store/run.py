"""The run directory: its resolved config, its manifest, its tables and its writer.

Layout of a run directory:
    config.yaml          the resolved config (every default filled in)
    manifest.json        package versions, git commit, model/adapter provenance, seeds, times,
                         what was skipped (store/provenance.py)
    generations.jsonl    one GenerationRow per line, keyed (store/table.py)
    scores.jsonl         one ScoreRow per line, keyed by (generation key, classifier, unit,
                         scored text hash)
    *.quarantine.jsonl   damaged and replaced lines set aside, verbatim, with line numbers and why
    writer.lock          held by the one process that writes the tables (+ writer.lock.info;
                         store/locks.py)
    classifier/          a classifier trained in the run (demo), with train_report.json
    metrics.csv ...      statistics tables;  report/index.html, report.md

Nothing is thrown away; every file the store writes is written atomically (`fileio`). Shards of
one run (`shard=(i, n)`) write tables of their own (`generations.shard-i-of-n.jsonl`) under locks
of their own; readers read the union of a table's files (a key held by two files counts once).
A generation row that ended in an error (a server error, a timeout, an engine's `error` finish)
is `retryable`: a later row of its key replaces it (`charshift generate --retry-errors`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from charshift.fileio import atomic_write_text, remove_temps
from charshift.schema import GenerationRow, ScoreRow
from charshift.store.common import LockHeldError, ModeLockError, StoreError, warn, write_error
from charshift.store.locks import (
    SharedFlock,
    WriterLock,
    live_shard_writers,
    mode_locks,
    shards_holding,
    shared_files_lock,
)
from charshift.store.provenance import SHARED_FILES, Manifest
from charshift.store.table import (
    JsonlTable,
    Shard,
    quarantine_path,
    shard_suffix,
    table_files,
    table_path,
)

R = TypeVar("R", GenerationRow, ScoreRow)
TABLES = ("generations", "scores")
# A score is looked up by the generation, the classifier, the unit scored and the scored text's
# hash: a changed text (a length cut that moved) misses and is scored again.
SCORE_KEY = ("key", "classifier", "unit", "text_hash")
# Outcomes of a generation row that a retry may replace: no usable reply came back (a server
# error, a timeout, vLLM's `error` or `abort` finish reason).
RETRYABLE_OUTCOMES = frozenset({"error"})


def retryable(row: GenerationRow) -> bool:
    """Whether `row` ended without a usable reply, so a retry may replace it."""
    return row.outcome in RETRYABLE_OUTCOMES


def _check_shard(shard: Shard | None) -> Shard | None:
    if shard is None:
        return None
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise StoreError(f"shard: expected (index, count) with 0 <= index < count, got {shard!r}")
    return (i, n)


class RunStore:
    """One run directory.

    `writable=True` (the commands that generate or score): takes the writer lock of the run (or
    of `shard`), repairs damaged tables and may write; `writable=False` (reports): never changes a
    file and takes no lock. `create`: make the folder (writers only); otherwise it must hold a run.
    What opening found goes to `warn` (stderr by default) and into `notes` (for the report).
    """

    def __init__(
        self,
        root: str | Path,
        create: bool = True,
        *,
        writable: bool = True,
        shard: Shard | None = None,
        warn: Callable[[str], None] = warn,
    ) -> None:
        self.root = Path(root)
        self.writable = writable
        self.shard = _check_shard(shard)
        self.warn = warn
        self.notes: list[str] = []
        self._manifest = Manifest(self.root, self._say, writable)
        self._lock: WriterLock | None = None
        self._mode: list[SharedFlock] = []  # a shard writer's shared holds (see SHARDING)
        if not (writable and create):
            self._require_run()
        if writable:
            self._open_for_writing(create)
        try:
            self.generations: JsonlTable[GenerationRow] = self._table(
                "generations", GenerationRow, ("key",), retryable
            )
            self.scores: JsonlTable[ScoreRow] = self._table("scores", ScoreRow, SCORE_KEY)
            for t in (self.generations, self.scores):
                self._after_open(t)
        except BaseException:
            self.close()
            raise

    def _say(self, msg: str) -> None:
        self.notes.append(msg)
        self.warn(msg)

    def _open_for_writing(self, create: bool) -> None:
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise write_error(self.root, err) from err
        what = f"run {self.root}" + (
            f" (shard {self.shard[0]} of {self.shard[1]})" if self.shard else ""
        )
        if self.shard:
            self._mode = self._take_mode_locks(what)
        self._lock = WriterLock(self.root / f"writer{shard_suffix(self.shard)}.lock", what)
        try:
            msg = self._lock.acquire()
        except BaseException as err:
            self._lock = None
            self._release_mode_locks()
            if isinstance(err, LockHeldError) and not self.shard:
                if live_shard_writers(self.root):
                    raise ModeLockError(shards_holding(self.root, what)) from None
            raise
        if msg:
            self.warn(msg)  # not a note for the report: it says nothing about the data
        own = [table_path(self.root, t, self.shard) for t in TABLES]
        remove_temps(self.root, [p.name for p in own] + [quarantine_path(p).name for p in own])

    def _take_mode_locks(self, what: str) -> list[SharedFlock]:
        """A shard's holds that keep an unsharded writer and shards of another count out."""
        assert self.shard is not None
        try:
            return mode_locks(self.root, self.shard, what)
        except (ImportError, OSError) as err:  # no fcntl (Windows), or a file system without flock
            self.warn(
                f"{what}: cannot keep sharded and unsharded writers of this run apart here "
                f"({err}); run them one at a time"
            )
            return []

    def _release_mode_locks(self) -> None:
        for lock in self._mode:
            lock.release()
        self._mode = []

    def _table(
        self,
        stem: str,
        record_type: type[R],
        key_fields: tuple[str, ...],
        replaceable: Callable[[R], bool] | None = None,
    ) -> JsonlTable:
        own = table_path(self.root, stem, self.shard if self.writable else None)
        return JsonlTable(
            own,
            record_type,
            key_fields,
            writable=self.writable,
            read_also=table_files(self.root, stem),
            replaceable=replaceable,
        )

    def _after_open(self, table: JsonlTable) -> None:
        """Say what opening `table` found, and log what it set aside."""
        for msg in table.describe():
            self._say(msg)
        for what, found in (("set_aside", table.set_aside), ("replaced", table.replaced_aside)):
            if found:
                self.log_event(what, file=table.path.name, lines=[d.line for d in found])

    def compact(self) -> None:
        """After retries replaced rows: set the replaced lines aside now (see JsonlTable)."""
        for t in (self.generations, self.scores):
            note = t.compact()
            if note:
                self._say(note)
                lines = [d.line for d in t.replaced_aside]
                self.log_event("replaced", file=t.path.name, lines=lines)

    def _require_run(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: no such run directory")
        if self.config_path.is_file():
            return
        tables = [p.name for t in TABLES for p in table_files(self.root, t)]
        if not tables:
            raise StoreError(f"{self.root} is not a charshift run directory (no config.yaml)")
        if isinstance(self.manifest().get("config"), dict):
            return  # read_config falls back to the manifest's copy, with a warning
        raise StoreError(
            f"{self.config_path} is missing, but the folder holds a run ({', '.join(tables)}) "
            "and manifest.json has no copy of its config. Restore config.yaml, or run "
            f"`charshift run CONFIG --out {self.root}` with the run's config: it checks that the "
            "stored rows belong to that config and writes config.yaml again."
        )

    # -- lifetime

    def close(self) -> None:
        """Release the writer lock (also done at exit; a killed process's lock is taken over)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._release_mode_locks()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.root}: opened read-only")

    # -- paths

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    # -- manifest (store/provenance.py)

    def manifest(self) -> dict[str, Any]:
        """The manifest ({} when there is none; a damaged one is read as empty, with a note)."""
        return self._manifest.read()

    def recorded(self, field: str) -> dict[str, str]:
        """The name -> text map the manifest records under `field` (`classifier_ids`: base ->
        the classifier id its scores use; `skipped_adapters`: base/adapter -> why), read back
        typed: {} when there is none; entries that are not text are left out."""
        return self._manifest.recorded(field)

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the manifest (a dict merges into a dict; None removes a field)."""
        return self._manifest.update(fields)

    def set_manifest(self, **fields: Any) -> dict[str, Any]:
        """Set `fields` in the manifest whole (None removes a field)."""
        return self._manifest.update(fields, merge=False)

    def modify_manifest(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, change (in place) and write the manifest as one step under the shared-files
        lock: a change that depends on what another shard wrote is not lost."""
        return self._manifest.modify(change)

    def log_event(self, event: str, **data: Any) -> None:
        """Start/end times of steps, appended to the manifest's event list."""
        self._manifest.log_event(event, **data)

    def _shared_files_lock(self) -> AbstractContextManager[None]:
        """Held while writing the files every shard of a run shares (manifest, config)."""
        self._require_writable()
        return shared_files_lock(self.root, SHARED_FILES)

    # -- config

    def write_config(
        self,
        cfg_dict: dict[str, Any],
        planned_keys: Callable[[], Iterable[str]] | None = None,
        normalise: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """Write the resolved config; a resumed run must have the same config. If config.yaml is
        missing from a folder that holds rows, the config is accepted only when it matches the
        manifest's copy, or (no manifest) when every stored row is one of `planned_keys()`.
        `normalise` re-resolves a stored config under this version (fields added since it was
        written take their defaults), so a resume is not refused for a field it never set."""
        self._require_writable()
        if self.config_path.exists():
            stored = self.read_config()
            if normalise is not None:
                try:
                    stored = normalise(stored)
                except ValueError:
                    pass  # not valid under this version: it differs, said below
            if stored != cfg_dict:
                raise StoreError(
                    f"{self.root} holds a run with a different config; use another --out or "
                    f"delete it (diff the resolved config in {self.config_path})"
                )
            if self.read_config() != cfg_dict:  # same run, resolved by an older version
                self._write_config_file(cfg_dict)
        else:
            if len(self.generations) or len(self.scores):
                self._check_same_run(cfg_dict, planned_keys)
            self._write_config_file(cfg_dict)
        if self.manifest().get("config") != cfg_dict:
            self.set_manifest(config=cfg_dict)

    def _write_config_file(self, cfg_dict: dict[str, Any]) -> None:
        text = yaml.safe_dump(cfg_dict, sort_keys=False, allow_unicode=True)
        with self._shared_files_lock():
            atomic_write_text(self.config_path, text, error=write_error)

    def _check_same_run(
        self, cfg_dict: dict[str, Any], planned_keys: Callable[[], Iterable[str]] | None
    ) -> None:
        held = f"{self.root} holds {len(self.generations)} generations but no config.yaml"
        copy = self.manifest().get("config")
        if isinstance(copy, dict):
            if copy != cfg_dict:
                raise StoreError(
                    f"{held}, and the config given differs from the run's (manifest.json keeps "
                    "a copy under `config`); use another --out, or restore config.yaml"
                )
            self._say(
                f"{held}; the config given matches manifest.json's copy: config.yaml written again"
            )
            return
        if planned_keys is None:
            raise StoreError(f"{held}; restore config.yaml (the run's resolved config)")
        planned = set(planned_keys())
        stray = [r.key for r in self.generations if r.key not in planned]
        if stray:
            raise StoreError(
                f"{held}, and {len(stray)} of them are not rows of the config given (e.g. key "
                f"{stray[0]}); use another --out, or restore the run's config.yaml"
            )
        self._say(
            f"{held}; every stored row is a row of the config given, so the run resumes and "
            "config.yaml is written again"
        )

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.exists():
            copy = self.manifest().get("config")
            if isinstance(copy, dict):
                self._say(
                    f"{self.config_path} is missing; using the copy of the run's config kept in "
                    f"{self.manifest_path} (a command that writes this run restores config.yaml)"
                )
                return copy
            raise StoreError(f"{self.root} is not a charshift run directory (no config.yaml)")
        try:
            data = yaml.safe_load(self.config_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as err:
            raise StoreError(
                f"{self.config_path} is damaged ({str(err).splitlines()[0]}); restore it "
                f"(manifest.json keeps a copy under `config`)"
            ) from None
        except OSError as err:
            raise StoreError(f"could not read {self.config_path}: {err.strerror}") from err
        if not isinstance(data, dict):
            raise StoreError(f"{self.config_path} is damaged (not a YAML mapping); restore it")
        return data

    # -- manifest
