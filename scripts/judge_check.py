"""Can a small model judge persona? Run an LLM judge (default: the packaged SmolLM2-135M on the
CPU, answers constrained to the rubric's JSON) over one finished run's eval texts and measure it
against what is known about them: which persona each persona-stage text was prompted with.

    python scripts/judge_check.py RUN [--slices id_chat] [--samples 1] [--out DIR]

For each mode, the texts are judged with `charshift.external.score_external_judge` and the file
is reported with `report_predictions`, so every figure is the tool's own:
- identify: the judge's macro-F1 excess over its own null (metrics.csv, scorer classifier =
  the judge's verdicts), with interval and permutation p: above 0 means it names the prompted
  persona more often than chance;
- likert: its excess over the base stage (likert.csv): above 0 means it finds more of each
  persona in the texts written under it than in neutral text of the same unit.
The demo's judge is on only if some figure's interval lies above 0 (see the README).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from charshift.external import report_predictions, score_external_judge
from charshift.schema import BASE_STAGE
from charshift.scoring.settings import JudgeSettings
from charshift.store import RunStore


def export(run: Path, slices: list[str], out: Path) -> int:
    """The run's eval rows of `slices` as a generations JSONL; returns how many have a text."""
    store = RunStore(run, create=False, writable=False)
    lines = []
    for r in store.generations:
        if r.split != "eval" or r.slice not in slices:
            continue
        lines.append({"base": r.base, "stage": r.stage, "slice": r.slice, "item_id": r.item_id,
                      "persona": None if r.stage == BASE_STAGE else r.persona,
                      "sample_idx": r.sample_idx, "text": r.text or None})  # fmt: skip
    out.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return sum(bool(x["text"]) for x in lines)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _iv(row: dict[str, str], stem: str) -> str:
    return f"{float(row[stem]):+.3f} [{row[stem + '_lo'] or 'n/a'}, {row[stem + '_hi'] or 'n/a'}]"


def summarise(mode: str, report: Path) -> list[str]:
    if mode == "identify":
        out = []
        for r in _rows(report / "metrics.csv"):
            if r["stage"] != BASE_STAGE:
                out.append(f"  {r['base']}/{r['stage']}/{r['slice']}: macro-F1 excess "
                           f"{_iv(r, 'macro_f1_excess')}, p_null {r['p_null']}, scored "
                           f"{r['n_scored']}/{r['n_rows']}")  # fmt: skip
        return out
    path = report / "likert.csv"
    if not path.is_file():
        return ["  no Likert score parsed at all"]
    return [
        f"  {r['base']}/{r['stage']}/{r['slice']}: mean {float(r['mean']):.2f}, base-stage null "
        f"{float(r['null']):.2f}, excess {_iv(r, 'excess')}, scored {r['n_scored']}/{r['n_rows']}"
        for r in _rows(path)
        if r["stage"] != BASE_STAGE
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished run directory (e.g. the quick demo's)")
    ap.add_argument("--slices", default="id_chat", help="comma-separated units to judge")
    ap.add_argument("--model", default="packaged:smollm2")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--modes", default="identify,likert")
    ap.add_argument("--out", type=Path, default=Path("judge_check"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gen = args.out / "generations.jsonl"
    n = export(args.run, args.slices.split(","), gen)
    print(
        f"{n} texts from {args.run} ({args.slices}); judge {args.model}, {args.samples} sample(s)"
    )
    for mode in args.modes.split(","):
        settings = JudgeSettings(
            model=args.model, backend={"kind": "hf", "device": "cpu", "dtype": "float32"},
            modes=[mode], samples=args.samples, max_tokens=args.max_tokens, retries=1,
            constrained=True,
        )  # fmt: skip
        pred, t0 = args.out / f"{mode}.jsonl", time.perf_counter()
        score_external_judge(gen, settings, pred)
        took = time.perf_counter() - t0
        report = args.out / f"report_{mode}"
        report_predictions(pred, report, n_boot=1000, positive_control="prompted_explicit")
        print(f"{mode} ({took:.0f} s):")
        print("\n".join(summarise(mode, report)))


if __name__ == "__main__":
    main()
