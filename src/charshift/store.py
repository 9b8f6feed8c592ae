"""The run directory: resolved config, manifest, and append-only keyed JSONL tables.

Layout of a run directory:
    config.yaml          the resolved config (every default filled in)
    manifest.json        package versions, git commit, model/adapter provenance, seeds, times
    generations.jsonl    one GenerationRow per line, keyed
    scores.jsonl         one ScoreRow per line, keyed by (generation key, classifier, unit,
                         scored text hash)
    *.quarantine.jsonl   damaged lines set aside, verbatim, with their line numbers and why
    writer.lock          held by the one process that writes the tables (+ writer.lock.info)
    classifier/          a classifier trained in the run (demo), with train_report.json
    metrics.csv ...      statistics tables;  report/index.html, report.md

Nothing is thrown away. Rows are appended and flushed (fsync) batch by batch. Opening a table reads
every line; a damaged line anywhere (not UTF-8, not JSON, not a valid record, a cut-off last line,
a second copy of a key) is skipped and every good line after it is kept. A reader never changes a
file; a writer (the commands that generate or score) moves the damaged lines, verbatim, into the
table's quarantine file and rewrites the table atomically without them, so only their rows are
redone. Every other file the store writes is written atomically (a unique temp file, fsync,
rename; the temp file is removed if anything fails).

One writer per table: a writer holds an OS-level lock (`filelock`) with its pid, host and start
time in a lock-info file; a second writer gets an error naming the holder; a lock left by a killed
process is taken over with a message. Shards of one run (`shard=(i, n)`) write tables of their own
(`generations.shard-i-of-n.jsonl`) under locks of their own; readers read the union of a table's
files (a key held by two files counts once).

Sharded and unsharded writers of one run never run at the same time, nor shards of two different
counts: an unsharded writer holds `writer.lock` exclusively, every shard of N holds it shared and
holds `writer.shards-of-N.lock` shared, and a shard refuses to start while another count's lock is
held. Otherwise two writers would generate the same rows. One after the other they are fine: a
writer skips every row any file already holds, whichever writer wrote it (see SHARDING).
"""

from __future__ import annotations

import atexit
import base64
import datetime as _dt
import errno
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from charshift.schema import GenerationRow, RecordError, ScoreRow

R = TypeVar("R", GenerationRow, ScoreRow)
Shard = tuple[int, int]  # (index, count), index 0-based

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
TABLES = ("generations", "scores")
SHOWN_LINES = 8  # damaged lines named one by one in a message; the rest are counted


class StoreError(RuntimeError):
    """A run directory that cannot be used as asked; the message names the file and the fix."""


class StoreWriteError(StoreError):
    """The OS refused a write (read-only file, full disk, ...); what was written before is kept."""


class LockHeldError(StoreError):
    """Another live process writes this run (or shard); the message names its pid and host."""


def warn(msg: str) -> None:
    """One warning line on stderr (the store's and the report's default)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


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


# -- atomic writes -------------------------------------------------------------------------------

_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_error(path: Path, err: OSError) -> StoreWriteError:
    name = errno.errorcode.get(err.errno or 0, "")
    return StoreWriteError(
        f"could not write {path}: {err.strerror or err}{f' ({name})' if name else ''}; "
        "everything written before is kept: fix this and run the same command again to resume"
    )


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` all at once: a unique temp file beside it, fsync, rename. On any
    failure the temp file is removed, the old file is untouched, and StoreWriteError names `path`."""
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_temps(folder: Path, names: Iterable[str]) -> None:
    """Remove temp files of `names` left by a process killed mid-write (callers hold the lock
    that guards those files)."""
    for name in names:
        for tmp in folder.glob(f".{glob_escape(name)}.*.tmp"):
            with suppress(OSError):
                tmp.unlink()


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# -- table files and their damage ----------------------------------------------------------------

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


@dataclass(frozen=True)
class DamagedLine:
    """A line of a table file that is not a usable record, kept verbatim (without its newline)."""

    file: Path
    line: int  # 1-based
    reason: str
    raw: bytes

    def to_dict(self, table_sha256: str) -> dict[str, Any]:
        d: dict[str, Any] = {
            "table": self.file.name,
            "line": self.line,
            "reason": self.reason,
            "found": _now(),
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


def _parse_line(raw: bytes, record_type: type[R]) -> R | str:
    """A record, or the reason the line is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return "not valid JSON (nested too deeply)"
    if not isinstance(obj, dict):
        shown = "null" if obj is None else type(obj).__name__
        return f"not a JSON object ({shown})"
    try:
        return record_type.from_dict(obj, record_type.__name__)
    except (RecordError, TypeError, ValueError) as err:
        return str(err)


# -- tables --------------------------------------------------------------------------------------


class JsonlTable(Generic[R]):
    """An append-only JSONL file of typed records (`record_type`, a schema dataclass with
    `to_dict` / `from_dict`) keyed by the attributes `key_fields`. Rows are written and read back
    as the same records.

    Opening reads `path` and the files in `read_also` (other shards' files of the same table) in a
    fixed order; the first copy of a key wins. Damaged lines and later copies of a key are listed
    in `found` and skipped. `writable=False` never changes a file; `writable=True` moves what was
    found in `path` itself to its quarantine file (`set_aside`) and rewrites `path` without it.
    Only `path` is ever appended to.
    """

    def __init__(
        self,
        path: Path,
        record_type: type[R],
        key_fields: tuple[str, ...] = ("key",),
        *,
        writable: bool = True,
        read_also: Sequence[Path] = (),
    ) -> None:
        self.path = Path(path)
        self.record_type = record_type
        self.key_fields = key_fields
        self.writable = writable
        self.files = sorted({self.path, *(Path(p) for p in read_also)}, key=_file_order)
        self.found: list[DamagedLine] = []
        self.set_aside: list[DamagedLine] = []
        self.lines: dict[Path, int] = {}  # non-blank lines per file, as found
        self._rows: dict[tuple, R] = {}
        self._where: dict[tuple, tuple[Path, int, int]] = {}  # file, line, hash of the line
        own_good: list[bytes] = []
        own_raw = b""
        for f in self.files:
            raw = _read_bytes(f)
            good = self._load_file(f, raw)
            if f == self.path:
                own_raw, own_good = raw, good
        if writable:
            self._repair(own_raw, own_good)

    def _key(self, row: R) -> tuple:
        return tuple(getattr(row, f) for f in self.key_fields)

    def _load_file(self, f: Path, raw: bytes) -> list[bytes]:
        """Read one file into the rows; returns its good lines (verbatim, no newline)."""
        good: list[bytes] = []
        lines = raw.split(b"\n")
        n_lines = 0
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            n_lines += 1
            cut = n == len(lines)  # the last line has no newline after it
            parsed = _parse_line(line, self.record_type)
            if isinstance(parsed, str):
                if cut:
                    parsed = "cut off: the last line has no newline (an interrupted write)"
                self.found.append(DamagedLine(f, n, parsed, line))
                continue
            k = self._key(parsed)
            if k in self._rows:
                self.found.append(DamagedLine(f, n, self._duplicate_reason(k, f, line), line))
                continue
            self._rows[k] = parsed
            self._where[k] = (f, n, hash(line))
            good.append(line)
        self.lines[f] = n_lines
        return good

    def _duplicate_reason(self, k: tuple, f: Path, line: bytes) -> str:
        first_file, first_line, first_hash = self._where[k]
        where = f"line {first_line}" if first_file == f else f"{first_file.name} line {first_line}"
        how = "an identical copy" if first_hash == hash(line) else "different content"
        return f"a second row with key {'/'.join(map(str, k))} ({how}); {where} is kept"

    def _repair(self, raw: bytes, good: list[bytes]) -> None:
        """Writers only: set aside what was found in `path`, then rewrite `path` without it."""
        mine = [d for d in self.found if d.file == self.path]
        if not mine and (not raw or raw.endswith(b"\n")):
            _check_appendable(self.path)
            return
        _check_appendable(self.path)
        if mine:
            _quarantine(self.path, mine, hashlib.sha256(raw).hexdigest())
        atomic_write_bytes(self.path, b"".join(line + b"\n" for line in good))
        self.set_aside = mine

    def describe(self) -> list[str]:
        """One message per file where something was found (empty when all is well)."""
        out = []
        for f in self.files:
            mine = [d for d in self.found if d.file == f]
            if mine:
                out.append(self._describe_file(f, mine))
        return out

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
        """Append records whose keys are new; returns how many were written. A failed write
        (full disk, read-only file) is undone to the last complete line and raises
        StoreWriteError naming the file."""
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        new: dict[tuple, R] = {}
        for r in rows:
            k = self._key(r)
            if k not in self._rows and k not in new:
                new[k] = r
        if not new:
            return 0
        blob = "".join(
            json.dumps(r.to_dict(), ensure_ascii=False, default=str) + "\n" for r in new.values()
        ).encode("utf-8")
        _append_bytes(self.path, blob)
        for k, r in new.items():
            self._rows[k] = r
            self._where[k] = (self.path, -1, 0)
        return len(new)


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
        raise _write_error(path, err) from err


def _append_bytes(path: Path, blob: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as err:
        raise _write_error(path, err) from err
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
            raise _write_error(path, err) from err
    finally:
        os.close(fd)


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
    atomic_write_bytes(q, old + blob.encode("utf-8"))


# -- the writer lock -----------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class WriterLock:
    """An OS-level lock (flock via `filelock`) on `path`, with the holder's pid, host, start time
    and command line in `path.info`. The kernel frees the lock when its holder dies, so a lock
    left by a killed process is simply taken; its info file tells us to say so."""

    def __init__(self, path: Path, what: str) -> None:
        from filelock import FileLock

        self.path = Path(path)
        self.info_path = self.path.with_name(self.path.name + ".info")
        self.what = what
        self._lock = FileLock(str(self.path), timeout=0, thread_local=False)
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a message when a stale lock was taken over."""
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise LockHeldError(self._held_message()) from None
        except OSError as err:
            raise _write_error(self.path, err) from err
        self.held = True
        try:
            previous = _read_json(self.info_path)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _now(),
                "argv": sys.argv,
            }
            atomic_write_text(self.info_path, json.dumps(info, indent=2))
        except BaseException:
            self.release()
            raise
        atexit.register(self.release)
        if previous:
            return (
                f"{self.path}: taking over the lock of {self.what} left by pid "
                f"{previous.get('pid')} on {previous.get('host')} (started "
                f"{previous.get('started')}), which no longer runs; a cut-off last line it "
                "left is set aside and its rows redone"
            )
        return None

    def _held_message(self) -> str:
        info: dict[str, Any] | None = None
        for _ in range(20):  # the holder writes its info right after taking the lock
            info = _read_json(self.info_path)
            if info:
                break
            time.sleep(0.05)
        if not info:
            return (
                f"{self.what} is being written by another process (lock {self.path} is held; "
                "it left no pid). Wait for it to finish or stop it; two writers would each redo "
                "every row."
            )
        who = f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
        cmd = " ".join(str(a) for a in info.get("argv") or [])
        pid = info.get("pid")
        if (
            info.get("host") == socket.gethostname()
            and isinstance(pid, int)
            and not _pid_alive(pid)
        ):
            return (
                f"{self.what}: the lock {self.path} is held, but the process that took it ({who}) "
                f"is gone; a process it started may still hold it (find it with `fuser {self.path}`)"
            )
        return (
            f"{self.what} is being written by another charshift process: {who}"
            f"{f' ({cmd})' if cmd else ''}. Wait for it to finish or stop it; two writers would "
            f"each redo every row. (lock: {self.path})"
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with suppress(OSError):
            self.info_path.unlink()
        with suppress(OSError):
            self._lock.release(force=True)
        atexit.unregister(self.release)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- sharded and unsharded writers ---------------------------------------------------------------

SHARDING = """\
A run directory may be written by one unsharded writer, or by the shards of one count N at once
(`--shard I/N`, each its own table files); never both at the same time. In sequence anything
goes: a writer skips every row held by any file of the run, so an unsharded `charshift run`
after the shards finishes what they left (a failed shard, the classifier trained on every
shard's rows, the scores), and a later sharding of another count resumes the same run."""


class ModeLockError(LockHeldError):
    """A sharded writer met an unsharded one (or shards of another count), or the reverse."""


class SharedFlock:
    """A shared (or probing exclusive) `flock` on a file, held through its own descriptor: the
    same primitive `filelock` uses, so it contends with a `WriterLock` on the same file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, exclusive: bool = False) -> bool:
        """Take the lock without waiting; False when another process holds a conflicting one.
        OSError when the file system has no flock."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops its flock
            self._fd = None


def count_lock_path(root: Path, n: int) -> Path:
    return Path(root) / f"writer.shards-of-{n}.lock"


def live_shard_writers(root: Path) -> list[str]:
    """'shard I of N (pid P on H, started T)' for each shard writer whose lock info is there and
    whose process is alive (on another host: assumed alive)."""
    out = []
    for info_path in sorted(Path(root).glob("writer.shard-*-of-*.lock.info")):
        info = _read_json(info_path)
        m = re.match(r"writer\.shard-(\d+)-of-(\d+)\.lock\.info$", info_path.name)
        if not info or not m:
            continue
        pid = info.get("pid")
        here = info.get("host") == socket.gethostname()
        if here and isinstance(pid, int) and not _pid_alive(pid):
            continue
        who = f"pid {pid} on {info.get('host')}, started {info.get('started')}"
        out.append(f"shard {m[1]} of {m[2]} ({who})")
    return out


def _mode_locks(root: Path, shard: Shard, what: str) -> list[SharedFlock]:
    """A shard writer's shared holds on `writer.lock` and on its count's lock; ModeLockError
    while an unsharded writer or shards of another count write the run."""
    i, n = shard
    held: list[SharedFlock] = []
    try:
        run_lock = SharedFlock(Path(root) / "writer.lock")
        if not run_lock.acquire():
            raise ModeLockError(_unsharded_holder(root, what, n))
        held.append(run_lock)
        mine = SharedFlock(count_lock_path(root, n))
        if not mine.acquire():
            raise ModeLockError(_other_count_holder(root, what, shard, None))
        held.append(mine)
        for other in sorted(Path(root).glob("writer.shards-of-*.lock")):
            m = re.match(r"writer\.shards-of-(\d+)\.lock$", other.name)
            if not m or int(m[1]) == n:
                continue
            probe = SharedFlock(other)
            if not probe.acquire(exclusive=True):
                raise ModeLockError(_other_count_holder(root, what, shard, int(m[1])))
            probe.release()
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held


def _unsharded_holder(root: Path, what: str, n: int) -> str:
    info = _read_json(Path(root) / "writer.lock.info") or {}
    who = f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
    return (
        f"{what}: the run is being written by an unsharded charshift process ({who}); a shard "
        f"would generate rows it is generating. Wait for it to finish or stop it, then start "
        f"the shards (--shard I/{n}). (lock: {Path(root) / 'writer.lock'})"
    )


def _other_count_holder(root: Path, what: str, shard: Shard, other: int | None) -> str:
    i, n = shard
    live = [s for s in live_shard_writers(root) if f" of {n} (" not in s]
    count = f"in {other} shards" if other else "in shards of another count"
    return (
        f"{what}: the run is being written {count} ({'; '.join(live) or 'see their locks'}); "
        f"shard {i} of {n} would overlap their items. Use --shard I/{other or 'M'} with their "
        "count, or wait for them to finish."
    )


def _shards_holding(root: Path, what: str) -> str:
    live = live_shard_writers(root)
    counts = sorted({s.split(" of ", 1)[1].split(" ", 1)[0] for s in live})
    hint = f" or give --shard I/{counts[0]} to run as one of them" if len(counts) == 1 else ""
    return (
        f"{what} is being written by {len(live)} shard writer(s): {'; '.join(live)}. An "
        f"unsharded writer would generate and score their rows too: wait for the shards to "
        f"finish (then run the unsharded command to finish the run){hint}."
    )


# -- provenance ----------------------------------------------------------------------------------


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


# -- the run directory ---------------------------------------------------------------------------


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
        self._manifest_warned = False
        self._lock: WriterLock | None = None
        self._mode: list[SharedFlock] = []  # a shard writer's shared holds (see SHARDING)
        if not (writable and create):
            self._require_run()
        if writable:
            self._open_for_writing(create)
        try:
            self.generations: JsonlTable[GenerationRow] = self._table(
                "generations", GenerationRow, ("key",)
            )
            self.scores: JsonlTable[ScoreRow] = self._table("scores", ScoreRow, SCORE_KEY)
            for t in (self.generations, self.scores):
                for msg in t.describe():
                    self._say(msg)
                if t.set_aside:
                    lines = [d.line for d in t.set_aside]
                    self.log_event("set_aside", file=t.path.name, lines=lines)
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
                raise _write_error(self.root, err) from err
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
                    raise ModeLockError(_shards_holding(self.root, what)) from None
            raise
        if msg:
            self.warn(msg)  # not a note for the report: it says nothing about the data
        own = [table_path(self.root, t, self.shard) for t in TABLES]
        _remove_temps(self.root, [p.name for p in own] + [quarantine_path(p).name for p in own])

    def _take_mode_locks(self, what: str) -> list[SharedFlock]:
        """A shard's holds that keep an unsharded writer and shards of another count out."""
        assert self.shard is not None
        try:
            return _mode_locks(self.root, self.shard, what)
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

    def _table(self, stem: str, record_type: type[R], key_fields: tuple[str, ...]) -> JsonlTable:
        own = table_path(self.root, stem, self.shard if self.writable else None)
        return JsonlTable(
            own,
            record_type,
            key_fields,
            writable=self.writable,
            read_also=table_files(self.root, stem),
        )

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
                with self._shared_files_lock():
                    atomic_write_text(
                        self.config_path,
                        yaml.safe_dump(cfg_dict, sort_keys=False, allow_unicode=True),
                    )
        else:
            if len(self.generations) or len(self.scores):
                self._check_same_run(cfg_dict, planned_keys)
            text = yaml.safe_dump(cfg_dict, sort_keys=False, allow_unicode=True)
            with self._shared_files_lock():
                atomic_write_text(self.config_path, text)
        if self.manifest().get("config") != cfg_dict:
            self._modify_manifest(lambda m: m.__setitem__("config", cfg_dict))

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

    def _read_manifest(self) -> tuple[dict[str, Any], str | None]:
        """(manifest, what is wrong with it or None)."""
        try:
            raw = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return {}, None
        except OSError as err:
            raise StoreError(f"could not read {self.manifest_path}: {err.strerror}") from err
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            return {}, f"not valid JSON ({str(err).splitlines()[0]})"
        if not isinstance(data, dict):
            return {}, f"not a JSON object ({type(data).__name__})"
        return data, None

    def manifest(self) -> dict[str, Any]:
        m, problem = self._read_manifest()
        if problem and not self._manifest_warned:
            self._manifest_warned = True
            self._say(
                f"{self.manifest_path} is damaged ({problem}); read as empty, so this run's "
                "provenance is incomplete"
            )
        return m

    def recorded(self, field: str) -> dict[str, str]:
        """The name -> text map the manifest records under `field` (`classifier_ids`: base ->
        the classifier id its scores use; `skipped_adapters`: base/adapter -> why), read back
        typed: {} when there is none; entries that are not text are left out."""
        found = self.manifest().get(field)
        if not isinstance(found, dict):
            return {}
        return {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, str)}

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the manifest (a dict merges into a dict; None removes a field)."""

        def merge(m: dict[str, Any]) -> None:
            for k, v in fields.items():
                if v is None:
                    m.pop(k, None)
                elif isinstance(v, dict) and isinstance(m.get(k), dict):
                    m[k].update(v)
                else:
                    m[k] = v

        return self._modify_manifest(merge)

    def log_event(self, event: str, **data: Any) -> None:
        """Start/end times of steps, appended to the manifest's event list."""
        entry = {"time": _now(), "event": event, **data}
        self._modify_manifest(lambda m: m.setdefault("events", []).append(entry))

    @contextmanager
    def _shared_files_lock(self) -> Iterator[None]:
        """Held while writing the files every shard of a run shares (manifest, config)."""
        self._require_writable()
        from filelock import FileLock, Timeout

        path = self.root / "manifest.lock"
        lock = FileLock(str(path), timeout=60, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise StoreError(f"{path}: held by another process for over 60 s") from None
        except OSError as err:
            raise _write_error(path, err) from err
        try:
            _remove_temps(self.root, ["manifest.json", "config.yaml"])
            yield
        finally:
            lock.release()

    def _modify_manifest(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, change and write the manifest atomically, under the shared-files lock."""
        with self._shared_files_lock():
            m = self._manifest_for_update()
            change(m)
            m["updated"] = _now()
            atomic_write_text(self.manifest_path, json.dumps(m, indent=2, default=str))
            return m

    def _manifest_for_update(self) -> dict[str, Any]:
        m, problem = self._read_manifest()
        if problem:
            aside = self.root / f"manifest.damaged-{_dt.datetime.now():%Y%m%d-%H%M%S-%f}.json"
            try:
                os.replace(self.manifest_path, aside)
            except OSError as err:
                raise _write_error(self.manifest_path, err) from err
            self._say(f"{self.manifest_path} was damaged ({problem}); set aside as {aside.name}")
        if not m:
            m = {
                "created": _now(),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "argv": sys.argv,
            }
        m.setdefault("packages", package_versions())
        m.setdefault("git_commit", git_commit())
        return m
