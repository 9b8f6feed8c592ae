"""The keyed JSONL table: an append-only file of typed records, its damaged lines and their
quarantine file, and the names of a table's files (the run's own and each shard's).

Opening reads every line (through `fileio.decode_json_line`, the package's one JSONL decoder); a
damaged line anywhere (not UTF-8, not JSON, not a valid record, a cut-off last line, a second copy
of a key) is skipped and every good line after it is kept. A reader never changes a file; a writer
moves the damaged lines, verbatim, into the table's quarantine file and rewrites the table
atomically (`fileio.atomic_write_bytes`) without them. Rows are appended and flushed (fsync)
batch by batch; a failed append is cut back to the last complete line.

One row per key. A table may name rows that are `replaceable` (a row that ended in a server
error): a later row of the same key replaces it, in an append and when a file is read, and
`compact` (or the next writer's open) moves the replaced line into the quarantine file.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from charshift.fileio import JsonLineError, atomic_write_bytes, decode_json_line
from charshift.schema import GenerationRow, RecordError, ScoreRow
from charshift.store.common import StoreError, now, write_error

R = TypeVar("R", GenerationRow, ScoreRow)
Shard = tuple[int, int]  # (index, count), index 0-based
SHOWN_LINES = 8  # damaged lines named one by one in a message; the rest are counted

# -- table files ---------------------------------------------------------------------------------

_TABLE_FILE = re.compile(r"^(?P<stem>[A-Za-z0-9_]+)(?:\.shard-(?P<i>\d+)-of-(?P<n>\d+))?\.jsonl$")


def shard_suffix(shard: Shard | None) -> str:
    return "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"


def table_path(root: Path, stem: str, shard: Shard | None = None) -> Path:
    return Path(root) / f"{stem}{shard_suffix(shard)}.jsonl"


def quarantine_path(table: Path) -> Path:
    """`generations.jsonl` -> `generations.quarantine.jsonl` (same for a shard's file)."""
    return table.with_name(table.name[: -len(".jsonl")] + ".quarantine.jsonl")


def _file_order(path: Path) -> tuple[int, int, int]:
    m = _TABLE_FILE.match(path.name)
    if not m or m["i"] is None:
        return (0, 0, 0)
    return (1, int(m["n"]), int(m["i"]))


def table_files(root: Path, stem: str) -> list[Path]:
    """Every file of table `stem` in `root` (the run's own and each shard's), in reading order."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (m := _TABLE_FILE.match(p.name)) and m["stem"] == stem]
    return sorted(found, key=_file_order)


# -- damaged lines and the quarantine file -------------------------------------------------------


@dataclass(frozen=True)
class DamagedLine:
    """A line of a table file that is not a usable record (or a row replaced by a later one of
    its key), kept verbatim (without its newline)."""

    file: Path
    line: int  # 1-based
    reason: str
    raw: bytes

    def to_dict(self, table_sha256: str) -> dict[str, Any]:
        d: dict[str, Any] = {
            "table": self.file.name,
            "line": self.line,
            "reason": self.reason,
            "found": now(),
            "table_sha256": table_sha256,
        }
        try:
            d["raw"] = self.raw.decode("utf-8")
        except UnicodeDecodeError:
            d["raw_base64"] = base64.b64encode(self.raw).decode("ascii")
        return d


def read_quarantine(path: str | Path) -> list[DamagedLine]:
    """The lines set aside in a quarantine file, with their original bytes."""
    out = []
    for raw in Path(path).read_bytes().splitlines():
        with suppress(ValueError, KeyError, TypeError):
            d = json.loads(raw)
            data = d["raw"].encode("utf-8") if "raw" in d else base64.b64decode(d["raw_base64"])
            out.append(DamagedLine(Path(path).parent / d["table"], d["line"], d["reason"], data))
    return out


def _quarantine(table: Path, lines: list[DamagedLine], table_sha256: str) -> None:
    """Add `lines` to the table's quarantine file (atomically; the old content kept as is).
    Entries already there from the same table content (a repair cut short) are not repeated."""
    q = quarantine_path(table)
    old = _read_bytes(q)
    seen = set()
    for raw in old.splitlines():
        with suppress(ValueError, KeyError, TypeError):
            d = json.loads(raw)
            seen.add((d["table_sha256"], d["line"]))
    new = [d for d in lines if (table_sha256, d.line) not in seen]
    if not new:
        return
    if old and not old.endswith(b"\n"):
        old += b"\n"
    blob = "".join(json.dumps(d.to_dict(table_sha256), ensure_ascii=False) + "\n" for d in new)
    atomic_write_bytes(q, old + blob.encode("utf-8"), error=write_error)


def _parse_line(raw: bytes, record_type: type[R]) -> R | str:
    """A record, or the reason the line is not one. The run's own rows hold model output as
    `json.dumps` wrote it: NaN allowed, no depth limit short of Python's."""
    try:
        obj = decode_json_line(raw, max_depth=None, finite=False, objects=True)
        return record_type.from_dict(obj, record_type.__name__)
    except (JsonLineError, RecordError, TypeError, ValueError) as err:
        return str(err)


# -- file primitives -----------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as err:
        raise StoreError(f"could not read {path}: {err.strerror or err}") from err


def _check_appendable(path: Path) -> None:
    """A writer finds out now, not after an hour of generation, that it cannot write `path`."""
    try:
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        elif not os.access(path.parent, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path.parent))
    except OSError as err:
        raise write_error(path, err) from err


def _append_bytes(path: Path, blob: bytes) -> None:
    """Append `blob` and fsync; on failure cut the file back to where it was."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as err:
        raise write_error(path, err) from err
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as err:
            with suppress(OSError):
                os.ftruncate(fd, start)  # no cut-off line left behind where we can help it
            raise write_error(path, err) from err
    finally:
        os.close(fd)


def _row_line(row: Any) -> str:
    return json.dumps(row.to_dict(), ensure_ascii=False, default=str) + "\n"


# -- the table -----------------------------------------------------------------------------------


class JsonlTable(Generic[R]):
    """An append-only JSONL file of typed records (`record_type`, a schema dataclass with
    `to_dict` / `from_dict`) keyed by the attributes `key_fields`. Rows are written and read back
    as the same records.

    Opening reads `path` and the files in `read_also` (other shards' files of the same table) in a
    fixed order; the first copy of a key wins, except that a `replaceable` row gives way to any
    other copy of its key (`replaced`), and of two replaceable copies the later wins. Damaged lines
    and later copies of a key are listed in `found` and skipped. `writable=False` never changes a
    file; `writable=True` moves what was found or replaced in `path` itself to its quarantine file
    (`set_aside`, `replaced_aside`) and rewrites `path` without it. Only `path` is appended to.
    """

    def __init__(
        self,
        path: Path,
        record_type: type[R],
        key_fields: tuple[str, ...] = ("key",),
        *,
        writable: bool = True,
        read_also: Sequence[Path] = (),
        replaceable: Callable[[R], bool] | None = None,
    ) -> None:
        self.path = Path(path)
        self.record_type = record_type
        self.key_fields = key_fields
        self.writable = writable
        self.replaceable = replaceable
        self.files = sorted({self.path, *(Path(p) for p in read_also)}, key=_file_order)
        self.found: list[DamagedLine] = []
        self.replaced: list[DamagedLine] = []  # rows that gave way to a later copy of their key
        self.set_aside: list[DamagedLine] = []
        self.replaced_aside: list[DamagedLine] = []
        self.lines: dict[Path, int] = {}  # non-blank lines per file, as found
        self._rows: dict[tuple, R] = {}
        self._where: dict[tuple, tuple[Path, int, int]] = {}  # file, line, hash of the line
        self._raw: dict[tuple, bytes] = {}  # the lines of replaceable rows, should one give way
        self._replacements = 0  # rows replaced by an append since opening
        own: list[tuple[tuple, int, bytes]] = []
        own_raw = b""
        for f in self.files:
            raw = _read_bytes(f)
            kept = self._load_file(f, raw)
            if f == self.path:
                own_raw, own = raw, kept
        if writable:
            self._repair(own_raw, own)

    def _key(self, row: R) -> tuple:
        return tuple(getattr(row, f) for f in self.key_fields)

    def _can_replace(self, row: R) -> bool:
        return self.replaceable is not None and self.replaceable(row)

    def _load_file(self, f: Path, raw: bytes) -> list[tuple[tuple, int, bytes]]:
        """Read one file into the rows; returns its rows kept so far (key, line number, line)."""
        kept: list[tuple[tuple, int, bytes]] = []
        lines = raw.split(b"\n")
        n_lines = 0
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            n_lines += 1
            parsed = _parse_line(line, self.record_type)
            if isinstance(parsed, str):
                if n == len(lines):  # the last line has no newline after it
                    parsed = "cut off: the last line has no newline (an interrupted write)"
                self.found.append(DamagedLine(f, n, parsed, line))
            elif self._take(self._key(parsed), parsed, f, n, line):
                kept.append((self._key(parsed), n, line))
        self.lines[f] = n_lines
        return kept

    def _take(self, k: tuple, row: R, f: Path, n: int, line: bytes) -> bool:
        """Whether the row read at `f` line `n` is the key's row (so far)."""
        old = self._rows.get(k)
        if old is not None and not self._can_replace(old):
            if self._can_replace(row):
                self.replaced.append(DamagedLine(f, n, self._replaced_reason(k), line))
            else:
                self.found.append(DamagedLine(f, n, self._duplicate_reason(k, f, line), line))
            return False
        if old is not None:
            old_file, old_line, _ = self._where[k]
            reason = f"replaced by the row of its key at {f.name} line {n}"
            self.replaced.append(DamagedLine(old_file, old_line, reason, self._raw.pop(k)))
        self._rows[k] = row
        self._where[k] = (f, n, hash(line))
        if self._can_replace(row):
            self._raw[k] = line
        return True

    def _replaced_reason(self, k: tuple) -> str:
        first_file, first_line, _ = self._where[k]
        return f"replaced by the row of its key at {first_file.name} line {first_line}"

    def _duplicate_reason(self, k: tuple, f: Path, line: bytes) -> str:
        first_file, first_line, first_hash = self._where[k]
        where = f"line {first_line}" if first_file == f else f"{first_file.name} line {first_line}"
        how = "an identical copy" if first_hash == hash(line) else "different content"
        return f"a second row with key {'/'.join(map(str, k))} ({how}); {where} is kept"

    def _repair(self, raw: bytes, own: list[tuple[tuple, int, bytes]]) -> None:
        """Writers only: set aside what was found or replaced in `path`, then rewrite `path`
        without it."""
        mine = [d for d in self.found if d.file == self.path]
        gone = [d for d in self.replaced if d.file == self.path]
        _check_appendable(self.path)
        if not mine and not gone and (not raw or raw.endswith(b"\n")):
            return
        if mine or gone:
            _quarantine(self.path, mine + gone, hashlib.sha256(raw).hexdigest())
        good = [line for k, n, line in own if self._where[k][:2] == (self.path, n)]
        atomic_write_bytes(self.path, b"".join(line + b"\n" for line in good), error=write_error)
        self.set_aside, self.replaced_aside = mine, gone

    def compact(self) -> str | None:
        """Writers: after rows were replaced by appends, set the replaced lines aside and rewrite
        the file without them (what the next writer's open would do). Returns what was done."""
        if not (self.writable and self._replacements):
            return None
        others = [f for f in self.files if f != self.path]
        fresh = JsonlTable(
            self.path,
            self.record_type,
            self.key_fields,
            read_also=others,
            replaceable=self.replaceable,
        )
        self.__dict__.update(fresh.__dict__)
        return self._replaced_note()

    def describe(self) -> list[str]:
        """One message per file where something was found, and one for the rows replaced by a
        newer row of their key (empty when all is well)."""
        out = []
        for f in self.files:
            mine = [d for d in self.found if d.file == f]
            if mine:
                out.append(self._describe_file(f, mine))
        note = self._replaced_note()
        return [*out, note] if note else out

    def _replaced_note(self) -> str | None:
        if not self.replaced_aside:
            return None
        return (
            f"{self.path}: {len(self.replaced_aside)} row(s) were replaced by a newer row of "
            f"their key (a retry); the replaced lines are kept in {quarantine_path(self.path)}"
        )

    def _describe_file(self, f: Path, found: list[DamagedLine]) -> str:
        shown = "; ".join(f"line {d.line}: {d.reason}" for d in found[:SHOWN_LINES])
        more = f"; and {len(found) - SHOWN_LINES} more" if len(found) > SHOWN_LINES else ""
        head = f"{f}: {len(found)} of {self.lines.get(f, 0)} lines are damaged or repeat a key ({shown}{more})"
        q = quarantine_path(f)
        if f == self.path and self.writable:
            return (
                f"{head}. Set aside, verbatim with their line numbers, in {q}; "
                "rows that had no good copy are redone."
            )
        if self.writable:  # another shard's file: its own writer repairs it
            return f"{head}. Skipped; that file belongs to another shard's writer."
        return (
            f"{head}. Skipped; the file was not changed (a command that writes this run, such "
            f"as `charshift run` or `charshift score`, sets them aside in {q.name} and redoes "
            "their rows)."
        )

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
        """Append records whose keys are new, or whose key's row is replaceable; returns how many
        were written. A failed write (full disk, read-only file) is undone to the last complete
        line and raises StoreWriteError naming the file."""
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        new: dict[tuple, R] = {}
        for r in rows:
            k = self._key(r)
            old = self._rows.get(k)
            if k not in new and (old is None or self._can_replace(old)):
                new[k] = r
        if not new:
            return 0
        _append_bytes(self.path, "".join(_row_line(r) for r in new.values()).encode("utf-8"))
        for k, r in new.items():
            self._replacements += k in self._rows
            self._raw.pop(k, None)
            self._rows[k] = r
            self._where[k] = (self.path, -1, 0)
        return len(new)
