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

import math

import numpy as np

from charshift.schema import derive_seed
from charshift.stats.counts import CellData, columns, k_of, statistics

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


def null_p_values(data: CellData, n_perm: int, seed: int) -> tuple[float, float]:
    """One-sided permutation p-values of the conditional and ITT macro-F1 excess."""
    if data.null or n_perm <= 0 or data.rows is None:
        return math.nan, math.nan
    perm = permutation_stats(data, n_perm, seed)
    point = statistics(data.counts.sum(axis=0))
    return (
        permutation_p(float(point["macro_f1_excess"]), perm["macro_f1_excess"]),
        permutation_p(float(point["macro_f1_excess_itt"]), perm["macro_f1_excess_itt"]),
    )
