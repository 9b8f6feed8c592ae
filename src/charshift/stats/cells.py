"""One cell's figures: raw and chance-corrected, with intervals, per persona, and the permutation
p-value of its excess over its own null (pure)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from charshift.schema import derive_seed
from charshift.stats.counts import CellData, columns, safe_div
from charshift.stats.intervals import Opts, Side, draw, scalar_iv, side, vector_iv
from charshift.stats.nulls import EXCESS_NAMES, null_floor, null_test
from charshift.stats.results import NONE, NULL_ROW, OTHER, Cell, CellMetrics, PersonaMetrics

# every statistic a cell reports with an interval (the CellMetrics field is the name, "yield_"
# for "yield")
CELL_STATS = (
    "yield", "macro_f1", "accuracy", "macro_f1_itt", "accuracy_itt", "macro_f1_null",
    "macro_f1_excess", "macro_f1_null_itt", "macro_f1_excess_itt", "kappa", "kappa_itt",
)  # fmt: skip


def cell_seed(seed: int, cell: Cell) -> int:
    return derive_seed("charshift.stats.cell", seed, cell.base, cell.stage, cell.slice)


def cell_side(data: CellData, o: Opts) -> Side:
    """The cell's counts with its own bootstrap draw (seeded from the cell's name)."""
    rng = np.random.default_rng(cell_seed(o.seed, data.cell))
    return side(data.counts, draw(rng, o.n_boot, len(data.clusters)), o.method, data.null)


def _per_persona(data: CellData, s: Side, labels: Sequence[str], o: Opts) -> list[PersonaMetrics]:
    col = columns(len(labels))
    tot = data.counts.sum(axis=0)
    f1, f1_itt = vector_iv(s, "f1", o), vector_iv(s, "f1_itt", o)
    tp, pred = tot[col["tp"]], tot[col["pred"]]
    true_s, true_a = tot[col["true_s"]], tot[col["true_a"]]
    precision, recall = safe_div(tp, pred, 0.0), safe_div(tp, true_s, 0.0)
    recall_itt = safe_div(tp, true_a, 0.0)
    null = s.point["f1_null"]
    return [
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
            f1_null=float(null[i]) if true_s[i] else float("nan"),
        )
        for i, pname in enumerate(labels)
    ]


def cell_metrics(data: CellData, labels: Sequence[str], o: Opts) -> CellMetrics:
    """The cell's figures; its excess intervals are floored by its permutation null
    (`nulls.null_floor`), whose draws it keeps on `data` for the primary family."""
    s = cell_side(data, o)
    ivs = {name.replace("yield", "yield_"): scalar_iv(s, name, o) for name in CELL_STATS}
    test = null_test(data, o.n_perm, o.seed)
    data.null_draws = test.draws
    for name in EXCESS_NAMES:
        ivs[name] = null_floor(ivs[name], test.draws.get(name), o.ci)
    p_null, p_null_itt = test.p, test.p_itt
    return CellMetrics(
        cell=data.cell,
        n_rows=data.n_outputs,
        n_scored=data.n_outputs_scored,
        n_clusters=len(data.clusters),
        n_personas_scored=int(s.point["n_personas_scored"]),
        n_personas=len(labels),
        per_persona=_per_persona(data, s, labels, o),
        confusion=data.confusion,
        confusion_rows=[NULL_ROW] if data.null else list(labels),
        confusion_cols=list(labels) + [OTHER, NONE],
        pred_distribution=distribution(data.pred_counter, labels),
        n_none=data.n_outputs - data.n_outputs_scored,
        mean_p_true=float(np.mean(data.p_true)) if data.p_true else None,
        null=data.null,
        p_null=p_null,
        p_null_itt=p_null_itt,
        n_perm=0 if data.null else o.n_perm,
        n_personas_attempted=int(s.point["n_personas_attempted"]),
        n_failed=data.n_failed,
        **ivs,
    )


def distribution(counter: Counter, labels: Sequence[str]) -> dict[str, int]:
    """Label-set personas first (in order), then other labels by count."""
    dist = {p: counter[p] for p in labels if counter[p]}
    for lab, n in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        if lab not in dist:
            dist[lab] = n
    return dist
