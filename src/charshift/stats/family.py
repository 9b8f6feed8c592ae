"""The declared primary family and its multiplicity control (pure).

The family is fixed before looking at any result: per base, for every trained stage (a stage
that carries a persona and is not the positive control), (1) the home-ground (`id_chat`)
conditional macro-F1 excess over its own null and (2) each chain's total loss in conditional
macro-F1 excess. Every member is computed on the base's shared draws (`chains.Universe`: one
draw per item kind), so the members' resamples are joint. Per member: `p` (two-sided, from the
bootstrap standard error, `intervals.p_two_sided`),
`p_holm` (Holm's step-down adjustment within the base's family) and `lo_simul` / `hi_simul`, a
simultaneous max-t band: estimate +- c * f * SE, SE the member's bootstrap standard deviation,
c the `ci` quantile over resamples of max over members |resample - estimate| / SE, and f the
small-sample expansion of the smallest member (`intervals.expansion`), widened where needed
to hold the member's own interval (a percentile interval of a skewed resample, widened by its
permutation null, can reach further on one side than a symmetric band: a simultaneous band is
never narrower than the marginal one). A member without an interval (one item) has neither band
nor p-value. Everything else is exploratory.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from charshift.stats.chains import Universe, item_kind
from charshift.stats.counts import CellData, k_of, macro_joint
from charshift.stats.differences import DiffIv, make_difference
from charshift.stats.intervals import Opts, expansion, flag, interval, p_two_sided, side
from charshift.stats.nulls import null_floor, null_se
from charshift.stats.results import (
    HOME,
    MIN_INTERVAL_CLUSTERS,
    OWN_NULL,
    PRIMARY,
    Cell,
    Difference,
    Interval,
)

EXCESS = "macro_f1_excess"
FAMILY_TEXT = (
    "per base, for every trained stage (a stage that carries a persona and is not the positive "
    "control): the home-ground (id_chat) conditional macro-F1 excess over its own null, and "
    "each chain's total loss in conditional macro-F1 excess; Holm-adjusted p-values and a "
    "simultaneous max-t band within the base's family; everything else is exploratory"
)
HOME_NOTE = (
    "the cell's macro-F1 minus its own null (its prediction shares with predictions independent "
    "of the persona), on the base's shared draw"
)


@dataclass
class Member:
    row: Difference
    boot: np.ndarray  # (n_boot,) resampled values on the base's shared draw
    g: int  # clusters behind it
    se_floor: float = 0.0  # a standard error its band may not fall below (permutation null)


def home_excess(
    cells: dict[Cell, CellData], base: str, stage: str, o: Opts, uni: Universe
) -> Member | None:
    """The home cell's conditional excess on the base's shared draw, as a family row."""
    d = cells.get(Cell(base, stage, HOME))
    if d is None or d.null:
        return None
    s = side(d.counts, uni.restrict(item_kind(HOME, d.clusters), d.clusters), o.method, d.null)
    est = float(s.point[EXCESS])
    boot = s.boot[EXCESS]
    g = s.n_eff(EXCESS)
    jack = None if s.jack is None else macro_joint([s.jack], EXCESS)[0]
    perm = d.null_draws.get(EXCESS)
    n_empty = int(np.isnan(boot).sum())
    floored = null_floor(Interval(est, *interval(boot, np.asarray(est), jack, o, g)), perm, o.ci)
    se_floor = null_se(perm)
    iv = DiffIv(est, floored.lo, floored.hi, n_empty, False,
                flag(est, g, n_empty, o.n_boot, o.min_clusters),
                int(s.point["n_personas_scored"]), p_two_sided(boot, est, g, o, se_floor), boot,
                g)  # fmt: skip
    row = make_difference(
        "excess", (d.cell, Cell(base, OWN_NULL, HOME)), EXCESS, False, iv,
        n_clusters=len(d.clusters), paired=True, note=HOME_NOTE, n_personas=k_of(d.counts),
        changes="persona shown above chance on home ground (positive = detected)",
    )  # fmt: skip
    return Member(row, boot, g, se_floor)


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count)."""
    ps = np.asarray(p, dtype=float)
    out = np.full(ps.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(ps))
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(ps[idx], kind="stable")]):
        running = max(running, min(1.0, (len(idx) - rank) * ps[i]))
        out[i] = running
    return out.tolist()


def _max_t_band(members: Sequence[Member], o: Opts) -> list[tuple[float, float]]:
    """(lo_simul, hi_simul) per member; NaN for a member without resamples or estimate."""
    est = np.array([m.row.estimate for m in members])
    boots = np.vstack([m.boot for m in members])
    finite = np.isfinite(boots).sum(axis=1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        se = np.where(finite > 1, np.nanstd(boots, axis=1, ddof=1), np.nan)
    # a member over one item has no band and takes no part in the others' (neither in the
    # max-t quantile nor, through its g of 1, in switching the small-sample expansion off)
    carried = np.array([m.g >= MIN_INTERVAL_CLUSTERS for m in members])
    ok = np.isfinite(est) & np.isfinite(se) & carried
    live = ok & (se > 0)
    if not live.any():
        return [(e, e) if k else (math.nan, math.nan) for e, k in zip(est, ok, strict=True)]
    with np.errstate(all="ignore"):
        t = np.abs(boots[live] - est[live, None]) / se[live, None]
    t_max = np.nanmax(np.where(np.isfinite(t), t, -np.inf), axis=0)
    t_max = t_max[np.isfinite(t_max)]
    c = float(np.quantile(t_max, o.ci)) if t_max.size else math.nan
    f = expansion(o.ci, min(m.g for m, k in zip(members, ok, strict=True) if k), o.small_sample)
    floor = np.array([m.se_floor for m in members])
    half = np.where(live, c * np.maximum(f * se, floor), 0.0)
    return [
        (float(e - h), float(e + h)) if k else (math.nan, math.nan)
        for e, h, k in zip(est, half, ok, strict=True)
    ]


def mark_family(members: Sequence[Member], o: Opts) -> None:
    """Mark `members` (one base's family) as the primary family and fill in its adjusted
    figures: Holm p-values and the simultaneous band."""
    if not members:
        return
    p_holm = holm([m.row.p for m in members])
    band = _max_t_band(members, o)
    for m, ph, (lo, hi) in zip(members, p_holm, band, strict=True):
        if not m.row.has_interval:  # no marginal interval (one item): no band either
            lo = hi = math.nan
        elif math.isfinite(lo):  # never narrower than the member's own interval
            lo, hi = min(lo, m.row.lo), max(hi, m.row.hi)
        m.row.family, m.row.p_holm, m.row.lo_simul, m.row.hi_simul = PRIMARY, ph, lo, hi
