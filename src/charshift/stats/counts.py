"""Records -> per-cluster counts, and every statistic as a function of summed counts (pure).

A cell is reduced to one row of counts per cluster (item); a bootstrap resample, a jackknife
leave-one-out or the point estimate is a weighted sum of those rows, and `statistics` turns any
such sum (any leading shape) into every figure at once. Persona-averaged figures (macro-F1, its
null and its excess) are averaged over a persona mask by `macro_joint`, so a difference or a
chain can average every side over the same personas.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from charshift.schema import (
    BASE_STAGE,
    FAILED_OUTCOMES,
    NULL_PERSONA_MARKERS,
    PredictionRecord,
)
from charshift.stats.results import Cell, LabelNote, order_stages

# Persona-averaged statistics: name -> (per-persona value, subtracted value or None, mask).
# Conditional ones average over the personas with a scored output ("scored"), ITT ones over the
# personas with a row ("attempted").
MACRO: dict[str, tuple[str, str | None, str]] = {
    "macro_f1": ("f1", None, "scored"),
    "macro_f1_null": ("f1_null", None, "scored"),
    "macro_f1_excess": ("f1", "f1_null", "scored"),
    "macro_f1_itt": ("f1_itt", None, "attempted"),
    "macro_f1_null_itt": ("f1_null_itt", None, "attempted"),
    "macro_f1_excess_itt": ("f1_itt", "f1_null_itt", "attempted"),
}


# --------------------------------------------------------------------------- grouping, labels


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
        if r.persona in NULL_PERSONA_MARKERS:
            out.extend(dataclasses.replace(r, persona=p) for p in personas)
        else:
            out.append(r)
    return out


def group(
    records: Iterable[PredictionRecord], personas: Sequence[str]
) -> dict[Cell, list[PredictionRecord]]:
    """Rows per cell, every true persona checked against the run's personas."""
    groups: dict[tuple[str, str, str], list[PredictionRecord]] = {}
    for r in records:
        groups.setdefault((r.base, r.stage, r.slice), []).append(r)
    allowed = {*personas, *NULL_PERSONA_MARKERS}
    for rows in groups.values():
        if not {r.persona for r in rows} <= allowed:
            bad = next(r for r in rows if r.persona not in allowed)
            raise ValueError(
                f"record {bad.key or bad.item_id} ({bad.base}/{bad.stage}/{bad.slice}) has true "
                f"persona {bad.persona!r}, not one of the run's personas {list(personas)}"
            )
    return {Cell(*key): rows for key, rows in groups.items()}


def _stage_rows(groups: dict[Cell, list[PredictionRecord]]) -> tuple[Counter, dict[str, set]]:
    rows: Counter[tuple[str, str, str]] = Counter()
    stages: dict[str, set[str]] = {}
    for cell, recs in groups.items():
        stages.setdefault(cell.base, set())
        if cell.stage == BASE_STAGE:
            continue
        counts = Counter(r.persona for r in recs if r.persona not in NULL_PERSONA_MARKERS)
        if counts:
            stages[cell.base].add(cell.stage)
        for p, n in counts.items():
            rows[(cell.base, cell.stage, p)] += n
    return rows, stages


def make_label_sets(
    groups: dict[Cell, list[PredictionRecord]], personas: Sequence[str]
) -> tuple[dict[str, list[str]], list[LabelNote]]:
    """Each base's label set and a note per persona that left it (see the package docstring)."""
    rows, stages = _stage_rows(groups)
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


def label_sets(
    records: Sequence[PredictionRecord], personas: Sequence[str]
) -> tuple[dict[str, list[str]], list[LabelNote]]:
    """Each base's label set and a note per persona that left it (see the package docstring)."""
    return make_label_sets(group(records, personas), personas)


# --------------------------------------------------------------------------- per-cell counts


@dataclass
class CellData:
    """One cell reduced to per-cluster counts: everything a bootstrap resample needs.

    `counts` columns (K personas of the base's label set): tp[K] | predicted[K] (scored rows) |
    true among scored[K] | true among all[K] | correct | n_scored | n_all. A base-null output
    appears there once per persona; the output-level fields count it once. `rows`: the rows'
    (cluster, true, predicted) indices (predicted K = other, K + 1 = none), for the
    permutation null; None for a base-null cell.
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
    rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    n_failed: int = 0
    # the permutation null's excess values (name -> (n_perm,)), once the cell's test has run
    null_draws: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def columns(k: int) -> dict[str, slice | int]:
    return {
        "tp": slice(0, k),
        "pred": slice(k, 2 * k),
        "true_s": slice(2 * k, 3 * k),
        "true_a": slice(3 * k, 4 * k),
        "correct": 4 * k,
        "n_s": 4 * k + 1,
        "n_a": 4 * k + 2,
    }


def k_of(counts: np.ndarray) -> int:
    return (counts.shape[-1] - 3) // 4


def build_cells(
    groups: dict[Cell, list[PredictionRecord]], labels: dict[str, list[str]]
) -> tuple[dict[Cell, CellData], list[Cell]]:
    """Every cell's counts, and the cells whose every row failed in the backend. Rows of a
    persona outside its base's label set are set aside; backend failures are counted apart."""
    out, failed_only = {}, []
    for cell, rows in groups.items():
        keep = {*labels[cell.base], *NULL_PERSONA_MARKERS}
        if not {r.persona for r in rows} <= keep:
            rows = [r for r in rows if r.persona in keep]
        ok = [r for r in rows if r.outcome not in FAILED_OUTCOMES]
        if ok:
            index = {p: i for i, p in enumerate(labels[cell.base])}
            out[cell] = cell_data(cell, ok, index, n_failed=len(rows) - len(ok))
        elif rows:
            failed_only.append(cell)
    return out, failed_only


def cell_data(
    cell: Cell, rows: list[PredictionRecord], index: dict[str, int], n_failed: int = 0
) -> CellData:
    """Encode one cell's rows (true index, predicted index: K = other, K+1 = none) as counts."""
    k = len(index)
    is_null = [r.persona in NULL_PERSONA_MARKERS for r in rows]
    null = all(is_null)
    if any(is_null) and not null:
        raise ValueError(f"cell {cell.label()} mixes null-persona rows with persona rows")
    p_out = np.fromiter(
        (k + 1 if r.prediction is None else index.get(r.prediction, k) for r in rows),
        dtype=np.int64,
        count=len(rows),
    )
    clusters, cid_out = np.unique(np.array([str(r.item_id) for r in rows]), return_inverse=True)
    encoded = None
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
        encoded = (cid, t, p)
    counts = encode_counts(t, p, cid, len(clusters), k)
    pred_counter = Counter(r.prediction for r in rows if r.prediction is not None)
    n_scored = int(np.sum(p_out <= k))
    return CellData(
        cell, clusters, counts, null, len(rows), n_scored, confusion, pred_counter, p_true,
        encoded, n_failed,
    )  # fmt: skip


def encode_counts(t: np.ndarray, p: np.ndarray, cid: np.ndarray, n_c: int, k: int) -> np.ndarray:
    """(n_clusters, 4K + 3) counts of rows with true `t`, predicted `p`, in cluster `cid`."""
    scored = p <= k
    hit = p == t
    counts = np.zeros((n_c, 4 * k + 3), dtype=np.float64)
    col = columns(k)
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


# --------------------------------------------------------------------------- statistics


def safe_div(num: Any, den: Any, empty: float) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    out = np.full(num.shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _kappa(correct: np.ndarray, n: np.ndarray, true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Cohen's kappa: (accuracy - p_e) / (1 - p_e), p_e = sum_j true_j pred_j / n^2 (a
    prediction outside the label set or missing agrees with no true label)."""
    acc = safe_div(correct, n, np.nan)
    pe = safe_div((true * pred).sum(axis=-1), n * n, np.nan)
    return safe_div(acc - pe, 1.0 - pe, np.nan)


def statistics(totals: np.ndarray) -> dict[str, np.ndarray]:
    """Every statistic from summed counts; `totals` is (..., 4K+3), any leading shape.

    Per persona j, with n_j its true rows, m_j the rows predicted j and N all rows (conditional:
    scored rows only; ITT: every row): F1_j = 2 tp_j / (n_j + m_j), and the F1 expected when
    predictions are independent of the true persona, F1null_j = 2 n_j m_j / (N (n_j + m_j))
    (tp_j replaced by its expectation n_j m_j / N). Persona-averaged figures: `MACRO`.
    """
    col = columns(k_of(totals))
    tp, pred = totals[..., col["tp"]], totals[..., col["pred"]]
    true_s, true_a = totals[..., col["true_s"]], totals[..., col["true_a"]]
    correct, n_s, n_a = (totals[..., col[c]] for c in ("correct", "n_s", "n_a"))
    st = {
        "scored": true_s > 0,
        "attempted": true_a > 0,
        "f1_null": safe_div(2 * true_s * pred, n_s[..., None] * (true_s + pred), 0.0),
        "f1_null_itt": safe_div(2 * true_a * pred, n_a[..., None] * (true_a + pred), 0.0),
        "accuracy": safe_div(correct, n_s, np.nan),
        "accuracy_itt": safe_div(correct, n_a, np.nan),
        "kappa": _kappa(correct, n_s, true_s, pred),
        "kappa_itt": _kappa(correct, n_a, true_a, pred),
        "yield": safe_div(n_s, n_a, np.nan),
    }
    st["f1"] = np.where(st["scored"], safe_div(2 * tp, pred + true_s, 0.0), np.nan)
    st["f1_itt"] = np.where(st["attempted"], safe_div(2 * tp, pred + true_a, 0.0), np.nan)
    st["n_personas_scored"] = st["scored"].sum(axis=-1).astype(np.float64)
    st["n_personas_attempted"] = st["attempted"].sum(axis=-1).astype(np.float64)
    for name in MACRO:
        st[name] = macro_joint([st], name)[0]
    return st


def persona_values(st: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The per-persona values behind the persona-averaged statistic `name`."""
    value, minus, _ = MACRO[name]
    v = np.nan_to_num(st[value], nan=0.0)
    return v - st[minus] if minus else v


def joint_mask(sts: Sequence[dict[str, np.ndarray]], name: str) -> np.ndarray:
    """The personas defined on every side (per resample when the sides are resamples)."""
    key = MACRO[name][2]
    return functools.reduce(np.logical_and, [st[key] for st in sts])


def macro_joint(sts: Sequence[dict[str, np.ndarray]], name: str) -> list[np.ndarray]:
    """`name` on every side, persona-averaged statistics over the personas defined on every
    side (the same set for all); any other statistic as it is."""
    if name not in MACRO:
        return [st[name] for st in sts]
    mask = joint_mask(sts, name)
    den = mask.sum(axis=-1)
    return [safe_div(np.where(mask, persona_values(st, name), 0.0).sum(axis=-1), den, np.nan)
            for st in sts]  # fmt: skip


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
    data = cell_data(Cell("-", "-", "-"), rows, index)
    st = statistics(data.counts.sum(axis=0))
    return {
        "macro_f1": float(st["macro_f1"]),
        "accuracy": float(st["accuracy"]),
        "per_label_f1": {
            n: None if math.isnan(v) else float(v) for n, v in zip(labels, st["f1"], strict=True)
        },
        "confusion": data.confusion[:, : len(labels)].tolist(),
    }
