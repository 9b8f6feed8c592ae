"""The files of classifier folders: JSON written atomically, and the sha256 of a file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    """The sha256 of a (small) file's bytes, as hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
