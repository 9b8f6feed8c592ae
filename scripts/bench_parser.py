"""Time the tool-call parser, its diagnosis and the email extractor on adversarial inputs.

    python scripts/bench_parser.py [--sizes 100k,1m,5m] [--families a,b] [--funcs parse,extract]
                                   [--timeout 30] [--module-path /work/main/src]

For every family of tests/adversarial.py, every function (`parse_tool_calls`,
`diagnose_tool_turn`, `extract_email`) and every size, prints the CPU seconds of one call (CPU
time, so that other processes on a shared machine do not count; `--clock wall` for wall time)
and the growth from the smallest to the largest size over the growth of the input: about 1 for
linear code, up to the size ratio (50 for 100 KB -> 5 MB) for quadratic code.

With `--module-path`, the same measurements also run against another checkout's `src` (e.g.
/work/main/src, the code before the change), side by side in the same run; the last column is
old / new at the largest size. Each (code, family, function) runs in a child process that
imports the code from the path given; a call that runs past `--timeout` seconds (wall) is
killed and shown as `>T`, and its larger sizes as `-`.
"""

from __future__ import annotations

import argparse
import json
import selectors
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["send_email", "search_directory", "read_document", "finish"]
FUNCS = ("parse", "diagnose", "extract")


def _size(token: str) -> int:
    token = token.strip().lower()
    scale = {"k": 1000, "m": 1000_000}.get(token[-1], 1)
    return int(float(token.rstrip("km")) * scale)


def _label(size: int) -> str:
    return f"{size / 1e6:g}MB" if size >= 1000_000 else f"{size / 1e3:g}KB"


def worker(module_path: str, family: str, func: str, sizes: list[int], clock: str) -> None:
    """Child process: import the code under test from `module_path`; one JSON line per size."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, module_path)
    import adversarial

    from charshift import extraction, toolcalls

    where = Path(toolcalls.__file__).resolve()
    if not where.is_relative_to(Path(module_path).resolve()):
        raise SystemExit(f"imported {where}, not the code under {module_path}")
    fn = {
        "parse": toolcalls.parse_tool_calls,
        "diagnose": lambda t: toolcalls.diagnose_tool_turn(t, TOOLS),
        "extract": extraction.extract_email,
    }[func]
    now = time.process_time if clock == "cpu" else time.perf_counter
    for size in sizes:
        text = adversarial.text(family, size)
        start = now()
        fn(text)
        print(json.dumps({"size": size, "seconds": now() - start}), flush=True)


def measure(
    module_path: str, family: str, func: str, sizes: list[int], timeout: float, clock: str
) -> dict[int, float | None]:
    """{size: seconds, None where the call ran past the timeout or was not reached}."""
    out: dict[int, float | None] = dict.fromkeys(sizes)
    cmd = [sys.executable, __file__, "--worker", "--module-path", module_path, "--clock", clock]
    cmd += ["--families", family, "--funcs", func, "--sizes", ",".join(map(str, sizes))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        for k, size in enumerate(sizes):
            line = _readline(proc, timeout + (30 if k == 0 else 0))  # the first pays the import
            if line is None:
                break
            out[size] = json.loads(line)["seconds"]
    finally:
        proc.kill()
        proc.wait()
    return out


def _readline(proc: subprocess.Popen[str], timeout: float) -> str | None:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
    return proc.stdout.readline() or None


def _cells(times: dict[int, float | None], sizes: list[int], timeout: float) -> list[str]:
    cells, dead = [], False
    for s in sizes:
        t = times[s]
        cells.append("-" if dead else f">{timeout:g}" if t is None else f"{t:.3f}")
        dead = dead or t is None
    lo, hi = times[sizes[0]], times[sizes[-1]]
    growth = (
        "-" if lo is None or hi is None or lo <= 0 else f"{hi / lo / (sizes[-1] / sizes[0]):.2f}"
    )
    return cells + [growth]


def _old_over_new(old: float | None, new: float | None, timeout: float) -> str:
    if new is None:
        return "-"
    if old is None:  # the timeout is wall time: no ratio of CPU times to give
        return f"old >{timeout:g}s wall"
    return f"{old / max(new, 1e-4):.1f}"


def run(args: argparse.Namespace) -> None:
    sizes = sorted(_size(s) for s in args.sizes.split(","))
    sys.path.insert(0, str(ROOT / "tests"))
    import adversarial

    families = args.families.split(",") if args.families else list(adversarial.FAMILIES)
    paths = [("new", str(ROOT / "src"))] + ([("old", args.module_path)] if args.module_path else [])
    head = ["family", "func"]
    for tag, _ in paths:
        head += [f"{tag} {_label(s)}" for s in sizes] + [f"{tag} growth"]
    if args.module_path:
        head.append(f"old/new {_label(sizes[-1])}")
    print(f"# {args.clock} seconds per call; growth = time ratio / size ratio (1 = linear)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    slowest: list[tuple[float, str]] = []
    for family in families:
        for func in args.funcs.split(","):
            res = {
                tag: measure(p, family, func, sizes, args.timeout, args.clock) for tag, p in paths
            }
            row = [family, func]
            for tag, _ in paths:
                row += _cells(res[tag], sizes, args.timeout)
            if args.module_path:
                row.append(
                    _old_over_new(res["old"][sizes[-1]], res["new"][sizes[-1]], args.timeout)
                )
            new_top = res["new"][sizes[-1]]
            slowest.append((float("inf") if new_top is None else new_top, f"{family}/{func}"))
            print("| " + " | ".join(row) + " |", flush=True)
    top = ", ".join(f"{name} {t:.3f}s" for t, name in sorted(slowest, reverse=True)[:5])
    print(f"\nslowest (new, {_label(sizes[-1])}): {top}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="100k,1m,5m")
    ap.add_argument("--families", default="", help="comma-separated; default: all")
    ap.add_argument("--funcs", default=",".join(FUNCS))
    ap.add_argument("--module-path", default="", help="another checkout's src to compare with")
    ap.add_argument("--timeout", type=float, default=30.0, help="wall seconds per call")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sizes = sorted(_size(s) for s in args.sizes.split(","))
        worker(args.module_path, args.families, args.funcs, sizes, args.clock)
    else:
        run(args)


if __name__ == "__main__":
    main()
