"""The judge's answer cache: every answer a judge gave, kept so that nothing is asked twice.

One JSONL file of `{"key", "text", "finish"}` lines: `key` is the hash of everything that
determines an answer (judge model and revision, rubric version, the messages, which hold the
judged text, the sampling settings and the sample's seed), `text` the judge's raw answer. A run
keeps it at `<run>/judge_cache.jsonl`, `score --generations` beside its output file. A rerun
(after a crash, or with more rows) reads every answer back and asks only for what is missing.

Lines are appended under a file lock (shards of one run may append at once) and flushed to disk
after each batch; a damaged line (a crash mid-write) is skipped with a warning and its answer is
asked again. Backend errors are not cached. No credential is ever part of a line.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

CACHE_NAME = "judge_cache.jsonl"


class JudgeCache:
    """Raw judge answers by key, read from and appended to one JSONL file (None: memory only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.answers: dict[str, str] = {}
        self.damaged = 0
        if path is not None and path.is_file():
            self._read(path)

    def _read(self, path: Path) -> None:
        with path.open("rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    obj = json.loads(raw)
                    key, text = obj["key"], obj["text"]
                    if not isinstance(key, str) or not isinstance(text, str):
                        raise TypeError("key and text must be strings")
                except (ValueError, KeyError, TypeError):
                    self.damaged += 1
                    warnings.warn(
                        f"{path} line {n}: not a judge answer (cut off by a crash?); skipped, "
                        "its question is asked again",
                        stacklevel=2,
                    )
                    continue
                self.answers.setdefault(key, text)

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def __len__(self) -> int:
        return len(self.answers)

    def add(self, entries: dict[str, tuple[str, str]]) -> None:
        """Keep `key -> (answer, finish reason)` and append the new ones to the file."""
        new = {k: v for k, v in entries.items() if k not in self.answers}
        for k, (text, _) in new.items():
            self.answers[k] = text
        if self.path is None or not new:
            return
        from filelock import FileLock

        lines = "".join(
            json.dumps({"key": k, "text": t, "finish": f}) + "\n" for k, (t, f) in new.items()
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"), self.path.open("a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:  # a line cut off by a crash is ended, so it stays one bad line
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    lines = "\n" + lines
            fh.write(lines.encode("ascii"))
            fh.flush()
            os.fsync(fh.fileno())
