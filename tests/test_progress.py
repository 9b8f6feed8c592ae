"""Progress off a terminal: plain lines with count, rate and time left, no escape codes."""

from __future__ import annotations

import io
import subprocess
import sys

from charshift import progress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_carry_count_rate_and_time_left_at_most_every_interval():
    out, clock = io.StringIO(), Clock()
    bar = progress.LineProgress(100, "generate m", "row", every_s=30, stream=out, clock=clock)
    for _ in range(10):  # 10 rows in 10 s: no line yet (the interval is 30 s)
        clock.t += 1
        bar.update()
    assert out.getvalue().splitlines() == ["[charshift] generate m: started, 100 rows"]
    for _ in range(50):  # lines at 30 s and 60 s
        clock.t += 1
        bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[1].startswith("[charshift] generate m: 30/100 (30%)")
    assert lines[2] == (
        "[charshift] generate m: 60/100 (60%) rows, 1.00/s, 01:00 elapsed, about 00:40 left"
    )
    for _ in range(40):  # the last row prints its line at once
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("[charshift] generate m: 100/100 (100%)") and len(lines) == 4
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_a_bar_off_a_terminal_is_plain_and_a_nested_one_is_silent(monkeypatch):
    monkeypatch.setenv("CHARSHIFT_PROGRESS", "plain")
    assert isinstance(progress.bar(3, "x"), progress.LineProgress)
    silent = progress.bar(None, "calls", nested=True)
    silent.update(5)
    silent.close()
    monkeypatch.setenv("CHARSHIFT_PROGRESS", "bars")
    from tqdm import tqdm

    shown = progress.bar(3, "x")
    assert isinstance(shown, tqdm)
    shown.close()


def test_the_cli_off_a_terminal_writes_no_escape_codes(tmp_path):
    """A real smoke generate through a pipe (not a terminal): plain progress lines, no
    cursor-up escapes from nested bars."""
    res = subprocess.run(
        [sys.executable, "-m", "charshift.cli", "generate", "--preset", "smoke", "--out",
         str(tmp_path / "run"), "--slices", "id_chat"],
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "\x1b[A" not in res.stderr and "\r" not in res.stderr
    assert "[charshift] generate " in res.stderr and "rows," in res.stderr


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "CHARSHIFT_PROGRESS"}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
