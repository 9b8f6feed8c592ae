"""The public entry points of the statistics: records in, results out (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from charshift.ladder import ALL_CONTRASTS, CHAINS, Chain, Rung
from charshift.schema import BASE_STAGE, PredictionRecord
from charshift.stats.cells import cell_metrics, cell_seed
from charshift.stats.chains import chain_fit, chain_results, universe
from charshift.stats.counts import CellData, build_cells, group, make_label_sets, statistics
from charshift.stats.differences import (
    DiffIv,
    contrast_rows,
    diff_iv,
    make_difference,
    pair_sides,
    stage_rows,
    stat_name,
)
from charshift.stats.family import EXCESS, Member, home_excess, mark_family
from charshift.stats.intervals import Opts, draw
from charshift.stats.nulls import permutation_stats
from charshift.stats.results import (
    DEFAULT_CONTROL,
    MIN_CLUSTERS,
    Cell,
    ChainDecomposition,
    Difference,
    LabelNote,
    Method,
    MetricsResult,
    infer_personas,
    order_slices,
    order_stages,
)
from charshift.stats.scorer import mark_blind, retention_rows, scorer_checks

N_PERM = 1000  # permutations behind each cell's p_null (StatsConfig.n_perm)


@dataclass
class Prepared:
    personas: list[str]
    labels: dict[str, list[str]]
    notes: list[LabelNote]
    cells: dict[Cell, CellData]
    failed_only: list[Cell]


def prepare(records: Sequence[PredictionRecord], personas: Sequence[str] | None) -> Prepared:
    recs = list(records)
    ps = list(personas) if personas is not None else infer_personas(recs)
    if len(ps) < 2:
        raise ValueError(f"need at least two personas, got {ps}")
    groups = group(recs, ps)
    labels, notes = make_label_sets(groups, ps)
    cells, failed_only = build_cells(groups, labels)
    return Prepared(ps, labels, notes, cells, failed_only)


def make_opts(
    n_boot: int, ci: float, method: str, seed: int, min_clusters: int, *,
    small_sample: bool = True, n_perm: int = N_PERM, control: str | None = DEFAULT_CONTROL,
) -> Opts:  # fmt: skip
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    if not 0 < ci < 1:
        raise ValueError("ci must be in (0, 1)")
    if method not in ("percentile", "bca"):
        raise ValueError(f"unknown interval method {method!r}; use 'percentile' or 'bca'")
    if min_clusters < 1:
        raise ValueError("min_clusters must be at least 1")
    if n_perm < 0:
        raise ValueError("n_perm must be at least 0")
    if control == BASE_STAGE:
        raise ValueError("the positive control cannot be the base stage (it carries no persona)")
    return Opts(n_boot, ci, method, seed, min_clusters, small_sample, n_perm, control)


def _get(cells: dict[Cell, CellData], cell: Sequence[str]) -> CellData:
    c = Cell(*cell)
    if c not in cells:
        raise ValueError(f"no records for cell {c.label()}")
    return cells[c]


def paired_difference(
    records: Sequence[PredictionRecord],
    cell_a: Sequence[str],
    cell_b: Sequence[str],
    *,
    metric: str = "macro_f1",
    itt: bool = False,
    personas: Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    method: Method = "percentile",
    seed: int = 0,
    paired: bool = True,
    min_clusters: int = MIN_CLUSTERS,
    small_sample: bool = True,
) -> Difference:
    """metric(cell_a) - metric(cell_b), resampling the shared item ids with one draw for both.

    Cells are (base, stage, unit). Both the estimate and the interval use only the items the
    cells share (and, for persona-averaged metrics, the personas defined in both). `paired=False`
    gives the independent two-sample bootstrap instead (for cells with no common items).
    """
    name = stat_name(metric, itt)
    o = make_opts(n_boot, ci, method, seed, min_clusters, small_sample=small_sample)
    prep = prepare(records, personas)
    da, db = _get(prep.cells, cell_a), _get(prep.cells, cell_b)
    pair = pair_sides(da, db, o, paired)
    d = diff_iv(pair.sa, pair.sb, name, pair.paired, o)
    return make_difference(
        "pair", (da.cell, db.cell), metric, itt, d, n_clusters=pair.n_clusters,
        paired=pair.paired, note=pair.note, n_personas=len(prep.labels[da.cell.base]),
    )  # fmt: skip


def chain_by_name(chain: Chain | str) -> Chain:
    if isinstance(chain, Chain):
        return chain
    for c in CHAINS:
        if c.name == chain:
            return c
    raise ValueError(f"unknown chain {chain!r}; known: {[c.name for c in CHAINS]}")


def chain_decomposition(
    records: Sequence[PredictionRecord],
    base: str,
    stage: str,
    *,
    chain: Chain | str = "agentic",
    metric: str = "macro_f1",
    itt: bool = False,
    personas: Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    method: Method = "percentile",
    seed: int = 0,
    min_clusters: int = MIN_CLUSTERS,
    small_sample: bool = True,
) -> ChainDecomposition | None:
    """One chain's additive decomposition for one (base, stage) (see the package docstring);
    the same figures `compute_metrics` gives. None when fewer than two of its units are here."""
    stat_name(metric, itt)
    o = make_opts(n_boot, ci, method, seed, min_clusters, small_sample=small_sample)
    prep = prepare(records, personas)
    uni = universe(prep.cells, base, o)
    out = chain_results(prep.cells, base, stage, chain_by_name(chain), o, uni)
    return next((d for d in out.decompositions if d.metric == metric and d.itt == itt), None)


@dataclass
class BootstrapDraws:
    """One cell's bootstrap, exposed for checking: the draw and every resample's statistics."""

    cell: Cell
    clusters: np.ndarray  # sorted unique item ids, the columns of `weights`
    weights: np.ndarray  # (n_boot, n_clusters): how often each cluster is in each resample
    values: dict[str, np.ndarray]  # statistic -> (n_boot,) or (n_boot, K) for "f1"/"f1_itt"
    point: dict[str, np.ndarray]


def bootstrap_draws(
    records: Sequence[PredictionRecord],
    personas: Sequence[str],
    cell: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> BootstrapDraws:
    """The exact draw and resample statistics `compute_metrics` uses for `cell` (same seed)."""
    prep = prepare(records, personas)
    data = _get(prep.cells, cell)
    rng = np.random.default_rng(cell_seed(seed, data.cell))
    w = draw(rng, n_boot, len(data.clusters))
    return BootstrapDraws(
        data.cell, data.clusters, w, statistics(w @ data.counts), statistics(data.counts.sum(0))
    )


def permutation_draws(
    records: Sequence[PredictionRecord],
    personas: Sequence[str],
    cell: Sequence[str],
    *,
    n_perm: int = N_PERM,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Every statistic under the exact permutations behind the cell's `p_null` (same seed)."""
    prep = prepare(records, personas)
    return permutation_stats(_get(prep.cells, cell), n_perm, seed)


@dataclass
class ChainDraws:
    """A chain's bootstrap, exposed for checking: one draw per item kind, and every unit's
    resample statistics on the common items (`values[unit][stat]`, shape (n_boot,))."""

    units: list[str]
    kinds: dict[str, str]
    common: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    values: dict[str, dict[str, np.ndarray]]
    point: dict[str, dict[str, np.ndarray]]


def chain_draws(
    records: Sequence[PredictionRecord],
    base: str,
    stage: str,
    *,
    chain: Chain | str = "agentic",
    personas: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> ChainDraws | None:
    """The exact draws and unit resamples `compute_metrics` uses for a chain (same seed)."""
    o = make_opts(n_boot, 0.95, "percentile", seed, MIN_CLUSTERS)
    prep = prepare(records, personas)
    uni = universe(prep.cells, base, o)
    fit = chain_fit(prep.cells, base, stage, chain_by_name(chain), o, uni)
    if fit is None:
        return None
    return ChainDraws(
        fit.units, fit.kinds, fit.common, fit.weights,
        {u: s.boot for u, s in fit.sides.items()}, {u: s.point for u, s in fit.sides.items()},
    )  # fmt: skip


def _total_member(total: Difference, d: DiffIv, o: Opts) -> Member:
    """A chain's total as a family member: its resamples, and the SE floor its interval had."""
    boot = d.boot if d.boot.size else np.full(o.n_boot, np.nan)
    se = d.se_floor if math.isfinite(d.se_floor) else 0.0
    return Member(total, boot, d.g, se)


def _base_differences(
    data: dict[Cell, CellData], base: str, stages: list[str], o: Opts,
    chains: Sequence[Chain], contrasts: Sequence[Rung], result: MetricsResult,
) -> None:  # fmt: skip
    """One base's chains, contrasts and its primary family (on the base's shared draws)."""
    uni = universe(data, base, o)
    members: list[Member] = []
    for st in stages:
        trained = st not in (BASE_STAGE, o.control)
        home = home_excess(data, base, st, o, uni) if trained else None
        if home is not None:
            members.append(home)
            result.differences.append(home.row)
        for chain in chains:
            out = chain_results(data, base, st, chain, o, uni)
            for dec in out.decompositions:
                result.chains.append(dec)
                result.differences += [*dec.rungs, dec.total]
            if trained and EXCESS in out.totals:
                total = next(d.total for d in out.decompositions
                             if d.metric == EXCESS and not d.itt)  # fmt: skip
                members.append(_total_member(total, out.totals[EXCESS], o))
        for c in contrasts:
            result.differences += contrast_rows(data, base, st, c.frm, c.to, c.changes, o)
    mark_family(members, o)


def compute_metrics(
    records: Sequence[PredictionRecord],
    personas: Sequence[str] | None = None,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    method: Method = "percentile",
    seed: int = 0,
    chains: Sequence[Chain] = CHAINS,
    contrasts: Sequence[Rung] = ALL_CONTRASTS,
    differences: bool = True,
    min_clusters: int = MIN_CLUSTERS,
    small_sample: bool = True,
    n_perm: int = N_PERM,
    control: str | None = DEFAULT_CONTROL,
) -> MetricsResult:
    """Metrics with intervals for every (base, stage, unit) cell, the scorer check, and with
    `differences=True` every chain's decomposition, the contrasts, the stage differences, the
    primary family and retention relative to the positive control `control` (see the package
    docstring). Pass base outputs unexpanded (persona NULL_PERSONA): each is paired with every
    persona of its base's label set for F1 and counted once otherwise.
    """
    o = make_opts(n_boot, ci, method, seed, min_clusters, small_sample=small_sample,
                  n_perm=n_perm, control=control)  # fmt: skip
    prep = prepare(records, personas)
    data = prep.cells
    bases = list(dict.fromkeys(c.base for c in data))
    stages = order_stages(c.stage for c in data)
    units = order_slices(c.slice for c in data)
    order = [Cell(b, st, u) for b in bases for st in stages for u in units if (b, st, u) in data]
    cells = {c: cell_metrics(data[c], prep.labels[c.base], o) for c in order}
    result = MetricsResult(
        prep.personas, prep.labels, prep.notes, cells, n_boot, ci, method, seed, min_clusters,
        n_perm=n_perm, small_sample=small_sample, control=control, failed_only=prep.failed_only,
    )  # fmt: skip
    result.scorer_checks = scorer_checks(cells, bases, control)
    if differences:
        for b in bases:
            _base_differences(data, b, stages, o, chains, contrasts, result)
        for b in bases:
            for u in units:
                result.differences += stage_rows(data, b, u, o)
        result.retention = retention_rows(data, result, o)
    mark_blind(result)
    return result
