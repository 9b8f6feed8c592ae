"""Coverage of charshift's percentile cluster bootstrap against the number of clusters.

Why `stats.MIN_CLUSTERS` is 10: this script simulates cells with a known truth and counts how
often the nominal 95% interval of `stats.compute_metrics` covers it, for cells of 3, 5, 10, 20
and 40 clusters (items), and 7 and 15 between.

Each simulated cell: K = 4 personas, `--rows` rows per persona per item, an item effect on the
hit rate (each item's rate drawn from Beta with mean 0.7, so items differ as real prompts and
scenarios do), wrong answers spread evenly over the other personas. By symmetry the population
accuracy and macro-F1 are both 0.7.

Usage: python scripts/coverage_min_clusters.py [--sims 400] [--n-boot 1000] [--rows 2]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from charshift import stats
from charshift.schema import PredictionRecord

PERSONAS = ["sarcasm", "humor", "remorse", "loving"]
TRUTH = 0.7


def cell(rng: np.random.Generator, n_clusters: int, rows: int) -> list[PredictionRecord]:
    rates = rng.beta(7.0, 3.0, size=n_clusters)  # mean 0.7
    recs = []
    for c in range(n_clusters):
        for t in PERSONAS:
            others = [p for p in PERSONAS if p != t]
            for _ in range(rows):
                pred = t if rng.random() < rates[c] else others[int(rng.integers(0, 3))]
                recs.append(PredictionRecord("b", "full", "chat_email", t, f"c{c}", pred))
    return recs


def coverage(n_clusters: int, sims: int, n_boot: int, rows: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng([seed, n_clusters])
    hits = {"accuracy": 0, "macro_f1": 0}
    for sim in range(sims):
        res = stats.compute_metrics(
            cell(rng, n_clusters, rows), PERSONAS, n_boot=n_boot, seed=sim, differences=False
        )
        m = res.get("b", "full", "chat_email")
        assert m is not None
        for name in hits:
            iv = getattr(m, name)
            hits[name] += iv.lo <= TRUTH <= iv.hi
    return {k: v / sims for k, v in hits.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=400)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(
        f"nominal 95% percentile cluster bootstrap; {args.sims} cells per size, "
        f"{len(PERSONAS)} personas x {args.rows} rows per item, {args.n_boot} resamples"
    )
    print("clusters  accuracy  macro-F1")
    for g in (3, 5, 7, 10, 15, 20, 40):
        cov = coverage(g, args.sims, args.n_boot, args.rows, args.seed)
        print(f"{g:8d}  {cov['accuracy']:8.3f}  {cov['macro_f1']:8.3f}")
    print(f"stats.MIN_CLUSTERS = {stats.MIN_CLUSTERS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
