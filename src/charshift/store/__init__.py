"""The run directory and everything it holds, in four parts (and `common`: their errors, warning
line and clock):

- `table`: the keyed JSONL table (append-only, typed records, damaged lines quarantined);
- `locks`: one writer per table, sharded and unsharded writers kept apart;
- `provenance`: the manifest and the facts it records;
- `run`: `RunStore`, the run directory (config, manifest, tables, writer lock).

Every file is written by `charshift.fileio`'s one atomic writer and every table line read by its
one JSONL decoder. The names below are the store's public face.
"""

from charshift.store.common import (
    LockHeldError,
    ModeLockError,
    StoreError,
    StoreWriteError,
    warn,
)
from charshift.store.locks import SHARDING, WriterLock, live_shard_writers
from charshift.store.provenance import PACKAGES, git_commit, package_versions
from charshift.store.run import RETRYABLE_OUTCOMES, SCORE_KEY, TABLES, RunStore, retryable
from charshift.store.table import (
    DamagedLine,
    JsonlTable,
    quarantine_path,
    read_quarantine,
    shard_suffix,
    table_files,
    table_path,
)

__all__ = [
    "PACKAGES",
    "RETRYABLE_OUTCOMES",
    "SCORE_KEY",
    "SHARDING",
    "TABLES",
    "DamagedLine",
    "JsonlTable",
    "LockHeldError",
    "ModeLockError",
    "RunStore",
    "StoreError",
    "StoreWriteError",
    "WriterLock",
    "git_commit",
    "live_shard_writers",
    "package_versions",
    "quarantine_path",
    "read_quarantine",
    "retryable",
    "shard_suffix",
    "table_files",
    "table_path",
    "warn",
]
