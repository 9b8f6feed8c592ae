"""Can the scorer see persona in a unit? The positive control, the base stage's format bias,
retention relative to the control, and the marking of every figure in a blind unit (pure).

The positive control (`analysis.positive_control`, default `prompted_explicit`: the persona told
to show in every format) is scored in every unit. Its conditional macro-F1 excess over its own
null is the scorer's `sensitivity` there; where that interval reaches 0 the scorer is blind in
that unit: it cannot tell a persona that is plainly asked for from chance, so a loss measured
there is not evidence of persona loss. The base stage (no persona) shows the scorer's format
bias: the share of its most-predicted label on neutral text (`null_top_share`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from charshift.schema import BASE_STAGE
from charshift.stats.counts import CellData, k_of
from charshift.stats.differences import pair_sides, personas_in_common
from charshift.stats.intervals import Opts, flag, interval, joint_values
from charshift.stats.results import (
    Cell,
    CellMetrics,
    Interval,
    MetricsResult,
    Retention,
    ScorerCheck,
    order_slices,
)

_NAN = Interval(math.nan, math.nan, math.nan)
BLIND_CONTROL = "the control's excess interval reaches 0 (scorer blind here): not interpretable"


def _null_bias(null: CellMetrics | None) -> tuple[str | None, float, dict[str, float]]:
    if null is None or not null.n_scored:
        return None, math.nan, {}
    dist = {lab: n / null.n_scored for lab, n in null.pred_distribution.items()}
    top = null.top_label
    return (top[0], top[1], dist) if top else (None, math.nan, dist)


def scorer_check(
    cells: dict[Cell, CellMetrics], base: str, unit: str, control: str | None
) -> ScorerCheck:
    ctrl = cells.get(Cell(base, control, unit)) if control else None
    label, share, dist = _null_bias(cells.get(Cell(base, BASE_STAGE, unit)))
    scorer = next((c.scorer for c in cells.values() if c.cell.base == base), "classifier")
    if ctrl is None:
        note = "no positive-control rows in this unit: not checked"
        return ScorerCheck(base, scorer, unit, control, _NAN, label, share, dist, None, note)
    sens = ctrl.macro_f1_excess
    if not math.isfinite(sens.estimate):
        note = "the positive control has no scored output here: not checked"
        return ScorerCheck(base, scorer, unit, control, sens, label, share, dist, None, note)
    blind = not sens.above_zero
    return ScorerCheck(base, scorer, unit, control, sens, label, share, dist, blind)


def scorer_checks(
    cells: dict[Cell, CellMetrics], bases: Sequence[str], control: str | None
) -> list[ScorerCheck]:
    """One check per (base, unit) of the result."""
    return [
        scorer_check(cells, b, u, control)
        for b in bases
        for u in order_slices(c.slice for c in cells if c.base == b)
    ]


def _ratio(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a / c where the control's excess is positive, else undefined (NaN)."""
    a, c = np.broadcast_arrays(np.asarray(a, float), np.asarray(c, float))
    out = np.full(a.shape, np.nan)
    np.divide(a, c, out=out, where=c > 0)
    return out


def retention(data: CellData, ctrl: CellData, itt: bool, o: Opts, blind: bool | None) -> Retention:
    """`data`'s excess / the control's excess in the same unit, paired on their shared items
    (unpaired when they share none), over the personas defined in both."""
    name = "macro_f1_excess_itt" if itt else "macro_f1_excess"
    pair = pair_sides(data, ctrl, o, None)
    point, boot, _ = joint_values([pair.sa, pair.sb], name, pair.paired)
    est = float(_ratio(point[0], point[1]))
    ratios = _ratio(boot[0], boot[1])
    g = min(pair.sa.n_eff(name), pair.sb.n_eff(name))
    lo, hi = interval(ratios, np.asarray(est), None, o, g)
    n_empty = int(np.isnan(ratios).sum())
    if math.isfinite(est) or not np.isfinite([point[0], point[1]]).all():
        f = flag(est, g, n_empty, o.n_boot, o.min_clusters)
    else:
        f = "undefined: the control's excess is not above 0"
    if blind:
        f = "; ".join(x for x in (BLIND_CONTROL, f) if x)
    c = data.cell
    return Retention(
        c.base, c.stage, c.slice, ctrl.cell.stage, itt, est, float(lo), float(hi),
        pair.n_clusters, personas_in_common([pair.sa, pair.sb], name), k_of(data.counts),
        n_empty, f, blind,
    )  # fmt: skip


def retention_rows(cells: dict[Cell, CellData], result: MetricsResult, o: Opts) -> list[Retention]:
    """Per (base, trained stage, unit) with a control cell: retention, conditional and ITT."""
    out = []
    for c, data in cells.items():
        if o.control is None or c.stage in (BASE_STAGE, o.control) or data.null:
            continue
        ctrl = cells.get(Cell(c.base, o.control, c.slice))
        if ctrl is None:
            continue
        check = result.scorer_check(c.base, c.slice)
        blind = check.scorer_blind if check else None
        out += [retention(data, ctrl, itt, o, blind) for itt in (False, True)]
    return out


def mark_blind(result: MetricsResult) -> None:
    """Mark every cell, difference and chain of a unit where the scorer is blind."""
    blind = {(s.base, s.unit) for s in result.scorer_checks if s.scorer_blind}
    for c, m in result.cells.items():
        check = result.scorer_check(c.base, c.slice)
        m.scorer_blind = check.scorer_blind if check else None
    for d in result.differences:
        d.blind = tuple(u for u in dict.fromkeys((d.a.slice, d.b.slice)) if (d.a.base, u) in blind)
    for dec in result.chains:
        dec.blind = tuple(u for u in dec.units if (dec.base, u) in blind)
