"""The one atomic file writer and the one strict JSONL reader of the package.

Writing: `atomic_write_bytes` / `atomic_write_text` replace a file all at once: a unique temp file
beside it (`.NAME.RANDOM.tmp`), fsync, rename, fsync of the folder. A new file gets the mode the
user's umask gives (0666 minus the umask: a colleague on a shared run folder can read it); a file
replaced keeps its mode. On any failure the temp file is removed, the old file is untouched, and
the error names the file. `remove_temps` clears temp files a killed writer left.

Reading: `decode_json_line` is the one decoder of a JSONL line. It refuses bytes that are not
UTF-8, a line that is not one JSON value, a key given twice in one object (JSON allows it; Python
would keep the last silently), and, for files a user hands in (`finite=True`, `max_depth` set),
NaN/Infinity, numbers too large for a float and nesting deeper than `MAX_DEPTH`. The run's own
tables are read with `finite=False, max_depth=None`: they hold model output as `json.dumps` wrote
it. `read_jsonl` reads a whole file (a missing file, a folder, an empty file, a line over
`MAX_LINE_BYTES` and a cut-off last line are named errors) and `jsonl_values` lines in memory; both
name the source and the 1-based line in every error.

Only the standard library is imported here, so every module can use it without a cycle.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

MAX_LINE_BYTES = 64 << 20  # one JSONL row of a user's file; a text of tens of MB is no model output
MAX_DEPTH = 32  # JSON nesting of one row of a user's file (the schemas need 2)

Error = type[Exception]


class WriteError(RuntimeError):
    """The OS refused a write (read-only file, full disk, ...); the message names the file."""


class JsonLineError(ValueError):
    """One JSONL line that is not what was asked for; the message says why, without a location."""


# ------------------------------------------------------------------------------------- writing


def write_error_text(path: str | Path, err: OSError) -> str:
    """'could not write PATH: No space left on device (ENOSPC)'."""
    name = errno.errorcode.get(err.errno or 0, "")
    return f"could not write {path}: {err.strerror or err}{f' ({name})' if name else ''}"


def _default_error(path: Path, err: OSError) -> Exception:
    return WriteError(write_error_text(path, err))


WriteErrorFactory = Callable[[Path, OSError], Exception]


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temp file beside `path`, created with mode 0666 so the kernel applies the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue


def atomic_write_bytes(
    path: str | Path, data: bytes, *, error: WriteErrorFactory = _default_error
) -> Path:
    """Replace `path` with `data` all at once (see the module doc); returns `path`. On failure
    `error(path, os_error)` is raised (default: WriteError naming the file)."""
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = _temp_beside(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with suppress(FileNotFoundError):
            os.chmod(tmp, path.stat().st_mode & 0o7777)  # a replaced file keeps its mode
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise error(path, err) from err
    finally:
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)
    fsync_dir(path.parent)
    return path


def atomic_write_text(
    path: str | Path, text: str, *, error: WriteErrorFactory = _default_error
) -> Path:
    """`atomic_write_bytes` of `text` in UTF-8 (no newline translation)."""
    return atomic_write_bytes(path, text.encode("utf-8"), error=error)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the OS allows opening a folder)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def remove_temps(folder: Path, names: Iterable[str]) -> None:
    """Remove the temp files of `names` left by a process killed mid-write (callers hold the lock
    that guards those files)."""
    for name in names:
        for tmp in Path(folder).glob(f".{glob_escape(name)}.*.tmp"):
            with suppress(OSError):
                tmp.unlink()


# ------------------------------------------------------------------------------------- reading


class _Refused(ValueError):
    """Raised inside the decoder's hooks; becomes a JsonLineError."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Refused(f"key {k!r} is given twice in one object")
            seen.add(k)
    return obj


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _Refused(f"number {text[:40]} is too large for a float")
    return v


# One decoder of each kind for every line (json.loads with hooks would build one per call).
_STRICT = json.JSONDecoder(
    object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant, parse_float=_finite_float
)
_OWN = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (only containers are visited)."""
    depth, level = 0, [obj]
    while level:
        depth += 1
        nxt: list[Any] = []
        for o in level:
            if isinstance(o, dict):
                nxt.extend(v for v in o.values() if isinstance(v, dict | list))
            elif isinstance(o, list):
                nxt.extend(v for v in o if isinstance(v, dict | list))
        level = nxt
    return depth


def decode_json_line(
    raw: bytes, *, max_depth: int | None = MAX_DEPTH, finite: bool = True, objects: bool = False
) -> Any:
    """One line (bytes, without its newline) -> its JSON value (`objects`: it must be an object);
    JsonLineError says why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JsonLineError(
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
        ) from None
    too_deep = f"JSON nested too deeply (more than {max_depth or 'Python allows'} levels)"
    try:
        obj = (_STRICT if finite else _OWN).decode(text)
    except json.JSONDecodeError as err:
        raise JsonLineError(f"not valid JSON ({err.msg}, column {err.colno})") from None
    except _Refused as err:
        raise JsonLineError(str(err)) from None
    except RecursionError:
        raise JsonLineError(too_deep) from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise JsonLineError(f"unreadable number ({err})") from None
    # fewer brackets than the limit cannot nest past it (a C-speed count spares the walk)
    if max_depth is not None and raw.count(b"[") + raw.count(b"{") > max_depth:
        if _depth(obj) > max_depth:
            raise JsonLineError(too_deep)
    if objects and not isinstance(obj, dict):
        raise JsonLineError(f"expected a JSON object, got {json_type(obj)}")
    return obj


def json_type(v: Any) -> str:
    """'an object', 'an array', 'a string', 'true/false', 'null' or 'a number'."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false"}
    return "null" if v is None else names.get(type(v), "a number")


def parse_json_line(
    raw: bytes, where: str, error: Error = JsonLineError, *, objects: bool = False
) -> Any:
    """`decode_json_line` (a user's file: strict) with errors `error(f"{where}: ...")`;
    `objects`: the value must be a JSON object."""
    try:
        return decode_json_line(raw, objects=objects)
    except JsonLineError as err:
        raise error(f"{where}: {err}") from None


def _raw_lines(lines: Iterable[bytes | str]) -> Iterator[tuple[int, bytes, bool]]:
    """(1-based number, line without its newline, whether it was cut off) for each line."""
    for n, line in enumerate(lines, 1):
        raw = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line
        cut = not raw.endswith(b"\n")  # only a last line can lack its newline
        raw = raw.rstrip(b"\r\n")
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark
        yield n, raw, cut


def jsonl_values(
    lines: Iterable[bytes | str],
    source: str,
    error: Error = JsonLineError,
    *,
    objects: bool = True,
    newlines: bool = False,
) -> Iterator[tuple[int, Any]]:
    """(1-based line number, value) for each non-blank line; an error names `source` and the line.
    `objects`: every value must be an object. `newlines`: the lines carry their newlines (read
    from a file), so a bad last line without one is said to be cut off."""
    for n, raw, cut in _raw_lines(lines):
        if not raw.strip():
            continue
        try:
            yield n, parse_json_line(raw, f"{source} line {n}", error, objects=objects)
        except error as err:
            if cut and newlines:
                raise error(f"{err}; it is the last line and has no newline: cut off?") from None
            raise


class _FileLines:
    """The lines of an open binary file, each at most MAX_LINE_BYTES (else a named error)."""

    def __init__(self, fh: Any, where: str, error: Error) -> None:
        self.fh, self.where, self.error = fh, where, error

    def __iter__(self) -> Iterator[bytes]:
        n = 0
        while raw := self.fh.readline(MAX_LINE_BYTES + 1):
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise self.error(f"{self.where} line {n}: longer than {MAX_LINE_BYTES} bytes")
            yield raw


def read_jsonl(
    path: str | Path,
    what: str = "input file",
    error: Error = JsonLineError,
    *,
    objects: bool = True,
) -> list[tuple[int, Any]]:
    """(1-based line number, value) for every non-blank line of a JSONL file a user hands in.
    Refused, naming `what`, the file and the line: a missing file, a folder, a file with no rows,
    and any line `jsonl_values` refuses. A pipe (`<(...)`, /dev/stdin) reads like a file."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {p} is a folder, not a JSONL file")
    if not p.exists():
        raise error(f"{what} not found: {p}")
    try:
        fh = p.open("rb")
    except OSError as err:
        raise error(f"{what} {p} cannot be read: {err.strerror or err}") from None
    with fh:
        lines = _FileLines(fh, f"{what} {p}", error)
        out = list(jsonl_values(lines, f"{what} {p}", error, objects=objects, newlines=True))
    if not out:
        raise error(f"{what} {p} holds no rows (the file is empty)")
    return out


def read_jsonl_objects(
    path: str | Path, what: str = "input file", error: Error = JsonLineError
) -> list[tuple[int, dict[str, Any]]]:
    """`read_jsonl` where every line must be a JSON object."""
    return read_jsonl(path, what, error, objects=True)
