"""Coverage of charshift's cluster-bootstrap intervals against the number of clusters.

Why `stats.MIN_CLUSTERS` is 10, and what the small-sample correction buys: this script
simulates cells with a known truth and counts how often the nominal 95% interval of
`stats.compute_metrics` covers it, for cells of 3, 5, 7, 10, 15, 20, 30 and 40 clusters
(items), with the small-sample correction (the expanded percentile interval, the default) and
without it (the plain percentile interval).

Each simulated cell: K = 4 personas, `--rows` rows per persona per item, an item effect on the
hit rate (each item's rate drawn from Beta with mean 0.7, so items differ as real prompts and
scenarios do), wrong answers spread evenly over the other personas. By symmetry the population
accuracy and macro-F1 are both 0.7, the macro-F1 null (predictions independent of the persona,
same shares) is 1/4, so the excess is 0.45, and Cohen's kappa is (0.7 - 1/4) / (3/4) = 0.6.

Usage: python scripts/coverage_min_clusters.py [--sims 400] [--n-boot 1000] [--rows 2]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from charshift import stats
from charshift.schema import PredictionRecord

PERSONAS = ["sarcasm", "humor", "remorse", "loving"]
TRUTH = {"accuracy": 0.7, "macro_f1": 0.7, "macro_f1_excess": 0.45, "kappa": 0.6}
SIZES = (3, 5, 7, 10, 15, 20, 30, 40)


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


def coverage(
    n_clusters: int, sims: int, n_boot: int, rows: int, seed: int, small_sample: bool
) -> dict[str, float]:
    rng = np.random.default_rng([seed, n_clusters])
    hits = dict.fromkeys(TRUTH, 0)
    for sim in range(sims):
        res = stats.compute_metrics(
            cell(rng, n_clusters, rows), PERSONAS, n_boot=n_boot, seed=sim, differences=False,
            n_perm=0, small_sample=small_sample,
        )  # fmt: skip
        m = res.get("b", "full", "chat_email")
        assert m is not None
        for name, truth in TRUTH.items():
            iv = getattr(m, name)
            hits[name] += iv.lo <= truth <= iv.hi
    return {k: v / sims for k, v in hits.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=400)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(
        f"nominal 95% cluster bootstrap; {args.sims} cells per size, {len(PERSONAS)} personas "
        f"x {args.rows} rows per item, {args.n_boot} resamples"
    )
    names = " ".join(f"{n:>16s}" for n in TRUTH)
    print(f"clusters  interval              {names}")
    for g in SIZES:
        for small, label in ((False, "percentile"), (True, "expanded (default)")):
            cov = coverage(g, args.sims, args.n_boot, args.rows, args.seed, small)
            print(f"{g:8d}  {label:20s}  " + " ".join(f"{cov[n]:16.3f}" for n in TRUTH))
    print(f"stats.MIN_CLUSTERS = {stats.MIN_CLUSTERS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
