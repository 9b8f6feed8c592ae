"""What every part of the store shares: its errors (each naming the file and the fix), its warning
line and its clock."""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path

from charshift.fileio import WriteError, write_error_text


class StoreError(RuntimeError):
    """A run directory that cannot be used as asked; the message names the file and the fix."""


class StoreWriteError(StoreError, WriteError):
    """The OS refused a write (read-only file, full disk, ...); what was written before is kept."""


class LockHeldError(StoreError):
    """Another live process writes this run (or shard); the message names its pid and host."""


class ModeLockError(LockHeldError):
    """A sharded writer met an unsharded one (or shards of another count), or the reverse."""


def write_error(path: Path, err: OSError) -> StoreWriteError:
    """The store's answer to a refused write: the file, the OS's reason, and how to resume."""
    return StoreWriteError(
        f"{write_error_text(path, err)}; everything written before is kept: fix this and run "
        "the same command again to resume"
    )


def warn(msg: str) -> None:
    """One warning line on stderr (the store's and the report's default)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def now() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
