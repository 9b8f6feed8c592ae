"""Progress on long work, and third-party noise (the I/O edge; no figures here).

On a terminal, tqdm bars. Off one (a log file, a SLURM or Ray job's output), escape codes and
redrawn bars make a log unreadable, so a bar is a `LineProgress`: one plain line when it starts,
then one at most every `every_s` seconds (and when it ends) with the count, the rate and the time
left; a nested bar (`nested=True`, e.g. model calls inside a row bar) prints nothing. The choice
is made per bar from `sys.stderr.isatty()`; `CHARSHIFT_PROGRESS=plain` or `=bars` forces it.

`quiet_third_parties()` is called once by the CLI: warnings and progress bars of libraries that
are not the user's concern (transformers' FutureWarnings and its weight-loading bars off a
terminal) are filtered there, and only there.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any, TextIO

EVERY_S = 30.0  # seconds between two plain progress lines


def interactive(stream: TextIO | None = None) -> bool:
    """Bars (True) or plain lines (False) on `stream` (default stderr)."""
    forced = os.environ.get("CHARSHIFT_PROGRESS", "").strip().lower()
    if forced in ("plain", "bars"):
        return forced == "bars"
    s = sys.stderr if stream is None else stream
    return bool(getattr(s, "isatty", lambda: False)())


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class LineProgress:
    """A bar for logs: plain lines with count, rate and time left (see the module doc)."""

    def __init__(
        self, total: int | None, desc: str, unit: str, *, every_s: float = EVERY_S,
        stream: TextIO | None = None, clock: Any = time.monotonic,
    ) -> None:  # fmt: skip
        self.total, self.desc, self.unit, self.every_s = total, desc.strip(), unit, every_s
        self.stream, self.clock = stream, clock
        self.n, self.start = 0, clock()
        self.last = self.start
        self.closed = False
        self._say(f"{self.desc}: started" + (f", {total} {unit}s" if total is not None else ""))

    def _say(self, text: str) -> None:
        print(f"[charshift] {text}", file=self.stream or sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = self.clock() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total is not None else "")
        if self.total:
            head += f" ({100.0 * self.n / self.total:.0f}%)"
        text = f"{head} {self.unit}s, {rate:.2f}/s, {_clock(elapsed)} elapsed"
        if self.total and rate > 0 and self.n < self.total:
            text += f", about {_clock((self.total - self.n) / rate)} left"
        return text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every_s or (self.total is not None and self.n >= self.total):
            self.last = now
            self._say(self.line())

    def set_postfix(self, *_args: Any, **_kwargs: Any) -> None:
        """(tqdm's; a plain line carries no postfix)"""

    def close(self) -> None:
        if not self.closed and (self.total is None or self.n < self.total):
            self._say(self.line())
        self.closed = True


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "it", *, nested: bool = False) -> Any:
    """A progress bar: tqdm on a terminal; off one a `LineProgress` (nothing for a nested bar)."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=not nested)
    return _Silent() if nested else LineProgress(total, desc, unit)


def quiet_third_parties() -> None:
    """Filter, once, what libraries print that is not the user's concern (see the module doc)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(\.|$)")
    if not interactive():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # transformers absent: nothing of its to quiet
            pass
