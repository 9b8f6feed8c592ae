"""The locks of a run directory: one writer per table, sharded and unsharded writers kept apart,
and the lock every writer holds while it changes the files all shards share.

One writer per table: a writer holds an OS-level lock (`filelock`, `WriterLock`) with its pid, host
and start time in a lock-info file; a second writer gets an error naming the holder; a lock left by
a killed process is taken over with a message. Shards of one run write tables of their own under
locks of their own (`writer.shard-i-of-n.lock`).

Sharded and unsharded writers of one run never run at the same time, nor shards of two different
counts: an unsharded writer holds `writer.lock` exclusively, every shard of N holds it shared and
holds `writer.shards-of-N.lock` shared, and a shard refuses to start while another count's lock is
held. Otherwise two writers would generate the same rows. One after the other they are fine: a
writer skips every row any file already holds, whichever writer wrote it (see SHARDING).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from charshift.fileio import atomic_write_text, remove_temps
from charshift.store.common import LockHeldError, ModeLockError, StoreError, now, write_error

Shard = tuple[int, int]  # (index, count), index 0-based


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
            raise write_error(self.path, err) from err
        self.held = True
        try:
            previous = _read_json(self.info_path)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": now(),
                "argv": sys.argv,
            }
            atomic_write_text(self.info_path, json.dumps(info, indent=2), error=write_error)
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


def mode_locks(root: Path, shard: Shard, what: str) -> list[SharedFlock]:
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


def shards_holding(root: Path, what: str) -> str:
    live = live_shard_writers(root)
    counts = sorted({s.split(" of ", 1)[1].split(" ", 1)[0] for s in live})
    hint = f" or give --shard I/{counts[0]} to run as one of them" if len(counts) == 1 else ""
    return (
        f"{what} is being written by {len(live)} shard writer(s): {'; '.join(live)}. An "
        f"unsharded writer would generate and score their rows too: wait for the shards to "
        f"finish (then run the unsharded command to finish the run){hint}."
    )


@contextmanager
def shared_files_lock(root: Path, names: tuple[str, ...]) -> Iterator[None]:
    """Held while writing the files every shard of a run shares (`names`: manifest, config);
    temp files a killed writer left of them are removed first."""
    from filelock import FileLock, Timeout

    path = Path(root) / "manifest.lock"
    lock = FileLock(str(path), timeout=60, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise StoreError(f"{path}: held by another process for over 60 s") from None
    except OSError as err:
        raise write_error(path, err) from err
    try:
        remove_temps(Path(root), names)
        yield
    finally:
        lock.release()
