"""Do the scorers agree? Agreement between the readings of a run's scorers (pure).

This module owns two definitions; tables, the report and the headline read them from here.

**Reading agreement**, per (base, unit), between two scorers' readings of the same rows:

* Rows: the persona rows only (every stage but the base stage, whose rows have no true persona:
  the trained stages and the positive control, pooled; `stages` names them), one per (stage,
  persona, item, sample). A row counts only where both scorers gave a reading; every other row
  that either scorer holds in that unit (no output, an unparseable judge answer, a unit one
  scorer has not scored yet) is left out and counted (`n_left_out`, and per scorer `missing_a`,
  `missing_b`), never dropped silently. A unit that only one of the two scores (the judge's
  behaviour unit) is not compared.
* Readings (`MEASURES`): a label scorer's correctness (its verdict is the row's persona: 1,
  else 0; "none" or another persona: 0); the classifier's p(true) (its probability of the row's
  persona); the Likert judge's score for the row's persona (the median of its samples); the
  persona-vector readings' projections on the row's persona's direction (text: the scored text
  through the base model; state: the generating model while it wrote the row).
* Statistics (`COMPARISONS`): Cohen's kappa between the classifier's and the identify judge's
  correctness, (p_o - p_e) / (1 - p_e) with p_e = p_a p_b + (1 - p_a)(1 - p_b); Spearman's rank
  correlation (Pearson's correlation of mid-ranks) between the classifier's p(true), the Likert
  score and the text projection, and of the state projection with the classifier's p(true) and
  the text projection. Both are undefined, an empty cell and never 0, where either
  reading is constant over the paired rows (a constant scorer carries no information to agree
  with) or nothing is paired.
* Intervals: the cluster bootstrap of `stats.intervals` with the item id as the cluster (every
  row of an item drawn together), seeded from the stats seed, the base, the unit and the pair. A
  resample is a weighted sample (each row weighted by how often its item was drawn), and its
  kappa and Spearman are exactly those of the sample with the rows repeated. A resample where
  the figure is undefined (a reading constant in it) is left out and counted. Fewer than
  `MIN_INTERVAL_CLUSTERS` items: no interval; fewer than `min_clusters`: flagged.

**Sign agreement**, per rung: for each pair of scorers with their own statistics (the classifier
and the label-giving scorers, `analysis.LABEL_SCORERS`, in conditional macro-F1 excess over each
scorer's own null; the Likert judge in its excess over the base stage, in Likert points,
`stats.likert`), each chain rung, chain total and contrast of every persona stage (positive =
persona lost; each scorer in its own unit, so only signs are compared). Each scorer's verdict on the difference: "loss" (interval above 0),
"gain" (below 0), "contains 0", "no interval" (undefined, or fewer than two items), "blind" (the
scorer cannot see persona in a unit of the rung, so its difference is not evidence) or "absent"
(the scorer has no such difference). The pair:

* `agree`: both find a loss, or both a gain;
* `disagree`: one finds a loss and the other a gain (both intervals exclude 0, opposite signs);
* `inconclusive`: anything else (at least one interval contains 0 or there is none). Where one
  scorer finds a change and the other's interval contains 0, `one_sided` says which found it:
  not a disagreement, since an interval containing 0 does not show there is no change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from charshift.schema import BASE_STAGE, NULL_PERSONA_MARKERS, PredictionRecord, derive_seed
from charshift.stats.intervals import Opts, draw, flag, interval
from charshift.stats.likert import LIKERT_EXCESS
from charshift.stats.results import (
    MIN_INTERVAL_CLUSTERS,
    Difference,
    Interval,
    MetricsResult,
    order_slices,
    order_stages,
)

KAPPA = "kappa"
SPEARMAN = "spearman"
EXCESS = "macro_f1_excess"
LIKERT_SCORER = "judge_likert"
SIGN_METRICS = (EXCESS, LIKERT_EXCESS)  # each scorer's own chance-corrected excess
SIGN_KINDS = ("rung", "total", "contrast")  # differences whose positive value is persona lost
AGREE, DISAGREE, INCONCLUSIVE = "agree", "disagree", "inconclusive"
LOSS, GAIN = "loss", "gain"
_BLOCK = 2_000_000  # resample weights held at once (resamples x rows)

RowId = tuple[str, str, str, int]  # (stage, persona, item id, sample index)


def correct(rec: PredictionRecord) -> float | None:
    """1 where the verdict is the row's persona, 0 where it is anything else; None: no verdict."""
    return None if rec.prediction is None else float(rec.prediction == rec.persona)


def p_true(rec: PredictionRecord) -> float | None:
    """The scorer's probability of the row's persona; None where it gave none."""
    v = (rec.probs or {}).get(rec.persona) if rec.prediction is not None else None
    return float(v) if v is not None and math.isfinite(v) else None


def own_score(rec: PredictionRecord) -> float | None:
    """The number the scorer gave for the row's persona (a Likert median, a projection)."""
    v = (rec.scores or {}).get(rec.persona)
    v = rec.judge_score if v is None else v
    return float(v) if v is not None and math.isfinite(v) else None


@dataclass(frozen=True)
class Measure:
    scorer: str
    reading: str
    read: Callable[[PredictionRecord], float | None]


MEASURES = {
    (m.scorer, m.reading): m
    for m in (
        Measure("classifier", "correct", correct),
        Measure("classifier", "p_true", p_true),
        Measure("judge_identify", "correct", correct),
        Measure("judge_likert", "score", own_score),
        Measure("persona_vector_text", "projection", own_score),
        Measure("persona_vector_state", "projection", own_score),
    )
}
COMPARISONS: tuple[tuple[str, tuple[str, str], tuple[str, str]], ...] = (
    (KAPPA, ("classifier", "correct"), ("judge_identify", "correct")),
    (SPEARMAN, ("classifier", "p_true"), ("judge_likert", "score")),
    (SPEARMAN, ("classifier", "p_true"), ("persona_vector_text", "projection")),
    (SPEARMAN, ("judge_likert", "score"), ("persona_vector_text", "projection")),
    (SPEARMAN, ("classifier", "p_true"), ("persona_vector_state", "projection")),
    (SPEARMAN, ("persona_vector_text", "projection"), ("persona_vector_state", "projection")),
)


@dataclass(frozen=True)
class ReadingAgreement:
    """One statistic between two scorers' readings in one (base, unit); see the module doc."""

    base: str
    unit: str
    statistic: str  # KAPPA or SPEARMAN
    scorer_a: str
    reading_a: str
    scorer_b: str
    reading_b: str
    value: Interval  # estimate NaN: undefined (`flag` says why)
    n_pairs: int  # rows with both readings
    n_left_out: int  # rows of either scorer here without both readings
    missing_a: int  # of those, rows without scorer a's reading
    missing_b: int
    stages: tuple[str, ...]  # the persona stages pooled


@dataclass(frozen=True)
class SignAgreement:
    """Whether two scorers agree on the sign of one rung's loss; see the module doc."""

    base: str
    stage: str
    kind: str  # "rung", "total" or "contrast"
    chain: str
    frm: str
    to: str
    changes: str
    scorer_a: str
    scorer_b: str
    a: Difference | None
    b: Difference | None
    verdict_a: str
    verdict_b: str
    agreement: str  # AGREE, DISAGREE or INCONCLUSIVE

    @property
    def one_sided(self) -> str:
        """The scorer that finds a change the other's interval cannot confirm ("" if none)."""
        if self.agreement != INCONCLUSIVE:
            return ""
        sure = {self.verdict_a, self.verdict_b} & {LOSS, GAIN}
        other = {self.verdict_a, self.verdict_b} - sure
        if len(sure) != 1 or other != {"contains 0"}:
            return ""
        return self.scorer_a if self.verdict_a in sure else self.scorer_b


@dataclass
class Agreement:
    """Everything this module computes for one run: the scorers present (those with a reading
    anywhere) and, where there are two or more, the reading and sign agreement."""

    scorers: list[str]
    readings: list[ReadingAgreement] = field(default_factory=list)
    signs: list[SignAgreement] = field(default_factory=list)

    @property
    def compared(self) -> bool:
        return len(self.scorers) >= 2


# --------------------------------------------------------------------------- the statistics


def weighted_kappa(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Cohen's kappa of two 0/1 readings `a`, `b` (n,) under each row of weights `w` (m, n);
    NaN where either reading is constant (or no weight)."""
    tot = w.sum(axis=1)
    with np.errstate(all="ignore"):
        pa, pb = (w @ a) / tot, (w @ b) / tot
        po = (w @ (a == b).astype(np.float64)) / tot
        pe = pa * pb + (1.0 - pa) * (1.0 - pb)
        k = (po - pe) / (1.0 - pe)
    eps = 1e-12
    constant = (pa <= eps) | (pa >= 1 - eps) | (pb <= eps) | (pb >= 1 - eps) | (tot <= 0)
    return np.where(constant, np.nan, k)


def _midranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each row's mid-rank (m, n) in the sample that repeats row i w[:, i] times."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    group = np.empty(x.size, dtype=np.intp)
    group[order] = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1
    gw = np.add.reduceat(w[:, order], starts, axis=1)
    before = np.cumsum(gw, axis=1) - gw
    return (before + (gw + 1.0) / 2.0)[:, group]


def weighted_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spearman's rho of `x`, `y` (n,) under each row of weights `w` (m, n): the Pearson
    correlation of mid-ranks in the sample with the rows repeated; NaN where either is constant."""
    rx, ry = _midranks(x, w), _midranks(y, w)
    tot = w.sum(axis=1, keepdims=True)
    with np.errstate(all="ignore"):
        dx = rx - (w * rx).sum(axis=1, keepdims=True) / tot
        dy = ry - (w * ry).sum(axis=1, keepdims=True) / tot
        vx, vy = (w * dx * dx).sum(axis=1), (w * dy * dy).sum(axis=1)
        r = (w * dx * dy).sum(axis=1) / np.sqrt(vx * vy)
    tiny = 1e-9 * np.maximum(tot[:, 0], 1.0)
    return np.where((vx <= tiny) | (vy <= tiny), np.nan, np.clip(r, -1.0, 1.0))


STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    KAPPA: weighted_kappa,
    SPEARMAN: weighted_spearman,
}


def _in_blocks(fn: Callable[..., np.ndarray], x: np.ndarray, y: np.ndarray,
               wc: np.ndarray, idx: np.ndarray) -> np.ndarray:  # fmt: skip
    """fn over cluster weights `wc` (m, G) spread to rows by `idx`, a block of rows at a time."""
    step = max(1, _BLOCK // max(1, idx.size))
    parts = [fn(x, y, wc[i : i + step][:, idx]) for i in range(0, wc.shape[0], step)]
    return np.concatenate(parts) if parts else np.zeros(0)


def paired_statistic(
    statistic: str, x: Sequence[float], y: Sequence[float], items: Sequence[str], o: Opts,
    seed: int,
) -> Interval:  # fmt: skip
    """`statistic` of the paired readings `x`, `y` with its cluster-bootstrap interval over
    `items` (one id per row); NaN estimate and a flag saying why where it is undefined."""
    fn = STATISTICS[statistic]
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ids, idx = np.unique(np.asarray(items, dtype=object).astype(str), return_inverse=True)
    g = int(ids.size)
    if xa.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, 0, False, "undefined: no paired rows")
    est = float(fn(xa, ya, np.ones((1, xa.size)))[0])
    if not math.isfinite(est):
        why = "undefined: a reading is constant over the paired rows (nothing to agree with)"
        return Interval(math.nan, math.nan, math.nan, g, 0, False, why)
    if g < MIN_INTERVAL_CLUSTERS:
        f = flag(est, g, 0, o.n_boot, o.min_clusters)
        return Interval(est, math.nan, math.nan, g, 0, False, f)
    boot = _in_blocks(fn, xa, ya, draw(np.random.default_rng(seed), o.n_boot, g), idx)
    jack = _in_blocks(fn, xa, ya, 1.0 - np.eye(g), idx) if o.method == "bca" else None
    lo, hi = interval(boot, np.asarray(est), jack, o, g)
    n_empty = int(np.isnan(boot).sum())
    return Interval(est, float(lo), float(hi), g, n_empty, False,
                    flag(est, g, n_empty, o.n_boot, o.min_clusters))  # fmt: skip


# --------------------------------------------------------------------------- reading agreement


def _persona_rows(
    records: Iterable[PredictionRecord], scorer: str
) -> dict[tuple[str, str], dict[RowId, PredictionRecord]]:
    """(base, unit) -> row -> record, persona rows only; a ValueError on a row given twice."""
    out: dict[tuple[str, str], dict[RowId, PredictionRecord]] = {}
    for r in records:
        if r.stage == BASE_STAGE or r.persona in NULL_PERSONA_MARKERS:
            continue
        rows = out.setdefault((r.base, r.slice), {})
        rid = (r.stage, r.persona, r.item_id, r.sample_idx)
        if rid in rows:
            raise ValueError(
                f"{scorer}: two records for base {r.base}, unit {r.slice}, stage {r.stage}, "
                f"persona {r.persona}, item {r.item_id}, sample {r.sample_idx}"
            )
        rows[rid] = r
    return out


@dataclass(frozen=True)
class _Side:
    scorer: str
    reading: str
    rows: dict[RowId, PredictionRecord]

    def values(self, ids: Iterable[RowId]) -> dict[RowId, float | None]:
        read = MEASURES[(self.scorer, self.reading)].read
        return {i: (read(self.rows[i]) if i in self.rows else None) for i in ids}


def _reading_row(
    statistic: str, base: str, unit: str, a: _Side, b: _Side, o: Opts
) -> ReadingAgreement:
    pool = sorted(set(a.rows) | set(b.rows))
    va, vb = a.values(pool), b.values(pool)
    both = [i for i in pool if va[i] is not None and vb[i] is not None]
    seed = derive_seed("charshift.stats.agreement", o.seed, base, unit, a.scorer, a.reading,
                       b.scorer, b.reading)  # fmt: skip
    value = paired_statistic(
        statistic, [va[i] for i in both], [vb[i] for i in both], [i[2] for i in both], o, seed
    )
    return ReadingAgreement(
        base, unit, statistic, a.scorer, a.reading, b.scorer, b.reading, value,
        n_pairs=len(both), n_left_out=len(pool) - len(both),
        missing_a=sum(va[i] is None for i in pool), missing_b=sum(vb[i] is None for i in pool),
        stages=tuple(order_stages({i[0] for i in pool})),
    )  # fmt: skip


def reading_agreement(
    records: Mapping[str, Sequence[PredictionRecord]], o: Opts
) -> list[ReadingAgreement]:
    """Every statistic of `COMPARISONS` whose two scorers are in `records` (scorer -> its
    records, as the statistics take them), per (base, unit) both score; see the module doc."""
    rows = {name: _persona_rows(recs, name) for name, recs in records.items()}
    out = []
    for statistic, (sa, ra), (sb, rb) in COMPARISONS:
        if sa not in rows or sb not in rows:
            continue
        shared = set(rows[sa]) & set(rows[sb])
        bases = list(dict.fromkeys(base for base, _ in rows[sa]))
        for base in bases:
            for unit in order_slices(u for b, u in shared if b == base):
                a = _Side(sa, ra, rows[sa][(base, unit)])
                b = _Side(sb, rb, rows[sb][(base, unit)])
                out.append(_reading_row(statistic, base, unit, a, b, o))
    return out


# --------------------------------------------------------------------------- sign agreement

SignKey = tuple[str, str, str, str, str, str]  # base, stage, kind, chain, frm, to


def sign_verdict(d: Difference | None) -> str:
    """One scorer's verdict on a difference whose positive value is persona lost."""
    if d is None:
        return "absent"
    if d.blind:
        return "blind"
    if not math.isfinite(d.estimate) or not d.has_interval:
        return "no interval"
    if d.lo > 0:
        return LOSS
    if d.hi < 0:
        return GAIN
    return "contains 0"


def sign_category(verdict_a: str, verdict_b: str) -> str:
    """agree / disagree / inconclusive from two verdicts (see the module doc)."""
    sure = (LOSS, GAIN)
    if verdict_a in sure and verdict_b in sure:
        return AGREE if verdict_a == verdict_b else DISAGREE
    return INCONCLUSIVE


def _sign_differences(differences: Iterable[Difference]) -> dict[SignKey, Difference]:
    out = {}
    for d in differences:
        if (
            d.kind in SIGN_KINDS
            and d.metric in SIGN_METRICS
            and not d.itt
            and d.a.stage != BASE_STAGE
        ):
            out[(d.a.base, d.a.stage, d.kind, d.chain, d.a.slice, d.b.slice)] = d
    return out


def sign_agreement(
    results: Mapping[str, MetricsResult], likert: Sequence[Difference] | None = None
) -> list[SignAgreement]:
    """For every pair of scorers in `results` (scorer -> its statistics, in the order given;
    then the Likert judge, `likert`: its differences from `stats.likert`) and every rung, total
    and contrast either has: the two verdicts and the pair's category."""
    diffs = {name: _sign_differences(r.differences) for name, r in results.items()}
    if likert is not None:
        diffs[LIKERT_SCORER] = _sign_differences(likert)
    out = []
    for sa, sb in combinations(diffs, 2):
        keys = list(dict.fromkeys([*diffs[sa], *diffs[sb]]))
        for key in keys:
            da, db = diffs[sa].get(key), diffs[sb].get(key)
            ref = da if da is not None else db
            if ref is None:
                continue
            va, vb = sign_verdict(da), sign_verdict(db)
            out.append(SignAgreement(*key, ref.changes, sa, sb, da, db, va, vb,
                                     sign_category(va, vb)))  # fmt: skip
    return out


def compute_agreement(
    records: Mapping[str, Sequence[PredictionRecord]],
    results: Mapping[str, MetricsResult],
    o: Opts,
    likert: Sequence[Difference] | None = None,
) -> Agreement:
    """The run's agreement: `records` (scorer -> records) of every scorer, `results` (scorer ->
    statistics) of those with a label. A scorer with records is present even where it gave no
    reading at all (a judge whose every answer was unparseable: its rows are all left out, and
    counted); with fewer than two present nothing is compared."""
    present = [name for name, recs in records.items() if recs]
    agreement = Agreement(present)
    if agreement.compared:
        agreement.readings = reading_agreement({n: records[n] for n in present}, o)
        with_likert = likert if LIKERT_SCORER in present else None
        agreement.signs = sign_agreement(
            {n: r for n, r in results.items() if n in present}, with_likert
        )
    return agreement
