"""Run the bad-input matrix of tests/test_bad_inputs.py against a source tree and count outcomes.

    python scripts/bad_input_matrix.py --src src                 # this checkout
    python scripts/bad_input_matrix.py --src /tmp/old/src        # another tree (e.g. an old commit)

Prints issue 9's table: per area, how many cases were tried, gave a clear error (exit code != 0,
no traceback; "misleading" where the message does not name the field, file or line the case
expects), a traceback, a silently wrong result (exit 0, or no answer within --timeout seconds)
or lost data (a command that failed changed or removed an existing output file, or any command
changed its own input file). The cases and how each is run are
the test module's; this script only swaps the code under test and counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class _Timeout(BaseException):  # BaseException: CliRunner catches every Exception
    pass


def _load_matrix(src: Path) -> ModuleType:
    sys.path.insert(0, str(src.resolve()))
    spec = importlib.util.spec_from_file_location("bad_inputs", ROOT / "tests/test_bad_inputs.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bad_inputs"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    import charshift

    assert Path(charshift.__file__).resolve().is_relative_to(src.resolve()), charshift.__file__
    return mod


def _classify(m: ModuleType, case: Any, folder: Path, dry: bool, timeout: int) -> tuple[str, bool]:
    """(verdict, data lost) for one case; verdict: clear, misleading, traceback, silent, hang."""

    def alarm(*_: Any) -> None:
        raise _Timeout

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        out = m.run_case(case, folder, m.cli_invoke, dry=dry)
    except _Timeout:
        return "hang", False
    finally:
        signal.alarm(0)
    if out.traceback:
        verdict = "traceback"
    elif out.exit_code == 0:
        verdict = "silent"
    else:
        verdict = "clear" if all(s in out.output for s in case.expect) else "misleading"
    # An accepted input replaces the old outputs as any run does (that is the silent wrong);
    # data is lost when a command that fails has changed or removed what was there, or when any
    # command changed the user's own input file.
    return verdict, bool(out.inputs_changed) or (bool(out.changed) and verdict != "silent")


def _row(name: str, results: list[tuple[str, str, bool]]) -> str:
    c = Counter(v for _, v, _ in results)
    clear = c["clear"] + c["misleading"]
    clear_s = f"{clear} ({c['misleading']} misleading)" if c["misleading"] else str(clear)
    silent = c["silent"] + c["hang"]
    silent_s = f"{silent} ({c['hang']} hung)" if c["hang"] else str(silent)
    lost = sum(lost for _, _, lost in results)
    return f"| {name} | {len(results)} | {clear_s} | {c['traceback']} | {silent_s} | {lost} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the source tree to test")
    ap.add_argument("--timeout", type=int, default=180, help="seconds per case")
    ap.add_argument(
        "--only", default="", help="comma-separated areas: dry,real,predictions,gens,cli"
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    args = ap.parse_args()
    m = _load_matrix(args.src)
    areas = {
        "dry": ("configs (dry run)", m.CONFIG_CASES, True),
        "real": ("configs run for real", [c for c in m.CONFIG_CASES if c.real], False),
        "predictions": ("`report --predictions`", m.PREDICTION_CASES, True),
        "gens": ("`score --generations`", m.GENERATION_CASES, True),
        "cli": ("other commands and options", m.CLI_CASES, False),
    }
    chosen = [a for a in args.only.split(",") if a] or list(areas)
    tmp = Path(tempfile.mkdtemp(prefix="bad-input-matrix-"))
    os.environ.setdefault("CHARSHIFT_CACHE", str(tmp / "cache"))
    lines = []
    for key in chosen:
        name, cases, dry = areas[key]
        results = []
        for i, case in enumerate(cases):
            verdict, lost = _classify(m, case, tmp / key / f"{i}-{case.id}", dry, args.timeout)
            results.append((case.id, verdict, lost))
            if args.verbose:
                print(f"{key:12} {case.id:32} {verdict}{' DATA LOST' if lost else ''}", flush=True)
        lines.append(_row(name, results))
    print(f"\nsource: {args.src}\n")
    print("| area | tried | clear error | traceback | silent wrong | data lost |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
