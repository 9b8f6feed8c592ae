"""The permutation null of a cell: true persona labels permuted within items (pure, vectorised).

Under "predictions carry no information about the persona", the persona labels of the rows of
one item are exchangeable (the item's difficulty and topic are shared by its rows, so labels are
not exchangeable across items). `permutation_stats` recomputes every statistic for `n_perm`
such permutations at once; `permutation_p` is the one-sided p-value of the observed excess.
The expected-counts null of `counts.statistics` (F1null_j = 2 n_j m_j / (N (n_j + m_j))) is the
mean of this distribution exactly for ITT figures in a design where every item holds every
persona equally often, and closely otherwise (tests/test_stats_simulation.py measures it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from charshift.ladder import split_unit
from charshift.schema import derive_seed
from charshift.stats.counts import CellData, columns, k_of, statistics
from charshift.stats.results import Interval

EXCESS_NAMES = ("macro_f1_excess", "macro_f1_excess_itt")

_CHUNK = 256  # permutations per vectorised block (bounds memory: CHUNK x rows indices)


def _groups(cid: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows by cluster, padded to the largest cluster: (C, width) true labels (int16, padding
    -1), the mask of real positions, and the rows in the order of those positions (sorted by
    cluster, row-major)."""
    order = np.argsort(cid, kind="stable")
    sizes = np.bincount(cid)
    width = int(sizes.max()) if sizes.size else 0
    valid = np.arange(width)[None, :] < sizes[:, None]
    labels = np.full(valid.shape, -1, dtype=np.int16)
    labels[valid] = t[order]
    return labels, valid, order


def _block(
    fixed: np.ndarray, p: np.ndarray, groups: tuple[np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator, m: int,
) -> np.ndarray:  # fmt: skip
    """Summed counts of `m` permutations of the true labels within clusters."""
    k = k_of(fixed)
    col = columns(k)
    labels, valid, order = groups
    keys = rng.random((m, *labels.shape), dtype=np.float32)
    keys[:, ~valid] = 2.0  # padding sorts last, so each cluster's first positions are its rows
    shuffled = np.take_along_axis(np.broadcast_to(labels, keys.shape), keys.argsort(-1), -1)
    tp = shuffled[:, valid]  # (m, rows by cluster): each row's permuted true label
    pv = p[order]
    hit = (tp == pv[None, :]).astype(np.float32)
    totals = np.repeat(fixed[None, :], m, axis=0)
    onehot = (pv[:, None] == np.arange(k)[None, :]).astype(np.float32)  # (rows, K)
    totals[:, col["tp"]] = hit @ onehot  # a hit of row r counts for its predicted persona
    totals[:, col["correct"]] = hit.sum(axis=1)
    # true among scored = true among all (fixed) - true among the missing rows (usually few)
    missing = pv > k
    lost = np.zeros((m, k))
    for j in range(k) if missing.any() else ():
        lost[:, j] = (tp[:, missing] == j).sum(axis=1)
    totals[:, col["true_s"]] = fixed[col["true_a"]][None, :] - lost
    return totals


def permutation_stats(data: CellData, n_perm: int, seed: int) -> dict[str, np.ndarray]:
    """Every statistic of `n_perm` within-item permutations of the cell's true labels (each
    (n_perm, ...)); predictions, the rows' items and the per-persona row counts stay as they are.
    The cell's own stream: seeded from (seed, base, stage, unit)."""
    if data.rows is None:
        raise ValueError(f"{data.cell.label()} is a base-null cell: it has no labels to permute")
    cid, t, p = data.rows
    groups = _groups(cid, t)
    rng = np.random.default_rng(derive_seed("charshift.stats.perm", seed, *data.cell))
    fixed = data.counts.sum(axis=0)
    blocks = [
        _block(fixed, p, groups, rng, min(_CHUNK, n_perm - start))
        for start in range(0, n_perm, _CHUNK)
    ]
    return statistics(np.concatenate(blocks, axis=0) if blocks else np.zeros((0, fixed.size)))


def permutation_p(observed: float, permuted: np.ndarray) -> float:
    """(1 + #{permuted >= observed}) / (1 + n_perm); a permutation with the figure undefined
    counts as not reaching it. NaN without permutations or an observed value."""
    if permuted.size == 0 or not math.isfinite(observed):
        return math.nan
    tol = 1e-9 * max(1.0, abs(observed))
    hits = int(np.sum(np.nan_to_num(permuted, nan=-np.inf) >= observed - tol))
    return (1 + hits) / (1 + permuted.size)


class NullTest(NamedTuple):
    """A cell's permutation null: one-sided p-values of its conditional and ITT excess, and the
    permuted values themselves (name -> (n_perm,)), empty without permutations."""

    p: float
    p_itt: float
    draws: dict[str, np.ndarray]


def null_test(data: CellData, n_perm: int, seed: int) -> NullTest:
    """The cell's permutation null (nothing for a base-null cell or without permutations)."""
    if data.null or n_perm <= 0 or data.rows is None:
        return NullTest(math.nan, math.nan, {})
    perm = permutation_stats(data, n_perm, seed)
    point = statistics(data.counts.sum(axis=0))
    draws = {name: perm[name] for name in EXCESS_NAMES}
    return NullTest(
        permutation_p(float(point["macro_f1_excess"]), draws["macro_f1_excess"]),
        permutation_p(float(point["macro_f1_excess_itt"]), draws["macro_f1_excess_itt"]),
        draws,
    )


def difference_null(a: CellData, b: CellData, name: str) -> np.ndarray | None:
    """Draws from the null of excess(a) - excess(b) when neither cell carries a persona: the two
    cells' own permutation draws (independent streams), each centred, paired up. Only for cells
    whose rows are distinct generations (not two scoring variants of one slice, whose rows are
    the same outputs: their matching noise is shared, so the independent sum would overstate
    it); None otherwise, or without permutations."""
    if split_unit(a.cell.slice)[0] == split_unit(b.cell.slice)[0] and a.cell.stage == b.cell.stage:
        return None
    da, db = a.null_draws.get(name), b.null_draws.get(name)
    if da is None or db is None or da.size != db.size:
        return None
    if not (np.isfinite(da).any() and np.isfinite(db).any()):
        return None  # a side with nothing scored has no null spread
    return (da - np.nanmean(da)) - (db - np.nanmean(db))


def null_floor(iv: Interval, permuted: np.ndarray | None, ci: float) -> Interval:
    """`iv`, widened where needed so that it is never narrower than the permutation null's own
    spread about the estimate (its central `ci` quantiles, centred): under no persona the
    interval then covers 0 at least as often as the exact permutation test keeps it. Why: the
    bootstrap's spread shrinks with the estimate (few hits, small variance), so without the
    floor a low estimate gets a short interval that misses 0 from below."""
    if permuted is None or iv.fixed_by_construction or not math.isfinite(iv.estimate):
        return iv
    v = permuted[np.isfinite(permuted)]
    if v.size < 2:
        return iv
    a = (1.0 - ci) / 2.0
    q_lo, q_hi = np.quantile(v - v.mean(), [a, 1.0 - a])
    lo, hi = min(iv.lo, iv.estimate - float(q_hi)), max(iv.hi, iv.estimate - float(q_lo))
    return dataclasses.replace(iv, lo=lo, hi=hi)


def null_se(permuted: np.ndarray | None) -> float:
    """The permutation null's standard deviation (0 when there is none)."""
    if permuted is None:
        return 0.0
    v = permuted[np.isfinite(permuted)]
    return float(v.std(ddof=1)) if v.size > 1 else 0.0
