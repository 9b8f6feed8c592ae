"""The Likert judge's figures (pure): the mean score per cell, its excess over the base stage
in the same unit, the fall of that excess along every chain and contrast, and whether the judge
sees the positive control in each unit.

The Likert judge gives a number, not a persona, so the classifier's macro-F1 does not apply.
Its figures, defined here once (tables, the report and the agreement read them from here):

* Rows. A persona row (every stage but the base stage) is read as the judge's score for the
  row's own persona (the median of its samples, 1-5). A base-stage row has no persona; the
  judge scored it against every persona, and each of those scores is that persona's null
  reading of the row. A row without a score (no output, an unparseable or failed judgement) is
  left out of the figures and counted (`n_rows` - `n_scored`), never read as a low score.
  Backend failures of the generation (outcome `error`, `context_overflow`) are not rows.
* `mean` of a cell (base, stage, unit): per persona, the mean score of its scored rows; then
  the mean over the personas with a scored row (`n_personas`; each persona weighs the same, as
  in macro-F1). In a base-stage cell the per-persona means are those of the base rows' scores
  against each persona.
* `null` and `excess`: the null of persona p in a unit is the base stage's mean score against
  p in that unit, i.e. how persona-like the judge finds neutral text of the same format.
  excess = the mean over personas of (p's mean - p's null), over the personas with both
  (a base-stage cell has excess 0 by construction). Positive: the judge finds more of the
  persona than in neutral text of the same format; the scale is Likert points.
* Intervals: the cluster bootstrap with the item id as the cluster, a cell's stage rows and the
  base rows of the same item drawn together (paired on items), the persona set fixed at the
  point estimate's (a resample in which a persona has no row is undefined, left out and
  counted). Fewer than `MIN_INTERVAL_CLUSTERS` items: no interval; fewer than `min_clusters`:
  flagged. Percentile intervals with the small-sample expansion of `stats.intervals`.
* Differences (`likert_excess`, positive = persona lost): for every chain rung and total of
  `ladder.CHAINS` and every contrast of `ladder.ALL_CONTRASTS`, excess(frm) - excess(to) in one
  (base, stage), both averaged over the personas scored in both units (`k` of `n_personas`;
  where k < n, not the difference of the two cells' own figures, and the note says so). Units
  whose items are of one kind share one draw over the union of their items (paired; a chain
  total over two units is its one rung, the same draw); otherwise each is drawn on its own
  (unpaired, the smaller side's items govern). A unit without base-stage rows has no excess,
  and a difference touching it is undefined (kept, with a note), never dropped.
* Scorer check: the positive control's excess in a unit is the judge's sensitivity there. Where
  its interval reaches 0 the judge is blind in that unit and every difference touching it says
  so (`Difference.blind`); with no interval, or no control, it is not checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from charshift.ladder import ALL_CONTRASTS, CHAINS, Rung
from charshift.schema import BASE_STAGE, NULL_PERSONA_MARKERS, PredictionRecord, derive_seed
from charshift.stats.chains import item_kind, rung_changes
from charshift.stats.intervals import Opts, draw, flag, interval, p_two_sided
from charshift.stats.results import Cell, Difference, Interval, order_slices, order_stages

LIKERT_MEAN = "likert_mean"
LIKERT_EXCESS = "likert_excess"
FAILED_OUTCOMES = ("error", "context_overflow")
_NAN = Interval(math.nan, math.nan, math.nan)


@dataclass
class Sums:
    """One (base, stage, unit)'s scores per item (rows) and persona (columns): their sum and
    count; `rows`: the readings asked for in the cell (a persona row's for its persona; a base
    row's for every persona), `scored`: those with a score."""

    items: np.ndarray
    total: np.ndarray
    count: np.ndarray
    rows: int = 0
    scored: int = 0

    def on(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """total and count re-indexed on `ids` (zero for an item this cell lacks)."""
        t = np.zeros((len(ids), self.total.shape[1]))
        c = np.zeros_like(t)
        pos = np.searchsorted(ids, self.items)
        t[pos], c[pos] = self.total, self.count
        return t, c


@dataclass(frozen=True)
class LikertCell:
    """One cell's Likert figures (see the module doc)."""

    cell: Cell
    n_rows: int
    n_scored: int
    n_personas: int
    mean: Interval
    null: float  # the persona-averaged base-stage mean over the same personas (NaN for base)
    excess: Interval
    scorer_blind: bool | None = None

    @property
    def n_missing(self) -> int:
        return self.n_rows - self.n_scored


@dataclass
class LikertResult:
    """Every Likert figure of a run: cells, differences and the scorer check per (base, unit)."""

    personas: list[str]
    cells: list[LikertCell] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    sensitivity: dict[tuple[str, str], Interval] = field(default_factory=dict)
    blind: dict[tuple[str, str], bool | None] = field(default_factory=dict)


# --------------------------------------------------------------------------- rows -> sums


def _readings(rec: PredictionRecord, personas: Sequence[str]) -> dict[str, float] | None:
    """persona -> score of one record (None: the row has no score at all)."""
    scores = dict(rec.scores or {})
    if rec.persona in NULL_PERSONA_MARKERS or rec.stage == BASE_STAGE:
        if rec.persona not in NULL_PERSONA_MARKERS:  # expanded base rows: one persona each
            v = scores.get(rec.persona, rec.judge_score)
            scores = {rec.persona: v} if v is not None else {}
        out = {p: float(v) for p, v in scores.items() if p in personas and math.isfinite(v)}
        return out or None
    v = scores.get(rec.persona, rec.judge_score)
    return {rec.persona: float(v)} if v is not None and math.isfinite(v) else None


def _reading_ids(rec: PredictionRecord, personas: Sequence[str]) -> list[tuple[str, str, int]]:
    """The readings a record stands for, (persona, item, sample): its own persona's, or, for a
    base row judged against every persona, one per persona."""
    if rec.persona in NULL_PERSONA_MARKERS:
        return [(p, str(rec.item_id), rec.sample_idx) for p in personas]
    return [(str(rec.persona), str(rec.item_id), rec.sample_idx)]


def likert_sums(records: Sequence[PredictionRecord], personas: Sequence[str]) -> dict[Cell, Sums]:
    """Each cell's per-item, per-persona sums of scores (see the module doc's Rows)."""
    index = {p: j for j, p in enumerate(personas)}
    acc: dict[Cell, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    rows: dict[Cell, set] = {}
    scored: dict[Cell, set] = {}
    for r in records:
        if r.outcome in FAILED_OUTCOMES:
            continue
        cell = Cell(r.base, r.stage, r.slice)
        read = _readings(r, personas) or {}
        for reading in _reading_ids(r, personas):  # a base row: one reading per persona
            rows.setdefault(cell, set()).add(reading)
            if reading[0] in read:
                scored.setdefault(cell, set()).add(reading)
        if not read:
            continue
        t, c = acc.setdefault(cell, {}).setdefault(
            str(r.item_id), (np.zeros(len(personas)), np.zeros(len(personas)))
        )
        for p, v in read.items():
            t[index[p]] += v
            c[index[p]] += 1
    out = {}
    for cell, ids in rows.items():
        per_item = acc.get(cell, {})
        items = np.array(sorted(per_item), dtype=object)
        k = len(personas)
        total = np.array([per_item[i][0] for i in items]).reshape(len(items), k)
        count = np.array([per_item[i][1] for i in items]).reshape(len(items), k)
        out[cell] = Sums(items, total, count, len(ids), len(scored.get(cell, ())))
    return out


# --------------------------------------------------------------------------- the figures


def _means(total: np.ndarray, count: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(n_boot, K) per-persona weighted means (NaN where a persona has no weight)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ total) / (w @ count)


def _macro(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The mean over the personas `keep`; NaN in a resample where one of them is undefined."""
    if not keep.any():
        return np.full(values.shape[0], math.nan)
    return values[:, keep].mean(axis=1)


@dataclass
class _Pair:
    """A cell's stage sums and its unit's base sums on one item vector."""

    ids: np.ndarray
    stage: tuple[np.ndarray, np.ndarray]
    base: tuple[np.ndarray, np.ndarray] | None

    def keep(self) -> np.ndarray:
        """The personas the point estimate averages over (scored on both sides)."""
        have = self.stage[1].sum(axis=0) > 0
        return have & (self.base[1].sum(axis=0) > 0) if self.base is not None else have

    def values(self, w: np.ndarray, excess: bool, keep: np.ndarray | None = None) -> np.ndarray:
        """(n_boot,) the persona-averaged mean, or its excess over the base, under weights w,
        over the personas `keep` (default: `self.keep()`)."""
        m = _means(*self.stage, w)
        if excess and self.base is not None:
            m = m - _means(*self.base, w)
        return _macro(m, self.keep() if keep is None else keep)

    def point(self, excess: bool, keep: np.ndarray | None = None) -> float:
        return float(self.values(np.ones((1, len(self.ids))), excess, keep)[0])


def _pair(sums: Mapping[Cell, Sums], cell: Cell, ids: np.ndarray | None = None) -> _Pair:
    base = sums.get(Cell(cell.base, BASE_STAGE, cell.slice))
    own = sums[cell]
    if ids is None:
        ids = np.union1d(own.items, base.items) if base is not None else own.items
    null = None if base is None or cell.stage == BASE_STAGE else base.on(ids)
    return _Pair(ids, own.on(ids), null)


def _weights(o: Opts, n: int, *key: object) -> np.ndarray:
    rng = np.random.default_rng(derive_seed("charshift.stats.likert", o.seed, *key))
    return draw(rng, o.n_boot, n)


def _iv(point: float, boot: np.ndarray, g: int, o: Opts, note: str = "") -> Interval:
    if not math.isfinite(point):
        return Interval(point, math.nan, math.nan, g, 0, False, "undefined: nothing scored")
    lo, hi = interval(boot, np.asarray(point), None, o, g)
    n_empty = int(np.isnan(boot).sum())
    f = "; ".join(x for x in (flag(point, g, n_empty, o.n_boot, o.min_clusters), note) if x)
    return Interval(point, float(lo), float(hi), g, n_empty, False, f)


def missing_note(sums: Mapping[Cell, Sums], cell: Cell, with_null: bool = True) -> str:
    """What a figure of `cell` leaves out: its readings without a score and (`with_null`, for
    an excess) those of the base stage in its unit, the null it is measured against."""
    parts = []
    cells = [cell] + ([Cell(cell.base, BASE_STAGE, cell.slice)] if with_null else [])
    for c in dict.fromkeys(cells):
        s = sums.get(c)
        if s is not None and s.rows > s.scored:
            whose = "" if c == cell else " of the base stage (the null)"
            parts.append(f"{s.rows - s.scored} of {s.rows} readings{whose} have no score")
    if not parts:
        return ""
    return "; ".join(parts) + (
        " (left out: if the judge fails more often on some texts, the figure is biased)"
    )


def likert_cell(sums: Mapping[Cell, Sums], cell: Cell, o: Opts) -> LikertCell:
    """One cell's mean and excess with their intervals (see the module doc)."""
    s = sums[cell]
    pair = _pair(sums, cell)
    w = _weights(o, len(pair.ids), *cell)
    g = int((pair.stage[1].sum(axis=1) > 0).sum())
    note = missing_note(sums, cell)
    mean = _iv(pair.point(False), pair.values(w, False), g, o, missing_note(sums, cell, False))
    if cell.stage == BASE_STAGE:
        excess = Interval(0.0, math.nan, math.nan, g, 0, True, "")
        return LikertCell(cell, s.rows, s.scored, int(pair.keep().sum()), mean, math.nan, excess)
    if pair.base is None:
        iv = Interval(math.nan, math.nan, math.nan, g, 0, False, "no base-stage rows in this unit")
        return LikertCell(cell, s.rows, s.scored, int(pair.keep().sum()), mean, math.nan, iv)
    point = pair.point(True)
    null = float(_macro(_means(*pair.base, np.ones((1, len(pair.ids)))), pair.keep())[0])
    excess = _iv(point, pair.values(w, True), g, o, note)
    return LikertCell(cell, s.rows, s.scored, int(pair.keep().sum()), mean, null, excess)


def _rung(
    sums: Mapping[Cell, Sums], a: Cell, b: Cell, o: Opts, *, kind: str, changes: str,
    chain: str = "",
) -> Difference | None:  # fmt: skip
    """excess(a) - excess(b) in one (base, stage): paired where the units' items are of one kind."""
    if a not in sums or b not in sums:
        return None
    ka, kb = (item_kind(c.slice, _pair(sums, c).ids) for c in (a, b))
    if ka == kb:
        ids = np.union1d(_pair(sums, a).ids, _pair(sums, b).ids)
        pa, pb = _pair(sums, a, ids), _pair(sums, b, ids)
        w = _weights(o, len(ids), a.base, a.stage, a.slice, b.slice)
        wa = wb = w
        g = int(((pa.stage[1].sum(axis=1) > 0) & (pb.stage[1].sum(axis=1) > 0)).sum())
        note = f"paired on {ka} items"
    else:
        pa, pb = _pair(sums, a), _pair(sums, b)
        wa, wb = (_weights(o, len(p.ids), *c, "unpaired") for p, c in ((pa, a), (pb, b)))
        g = min(int((p.stage[1].sum(axis=1) > 0).sum()) for p in (pa, pb))
        note = f"unpaired: {ka} items vs {kb} items, bootstrapped independently"
    no_null = [c.slice for c, p in ((a, pa), (b, pb)) if p.base is None]
    keep = pa.keep() & pb.keep()  # one persona set for both sides
    if no_null:
        est, boot = math.nan, np.full(o.n_boot, math.nan)
        note = f"no base-stage rows in {', '.join(no_null)}: no excess there, so no rung"
    else:
        est = pa.point(True, keep) - pb.point(True, keep)
        boot = pa.values(wa, True, keep) - pb.values(wb, True, keep)
    if 0 < keep.sum() < len(keep):
        note += (f"; over the {int(keep.sum())} of {len(keep)} personas scored in both units "
                 "(not the difference of the two cells' own figures)")  # fmt: skip
    lacking = "; ".join(x for x in (missing_note(sums, a), missing_note(sums, b)) if x)
    iv = _iv(est, boot, g, o, lacking)
    if no_null:
        iv = Interval(math.nan, math.nan, math.nan, g, 0, False, note)
    return Difference(
        kind=kind, a=a, b=b, metric=LIKERT_EXCESS, itt=False, estimate=est, lo=iv.lo, hi=iv.hi,
        n_clusters=g, paired=ka == kb, note=note, changes=changes, chain=chain,
        n_empty_resamples=iv.n_empty_resamples, flag=iv.flag, k=int(keep.sum()),
        n_personas=len(keep), p=p_two_sided(boot, est, g, o),
    )  # fmt: skip


def _differences(sums: Mapping[Cell, Sums], base: str, stage: str, o: Opts) -> list[Difference]:
    out: list[Difference] = []
    for chain in CHAINS:
        units = [u for u in chain.units if Cell(base, stage, u) in sums]
        cells = [Cell(base, stage, u) for u in units]
        for a, b in zip(cells[:-1], cells[1:], strict=True):
            changes = rung_changes(chain, a.slice, b.slice)
            out.append(_rung(sums, a, b, o, kind="rung", changes=changes, chain=chain.name))
        if len(cells) > 1:
            changes = f"all of: {chain.title}"
            out.append(
                _rung(sums, cells[0], cells[-1], o, kind="total", changes=changes, chain=chain.name)
            )
    for r in ALL_CONTRASTS:
        out.append(_contrast(sums, base, stage, r, o))
    return [d for d in out if d is not None]


def _contrast(
    sums: Mapping[Cell, Sums], base: str, stage: str, r: Rung, o: Opts
) -> Difference | None:
    a, b = Cell(base, stage, r.frm), Cell(base, stage, r.to)
    return _rung(sums, a, b, o, kind="contrast", changes=r.changes)


def _mark_blind(result: LikertResult, control: str | None) -> None:
    for c in result.cells:
        if c.cell.stage == control:
            key = (c.cell.base, c.cell.slice)
            result.sensitivity[key] = c.excess
            result.blind[key] = (c.excess.lo <= 0) if c.excess.has_interval else None
    cells = []
    for c in result.cells:
        blind = result.blind.get((c.cell.base, c.cell.slice))
        cells.append(LikertCell(c.cell, c.n_rows, c.n_scored, c.n_personas, c.mean, c.null,
                                c.excess, blind))  # fmt: skip
    result.cells = cells
    for d in result.differences:
        d.blind = tuple(u.slice for u in (d.a, d.b) if result.blind.get((u.base, u.slice)))


def likert_result(
    records: Sequence[PredictionRecord], personas: Sequence[str], o: Opts
) -> LikertResult:
    """Every Likert figure of `records` (a Likert judge's prediction records; see the module
    doc). `o.control`: the positive-control stage of the scorer check."""
    sums = likert_sums(records, personas)
    result = LikertResult(list(personas))
    bases = list(dict.fromkeys(c.base for c in sums))
    for base in bases:
        stages = order_stages({c.stage for c in sums if c.base == base})
        units = order_slices({c.slice for c in sums if c.base == base})
        for stage in stages:
            for unit in units:
                if Cell(base, stage, unit) in sums:
                    result.cells.append(likert_cell(sums, Cell(base, stage, unit), o))
            if stage != BASE_STAGE:
                result.differences += _differences(sums, base, stage, o)
    _mark_blind(result, o.control)
    return result
