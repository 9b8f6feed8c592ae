"""Differences between two sides (cells, or units on a chain's common items), the contrasts of
`ladder.ALL_CONTRASTS` and the stage differences (pure).

A conditional persona-averaged difference averages both sides over the same personas: those
scored on both sides, per resample (ITT: those with rows on both sides), and says how many
(`k` of `n_personas`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from charshift.schema import BASE_STAGE, derive_seed
from charshift.stats.counts import MACRO, CellData, joint_mask, k_of
from charshift.stats.intervals import (
    FIXED_FOR_NULL,
    Opts,
    Side,
    draw,
    flag,
    interval,
    joint_values,
    p_two_sided,
    side,
)
from charshift.stats.nulls import difference_null, null_floor, null_se
from charshift.stats.results import METRICS, Cell, Difference, Interval, order_stages


def stat_name(metric: str, itt: bool) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    return f"{metric}_itt" if itt else metric


class DiffIv(NamedTuple):
    estimate: float
    lo: float
    hi: float
    n_empty: int
    fixed: bool
    flag: str
    k: int
    p: float
    boot: np.ndarray  # the resampled differences (empty when fixed)
    g: int  # the clusters behind it (the smaller side's)
    se_floor: float = 0.0  # the null's standard error its SE was not allowed below


def personas_in_common(sides: Sequence[Side], name: str) -> int:
    """How many personas every side's point estimate averages over (0: not persona-averaged)."""
    if name not in MACRO:
        return 0
    return int(joint_mask([s.point for s in sides], name).sum())


def diff_iv(
    sa: Side, sb: Side, name: str, paired: bool, o: Opts, null: np.ndarray | None = None
) -> DiffIv:
    """a - b for statistic `name`: paired sides share one draw (same clusters, same weights).
    `null`: draws of the difference under no persona (`nulls.difference_null`), a floor for
    its interval and standard error."""
    point, boot, jack = joint_values([sa, sb], name, paired)
    est = float(point[0] - point[1])
    k = personas_in_common([sa, sb], name)
    g = min(sa.n_eff(name), sb.n_eff(name))
    if name in FIXED_FOR_NULL and sa.null and sb.null:
        return DiffIv(est, math.nan, math.nan, 0, True, FIXED_FOR_NULL[name], k, math.nan,
                      np.zeros(0), g)  # fmt: skip
    diff = boot[0] - boot[1]
    jk = None if jack is None else jack[0] - jack[1]
    return finish_diff(est, diff, jk, k, g, o, null)


def finish_diff(
    est: float, diff: np.ndarray, jack: np.ndarray | None, k: int, g: int, o: Opts,
    null: np.ndarray | None,
) -> DiffIv:  # fmt: skip
    """A difference's interval, flag and p-value from its resamples, floored by `null`."""
    iv = Interval(est, *(float(x) for x in interval(diff, np.asarray(est), jack, o, g)))
    iv = null_floor(iv, null, o.ci)
    n_empty = int(np.isnan(diff).sum())
    f = flag(est, g, n_empty, o.n_boot, o.min_clusters)
    se_floor = null_se(null)
    p = p_two_sided(diff, est, g, o, se_floor)
    return DiffIv(est, iv.lo, iv.hi, n_empty, False, f, k, p, diff, g, se_floor)


def make_difference(
    kind: str, cells: tuple[Cell, Cell], metric: str, itt: bool, d: DiffIv, *, n_clusters: int,
    paired: bool, note: str, n_personas: int, changes: str = "", chain: str = "",
) -> Difference:  # fmt: skip
    a, b = cells
    return Difference(
        kind=kind, a=a, b=b, metric=metric, itt=itt, estimate=d.estimate, lo=d.lo, hi=d.hi,
        n_clusters=n_clusters, paired=paired, note=note, changes=changes, chain=chain,
        n_empty_resamples=d.n_empty, fixed_by_construction=d.fixed, flag=d.flag, k=d.k,
        n_personas=n_personas, p=d.p,
    )  # fmt: skip


class Pair(NamedTuple):
    sa: Side
    sb: Side
    n_clusters: int
    paired: bool
    note: str


def pair_sides(da: CellData, db: CellData, o: Opts, paired: bool | None) -> Pair:
    """Both cells' sides for a difference: on the shared items with one draw (paired), or each on
    its own items with its own draw (unpaired; its cluster count is the smaller side's).
    `paired=None`: paired when items are shared."""
    shared, ia, ib = np.intersect1d(da.clusters, db.clusters, return_indices=True)
    if paired is None:
        paired = len(shared) > 0
    rng = np.random.default_rng(
        derive_seed("charshift.stats.diff", o.seed, *da.cell, *db.cell, bool(paired))
    )
    if paired:
        if len(shared) == 0:
            raise ValueError(
                f"cells {da.cell.label()} and {db.cell.label()} share no item ids: "
                "a paired difference needs common items (use paired=False)"
            )
        w = draw(rng, o.n_boot, len(shared))
        sa, sb = (
            side(da.counts[ia], w, o.method, da.null),
            side(db.counts[ib], w, o.method, db.null),
        )
        note = "paired on shared item ids"
        if len(shared) < max(len(da.clusters), len(db.clusters)):
            note += (
                f" ({len(shared)} of {len(da.clusters)} / {len(db.clusters)} items; "
                "estimate on the shared items only)"
            )
        return Pair(sa, sb, len(shared), True, note)
    wa = draw(rng, o.n_boot, len(da.clusters))
    wb = draw(rng, o.n_boot, len(db.clusters))
    sa, sb = side(da.counts, wa, o.method, da.null), side(db.counts, wb, o.method, db.null)
    n = min(len(da.clusters), len(db.clusters))
    note = (
        f"unpaired: cells bootstrapped independently ({len(da.clusters)} and "
        f"{len(db.clusters)} items; the smaller side governs)"
    )
    return Pair(sa, sb, n, False, note)


def diff_rows(
    kind: str, da: CellData, db: CellData, o: Opts, *, metrics: Sequence[str] = METRICS,
    paired: bool | None = None, changes: str = "",
) -> list[Difference]:  # fmt: skip
    pair = pair_sides(da, db, o, paired)
    k = k_of(da.counts)
    return [
        make_difference(
            kind,
            (da.cell, db.cell),
            metric,
            itt,
            diff_iv(
                pair.sa,
                pair.sb,
                stat_name(metric, itt),
                pair.paired,
                o,
                difference_null(da, db, stat_name(metric, itt)),
            ),
            n_clusters=pair.n_clusters,
            paired=pair.paired,
            note=pair.note,
            n_personas=k,
            changes=changes,
        )  # fmt: skip
        for metric in metrics
        for itt in (False, True)
    ]


def contrast_rows(
    cells: dict[Cell, CellData], base: str, stage: str, frm: str, to: str, changes: str, o: Opts
) -> list[Difference]:
    ca, cb = Cell(base, stage, frm), Cell(base, stage, to)
    if ca not in cells or cb not in cells:
        return []
    return diff_rows("contrast", cells[ca], cells[cb], o, changes=changes)


def stage_rows(cells: dict[Cell, CellData], base: str, unit: str, o: Opts) -> list[Difference]:
    """Each trained stage minus the one before it in one unit (positive = persona gained),
    paired on the shared items. Neither the base stage (a null: its excess is 0 by
    construction, so "stage minus base" is not evidence) nor the positive control takes part."""
    present = [
        st
        for st in order_stages(st for (b, st, u) in cells if b == base and u == unit)
        if st not in (BASE_STAGE, o.control)
    ]
    rows = []
    for later, earlier in zip(present[1:], present[:-1], strict=True):
        da, db = cells[Cell(base, later, unit)], cells[Cell(base, earlier, unit)]
        if len(np.intersect1d(da.clusters, db.clusters)) == 0:
            continue
        rows += diff_rows("stage", da, db, o, changes=f"stage {earlier} -> {later}")
    return rows
