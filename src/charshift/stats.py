"""Every metric and interval of charshift, defined once. Pure: records in, results out.

Input: `PredictionRecord`s (one row = one output with its true persona and the classifier's
verdict; `slice` holds the measured *unit*, a slice or a `SLICE.VARIANT` scoring variant, see
`charshift.ladder`). Output: a `MetricsResult` with, per cell (base, stage, unit), macro-F1 and
accuracy (conditional and intention-to-treat), yield, per-persona figures, confusion counts and
the predicted-label distribution; the additive decomposition of every chain of
`charshift.ladder.CHAINS`, the contrasts of `ladder.ALL_CONTRASTS` and the stage differences, each
with a cluster-bootstrap interval that says when it cannot be trusted. Reading prediction files
lives in `charshift.external`, writing tables in `charshift.tables`.

Definitions (the only ones in the code base):

* Label set, per base: the run's personas, in the run's order, less any persona with no rows at
  all in some non-base stage of that base (a skipped adapter, e.g. a gated one). Such a persona
  leaves the base's label set in every cell of that base (`MetricsResult.labels`), its rows in
  the other stages are set aside, and the result says so (`MetricsResult.label_notes`). A
  prediction outside the label set (a persona the run did not use or the base dropped) is wrong.
* Conditional metrics use only rows with an output (prediction not None). Conditional macro-F1
  is the mean of per-persona F1 over the personas with at least one scored output in the cell
  (`n_personas_scored` of `n_personas`); a persona without one has an undefined (NaN)
  conditional F1 and is left out, in the point estimate and in each bootstrap resample alike. It
  equals scikit-learn's `f1_score(y, p, labels=<those personas>, average="macro",
  zero_division=0)`. Intention-to-treat (ITT) metrics use every attempted row, count a missing
  output as a wrong prediction and average over all K personas of the label set
  (`labels=personas`). Yield = rows with an output / rows attempted.
* The base stage is an explicit null: it is generated once per item and sample (persona
  "__null__"), and each such output is paired with every persona of the label set as its true
  label for F1 (its per-persona recall is the share of base outputs given that persona; its
  macro-F1 is what the classifier scores when nothing carries a persona). Counts are per output:
  a base cell's `n_rows`, `n_scored`, confusion and label distribution count each output once.
  Its accuracy is fixed by construction (1/K times the share of outputs predicted inside the
  label set): it carries no interval (`fixed_by_construction`, NaN ends).
* Intervals: cluster bootstrap by `item_id` (an ID prompt or an email scenario): all rows of an
  item (every persona and sample) are resampled together. Vectorised: a (n_boot x n_clusters)
  multinomial count matrix W times the per-cluster count matrix gives every resample's counts at
  once. Each cell draws from its own generator seeded by (seed, base, stage, unit). Percentile
  intervals by default; BCa with a jackknife over clusters for the acceleration. A resample in
  which a figure is undefined (nothing scored) is counted (`n_empty_resamples`) and left out.
* An interval is flagged (`flag` non-empty, `reliable` False) when fewer than `MIN_CLUSTERS`
  clusters carry its estimate (for conditional figures: clusters with a scored output; for a
  difference: the fewer of its two sides), when its estimate is undefined, or when some
  resamples had nothing scored. Why 10: `scripts/coverage_min_clusters.py --sims 1000` simulates
  cells with a known truth (K = 4, 2 rows per persona per item, item hit rates ~ Beta(7, 3)) and
  counts how often the nominal 95% percentile cluster bootstrap covers it. Accuracy / macro-F1
  coverage: 3 clusters 0.75 / 0.75, 5: 0.87 / 0.84, 7: 0.87 / 0.88, 10: 0.91 / 0.90,
  15: 0.94 / 0.93, 20: 0.94 / 0.92, 40: 0.94 / 0.93 (1000 cells each, so +-0.01). With few
  clusters the bootstrap's spread shrinks by (G-1)/G and lacks a t-correction; 10 is the smallest
  size tried whose coverage is within about 5 points of nominal, and below it coverage falls
  fast (a "95%" interval from 3 clusters misses one time in four).
* Chains (`charshift.ladder.CHAINS`): for each (base, stage) every unit of a chain is estimated
  on the chain's common items (per item kind: the prompt items common to all its prompt units,
  the scenario items common to all its scenario units), so the rungs (differences of consecutive
  units, closer to home minus further: positive = persona lost) sum exactly to the total (first
  minus last). One bootstrap draw per item kind is shared by all units of the chain, so every
  resample telescopes too; a rung between a prompt unit and a scenario unit is unpaired (two
  independent draws), the others paired. The item kind is the `kind:` prefix of the item ids
  when they carry one, else "prompt" for the ID slices and "scenario" for the rest.
* Contrasts (`ladder.ALL_CONTRASTS`) and stage differences (later minus earlier stage, and minus the
  base stage, per unit) are paired on the items the two cells share, with one draw for both.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal, NamedTuple

import numpy as np

from charshift import slices
from charshift.config import ALL_PERSONAS, ALL_SLICES
from charshift.ladder import ALL_CONTRASTS, CHAINS, VARIANTS, Chain, Rung, split_unit
from charshift.schema import (
    BASE_STAGE,
    NULL_PERSONA_MARKERS,
    PROMPTED_STAGE,
    PredictionRecord,
    derive_seed,
)

_NULL_MARKERS = NULL_PERSONA_MARKERS
STAGE_ORDER = (BASE_STAGE, PROMPTED_STAGE, "distillation", "full")
OTHER = "other"  # confusion column: a prediction outside the base's label set
NONE = "none"  # confusion column: no output
NULL_ROW = "(base: no persona)"  # the one confusion row of a base-null cell
MIN_CLUSTERS = 10  # fewer clusters than this behind an interval: flagged (module docstring)
FIXED_TEXT = (
    "fixed by construction: the base null pairs each output with every persona, so accuracy is "
    "1/K times the share of outputs predicted inside the label set; no interval"
)

Method = Literal["percentile", "bca"]
METRICS = ("macro_f1", "accuracy")
_STATS = ("macro_f1", "macro_f1_itt", "accuracy", "accuracy_itt")


class Cell(NamedTuple):
    base: str
    stage: str
    slice: str  # the unit: a slice or SLICE.VARIANT

    def label(self) -> str:
        return f"{self.base}/{self.stage}/{self.slice}"


@dataclass(frozen=True)
class Interval:
    """An estimate and its interval. `n_clusters`: the clusters that carry the estimate (for a
    conditional figure, those with a scored output). `flag` says why the interval is not to be
    trusted ("" when it is); `fixed_by_construction` figures have NaN ends."""

    estimate: float
    lo: float
    hi: float
    n_clusters: int = 0
    n_empty_resamples: int = 0
    fixed_by_construction: bool = False
    flag: str = ""

    @property
    def reliable(self) -> bool:
        return not self.flag


@dataclass
class PersonaMetrics:
    persona: str
    n: int  # rows attempted with this true persona (a base output counts once per persona)
    n_scored: int  # of which with an output
    yield_: float
    precision: float
    recall: float
    f1: Interval  # NaN when this persona has no scored output in the cell (not averaged)
    f1_itt: Interval
    recall_itt: float


@dataclass
class CellMetrics:
    cell: Cell
    n_rows: int  # outputs attempted (a base output counted once, not once per persona)
    n_scored: int  # outputs scored
    n_clusters: int
    yield_: Interval
    macro_f1: Interval
    accuracy: Interval
    macro_f1_itt: Interval
    accuracy_itt: Interval
    n_personas_scored: int  # personas with a scored output: the conditional macro-F1's average
    n_personas: int  # K: the base's label set, the ITT macro-F1's average
    per_persona: list[PersonaMetrics]
    confusion: np.ndarray  # (rows, K + 2): rows `confusion_rows`, cols personas + other + none
    confusion_rows: list[str]  # the label set, or [NULL_ROW] for a base-null cell
    confusion_cols: list[str]
    pred_distribution: dict[str, int]  # predicted label -> outputs, scored outputs only
    n_none: int  # outputs missing
    mean_p_true: float | None  # mean probability of the true persona (None for the base null)
    null: bool = False  # a base-null cell


@dataclass
class Difference:
    """metric(a) - metric(b) with its bootstrap interval.

    Rungs, totals and contrasts: a = the unit closer to home, so a positive value is persona
    lost; `changes` names what differs (from `charshift.ladder`). Stage differences: a = the
    later stage, so a positive value is persona gained. `n_clusters`: clusters resampled (the
    shared ones when paired, both sides' when unpaired).
    """

    kind: str  # "rung" | "total" | "contrast" | "stage" | "pair"
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
    changes: str = ""
    chain: str = ""
    n_empty_resamples: int = 0
    fixed_by_construction: bool = False
    flag: str = ""

    @property
    def reliable(self) -> bool:
        return not self.flag


@dataclass
class ChainDecomposition:
    """One chain of `charshift.ladder.CHAINS` for one (base, stage), metric and view.

    `units`: the chain's units present here, in chain order; `estimates[i]`: units[i]'s metric
    on the common items (not the cell's own figure when items were dropped). The rungs sum
    exactly to the total. `common`: item kind -> size of the common item set; `dropped`: unit ->
    its items outside the common set; `missing`: chain units without records here (a rung over a
    missing unit bundles the changes of the rungs it spans, and says so).
    """

    base: str
    stage: str
    chain: str
    title: str
    metric: str
    itt: bool
    units: list[str]
    kinds: dict[str, str]
    estimates: list[Interval]
    rungs: list[Difference]
    total: Difference
    common: dict[str, int]
    dropped: dict[str, int]
    missing: list[str]

    @property
    def note(self) -> str:
        sets = ", ".join(f"{n} {kind} items" for kind, n in self.common.items())
        out = f"estimated on the items common to every unit of the chain ({sets})"
        left = [f"{u} {n}" for u, n in self.dropped.items() if n]
        if left:
            out += "; items outside that set, left out: " + ", ".join(left)
        if self.missing:
            out += "; units without records here: " + ", ".join(self.missing)
        return out


@dataclass(frozen=True)
class LabelNote:
    """A persona that left a base's label set, and why."""

    base: str
    persona: str
    stages: tuple[str, ...]  # the non-base stages of the base where it has no rows at all
    n_rows_set_aside: int  # its rows in the base's other stages, left out of every figure
    k: int  # the base's label set size after the drop

    def text(self) -> str:
        return (
            f"{self.base}: {self.persona} has no rows at all in stage(s) "
            f"{', '.join(self.stages)} (a skipped adapter?), so it leaves {self.base}'s label "
            f"set in every cell of {self.base} (K = {self.k}); its {self.n_rows_set_aside} rows "
            f"in other stages are set aside, and a prediction of {self.persona} counts as wrong."
        )


@dataclass
class MetricsResult:
    personas: list[str]  # the run's personas
    labels: dict[str, list[str]]  # base -> its label set
    label_notes: list[LabelNote]
    cells: dict[Cell, CellMetrics]
    n_boot: int
    ci: float
    method: str
    seed: int
    min_clusters: int = MIN_CLUSTERS
    differences: list[Difference] = field(default_factory=list)
    chains: list[ChainDecomposition] = field(default_factory=list)

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


def _unit_rank() -> list[str]:
    known = list(ALL_SLICES)
    for chain in CHAINS:
        for u in chain.units:
            s, _ = split_unit(u)
            if s not in known:
                known.append(s)
    return known


def order_slices(slices: Iterable[str]) -> list[str]:
    """Units in the config's slice order (home ground outward), each slice's scoring variants
    right after it, then the chains' other slices, unknown ones last (sorted)."""
    rank = _unit_rank()

    def key(u: str) -> tuple[int, int, str]:
        s, v = split_unit(u)
        vpos = 0 if v is None else 1 + (VARIANTS.index(v) if v in VARIANTS else len(VARIANTS))
        return (rank.index(s) if s in rank else len(rank), vpos, u)

    return sorted(set(slices), key=key)


def infer_personas(records: Iterable[PredictionRecord]) -> list[str]:
    """The true labels present (null markers excluded): known personas in the OCT order first."""
    seen = list(dict.fromkeys(r.persona for r in records if r.persona not in _NULL_MARKERS))
    return [p for p in ALL_PERSONAS if p in seen] + [p for p in seen if p not in ALL_PERSONAS]


# --------------------------------------------------------------------------- base null, labels


def expand_base_null(
    records: Iterable[PredictionRecord], personas: Sequence[str]
) -> list[PredictionRecord]:
    """Pair each null-persona output with every persona of `personas` as its true label.

    What `compute_metrics` does internally for F1 (pass it the records unexpanded: it counts a
    base output once). Records with a real persona pass through, so calling this twice changes
    nothing.
    """
    out: list[PredictionRecord] = []
    for r in records:
        if r.persona in _NULL_MARKERS:
            out.extend(dataclasses.replace(r, persona=p) for p in personas)
        else:
            out.append(r)
    return out


def label_sets(
    records: Sequence[PredictionRecord], personas: Sequence[str]
) -> tuple[dict[str, list[str]], list[LabelNote]]:
    """Each base's label set and a note per persona that left it (see the module docstring)."""
    return _label_sets(_group(records, personas), personas)


def _group(
    records: Iterable[PredictionRecord], personas: Sequence[str]
) -> dict[Cell, list[PredictionRecord]]:
    """Rows per cell, every true persona checked against the run's personas."""
    groups: dict[tuple[str, str, str], list[PredictionRecord]] = {}
    for r in records:
        key = (r.base, r.stage, r.slice)
        rows = groups.get(key)
        if rows is None:
            rows = groups[key] = []
        rows.append(r)
    allowed = {*personas, *_NULL_MARKERS}
    for rows in groups.values():
        if not {r.persona for r in rows} <= allowed:
            bad = next(r for r in rows if r.persona not in allowed)
            raise ValueError(
                f"record {bad.key or bad.item_id} ({bad.base}/{bad.stage}/{bad.slice}) has true "
                f"persona {bad.persona!r}, not one of the run's personas {list(personas)}"
            )
    return {Cell(*key): rows for key, rows in groups.items()}


def _label_sets(
    groups: dict[Cell, list[PredictionRecord]], personas: Sequence[str]
) -> tuple[dict[str, list[str]], list[LabelNote]]:
    rows: Counter[tuple[str, str, str]] = Counter()
    stages: dict[str, set[str]] = {}
    for cell, recs in groups.items():
        stages.setdefault(cell.base, set())
        if cell.stage == BASE_STAGE:
            continue
        counts = Counter(r.persona for r in recs if r.persona not in _NULL_MARKERS)
        if counts:
            stages[cell.base].add(cell.stage)
        for p, n in counts.items():
            rows[(cell.base, cell.stage, p)] += n
    labels: dict[str, list[str]] = {}
    notes: list[LabelNote] = []
    for base, present in stages.items():
        lost = {
            p: tuple(st for st in order_stages(present) if not rows[(base, st, p)])
            for p in personas
        }
        keep = [p for p in personas if not lost[p]]
        if len(keep) < 2:
            raise ValueError(
                f"base {base!r}: only {keep} have rows in every stage "
                f"({order_stages(present)}); a label set needs at least two personas"
            )
        labels[base] = keep
        for p in personas:
            if lost[p]:
                n = sum(v for (b, _, q), v in rows.items() if b == base and q == p)
                notes.append(LabelNote(base, p, lost[p], n, len(keep)))
    return labels, notes


# --------------------------------------------------------------------------- per-cell counts


@dataclass
class _CellData:
    """One cell reduced to per-cluster counts: everything a bootstrap resample needs.

    `counts` columns (K personas of the base's label set): tp[K] | predicted[K] (scored rows) |
    true among scored[K] | true among all[K] | correct | n_scored | n_all. A base-null output
    appears there once per persona; the output-level fields count it once.
    """

    cell: Cell
    clusters: np.ndarray  # sorted unique item ids
    counts: np.ndarray  # (C, 4K + 3) float64
    null: bool
    n_outputs: int
    n_outputs_scored: int
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


def _k_of(counts: np.ndarray) -> int:
    return (counts.shape[-1] - 3) // 4


def _build_cells(
    groups: dict[Cell, list[PredictionRecord]], labels: dict[str, list[str]]
) -> dict[Cell, _CellData]:
    """Every cell's counts; rows of a persona outside its base's label set are set aside."""
    out = {}
    for cell, rows in groups.items():
        keep = {*labels[cell.base], *_NULL_MARKERS}
        if not {r.persona for r in rows} <= keep:
            rows = [r for r in rows if r.persona in keep]
        if rows:
            index = {p: i for i, p in enumerate(labels[cell.base])}
            out[cell] = _cell_data(cell, rows, index)
    return out


def _cell_data(cell: Cell, rows: list[PredictionRecord], index: dict[str, int]) -> _CellData:
    """Encode one cell's rows (true index, predicted index: K = other, K+1 = none) as counts."""
    k = len(index)
    is_null = [r.persona in _NULL_MARKERS for r in rows]
    null = all(is_null)
    if any(is_null) and not null:
        raise ValueError(f"cell {cell.label()} mixes null-persona rows with persona rows")
    p_out = np.fromiter(
        (k + 1 if r.prediction is None else index.get(r.prediction, k) for r in rows),
        dtype=np.int64,
        count=len(rows),
    )
    clusters, cid_out = np.unique(np.array([str(r.item_id) for r in rows]), return_inverse=True)
    if null:  # each output once per persona of the label set
        t = np.tile(np.arange(k), len(rows))
        p, cid = np.repeat(p_out, k), np.repeat(cid_out, k)
        confusion = np.bincount(p_out, minlength=k + 2)[None, :].astype(np.int64)
        p_true: list[float] = []
    else:
        t = np.fromiter((index[r.persona] for r in rows), dtype=np.int64, count=len(rows))
        p, cid = p_out, cid_out
        confusion = np.zeros((k, k + 2), dtype=np.int64)
        np.add.at(confusion, (t, p), 1)
        p_true = [
            float(r.probs.get(r.persona, 0.0)) for r in rows if r.prediction is not None and r.probs
        ]
    counts = _counts(t, p, cid, len(clusters), k)
    pred_counter = Counter(r.prediction for r in rows if r.prediction is not None)
    n_scored = int(np.sum(p_out <= k))
    return _CellData(
        cell, clusters, counts, null, len(rows), n_scored, confusion, pred_counter, p_true
    )


def _counts(t: np.ndarray, p: np.ndarray, cid: np.ndarray, n_c: int, k: int) -> np.ndarray:
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
    return counts


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


def _stats(totals: np.ndarray) -> dict[str, np.ndarray]:
    """All statistics from summed counts; `totals` is (..., 4K+3), any leading shape."""
    col = _columns(_k_of(totals))
    tp, pred = totals[..., col["tp"]], totals[..., col["pred"]]
    true_s, true_a = totals[..., col["true_s"]], totals[..., col["true_a"]]
    correct, n_s, n_a = (
        totals[..., col["correct"]],
        totals[..., col["n_s"]],
        totals[..., col["n_a"]],
    )
    # F1 = 2tp / (2tp + fp + fn) = 2tp / (predicted + true).
    # Conditional: defined for the personas with a scored output, averaged over those.
    scored = true_s > 0
    f1 = np.where(scored, _safe_div(2 * tp, pred + true_s, 0.0), np.nan)
    n_p = scored.sum(axis=-1)
    macro = _safe_div(np.where(scored, f1, 0.0).sum(axis=-1), n_p, np.nan)
    # ITT: every persona of the label set, 0 when it is neither true nor predicted
    f1_itt = _safe_div(2 * tp, pred + true_a, 0.0)
    macro_itt = np.where(n_a > 0, f1_itt.mean(axis=-1), np.nan)
    return {
        "macro_f1": macro,
        "macro_f1_itt": macro_itt,
        "accuracy": _safe_div(correct, n_s, np.nan),
        "accuracy_itt": _safe_div(correct, n_a, np.nan),
        "yield": _safe_div(n_s, n_a, np.nan),
        "f1": f1,
        "f1_itt": np.where(n_a[..., None] > 0, f1_itt, np.nan),
        "n_personas_scored": n_p.astype(np.float64),
    }


def score_labels(
    y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]
) -> dict[str, Any]:
    """Point figures for plain label lists (no clusters, no intervals): the same definitions as
    every cell of `compute_metrics` (used for a classifier's held-out split). A label without
    support has no conditional F1 (None) and is not averaged."""
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    index = {p: i for i, p in enumerate(labels)}
    rows = [
        PredictionRecord("-", "-", "-", t, str(i), p)
        for i, (t, p) in enumerate(zip(y_true, y_pred, strict=True))
    ]
    data = _cell_data(Cell("-", "-", "-"), rows, index)
    st = _stats(data.counts.sum(axis=0))
    return {
        "macro_f1": float(st["macro_f1"]),
        "accuracy": float(st["accuracy"]),
        "per_label_f1": {
            n: None if math.isnan(v) else float(v) for n, v in zip(labels, st["f1"], strict=True)
        },
        "confusion": data.confusion[:, : len(labels)].tolist(),
    }


# --------------------------------------------------------------------------- intervals


def _draw(rng: np.random.Generator, n_boot: int, n_clusters: int) -> np.ndarray:
    """(n_boot x n_clusters) multinomial counts: how often each cluster is drawn per resample."""
    if n_clusters == 0:
        return np.zeros((n_boot, 0))
    probs = np.full(n_clusters, 1.0 / n_clusters)
    return rng.multinomial(n_clusters, probs, size=n_boot).astype(np.float64)


def _interval(
    boot: np.ndarray,
    point: np.ndarray,
    jack: np.ndarray | None,
    ci: float,
    method: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise interval over the trailing shape of `boot` (n_boot, ...); NaN resamples
    (figure undefined) are left out.

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
        jk = None if flat_jack is None else flat_jack[:, j]
        lo[j], hi[j] = _bca_ends(b, float(theta), jk, alpha)
    return lo.reshape(point.shape), hi.reshape(point.shape)


def _bca_ends(
    b: np.ndarray, theta: float, jk: np.ndarray | None, alpha: float
) -> tuple[float, float]:
    nd = NormalDist()
    share = (np.sum(b < theta) + 0.5 * np.sum(b == theta)) / b.size
    share = min(max(share, 0.5 / b.size), 1.0 - 0.5 / b.size)
    z0 = nd.inv_cdf(share)
    acc = 0.0
    if jk is not None:
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
    q = np.quantile(b, levels)
    return float(q[0]), float(q[1])


def _nanquantile(boot: np.ndarray, qs: list[float]) -> tuple[np.ndarray, np.ndarray]:
    if not np.isnan(boot).any():
        q = np.quantile(boot, qs, axis=0)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q = np.nanquantile(boot, qs, axis=0)
    return q[0], q[1]


def _jackknife(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics with each cluster left out in turn: (C, ...) arrays."""
    return _stats(counts.sum(axis=0)[None, :] - counts)


def _flag(estimate: float, n_clusters: int, n_empty: int, n_boot: int, min_clusters: int) -> str:
    """Why an interval is not to be trusted ("" when nothing is wrong)."""
    parts = []
    if not math.isfinite(estimate):
        parts.append("undefined: nothing scored")
    elif n_clusters < min_clusters:
        parts.append(f"{n_clusters} cluster(s) behind it, fewer than {min_clusters}")
    if n_empty and math.isfinite(estimate):  # (an undefined estimate has no defined resample)
        parts.append(f"{n_empty} of {n_boot} resamples had nothing scored and are left out")
    return "; ".join(parts)


@dataclass
class _Side:
    """One set of counts (a cell, or a unit on a chain's common items) with its resamples."""

    counts: np.ndarray
    point: dict[str, np.ndarray]
    boot: dict[str, np.ndarray]
    jack: dict[str, np.ndarray] | None
    null: bool

    def n_eff(self, name: str) -> int:
        """Clusters carrying `name`: all of them for ITT and yield, scored ones otherwise."""
        if name.endswith("_itt") or name == "yield":
            return int(self.counts.shape[0])
        return int(np.sum(self.counts[:, _columns(_k_of(self.counts))["n_s"]] > 0))


def _side(counts: np.ndarray, w: np.ndarray, method: str, null: bool) -> _Side:
    jack = _jackknife(counts) if method == "bca" else None
    return _Side(counts, _stats(counts.sum(axis=0)), _stats(w @ counts), jack, null)


@dataclass(frozen=True)
class _Opts:
    n_boot: int
    ci: float
    method: str
    seed: int
    min_clusters: int


def _scalar_iv(side: _Side, name: str, o: _Opts) -> Interval:
    est = float(side.point[name])
    n_eff = side.n_eff(name)
    if side.null and name.startswith("accuracy"):
        return Interval(est, math.nan, math.nan, n_eff, 0, True, FIXED_TEXT)
    jack = None if side.jack is None else side.jack[name]
    lo, hi = _interval(side.boot[name], side.point[name], jack, o.ci, o.method)
    n_empty = int(np.isnan(side.boot[name]).sum())
    flag = _flag(est, n_eff, n_empty, o.n_boot, o.min_clusters)
    return Interval(est, float(lo), float(hi), n_eff, n_empty, False, flag)


def _vector_iv(side: _Side, name: str, o: _Opts) -> list[Interval]:
    jack = None if side.jack is None else side.jack[name]
    lo, hi = _interval(side.boot[name], side.point[name], jack, o.ci, o.method)
    n_eff = side.n_eff(name)
    out = []
    for i, est in enumerate(side.point[name]):
        n_empty = int(np.isnan(side.boot[name][:, i]).sum())
        flag = _flag(float(est), n_eff, n_empty, o.n_boot, o.min_clusters)
        out.append(Interval(float(est), float(lo[i]), float(hi[i]), n_eff, n_empty, False, flag))
    return out


# --------------------------------------------------------------------------- cells


def _cell_seed(seed: int, cell: Cell) -> int:
    return derive_seed("charshift.stats.cell", seed, cell.base, cell.stage, cell.slice)


def _cell_metrics(data: _CellData, labels: Sequence[str], o: _Opts) -> CellMetrics:
    k = len(labels)
    rng = np.random.default_rng(_cell_seed(o.seed, data.cell))
    side = _side(data.counts, _draw(rng, o.n_boot, len(data.clusters)), o.method, data.null)
    col = _columns(k)
    tot = data.counts.sum(axis=0)
    f1, f1_itt = _vector_iv(side, "f1", o), _vector_iv(side, "f1_itt", o)
    tp, pred = tot[col["tp"]], tot[col["pred"]]
    true_s, true_a = tot[col["true_s"]], tot[col["true_a"]]
    precision, recall = _safe_div(tp, pred, 0.0), _safe_div(tp, true_s, 0.0)
    recall_itt = _safe_div(tp, true_a, 0.0)
    per = [
        PersonaMetrics(
            persona=pname,
            n=int(true_a[i]),
            n_scored=int(true_s[i]),
            yield_=float(true_s[i] / true_a[i]) if true_a[i] else float("nan"),
            precision=float(precision[i]),
            recall=float(recall[i]),
            f1=f1[i],
            f1_itt=f1_itt[i],
            recall_itt=float(recall_itt[i]),
        )
        for i, pname in enumerate(labels)
    ]
    return CellMetrics(
        cell=data.cell,
        n_rows=data.n_outputs,
        n_scored=data.n_outputs_scored,
        n_clusters=len(data.clusters),
        yield_=_scalar_iv(side, "yield", o),
        macro_f1=_scalar_iv(side, "macro_f1", o),
        accuracy=_scalar_iv(side, "accuracy", o),
        macro_f1_itt=_scalar_iv(side, "macro_f1_itt", o),
        accuracy_itt=_scalar_iv(side, "accuracy_itt", o),
        n_personas_scored=int(side.point["n_personas_scored"]),
        n_personas=k,
        per_persona=per,
        confusion=data.confusion,
        confusion_rows=[NULL_ROW] if data.null else list(labels),
        confusion_cols=list(labels) + [OTHER, NONE],
        pred_distribution=_distribution(data.pred_counter, labels),
        n_none=data.n_outputs - data.n_outputs_scored,
        mean_p_true=float(np.mean(data.p_true)) if data.p_true else None,
        null=data.null,
    )


def _distribution(counter: Counter, labels: Sequence[str]) -> dict[str, int]:
    """Label-set personas first (in order), then other labels by count."""
    dist = {p: counter[p] for p in labels if counter[p]}
    for lab, n in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        if lab not in dist:
            dist[lab] = n
    return dist


# --------------------------------------------------------------------------- differences


def _stat_name(metric: str, itt: bool) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    return f"{metric}_itt" if itt else metric


class _DiffIv(NamedTuple):
    estimate: float
    lo: float
    hi: float
    n_empty: int
    fixed: bool
    flag: str


def _diff_iv(sa: _Side, sb: _Side, name: str, paired: bool, o: _Opts) -> _DiffIv:
    """a - b for statistic `name`: paired sides share one draw (same clusters, same weights)."""
    est = float(sa.point[name] - sb.point[name])
    if name.startswith("accuracy") and sa.null and sb.null:
        return _DiffIv(est, math.nan, math.nan, 0, True, FIXED_TEXT)
    diff = sa.boot[name] - sb.boot[name]
    jack = None
    if o.method == "bca" and sa.jack is not None and sb.jack is not None:
        if paired:
            jack = sa.jack[name] - sb.jack[name]
        else:
            jack = np.concatenate(
                [sa.jack[name] - sb.point[name], sa.point[name] - sb.jack[name]], axis=0
            )
    lo, hi = _interval(diff, np.asarray(est), jack, o.ci, o.method)
    n_empty = int(np.isnan(diff).sum())
    n_eff = min(sa.n_eff(name), sb.n_eff(name))
    flag = _flag(est, n_eff, n_empty, o.n_boot, o.min_clusters)
    return _DiffIv(est, float(lo), float(hi), n_empty, False, flag)


def _pair_sides(
    da: _CellData, db: _CellData, o: _Opts, paired: bool | None
) -> tuple[_Side, _Side, int, bool, str]:
    """Both cells' sides for a difference: on the shared items with one draw (paired), or each on
    its own items with its own draw (unpaired). `paired=None`: paired when items are shared."""
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
        w = _draw(rng, o.n_boot, len(shared))
        sa, sb = (
            _side(da.counts[ia], w, o.method, da.null),
            _side(db.counts[ib], w, o.method, db.null),
        )
        note = "paired on shared item ids"
        if len(shared) < max(len(da.clusters), len(db.clusters)):
            note += (
                f" ({len(shared)} of {len(da.clusters)} / {len(db.clusters)} items; "
                "estimate on the shared items only)"
            )
        return sa, sb, len(shared), True, note
    wa = _draw(rng, o.n_boot, len(da.clusters))
    wb = _draw(rng, o.n_boot, len(db.clusters))
    sa, sb = _side(da.counts, wa, o.method, da.null), _side(db.counts, wb, o.method, db.null)
    note = "unpaired: cells bootstrapped independently"
    return sa, sb, len(da.clusters) + len(db.clusters), False, note


def _diff_rows(
    kind: str,
    da: _CellData,
    db: _CellData,
    o: _Opts,
    *,
    metrics: Sequence[str] = METRICS,
    paired: bool | None = None,
    changes: str = "",
) -> list[Difference]:
    sa, sb, n_used, was_paired, note = _pair_sides(da, db, o, paired)
    rows = []
    for metric in metrics:
        for itt in (False, True):
            d = _diff_iv(sa, sb, _stat_name(metric, itt), was_paired, o)
            rows.append(
                Difference(
                    kind,
                    da.cell,
                    db.cell,
                    metric,
                    itt,
                    d.estimate,
                    d.lo,
                    d.hi,
                    n_used,
                    was_paired,
                    note,
                    changes,
                    "",
                    d.n_empty,
                    d.fixed,
                    d.flag,
                )  # fmt: skip
            )
    return rows


# --------------------------------------------------------------------------- chains


def item_kind(unit: str, item_ids: Iterable[str]) -> str:
    """The kind of a unit's items: their common `kind:` prefix, else the slice's item kind in
    the registry (`charshift.slices`), "scenario" for a slice it does not know."""
    prefixes = {i.partition(":")[0] if ":" in i else None for i in map(str, item_ids)}
    if len(prefixes) == 1 and None not in prefixes:
        return str(next(iter(prefixes)))
    entry = slices.SLICES.get(split_unit(unit)[0])
    return entry.items if entry else "scenario"


@dataclass
class _ChainFit:
    units: list[str]
    kinds: dict[str, str]
    common: dict[str, np.ndarray]  # kind -> common item ids
    weights: dict[str, np.ndarray]  # kind -> the one (n_boot, n_common) draw
    sides: dict[str, _Side]
    dropped: dict[str, int]
    missing: list[str]


def _chain_fit(
    cells: dict[Cell, _CellData], base: str, stage: str, chain: Chain, o: _Opts
) -> _ChainFit | None:
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
    weights = {
        kind: _draw(
            np.random.default_rng(
                derive_seed("charshift.stats.chain", o.seed, base, stage, chain.name, kind)
            ),
            o.n_boot,
            len(ids),
        )
        for kind, ids in common.items()
    }
    sides = {}
    for u, d in data.items():
        pos = np.searchsorted(d.clusters, common[kinds[u]])
        sides[u] = _side(d.counts[pos], weights[kinds[u]], o.method, d.null)
    dropped = {u: len(d.clusters) - len(common[kinds[u]]) for u, d in data.items()}
    missing = [u for u in chain.units if u not in data]
    return _ChainFit(present, kinds, common, weights, sides, dropped, missing)


def _rung_changes(chain: Chain, frm: str, to: str) -> str:
    """The `changes` of the chain rungs from `frm` to `to` (several when a unit is missing)."""
    units = chain.units
    spanned = chain.rungs[units.index(frm) : units.index(to)]
    if len(spanned) == 1:
        return spanned[0].changes
    return f"BUNDLE of {len(spanned)} changes (a unit between is missing): " + "; ".join(
        r.changes for r in spanned
    )


def _chain_diff(
    fit: _ChainFit, frm: str, to: str, name: str, o: _Opts
) -> tuple[_DiffIv, int, bool, str]:
    ka, kb = fit.kinds[frm], fit.kinds[to]
    paired = ka == kb
    d = _diff_iv(fit.sides[frm], fit.sides[to], name, paired, o)
    if paired:
        return d, len(fit.common[ka]), True, f"paired on the chain's common {ka} items"
    n = len(fit.common[ka]) + len(fit.common[kb])
    return d, n, False, f"unpaired: {ka} items vs {kb} items, bootstrapped independently"


def _chain_difference(
    fit: _ChainFit, kind: str, cells: tuple[Cell, Cell], metric: str, itt: bool, o: _Opts, *,
    changes: str, chain: str,
) -> Difference:  # fmt: skip
    a, b = cells
    d, n, paired, note = _chain_diff(fit, a.slice, b.slice, _stat_name(metric, itt), o)
    return Difference(
        kind, a, b, metric, itt, d.estimate, d.lo, d.hi, n, paired, note, changes, chain,
        d.n_empty, d.fixed, d.flag,
    )  # fmt: skip


def _chain_results(
    cells: dict[Cell, _CellData], base: str, stage: str, chain: Chain, o: _Opts
) -> list[ChainDecomposition]:
    fit = _chain_fit(cells, base, stage, chain, o)
    if fit is None:
        return []
    out = []
    units = [Cell(base, stage, u) for u in fit.units]
    for metric in METRICS:
        for itt in (False, True):
            rungs = [
                _chain_difference(
                    fit,
                    "rung",
                    (a, b),
                    metric,
                    itt,
                    o,
                    changes=_rung_changes(chain, a.slice, b.slice),
                    chain=chain.name,
                )  # fmt: skip
                for a, b in zip(units[:-1], units[1:], strict=True)
            ]
            total = _chain_difference(
                fit, "total", (units[0], units[-1]), metric, itt, o,
                changes=f"all of: {chain.title}", chain=chain.name,
            )  # fmt: skip
            name = _stat_name(metric, itt)
            out.append(
                ChainDecomposition(
                    base,
                    stage,
                    chain.name,
                    chain.title,
                    metric,
                    itt,
                    list(fit.units),
                    dict(fit.kinds),
                    [_scalar_iv(fit.sides[u], name, o) for u in fit.units],
                    rungs,
                    total,
                    {kd: len(ids) for kd, ids in fit.common.items()},
                    dict(fit.dropped),
                    list(fit.missing),
                )  # fmt: skip
            )
    return out


def _contrast_rows(
    cells: dict[Cell, _CellData], base: str, stage: str, contrast: Rung, o: _Opts
) -> list[Difference]:
    ca, cb = Cell(base, stage, contrast.frm), Cell(base, stage, contrast.to)
    if ca not in cells or cb not in cells:
        return []
    return _diff_rows("contrast", cells[ca], cells[cb], o, changes=contrast.changes)


def _stage_rows(cells: dict[Cell, _CellData], base: str, unit: str, o: _Opts) -> list[Difference]:
    present = order_stages(st for (b, st, u) in cells if b == base and u == unit)
    pairs = list(zip(present[1:], present[:-1], strict=True))
    if BASE_STAGE in present:
        pairs += [(st, BASE_STAGE) for st in present[2:]]
    rows = []
    for later, earlier in pairs:
        da, db = cells[Cell(base, later, unit)], cells[Cell(base, earlier, unit)]
        if len(np.intersect1d(da.clusters, db.clusters)) == 0:
            continue
        rows += _diff_rows("stage", da, db, o, changes=f"stage {earlier} -> {later}")
    return rows


# --------------------------------------------------------------------------- public entry points


@dataclass
class _Prepared:
    personas: list[str]
    labels: dict[str, list[str]]
    notes: list[LabelNote]
    cells: dict[Cell, _CellData]


def _prepare(records: Sequence[PredictionRecord], personas: Sequence[str] | None) -> _Prepared:
    recs = list(records)
    ps = list(personas) if personas is not None else infer_personas(recs)
    if len(ps) < 2:
        raise ValueError(f"need at least two personas, got {ps}")
    groups = _group(recs, ps)
    labels, notes = _label_sets(groups, ps)
    return _Prepared(ps, labels, notes, _build_cells(groups, labels))


def _opts(n_boot: int, ci: float, method: str, seed: int, min_clusters: int) -> _Opts:
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    if not 0 < ci < 1:
        raise ValueError("ci must be in (0, 1)")
    if method not in ("percentile", "bca"):
        raise ValueError(f"unknown interval method {method!r}; use 'percentile' or 'bca'")
    if min_clusters < 1:
        raise ValueError("min_clusters must be at least 1")
    return _Opts(n_boot, ci, method, seed, min_clusters)


def _get(cells: dict[Cell, _CellData], cell: Sequence[str]) -> _CellData:
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
) -> Difference:
    """metric(cell_a) - metric(cell_b), resampling the shared item ids with one draw for both.

    Cells are (base, stage, unit). Both the estimate and the interval use only the items the
    cells share. `paired=False` gives the independent two-sample bootstrap instead (for cells
    with no common items).
    """
    name = _stat_name(metric, itt)
    o = _opts(n_boot, ci, method, seed, min_clusters)
    prep = _prepare(records, personas)
    da, db = _get(prep.cells, cell_a), _get(prep.cells, cell_b)
    sa, sb, n_used, was_paired, note = _pair_sides(da, db, o, paired)
    d = _diff_iv(sa, sb, name, was_paired, o)
    return Difference(
        "pair", da.cell, db.cell, metric, itt, d.estimate, d.lo, d.hi, n_used, was_paired,
        note, "", "", d.n_empty, d.fixed, d.flag,
    )  # fmt: skip


def _chain_by_name(chain: Chain | str) -> Chain:
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
) -> ChainDecomposition | None:
    """One chain's additive decomposition for one (base, stage) (see the module docstring);
    the same figures `compute_metrics` gives. None when fewer than two of its units are here."""
    _stat_name(metric, itt)
    o = _opts(n_boot, ci, method, seed, min_clusters)
    prep = _prepare(records, personas)
    found = _chain_results(prep.cells, base, stage, _chain_by_name(chain), o)
    return next((d for d in found if d.metric == metric and d.itt == itt), None)


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
    prep = _prepare(records, personas)
    data = _get(prep.cells, cell)
    rng = np.random.default_rng(_cell_seed(seed, data.cell))
    w = _draw(rng, n_boot, len(data.clusters))
    return BootstrapDraws(
        data.cell, data.clusters, w, _stats(w @ data.counts), _stats(data.counts.sum(0))
    )


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
    o = _opts(n_boot, 0.95, "percentile", seed, MIN_CLUSTERS)
    prep = _prepare(records, personas)
    fit = _chain_fit(prep.cells, base, stage, _chain_by_name(chain), o)
    if fit is None:
        return None
    return ChainDraws(
        fit.units,
        fit.kinds,
        fit.common,
        fit.weights,
        {u: s.boot for u, s in fit.sides.items()},
        {u: s.point for u, s in fit.sides.items()},
    )


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
) -> MetricsResult:
    """Metrics with intervals for every (base, stage, unit) cell, plus differences.

    Pass base outputs unexpanded (persona NULL_PERSONA): each is paired with every persona of
    its base's label set for F1 and counted once otherwise. With `differences=True` the result
    also holds, per (base, stage), every chain's decomposition (`chains`; rungs and totals also
    in `differences`) and the contrasts, and per (base, unit) the stage differences: each later
    stage minus the one before it and minus the base stage, paired on the shared items.
    """
    o = _opts(n_boot, ci, method, seed, min_clusters)
    prep = _prepare(records, personas)
    data = prep.cells
    bases = list(dict.fromkeys(c.base for c in data))
    stages = order_stages(c.stage for c in data)
    units = order_slices(c.slice for c in data)
    order = [Cell(b, st, u) for b in bases for st in stages for u in units if (b, st, u) in data]
    cells = {c: _cell_metrics(data[c], prep.labels[c.base], o) for c in order}
    result = MetricsResult(
        prep.personas, prep.labels, prep.notes, cells, n_boot, ci, method, seed, min_clusters
    )
    if not differences:
        return result
    for b in bases:
        for st in stages:
            for chain in chains:
                for dec in _chain_results(data, b, st, chain, o):
                    result.chains.append(dec)
                    result.differences += [*dec.rungs, dec.total]
            for contrast in contrasts:
                result.differences += _contrast_rows(data, b, st, contrast, o)
    for b in bases:
        for u in units:
            result.differences += _stage_rows(data, b, u, o)
    return result
