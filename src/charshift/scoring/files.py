"""The files of classifier folders: JSON written atomically, and the sha256 of a file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from charshift.fileio import atomic_write_text


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON with the package's one atomic writer (`fileio.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=2))


def file_sha256(path: Path) -> str:
    """The sha256 of a (small) file's bytes, as hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
