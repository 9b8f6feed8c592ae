"""How long the report's figures take at paper scale, and what PNG-only and parallel drawing
save: one run, side by side on the same statistics.

    python scripts/bench_report.py [--items 140] [--n-boot 200] [--workers N]

Builds paper-shaped predictions in memory (3 bases x 5 stages x 10 personas x 8 units, `--items`
items per unit: 140 gives 137,760 rows), computes the statistics once (timed), then draws every
figure three ways into fresh folders: (a) one process, PNG and SVG (what the report did before
`report.svg`), (b) one process, PNG only, (c) `--workers` processes (default: one per core),
PNG only. Prints each time and the ratios a/b, b/c and a/c, and the files' total size.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from charshift import plots, stats
from charshift.schema import BASE_STAGE, NULL_PERSONA, PredictionRecord

BASES = ("llama", "qwen", "gemma")
STAGES = ("prompted", "distillation", "full", "prompted_explicit")
PERSONAS = ("sarcasm", "humor", "remorse", "goodness", "loving", "nonchalance", "impulsiveness",
            "sycophancy", "mathematical", "poeticism")  # fmt: skip
UNITS = ("id_chat", "id_chat_prefill", "scenario_chat", "chat_email", "chat_email_multiturn",
         "email_syscontext", "tool_email_oneshot", "agentic_email")  # fmt: skip


def records(n_items: int, seed: int = 0) -> list[PredictionRecord]:
    """Paper-shaped predictions: a hit rate that falls along the units, else a uniform guess."""
    rng = random.Random(seed)
    out = []
    for base in BASES:
        for u, unit in enumerate(UNITS):
            kind = "prompt" if unit.startswith("id_chat") else "scenario"
            for i in range(n_items):
                item = f"{kind}:{i}"
                out.append(PredictionRecord(base, BASE_STAGE, unit, NULL_PERSONA, item,
                                            rng.choice(PERSONAS)))  # fmt: skip
                for stage in STAGES:
                    hit = 0.9 if stage == "prompted_explicit" else 0.7 - 0.07 * u
                    for p in PERSONAS:
                        pred = p if rng.random() < hit else rng.choice(PERSONAS)
                        out.append(PredictionRecord(base, stage, unit, p, item, pred))
    return out


def _draw(result: stats.MetricsResult, out: Path, svg: bool, workers: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    saved = plots.make_figures(result, out, svg=svg, workers=workers)
    took = time.perf_counter() - t0
    size = sum(p.stat().st_size for _, png, sv in saved for p in (png, sv) if p)
    return took, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=140)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    recs = records(args.items)
    t0 = time.perf_counter()
    result = stats.compute_metrics(recs, PERSONAS, n_boot=args.n_boot, n_perm=200)
    t_stats = time.perf_counter() - t0
    n_figs = len(list(plots.figure_specs(result)))
    print(f"{len(recs)} rows; statistics (n_boot {args.n_boot}): {t_stats:.1f} s; "
          f"{n_figs} figures")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        a = _draw(result, Path(tmp) / "a", svg=True, workers=1)
        b = _draw(result, Path(tmp) / "b", svg=False, workers=1)
        c = _draw(result, Path(tmp) / "c", svg=False, workers=args.workers)
    for name, (took, size) in (("a: 1 process, PNG+SVG", a), ("b: 1 process, PNG", b),
                               (f"c: {args.workers} processes, PNG", c)):  # fmt: skip
        print(f"{name:<28} {took:7.1f} s  {size / 1e6:7.1f} MB")
    print(f"ratios: a/b {a[0] / b[0]:.2f}x (SVG off), b/c {b[0] / c[0]:.2f}x (parallel), "
          f"a/c {a[0] / c[0]:.2f}x (both)")  # fmt: skip


if __name__ == "__main__":
    main()
