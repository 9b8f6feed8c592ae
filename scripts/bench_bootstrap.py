"""Benchmark: vectorised cluster bootstrap (charshift.stats) against a plain per-resample loop.

Builds a synthetic 5,000-row cell (10 personas, 500 clusters of 10 rows, cluster-level hit rates,
predictions outside the label set and missing outputs), then

1. times `stats.compute_metrics` (1000 resamples, all metrics; the best of `--repeat` runs, as
   the machine may be shared) and a loop that, per resample,
   draws clusters with replacement, gathers their rows and recomputes macro-F1 with
   scikit-learn (1000 resamples, macro-F1 only);
2. checks agreement: the same point estimate, intervals within a quarter of their width;
3. checks exactness: with the vectorised path's own draw, the loop reproduces every resample's
   macro-F1 to 1e-12.

Usage: python scripts/bench_bootstrap.py [--n-boot 1000] [--seed 0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from sklearn.metrics import f1_score

from charshift import stats
from charshift.config import ALL_PERSONAS
from charshift.schema import PredictionRecord


def synthetic_cell(seed: int, n_clusters: int = 500) -> tuple[list[PredictionRecord], list[str]]:
    rng = np.random.default_rng(seed)
    personas = [p for p in ALL_PERSONAS if p != "misalignment"]  # 10, as in the paper
    labels = personas + ["misalignment", None]
    recs = []
    for c in range(n_clusters):
        rate = rng.beta(6, 3)
        for t in personas:
            if rng.random() < 0.1:
                pred = None
            elif rng.random() < rate:
                pred = t
            else:
                pred = labels[int(rng.integers(0, len(labels) - 1))]
            recs.append(PredictionRecord("bench", "full", "agentic_email", t, f"sc{c:04d}", pred))
    return recs, personas


def encode(recs: list[PredictionRecord], personas: list[str]) -> tuple[np.ndarray, ...]:
    idx = {p: i for i, p in enumerate(personas)}
    k = len(personas)
    y = np.array([idx[r.persona] for r in recs])
    p = np.array([k + 1 if r.prediction is None else idx.get(r.prediction, k) for r in recs])
    clusters, cid = np.unique([r.item_id for r in recs], return_inverse=True)
    rows_of = [np.flatnonzero(cid == c) for c in range(len(clusters))]
    return y, p, clusters, rows_of


def macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Conditional macro-F1: rows with an output, averaged over the personas that have one."""
    keep = p <= k
    labels = sorted(set(y[keep].tolist()))
    return float(f1_score(y[keep], p[keep], labels=labels, average="macro", zero_division=0))


def loop_bootstrap(
    y: np.ndarray, p: np.ndarray, rows_of: list[np.ndarray], k: int, n_boot: int, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(rows_of)
    out = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, n, size=n)
        rows = np.concatenate([rows_of[c] for c in pick])
        out[b] = macro_f1(y[rows], p[rows], k)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    recs, personas = synthetic_cell(args.seed)
    k = len(personas)
    y, p, clusters, rows_of = encode(recs, personas)
    print(
        f"cell: {len(recs)} rows, {k} personas, {len(clusters)} clusters, {args.n_boot} resamples"
    )

    t_vec = float("inf")
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        res = stats.compute_metrics(
            recs, personas, n_boot=args.n_boot, seed=args.seed, differences=False
        )
        t_vec = min(t_vec, time.perf_counter() - t0)
    cm = next(iter(res.cells.values()))

    t0 = time.perf_counter()
    loop = loop_bootstrap(y, p, rows_of, k, args.n_boot, args.seed + 1)
    t_loop = time.perf_counter() - t0

    point_loop = macro_f1(y, p, k)
    lo_loop, hi_loop = np.quantile(loop, [0.025, 0.975])
    print(f"vectorised (compute_metrics, all metrics): {t_vec:8.3f} s (best of {args.repeat})")
    print(f"plain loop (sklearn, macro-F1 only):      {t_loop:8.3f} s")
    print(f"speed-up: {t_loop / t_vec:.1f}x")
    print(
        f"macro-F1 vectorised {cm.macro_f1.estimate:.6f} [{cm.macro_f1.lo:.4f}, {cm.macro_f1.hi:.4f}]"
    )
    print(f"macro-F1 loop       {point_loop:.6f} [{lo_loop:.4f}, {hi_loop:.4f}]")

    ok = True
    if abs(point_loop - cm.macro_f1.estimate) > 1e-12:
        print("FAIL: point estimates differ")
        ok = False
    width = cm.macro_f1.hi - cm.macro_f1.lo
    if max(abs(lo_loop - cm.macro_f1.lo), abs(hi_loop - cm.macro_f1.hi)) > 0.25 * width:
        print("FAIL: interval ends differ by more than a quarter of the width")
        ok = False

    # exactness: replay the vectorised path's own draw through the loop's recomputation
    draws = stats.bootstrap_draws(recs, personas, next(iter(res.cells)), n_boot=50, seed=args.seed)
    assert list(draws.clusters) == list(clusters)
    worst = 0.0
    for b in range(draws.weights.shape[0]):
        rows = np.concatenate(
            [np.tile(rows_of[c], int(n)) for c, n in enumerate(draws.weights[b]) if n]
        )
        worst = max(worst, abs(macro_f1(y[rows], p[rows], k) - draws.values["macro_f1"][b]))
    print(f"same draw, 50 resamples: max |vectorised - loop| = {worst:.2e}")
    if worst > 1e-12:
        print("FAIL: the vectorised resamples do not match the loop")
        ok = False
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
