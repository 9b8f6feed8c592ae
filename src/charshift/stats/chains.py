"""The additive decomposition of every chain of `ladder.CHAINS`, on the base's shared draws (pure).

Draws: per (base, item kind), ONE multinomial draw over the base's whole item universe of that
kind (every item of that kind in any cell of the base). A chain uses the columns of its common
items, so all units of a chain share each resample (the rungs telescope in every resample), and
so do the chains and home cells of every stage of the base: the members of the base's primary
family are jointly resampled, which the simultaneous band needs (`charshift.stats.family`).
When a chain's common items are fewer than the universe, its resample has a random size (the
universe draw restricted to them); for these ratio statistics that only adds a little width.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from charshift import slices
from charshift.ladder import Chain, split_unit
from charshift.schema import derive_seed
from charshift.stats.counts import MACRO, CellData, joint_mask, k_of, macro_joint
from charshift.stats.differences import DiffIv, finish_diff, make_difference, stat_name
from charshift.stats.intervals import (
    FIXED_FOR_NULL,
    Opts,
    Side,
    draw,
    fixed_iv,
    flag,
    interval,
    joint_values,
    side,
)
from charshift.stats.nulls import difference_null, null_floor
from charshift.stats.results import METRICS, Cell, ChainDecomposition, Interval


def item_kind(unit: str, item_ids: Iterable[str]) -> str:
    """The kind of a unit's items: their common `kind:` prefix, else the slice's item kind in
    the registry (`charshift.slices`), "scenario" for a slice it does not know."""
    prefixes = {i.partition(":")[0] if ":" in i else None for i in map(str, item_ids)}
    if len(prefixes) == 1 and None not in prefixes:
        return str(next(iter(prefixes)))
    entry = slices.SLICES.get(split_unit(unit)[0])
    return entry.items if entry else "scenario"


@dataclass
class Universe:
    """One base's draws: item kind -> its sorted item ids and one (n_boot, n_items) draw."""

    ids: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]

    def restrict(self, kind: str, items: np.ndarray) -> np.ndarray:
        return self.weights[kind][:, np.searchsorted(self.ids[kind], items)]


def universe(cells: dict[Cell, CellData], base: str, o: Opts) -> Universe:
    ids: dict[str, np.ndarray] = {}
    for c, d in cells.items():
        if c.base == base:
            kind = item_kind(c.slice, d.clusters)
            ids[kind] = np.union1d(ids.get(kind, d.clusters[:0]), d.clusters)
    weights = {
        kind: draw(
            np.random.default_rng(derive_seed("charshift.stats.universe", o.seed, base, kind)),
            o.n_boot,
            len(items),
        )
        for kind, items in ids.items()
    }
    return Universe(ids, weights)


@dataclass
class ChainFit:
    units: list[str]
    kinds: dict[str, str]
    common: dict[str, np.ndarray]  # kind -> common item ids
    weights: dict[str, np.ndarray]  # kind -> the (n_boot, n_common) draw shared by its units
    sides: dict[str, Side]
    dropped: dict[str, int]
    missing: list[str]
    k: int  # the label set size
    data: dict[str, CellData]  # unit -> its whole cell (for its permutation null)


def chain_fit(
    cells: dict[Cell, CellData], base: str, stage: str, chain: Chain, o: Opts, uni: Universe
) -> ChainFit | None:
    present = [u for u in chain.units if Cell(base, stage, u) in cells]
    if len(present) < 2:
        return None
    data = {u: cells[Cell(base, stage, u)] for u in present}
    kinds = {u: item_kind(u, d.clusters) for u, d in data.items()}
    common: dict[str, np.ndarray] = {}
    for u, d in data.items():
        kind = kinds[u]
        common[kind] = (
            d.clusters if kind not in common else np.intersect1d(common[kind], d.clusters)
        )
    weights = {kind: uni.restrict(kind, ids) for kind, ids in common.items()}
    sides = {}
    for u, d in data.items():
        pos = np.searchsorted(d.clusters, common[kinds[u]])
        sides[u] = side(d.counts[pos], weights[kinds[u]], o.method, d.null)
    dropped = {u: len(d.clusters) - len(common[kinds[u]]) for u, d in data.items()}
    missing = [u for u in chain.units if u not in data]
    k = k_of(next(iter(data.values())).counts)
    return ChainFit(present, kinds, common, weights, sides, dropped, missing, k, data)


def rung_changes(chain: Chain, frm: str, to: str) -> str:
    """The `changes` of the chain rungs from `frm` to `to` (several when a unit is missing)."""
    units = chain.units
    spanned = chain.rungs[units.index(frm) : units.index(to)]
    if len(spanned) == 1:
        return spanned[0].changes
    return f"BUNDLE of {len(spanned)} changes (a unit between is missing): " + "; ".join(
        r.changes for r in spanned
    )


@dataclass
class _Values:
    """Every unit's point and resampled values of one statistic, persona-averaged figures over
    the personas defined in every unit of the chain (per resample)."""

    point: dict[str, float]
    boot: dict[str, np.ndarray]
    k: int


def _values(fit: ChainFit, name: str) -> _Values:
    sides = [fit.sides[u] for u in fit.units]
    point = macro_joint([s.point for s in sides], name)
    boot = macro_joint([s.boot for s in sides], name)
    k = int(joint_mask([s.point for s in sides], name).sum()) if name in MACRO else 0
    return _Values(
        {u: float(v) for u, v in zip(fit.units, point, strict=True)},
        dict(zip(fit.units, boot, strict=True)),
        k,
    )


def _chain_diff(fit: ChainFit, vals: _Values, frm: str, to: str, name: str, o: Opts) -> DiffIv:
    sa, sb = fit.sides[frm], fit.sides[to]
    paired = fit.kinds[frm] == fit.kinds[to]
    est = vals.point[frm] - vals.point[to]
    g = min(sa.n_eff(name), sb.n_eff(name))
    if name in FIXED_FOR_NULL and sa.null and sb.null:
        return DiffIv(est, math.nan, math.nan, 0, True, FIXED_FOR_NULL[name], vals.k, math.nan,
                      np.zeros(0), g)  # fmt: skip
    diff = vals.boot[frm] - vals.boot[to]
    jack = joint_values([sa, sb], name, paired)[2]  # BCa: the pair's own leave-one-out values
    jk = None if jack is None else jack[0] - jack[1]
    null = difference_null(fit.data[frm], fit.data[to], name)
    return finish_diff(est, diff, jk, vals.k, g, o, null)


def _pairing(fit: ChainFit, frm: str, to: str) -> tuple[int, bool, str]:
    ka, kb = fit.kinds[frm], fit.kinds[to]
    if ka == kb:
        return len(fit.common[ka]), True, f"paired on the chain's common {ka} items"
    n = min(len(fit.common[ka]), len(fit.common[kb]))
    note = (
        f"unpaired: {len(fit.common[ka])} {ka} items vs {len(fit.common[kb])} {kb} items, "
        "bootstrapped independently (the smaller side governs)"
    )
    return n, False, note


def _unit_iv(fit: ChainFit, vals: _Values, unit: str, name: str, o: Opts) -> Interval:
    s = fit.sides[unit]
    est = vals.point[unit]
    fixed = fixed_iv(s, name, est)
    if fixed is not None:
        return fixed
    g = s.n_eff(name)
    jack = None if s.jack is None else macro_joint([s.jack], name)[0]
    lo, hi = interval(vals.boot[unit], np.asarray(est), jack, o, g)
    n_empty = int(np.isnan(vals.boot[unit]).sum())
    iv = Interval(est, float(lo), float(hi), g, n_empty, False,
                  flag(est, g, n_empty, o.n_boot, o.min_clusters))  # fmt: skip
    return null_floor(iv, fit.data[unit].null_draws.get(name), o.ci)


@dataclass
class ChainOut:
    decompositions: list[ChainDecomposition]
    totals: dict[str, DiffIv]  # statistic name -> the total with its resamples (for the family)


def _decomposition(
    fit: ChainFit, base: str, stage: str, chain: Chain, metric: str, itt: bool, o: Opts
) -> tuple[ChainDecomposition, DiffIv]:
    name = stat_name(metric, itt)
    vals = _values(fit, name)
    units = [Cell(base, stage, u) for u in fit.units]

    def diff(kind: str, a: Cell, b: Cell, changes: str) -> tuple[object, DiffIv]:
        d = _chain_diff(fit, vals, a.slice, b.slice, name, o)
        n, paired, note = _pairing(fit, a.slice, b.slice)
        row = make_difference(kind, (a, b), metric, itt, d, n_clusters=n, paired=paired,
                              note=note, n_personas=fit.k, changes=changes, chain=chain.name)  # fmt: skip
        return row, d

    rungs = [diff("rung", a, b, rung_changes(chain, a.slice, b.slice))[0]
             for a, b in zip(units[:-1], units[1:], strict=True)]  # fmt: skip
    total, total_iv = diff("total", units[0], units[-1], f"all of: {chain.title}")
    dec = ChainDecomposition(
        base, stage, chain.name, chain.title, metric, itt, list(fit.units), dict(fit.kinds),
        [_unit_iv(fit, vals, u, name, o) for u in fit.units], rungs, total,  # type: ignore[arg-type]
        {kd: len(ids) for kd, ids in fit.common.items()}, dict(fit.dropped), list(fit.missing),
        vals.k if name in MACRO else 0, fit.k,
    )  # fmt: skip
    return dec, total_iv


def chain_results(
    cells: dict[Cell, CellData], base: str, stage: str, chain: Chain, o: Opts, uni: Universe
) -> ChainOut:
    fit = chain_fit(cells, base, stage, chain, o, uni)
    out = ChainOut([], {})
    if fit is None:
        return out
    for metric in METRICS:
        for itt in (False, True):
            dec, total = _decomposition(fit, base, stage, chain, metric, itt, o)
            out.decompositions.append(dec)
            out.totals[stat_name(metric, itt)] = total
    return out
