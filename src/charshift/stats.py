"""Every metric and interval of charshift, defined once.

Input: `PredictionRecord`s (one row = one output with its true persona and the classifier's
verdict). Output: a `MetricsResult` with, per cell (base, stage, slice), macro-F1 and accuracy
(conditional and intention-to-treat), yield, per-persona figures, confusion matrix, predicted-label
distribution, and differences between cells (the ladder decomposition and stage gains), each with
a cluster-bootstrap interval.

Definitions (the only ones in the code base):

* Label set = the run's personas, in the run's order. A prediction outside it (a classifier label
  the run did not use, e.g. "goodness" when the run omits it) is a wrong answer. Macro-F1 is the
  unweighted mean of per-persona F1 over the label set, as scikit-learn's
  `f1_score(y, p, labels=personas, average="macro", zero_division=0)`: a persona that is neither
  true nor predicted in a cell counts with F1 = 0.
* Conditional metrics use only rows with an output (prediction not None); intention-to-treat
  (ITT) metrics use every attempted row and count a missing output as a wrong prediction.
  Yield = rows with an output / rows attempted.
* Intervals: cluster bootstrap by `item_id` (an ID prompt or an email scenario): all rows of an
  item (every persona and sample) are resampled together, because rows of one item are not
  independent. The resampling is vectorised: a (n_boot x n_clusters) multinomial count matrix W
  times the per-cluster count matrix gives every resample's tp / predicted / true counts at once.
  Each cell draws from its own generator seeded by (seed, base, stage, slice), so a figure never
  depends on what else was computed. Percentile intervals by default; BCa with a jackknife over
  clusters for the acceleration.
* Differences between two cells resample the shared item ids with one draw for both cells
  (paired); cells without shared ids (ID prompts vs email scenarios) are bootstrapped
  independently (unpaired), and the result says which.
* The base stage is an explicit null: it is generated once per item and sample (persona
  "__null__"), and `expand_base_null` pairs each base output with every persona of the run as its
  true label. Its per-persona recall is then the share of base outputs the classifier gives that
  persona, and its macro-F1 is what the classifier scores when nothing carries a persona.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal, NamedTuple

import numpy as np

from charshift.config import ALL_PERSONAS, ALL_SLICES, LADDER
from charshift.schema import (
    BASE_STAGE,
    NULL_PERSONA_MARKERS,
    PROMPTED_STAGE,
    PredictionRecord,
    derive_seed,
)

_NULL_MARKERS = NULL_PERSONA_MARKERS
STAGE_ORDER = (BASE_STAGE, PROMPTED_STAGE, "distillation", "full")
OTHER = "other"  # confusion column: a prediction outside the run's personas
NONE = "none"  # confusion column: no output

Method = Literal["percentile", "bca"]
METRICS = ("macro_f1", "accuracy")


class PredictionsError(ValueError):
    """A predictions file that cannot be read, naming the line and field."""


class Cell(NamedTuple):
    base: str
    stage: str
    slice: str

    def label(self) -> str:
        return f"{self.base}/{self.stage}/{self.slice}"


@dataclass(frozen=True)
class Interval:
    estimate: float
    lo: float
    hi: float


@dataclass
class PersonaMetrics:
    persona: str
    n: int  # rows attempted with this true persona
    n_scored: int  # of which with an output
    yield_: float
    precision: float
    recall: float
    f1: Interval
    f1_itt: Interval
    recall_itt: float


@dataclass
class CellMetrics:
    cell: Cell
    n_rows: int  # attempted
    n_scored: int
    n_clusters: int
    yield_: Interval
    macro_f1: Interval
    accuracy: Interval
    macro_f1_itt: Interval
    accuracy_itt: Interval
    per_persona: list[PersonaMetrics]
    confusion: np.ndarray  # (K, K + 2): rows true persona, cols personas + other + none
    confusion_cols: list[str]
    pred_distribution: dict[str, int]  # predicted label -> count, scored rows only
    n_none: int
    mean_p_true: float | None  # mean probability of the true persona over scored rows with probs


@dataclass
class Difference:
    """metric(a) - metric(b) with its bootstrap interval.

    Ladder rungs: a = the earlier (closer to home) slice, so a positive value is persona lost.
    Stage differences: a = the later stage, so a positive value is persona gained.
    `n_clusters`: clusters resampled (the shared ones when paired, both cells' when unpaired).
    """

    kind: str  # "ladder_rung" | "ladder_total" | "stage" | "pair"
    a: Cell
    b: Cell
    metric: str
    itt: bool
    estimate: float
    lo: float
    hi: float
    n_clusters: int
    paired: bool
    note: str = ""


@dataclass
class LadderDecomposition:
    base: str
    stage: str
    metric: str
    itt: bool
    slices: list[str]
    rungs: list[Difference]
    total: Difference


@dataclass
class MetricsResult:
    personas: list[str]
    cells: dict[Cell, CellMetrics]
    n_boot: int
    ci: float
    method: str
    seed: int
    differences: list[Difference] = field(default_factory=list)
    ladders: list[LadderDecomposition] = field(default_factory=list)

    @property
    def bases(self) -> list[str]:
        return list(dict.fromkeys(c.base for c in self.cells))

    @property
    def stages(self) -> list[str]:
        return order_stages({c.stage for c in self.cells})

    @property
    def slices(self) -> list[str]:
        return order_slices({c.slice for c in self.cells})

    def get(self, base: str, stage: str, slice_: str) -> CellMetrics | None:
        return self.cells.get(Cell(base, stage, slice_))


# --------------------------------------------------------------------------- ordering helpers


def order_stages(stages: Iterable[str]) -> list[str]:
    """Canonical stage order: base, prompted, distillation, full, then any others sorted."""
    s = set(stages)
    return [x for x in STAGE_ORDER if x in s] + sorted(s - set(STAGE_ORDER))


def order_slices(slices: Iterable[str]) -> list[str]:
    """Slices in the config's order (home ground outward), unknown ones last."""
    s = set(slices)
    return [x for x in ALL_SLICES if x in s] + sorted(s - set(ALL_SLICES))


def infer_personas(records: Iterable[PredictionRecord]) -> list[str]:
    """The true labels present (null markers excluded): known personas in the OCT order first."""
    seen = list(dict.fromkeys(r.persona for r in records if r.persona not in _NULL_MARKERS))
    return [p for p in ALL_PERSONAS if p in seen] + [p for p in seen if p not in ALL_PERSONAS]


# --------------------------------------------------------------------------- base null


def expand_base_null(
    records: Iterable[PredictionRecord], personas: Sequence[str]
) -> list[PredictionRecord]:
    """Pair each null-persona output with every persona of the run as its true label.

    The base stage carries no persona, so it is generated once per (item, sample) and arrives
    with persona "__null__" (also accepted: "-", "" or None). Each such record becomes one record
    per persona (same prediction), all in the item's cluster. Records with a real persona pass
    through, so calling this twice changes nothing.
    """
    out: list[PredictionRecord] = []
    for r in records:
        if r.persona in _NULL_MARKERS:
            out.extend(dataclasses.replace(r, persona=p) for p in personas)
        else:
            out.append(r)
    return out


# --------------------------------------------------------------------------- per-cell counts


@dataclass
class _CellData:
    """One cell reduced to per-cluster counts: everything a bootstrap resample needs.

    `counts` columns (K personas): tp[K] | predicted[K] (scored rows) | true among scored[K] |
    true among all[K] | correct | n_scored | n_all.
    """

    cell: Cell
    clusters: np.ndarray  # sorted unique item ids
    counts: np.ndarray  # (C, 4K + 3) float64
    confusion: np.ndarray
    pred_counter: Counter
    p_true: list[float]


def _columns(k: int) -> dict[str, slice | int]:
    return {
        "tp": slice(0, k),
        "pred": slice(k, 2 * k),
        "true_s": slice(2 * k, 3 * k),
        "true_a": slice(3 * k, 4 * k),
        "correct": 4 * k,
        "n_s": 4 * k + 1,
        "n_a": 4 * k + 2,
    }


def _build_cells(
    records: Sequence[PredictionRecord], personas: Sequence[str]
) -> dict[Cell, _CellData]:
    index = {p: i for i, p in enumerate(personas)}
    groups: dict[Cell, list[PredictionRecord]] = {}
    for r in records:
        if r.persona not in index:
            if r.persona in _NULL_MARKERS:
                raise ValueError(
                    f"record {r.key or r.item_id} ({r.base}/{r.stage}/{r.slice}) has a null "
                    "persona: call expand_base_null first"
                )
            raise ValueError(
                f"record {r.key or r.item_id} ({r.base}/{r.stage}/{r.slice}) has true persona "
                f"{r.persona!r}, not one of the run's personas {list(personas)}"
            )
        groups.setdefault(Cell(r.base, r.stage, r.slice), []).append(r)

    return {cell: _cell_data(cell, rows, index) for cell, rows in groups.items()}


def _cell_data(cell: Cell, rows: list[PredictionRecord], index: dict[str, int]) -> _CellData:
    """Encode one cell's rows (true index, predicted index: K = other, K+1 = none) as counts."""
    k = len(index)
    t = np.fromiter((index[r.persona] for r in rows), dtype=np.int64, count=len(rows))
    p = np.fromiter(
        (k + 1 if r.prediction is None else index.get(r.prediction, k) for r in rows),
        dtype=np.int64,
        count=len(rows),
    )
    clusters, cid = np.unique(np.array([str(r.item_id) for r in rows]), return_inverse=True)
    n_c = len(clusters)
    scored = p <= k
    hit = p == t
    counts = np.zeros((n_c, 4 * k + 3), dtype=np.float64)
    col = _columns(k)
    counts[:, col["tp"]] = _per_cluster(cid, hit, t, n_c, k)
    counts[:, col["pred"]] = _per_cluster(cid, p < k, p, n_c, k)
    counts[:, col["true_s"]] = _per_cluster(cid, scored, t, n_c, k)
    counts[:, col["true_a"]] = _per_cluster(cid, np.ones_like(scored), t, n_c, k)
    counts[:, col["correct"]] = np.bincount(cid[hit], minlength=n_c)
    counts[:, col["n_s"]] = np.bincount(cid[scored], minlength=n_c)
    counts[:, col["n_a"]] = np.bincount(cid, minlength=n_c)
    confusion = np.zeros((k, k + 2), dtype=np.int64)
    np.add.at(confusion, (t, p), 1)
    pred_counter = Counter(r.prediction for r in rows if r.prediction is not None)
    p_true = [
        float(r.probs.get(r.persona, 0.0)) for r in rows if r.prediction is not None and r.probs
    ]
    return _CellData(cell, clusters, counts, confusion, pred_counter, p_true)


def _per_cluster(
    cid: np.ndarray, mask: np.ndarray, label: np.ndarray, n_c: int, k: int
) -> np.ndarray:
    """(n_clusters, K) counts of `label` among the rows where `mask` holds."""
    flat = cid[mask] * k + label[mask]
    return np.bincount(flat, minlength=n_c * k).reshape(n_c, k)


def _safe_div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    out = np.full(num.shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _stats(totals: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """All statistics from summed counts; `totals` is (..., 4K+3), any leading shape."""
    col = _columns(k)
    tp, pred = totals[..., col["tp"]], totals[..., col["pred"]]
    true_s, true_a = totals[..., col["true_s"]], totals[..., col["true_a"]]
    correct, n_s, n_a = (
        totals[..., col["correct"]],
        totals[..., col["n_s"]],
        totals[..., col["n_a"]],
    )
    # F1 = 2tp / (2tp + fp + fn) = 2tp / (predicted + true); 0 when nothing is predicted or true.
    f1 = _safe_div(2 * tp, pred + true_s, 0.0)
    f1_itt = _safe_div(2 * tp, pred + true_a, 0.0)
    # conditional metrics are undefined where nothing was scored (not 0)
    f1 = np.where(n_s[..., None] > 0, f1, np.nan)
    return {
        "macro_f1": f1.mean(axis=-1),
        "macro_f1_itt": f1_itt.mean(axis=-1),
        "accuracy": _safe_div(correct, n_s, np.nan),
        "accuracy_itt": _safe_div(correct, n_a, np.nan),
        "yield": _safe_div(n_s, n_a, np.nan),
        "f1": f1,
        "f1_itt": f1_itt,
    }


def score_labels(
    y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]
) -> dict[str, Any]:
    """Point figures for plain label lists (no clusters, no intervals): the same definitions as
    every cell of `compute_metrics` (used for a classifier's held-out split)."""
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    index = {p: i for i, p in enumerate(labels)}
    rows = [
        PredictionRecord("-", "-", "-", t, str(i), p)
        for i, (t, p) in enumerate(zip(y_true, y_pred, strict=True))
    ]
    data = _cell_data(Cell("-", "-", "-"), rows, index)
    st = _stats(data.counts.sum(axis=0), len(labels))
    return {
        "macro_f1": float(st["macro_f1"]),
        "accuracy": float(st["accuracy"]),
        "per_label_f1": {n: float(v) for n, v in zip(labels, st["f1"], strict=True)},
        "confusion": data.confusion[:, : len(labels)].tolist(),
    }


# --------------------------------------------------------------------------- intervals


def _draw(rng: np.random.Generator, n_boot: int, n_clusters: int) -> np.ndarray:
    """(n_boot x n_clusters) multinomial counts: how often each cluster is drawn per resample."""
    probs = np.full(n_clusters, 1.0 / n_clusters)
    return rng.multinomial(n_clusters, probs, size=n_boot).astype(np.float64)


def _interval(
    boot: np.ndarray,
    point: np.ndarray,
    jack: np.ndarray | None,
    ci: float,
    method: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise interval over the trailing shape of `boot` (n_boot, ...).

    BCa (Efron 1987): bias correction z0 from the share of resamples below the estimate (ties
    count half, so a degenerate distribution gives z0 = 0), acceleration from the jackknife
    values `jack` (n_leave_one_out, ...), one per left-out cluster.
    """
    alpha = (1.0 - ci) / 2.0
    point = np.asarray(point, dtype=np.float64)
    if method == "percentile":
        with np.errstate(all="ignore"):
            lo, hi = _nanquantile(boot, [alpha, 1.0 - alpha])
        return lo, hi
    if method != "bca":
        raise ValueError(f"unknown interval method {method!r}; use 'percentile' or 'bca'")
    nd = NormalDist()
    flat_boot = boot.reshape(boot.shape[0], -1)
    flat_point = point.reshape(-1)
    flat_jack = None if jack is None else jack.reshape(jack.shape[0], -1)
    lo = np.full(flat_point.shape, np.nan)
    hi = np.full(flat_point.shape, np.nan)
    for j in range(flat_point.size):
        b = flat_boot[:, j]
        b = b[~np.isnan(b)]
        theta = flat_point[j]
        if b.size == 0 or np.isnan(theta):
            continue
        share = (np.sum(b < theta) + 0.5 * np.sum(b == theta)) / b.size
        share = min(max(share, 0.5 / b.size), 1.0 - 0.5 / b.size)
        z0 = nd.inv_cdf(share)
        acc = 0.0
        if flat_jack is not None:
            jk = flat_jack[:, j]
            jk = jk[~np.isnan(jk)]
            if jk.size > 1:
                d = jk.mean() - jk
                den = 6.0 * float(np.sum(d**2)) ** 1.5
                acc = float(np.sum(d**3)) / den if den > 0 else 0.0
        levels = []
        for z_a in (nd.inv_cdf(alpha), nd.inv_cdf(1.0 - alpha)):
            denom = 1.0 - acc * (z0 + z_a)
            adj = z0 + (z0 + z_a) / denom if denom > 0 else math.copysign(np.inf, z_a)
            levels.append(nd.cdf(adj) if np.isfinite(adj) else (0.0 if adj < 0 else 1.0))
        lo[j], hi[j] = np.quantile(b, levels)
    return lo.reshape(point.shape), hi.reshape(point.shape)


def _nanquantile(boot: np.ndarray, qs: list[float]) -> tuple[np.ndarray, np.ndarray]:
    if not np.isnan(boot).any():
        q = np.quantile(boot, qs, axis=0)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q = np.nanquantile(boot, qs, axis=0)
    return q[0], q[1]


def _jackknife(counts: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Statistics with each cluster left out in turn: (C, ...) arrays."""
    return _stats(counts.sum(axis=0)[None, :] - counts, k)


def _cell_seed(seed: int, cell: Cell) -> int:
    return derive_seed("charshift.stats.cell", seed, cell.base, cell.stage, cell.slice)


def _cell_metrics(
    data: _CellData, personas: Sequence[str], n_boot: int, ci: float, method: str, seed: int
) -> CellMetrics:
    k = len(personas)
    counts = data.counts
    point = _stats(counts.sum(axis=0), k)
    rng = np.random.default_rng(_cell_seed(seed, data.cell))
    boot = _stats(_draw(rng, n_boot, len(data.clusters)) @ counts, k)
    jack = _jackknife(counts, k) if method == "bca" else None

    def iv(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = _interval(
            boot[name], point[name], None if jack is None else jack[name], ci, method
        )
        return point[name], lo, hi

    def scalar(name: str) -> Interval:
        e, lo, hi = iv(name)
        return Interval(float(e), float(lo), float(hi))

    col = _columns(k)
    tot = counts.sum(axis=0)
    f1, f1_lo, f1_hi = iv("f1")
    f1i, f1i_lo, f1i_hi = iv("f1_itt")
    tp, pred = tot[col["tp"]], tot[col["pred"]]
    true_s, true_a = tot[col["true_s"]], tot[col["true_a"]]
    precision = _safe_div(tp, pred, 0.0)
    recall = _safe_div(tp, true_s, 0.0)
    recall_itt = _safe_div(tp, true_a, 0.0)
    per = [
        PersonaMetrics(
            persona=pname,
            n=int(true_a[i]),
            n_scored=int(true_s[i]),
            yield_=float(true_s[i] / true_a[i]) if true_a[i] else float("nan"),
            precision=float(precision[i]),
            recall=float(recall[i]),
            f1=Interval(float(f1[i]), float(f1_lo[i]), float(f1_hi[i])),
            f1_itt=Interval(float(f1i[i]), float(f1i_lo[i]), float(f1i_hi[i])),
            recall_itt=float(recall_itt[i]),
        )
        for i, pname in enumerate(personas)
    ]
    labels = list(personas)
    dist = {p: data.pred_counter[p] for p in labels if data.pred_counter[p]}
    for lab, n in sorted(data.pred_counter.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        if lab not in dist:
            dist[lab] = n
    return CellMetrics(
        cell=data.cell,
        n_rows=int(tot[col["n_a"]]),
        n_scored=int(tot[col["n_s"]]),
        n_clusters=len(data.clusters),
        yield_=scalar("yield"),
        macro_f1=scalar("macro_f1"),
        accuracy=scalar("accuracy"),
        macro_f1_itt=scalar("macro_f1_itt"),
        accuracy_itt=scalar("accuracy_itt"),
        per_persona=per,
        confusion=data.confusion,
        confusion_cols=labels + [OTHER, NONE],
        pred_distribution=dist,
        n_none=int(tot[col["n_a"]] - tot[col["n_s"]]),
        mean_p_true=float(np.mean(data.p_true)) if data.p_true else None,
    )


# --------------------------------------------------------------------------- differences


def _stat_name(metric: str, itt: bool) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    return f"{metric}_itt" if itt else metric


def _differences(
    da: _CellData,
    db: _CellData,
    k: int,
    *,
    n_boot: int,
    ci: float,
    method: str,
    seed: int,
    paired: bool | None = None,
) -> tuple[dict[str, tuple[float, float, float]], int, bool, str]:
    """All metric differences a - b from one draw. Returns ({stat: (est, lo, hi)}, n, paired, note).

    `paired=None`: paired when the cells share item ids (on the shared ids only), else unpaired.
    """
    shared, ia, ib = np.intersect1d(da.clusters, db.clusters, return_indices=True)
    if paired is None:
        paired = len(shared) > 0
    names = ("macro_f1", "macro_f1_itt", "accuracy", "accuracy_itt")
    rng = np.random.default_rng(
        derive_seed("charshift.stats.diff", seed, *da.cell, *db.cell, bool(paired))
    )
    if paired:
        if len(shared) == 0:
            raise ValueError(
                f"cells {da.cell.label()} and {db.cell.label()} share no item ids: "
                "a paired difference needs common items (use paired=False)"
            )
        ca, cb = da.counts[ia], db.counts[ib]
        w = _draw(rng, n_boot, len(shared))
        sa, sb = _stats(w @ ca, k), _stats(w @ cb, k)
        pa, pb = _stats(ca.sum(axis=0), k), _stats(cb.sum(axis=0), k)
        if method == "bca":
            ja, jb = _jackknife(ca, k), _jackknife(cb, k)
            jack = {n: ja[n] - jb[n] for n in names}
        n_used = len(shared)
        note = "paired on shared item ids"
        if len(shared) < max(len(da.clusters), len(db.clusters)):
            note += (
                f" ({len(shared)} of {len(da.clusters)} / {len(db.clusters)} items; "
                "estimate on the shared items only)"
            )
    else:
        ca, cb = da.counts, db.counts
        wa = _draw(rng, n_boot, len(ca))
        wb = _draw(rng, n_boot, len(cb))
        sa, sb = _stats(wa @ ca, k), _stats(wb @ cb, k)
        pa, pb = _stats(ca.sum(axis=0), k), _stats(cb.sum(axis=0), k)
        if method == "bca":
            ja, jb = _jackknife(ca, k), _jackknife(cb, k)
            jack = {n: np.concatenate([ja[n] - pb[n], pa[n] - jb[n]], axis=0) for n in names}
        n_used = len(ca) + len(cb)
        note = "unpaired: no shared item ids, cells bootstrapped independently"
    out: dict[str, tuple[float, float, float]] = {}
    for n in names:
        est = pa[n] - pb[n]
        lo, hi = _interval(sa[n] - sb[n], est, jack[n] if method == "bca" else None, ci, method)
        out[n] = (float(est), float(lo), float(hi))
    return out, n_used, bool(paired), note


def _diff_rows(
    kind: str,
    da: _CellData,
    db: _CellData,
    k: int,
    metrics: Sequence[str],
    **kw: Any,
) -> list[Difference]:
    vals, n_used, paired, note = _differences(da, db, k, **kw)
    rows = []
    for metric in metrics:
        for itt in (False, True):
            est, lo, hi = vals[_stat_name(metric, itt)]
            rows.append(
                Difference(kind, da.cell, db.cell, metric, itt, est, lo, hi, n_used, paired, note)
            )
    return rows


def _prepare(
    records: Sequence[PredictionRecord], personas: Sequence[str] | None
) -> tuple[list[str], dict[Cell, _CellData]]:
    recs = list(records)
    ps = list(personas) if personas is not None else infer_personas(recs)
    if len(ps) < 2:
        raise ValueError(f"need at least two personas, got {ps}")
    return ps, _build_cells(expand_base_null(recs, ps), ps)


def _get(cells: dict[Cell, _CellData], cell: Sequence[str]) -> _CellData:
    c = Cell(*cell)
    if c not in cells:
        raise ValueError(f"no records for cell {c.label()}")
    return cells[c]


def paired_difference(
    records: Sequence[PredictionRecord],
    cell_a: Sequence[str],
    cell_b: Sequence[str],
    metric: str = "macro_f1",
    itt: bool = False,
    *,
    personas: Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    method: Method = "percentile",
    seed: int = 0,
    paired: bool = True,
) -> Difference:
    """metric(cell_a) - metric(cell_b), resampling the shared item ids with one draw for both.

    Cells are (base, stage, slice). Both the estimate and the interval use only the items the
    cells share (email slices share scenario ids; stages share items). `paired=False` gives the
    independent two-sample bootstrap instead (for cells with no common items).
    """
    ps, cells = _prepare(records, personas)
    da, db = _get(cells, cell_a), _get(cells, cell_b)
    vals, n_used, was_paired, note = _differences(
        da, db, len(ps), n_boot=n_boot, ci=ci, method=method, seed=seed, paired=paired
    )
    est, lo, hi = vals[_stat_name(metric, itt)]
    return Difference("pair", da.cell, db.cell, metric, itt, est, lo, hi, n_used, was_paired, note)


def _ladder(
    cells: dict[Cell, _CellData],
    k: int,
    base: str,
    stage: str,
    ladder: Sequence[str],
    metrics: Sequence[str],
    **kw: Any,
) -> list[LadderDecomposition]:
    present = [s for s in ladder if Cell(base, stage, s) in cells]
    if len(present) < 2:
        return []
    rung_rows = [
        _diff_rows(
            "ladder_rung",
            cells[Cell(base, stage, a)],
            cells[Cell(base, stage, b)],
            k,
            metrics,
            **kw,
        )
        for a, b in zip(present[:-1], present[1:], strict=True)
    ]
    total_rows = _diff_rows(
        "ladder_total",
        cells[Cell(base, stage, present[0])],
        cells[Cell(base, stage, present[-1])],
        k,
        metrics,
        **kw,
    )
    out = []
    for j, total in enumerate(total_rows):
        out.append(
            LadderDecomposition(
                base=base,
                stage=stage,
                metric=total.metric,
                itt=total.itt,
                slices=present,
                rungs=[rows[j] for rows in rung_rows],
                total=total,
            )
        )
    return out


def ladder_decomposition(
    records: Sequence[PredictionRecord],
    base: str,
    stage: str,
    ladder: Sequence[str] = LADDER,
    *,
    metric: str = "macro_f1",
    itt: bool = False,
    personas: Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    method: Method = "percentile",
    seed: int = 0,
) -> LadderDecomposition | None:
    """The loss along the ladder for one (base, stage): one difference per consecutive pair of
    the slices present (earlier minus later: positive = persona lost), plus the total (first
    minus last). Rungs between cells that share item ids are paired; the id_chat -> email rung
    (prompt ids vs scenario ids) is an independent bootstrap, marked `paired=False`.
    None when fewer than two ladder slices are present.
    """
    _stat_name(metric, itt)
    ps, cells = _prepare(records, personas)
    found = _ladder(
        cells,
        len(ps),
        base,
        stage,
        ladder,
        (metric,),
        n_boot=n_boot,
        ci=ci,
        method=method,
        seed=seed,
    )
    return next((d for d in found if d.itt == itt), None)


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
    ps, cells = _prepare(records, personas)
    data = _get(cells, cell)
    rng = np.random.default_rng(_cell_seed(seed, data.cell))
    w = _draw(rng, n_boot, len(data.clusters))
    k = len(ps)
    return BootstrapDraws(
        data.cell, data.clusters, w, _stats(w @ data.counts, k), _stats(data.counts.sum(0), k)
    )


# --------------------------------------------------------------------------- entry point


def compute_metrics(
    records: Sequence[PredictionRecord],
    personas: Sequence[str],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    method: Method = "percentile",
    seed: int = 0,
    ladder: Sequence[str] = LADDER,
    differences: bool = True,
) -> MetricsResult:
    """Metrics with intervals for every (base, stage, slice) cell, plus differences.

    Null-persona (base) records are expanded first (see `expand_base_null`). With
    `differences=True` the result also holds the ladder decomposition per (base, stage) and the
    stage differences per (base, slice): each later stage minus the one before it and minus
    the base stage, paired on the shared items.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    if not 0 < ci < 1:
        raise ValueError("ci must be in (0, 1)")
    if method not in ("percentile", "bca"):
        raise ValueError(f"unknown interval method {method!r}; use 'percentile' or 'bca'")
    ps, data = _prepare(records, personas)
    k = len(ps)
    bases = list(dict.fromkeys(c.base for c in data))
    stages = order_stages(c.stage for c in data)
    slices = order_slices(c.slice for c in data)
    order = [
        Cell(b, st, sl) for b in bases for st in stages for sl in slices if Cell(b, st, sl) in data
    ]
    cells = {c: _cell_metrics(data[c], ps, n_boot, ci, method, seed) for c in order}
    result = MetricsResult(ps, cells, n_boot, ci, method, seed)
    if not differences:
        return result
    kw = {"n_boot": n_boot, "ci": ci, "method": method, "seed": seed}
    for b in bases:
        for st in stages:
            for lad in _ladder(data, k, b, st, ladder, METRICS, **kw):
                result.ladders.append(lad)
                result.differences.extend(lad.rungs)
                result.differences.append(lad.total)
    for b in bases:
        for sl in slices:
            present = [st for st in stages if Cell(b, st, sl) in data]
            pairs = list(zip(present[1:], present[:-1], strict=True))
            if BASE_STAGE in present:
                pairs += [(st, BASE_STAGE) for st in present[2:]]
            for later, earlier in pairs:
                da, db = data[Cell(b, later, sl)], data[Cell(b, earlier, sl)]
                if len(np.intersect1d(da.clusters, db.clusters)) == 0:
                    continue
                result.differences.extend(_diff_rows("stage", da, db, k, METRICS, **kw))
    return result


# --------------------------------------------------------------------------- writers


def _fmt(x: Any) -> Any:
    if isinstance(x, float | np.floating):
        return "" if math.isnan(x) else f"{float(x):.6g}"
    return x


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow([_fmt(v) for v in row])
    return path


METRICS_COLUMNS = (
    "base", "stage", "slice", "n_rows", "n_scored", "yield",
    "macro_f1", "macro_f1_lo", "macro_f1_hi", "accuracy", "accuracy_lo", "accuracy_hi",
    "macro_f1_itt", "macro_f1_itt_lo", "macro_f1_itt_hi",
    "accuracy_itt", "accuracy_itt_lo", "accuracy_itt_hi", "mean_p_true",
)  # fmt: skip
PER_PERSONA_COLUMNS = (
    "base", "stage", "slice", "persona", "precision", "recall", "f1", "f1_lo", "f1_hi",
    "f1_itt", "n", "n_scored", "yield",
)  # fmt: skip
DIFFERENCE_COLUMNS = (
    "kind", "base", "metric", "itt", "stage_a", "slice_a", "stage_b", "slice_b",
    "estimate", "lo", "hi", "n_clusters", "paired", "note",
)  # fmt: skip


def write_tables(result: MetricsResult, out_dir: str | Path) -> list[Path]:
    """Write metrics.csv, per_persona.csv, confusion.csv, pred_distribution.csv, differences.csv
    (and the interval settings in stats.json) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cms = list(result.cells.values())
    paths = [
        _write_csv(
            out / "metrics.csv",
            METRICS_COLUMNS,
            (
                [*m.cell, m.n_rows, m.n_scored, m.yield_.estimate]
                + [v for iv in (m.macro_f1, m.accuracy, m.macro_f1_itt, m.accuracy_itt)
                   for v in (iv.estimate, iv.lo, iv.hi)]
                + [float("nan") if m.mean_p_true is None else m.mean_p_true]
                for m in cms
            ),
        ),
        _write_csv(
            out / "per_persona.csv",
            PER_PERSONA_COLUMNS,
            (
                [*m.cell, p.persona, p.precision, p.recall, p.f1.estimate, p.f1.lo, p.f1.hi,
                 p.f1_itt.estimate, p.n, p.n_scored, p.yield_]
                for m in cms
                for p in m.per_persona
            ),
        ),
        _write_csv(
            out / "confusion.csv",
            ("base", "stage", "slice", "true", "predicted", "count"),
            (
                [*m.cell, result.personas[i], col, int(m.confusion[i, j])]
                for m in cms
                for i in range(len(result.personas))
                for j, col in enumerate(m.confusion_cols)
            ),
        ),
        _write_csv(
            out / "pred_distribution.csv",
            ("base", "stage", "slice", "label", "count", "share_of_scored", "share_of_attempted"),
            (
                row
                for m in cms
                for row in (
                    [[*m.cell, lab, n, n / m.n_scored, n / m.n_rows]
                     for lab, n in m.pred_distribution.items()]
                    + [[*m.cell, "(no output)", m.n_none, float("nan"), m.n_none / m.n_rows]]
                )
            ),
        ),
        _write_csv(
            out / "differences.csv",
            DIFFERENCE_COLUMNS,
            (
                [d.kind, d.a.base, d.metric, d.itt, d.a.stage, d.a.slice, d.b.stage, d.b.slice,
                 d.estimate, d.lo, d.hi, d.n_clusters, d.paired, d.note]
                for d in result.differences
            ),
        ),
    ]  # fmt: skip
    settings = {
        "n_boot": result.n_boot,
        "ci": result.ci,
        "method": result.method,
        "seed": result.seed,
        "personas": result.personas,
        "cluster": "item_id",
    }
    (out / "stats.json").write_text(json.dumps(settings, indent=2) + "\n")
    paths.append(out / "stats.json")
    return paths


# --------------------------------------------------------------------------- predictions file


def load_predictions_jsonl(
    path: str | Path, *, allow_duplicates: bool = False
) -> list[PredictionRecord]:
    """Read predictions made elsewhere (one JSON object per line) for `charshift report`.

    Required: base, stage, slice, persona, item_id (strings; item_id may be an integer; a base
    row's persona may be null) and prediction (a string, or null for a row with no output).
    Optional: probs (label -> probability), sample_idx (int), outcome, text, key. The reading and
    the checks are `charshift.inputs.load_predictions`: a bad row or a duplicate raises
    PredictionsError naming the line and field; blank lines are skipped.
    """
    from charshift.inputs import load_predictions

    return load_predictions(path, allow_duplicates=allow_duplicates, error=PredictionsError)
