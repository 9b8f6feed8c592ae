"""The CSV tables (and stats.json) of a `stats.MetricsResult`: the I/O half of the statistics.

Every file is written atomically (`fileio.atomic_write_text`: a temporary file in the same
folder, then a rename; the user's umask decides who may read it), so a reader never sees half a
table. Model output and classifier labels are data: a string cell that
a spreadsheet would read as a formula (starting with `=`, `+`, `-`, `@`, a tab or a carriage
return) gets a leading `'`. Numbers are formatted here, never neutralised, so a negative
difference stays a number.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from charshift.fileio import atomic_write_text as write_atomic
from charshift.stats import (
    BLIND_TEXT,
    DEFAULT_SCORER,
    CellMetrics,
    Difference,
    Interval,
    MetricsResult,
    has_interval,
)
from charshift.stats.agreement import LIKERT_SCORER, Agreement
from charshift.stats.family import FAMILY_TEXT
from charshift.stats.likert import LikertResult

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """A string cell as a spreadsheet will show it, never as a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _cell(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, bool | np.bool_):
        return "True" if x else "False"
    if isinstance(x, float | np.floating):
        return "" if math.isnan(x) else f"{float(x):.6g}"
    if isinstance(x, int | np.integer):
        return str(int(x))
    return neutralise(str(x))


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([_cell(h) for h in header])
    for row in rows:
        w.writerow([_cell(v) for v in row])
    return write_atomic(path, buf.getvalue())


def _iv(i: Interval) -> list[Any]:
    """estimate, lo, hi, reliable; the ends are empty where there is no interval (fewer than two
    clusters: `Interval.has_interval`), never a degenerate [x, x]."""
    lo, hi = (i.lo, i.hi) if i.has_interval else (math.nan, math.nan)
    return [i.estimate, lo, hi, i.reliable]


def _ends(d: Difference) -> list[float]:
    """lo, hi of a difference, empty where it has no interval (see `_iv`)."""
    return [d.lo, d.hi] if d.has_interval else [math.nan, math.nan]


_IV = ("", "_lo", "_hi", "_reliable")
# (column stem, CellMetrics field) of each cell figure with an interval; macro_f1 is raw
_CELL_IVS = (
    ("macro_f1", "macro_f1"), ("macro_f1_excess", "macro_f1_excess"), ("kappa", "kappa"),
    ("accuracy", "accuracy"), ("macro_f1_itt", "macro_f1_itt"),
    ("macro_f1_excess_itt", "macro_f1_excess_itt"), ("kappa_itt", "kappa_itt"),
    ("accuracy_itt", "accuracy_itt"),
)  # fmt: skip
METRICS_COLUMNS = (
    "base", "stage", "slice", "scorer", "n_rows", "n_scored", "n_failed", "n_clusters", "yield",
    "n_personas_scored", "n_personas_attempted", "n_personas",
    *(f"{stem}{s}" for stem, _ in _CELL_IVS for s in _IV),
    "macro_f1_null", "macro_f1_null_itt", "p_null", "p_null_itt", "n_perm",
    "n_empty_resamples", "mean_p_true", "scorer_blind", "flag",
)  # fmt: skip
PER_PERSONA_COLUMNS = (
    "base", "stage", "slice", "scorer", "persona", "precision", "recall", "f1", "f1_lo", "f1_hi",
    "f1_reliable", "f1_null", "f1_excess", "f1_excess_lo", "f1_excess_hi", "f1_itt", "n",
    "n_scored", "yield", "scorer_blind",
)  # fmt: skip
DIFFERENCE_COLUMNS = (
    "kind", "chain", "base", "scorer", "metric", "itt", "stage_a", "slice_a", "stage_b", "slice_b",
    "estimate", "lo", "hi", "reliable", "p", "family", "p_holm", "lo_simul", "hi_simul", "k",
    "n_personas", "n_clusters", "paired", "n_empty_resamples", "scorer_blind", "blind_units",
    "changes", "flag", "note",
)  # fmt: skip
CHAIN_COLUMNS = (
    "base", "scorer", "stage", "chain", "metric", "itt", "position", "slice", "item_kind", "estimate",
    "lo", "hi", "reliable", "k", "n_personas", "common_items", "dropped_items", "scorer_blind",
    "null_top_share", "flag",
)  # fmt: skip
SCORER_CHECK_COLUMNS = (
    "base", "scorer", "unit", "control", "sensitivity", "sensitivity_lo", "sensitivity_hi",
    "sensitivity_reliable", "n_clusters", "null_top_label", "null_top_share", "scorer_blind",
    "flag",
)  # fmt: skip
RETENTION_COLUMNS = (
    "base", "scorer", "stage", "unit", "control", "itt", "retention", "lo", "hi", "reliable",
    "n_clusters", "k", "n_personas", "scorer_blind", "flag",
)  # fmt: skip


DEPTH_COLUMNS = (
    "base", "scorer", "stage", "persona", "depth", "n_units", "depth_not_blind", "n_units_not_blind",
    "n_detected", "units", "definition",
)  # fmt: skip
DEPTH_DEFINITION = (
    "mean over units (each slice once) of the persona's F1 excess over its own null = trained "
    "minus base (the base stage's excess is 0 by construction); not_blind: the units where the "
    "scorer is not blind; detected: units whose interval lies above 0"
)


def _depth_rows(result: MetricsResult) -> Iterable[list[Any]]:
    for d in result.depth:
        yield [
            d.base, d.stage, d.persona, d.depth, d.n_units, d.depth_not_blind,
            d.n_units_not_blind, d.n_detected, " ".join(d.units), DEPTH_DEFINITION,
        ]  # fmt: skip


def _cell_flag(m: CellMetrics) -> str:
    """metrics.csv's `flag` column (not `flags`: that name is a pandas DataFrame attribute)."""
    named = [("yield", m.yield_), *((stem, getattr(m, f)) for stem, f in _CELL_IVS)]
    out = [f"{n}: {iv.flag}" for n, iv in named if iv.flag and not iv.fixed_by_construction]
    if m.scorer_blind:
        out.insert(0, f"SCORER BLIND: {BLIND_TEXT}")
    return "; ".join(out)


def _metrics_rows(result: MetricsResult) -> Iterable[list[Any]]:
    for m in result.cells.values():
        yield (
            [*m.cell, m.scorer, m.n_rows, m.n_scored, m.n_failed, m.n_clusters, m.yield_.estimate]
            + [m.n_personas_scored, m.n_personas_attempted, m.n_personas]
            + [v for _, f in _CELL_IVS for v in _iv(getattr(m, f))]
            + [m.macro_f1_null.estimate, m.macro_f1_null_itt.estimate, m.p_null, m.p_null_itt]
            + [m.n_perm, m.macro_f1.n_empty_resamples, m.mean_p_true, m.scorer_blind, _cell_flag(m)]
        )  # fmt: skip


AGREEMENT_FILES = ("agreement.csv", "agreement_signs.csv")
AGREEMENT_COLUMNS = (
    "base", "unit", "statistic", "scorer_a", "reading_a", "scorer_b", "reading_b", "estimate",
    "lo", "hi", "reliable", "n_pairs", "n_clusters", "n_left_out", "missing_a", "missing_b",
    "n_empty_resamples", "stages", "flag",
)  # fmt: skip
SIGN_COLUMNS = (
    "base", "stage", "kind", "chain", "unit_a", "unit_b", "scorer_a", "metric_a", "estimate_a",
    "lo_a", "hi_a", "verdict_a", "scorer_b", "metric_b", "estimate_b", "lo_b", "hi_b",
    "verdict_b", "agreement", "one_sided", "changes",
)  # fmt: skip


def _agreement_rows(agreement: Agreement) -> Iterable[list[Any]]:
    for r in agreement.readings:
        yield [
            r.base, r.unit, r.statistic, r.scorer_a, r.reading_a, r.scorer_b, r.reading_b,
            *_iv(r.value), r.n_pairs, r.value.n_clusters, r.n_left_out, r.missing_a,
            r.missing_b, r.value.n_empty_resamples, " ".join(r.stages), r.value.flag,
        ]  # fmt: skip


def _side(d: Difference | None) -> list[Any]:
    return [None, *[math.nan] * 3] if d is None else [d.metric, d.estimate, *_ends(d)]


def _sign_rows(agreement: Agreement) -> Iterable[list[Any]]:
    for s in agreement.signs:
        yield [
            s.base, s.stage, s.kind, s.chain, s.frm, s.to, s.scorer_a, *_side(s.a), s.verdict_a,
            s.scorer_b, *_side(s.b), s.verdict_b, s.agreement, s.one_sided, s.changes,
        ]  # fmt: skip


def write_agreement(agreement: Agreement, out_dir: str | Path) -> list[Path]:
    """agreement.csv (kappa and Spearman between scorers' readings, per base and unit) and
    agreement_signs.csv (whether two scorers agree on the sign of each rung's loss), from
    `stats.agreement`."""
    out = Path(out_dir)
    return [
        write_csv(out / AGREEMENT_FILES[0], AGREEMENT_COLUMNS, _agreement_rows(agreement)),
        write_csv(out / AGREEMENT_FILES[1], SIGN_COLUMNS, _sign_rows(agreement)),
    ]


def _per_persona_rows(result: MetricsResult) -> Iterable[list[Any]]:
    for m in result.cells.values():
        for p in m.per_persona:
            yield [
                *m.cell, p.persona, p.precision, p.recall, *_iv(p.f1), p.f1_null,
                *_iv(p.f1_excess)[:3], p.f1_itt.estimate, p.n, p.n_scored, p.yield_, m.scorer_blind,
            ]  # fmt: skip


def _confusion_rows(result: MetricsResult) -> Iterable[list[Any]]:
    for m in result.cells.values():
        for i, row in enumerate(m.confusion_rows):
            for j, col in enumerate(m.confusion_cols):
                yield [*m.cell, row, col, int(m.confusion[i, j])]


def _distribution_rows(result: MetricsResult) -> Iterable[list[Any]]:
    nan = float("nan")
    for m in result.cells.values():
        for lab, n in m.pred_distribution.items():
            yield [*m.cell, lab, n, n / m.n_scored, n / m.n_rows]
        yield [*m.cell, "(no output)", m.n_none, nan, m.n_none / m.n_rows if m.n_rows else nan]


def _difference_rows(result: MetricsResult) -> Iterable[list[Any]]:
    return _differences_of(result.differences)


def _differences_of(differences: Iterable[Difference]) -> Iterable[list[Any]]:
    for d in differences:
        yield [
            d.kind, d.chain, d.a.base, d.metric, d.itt, d.a.stage, d.a.slice, d.b.stage,
            d.b.slice, d.estimate, *_ends(d), d.reliable, d.p, d.family, d.p_holm,
            *((d.lo_simul, d.hi_simul) if d.has_interval else (math.nan, math.nan)), d.k or None, d.n_personas, d.n_clusters, d.paired, d.n_empty_resamples,
            bool(d.blind), " ".join(d.blind), d.changes, d.flag, d.note,
        ]  # fmt: skip


def _chain_rows(result: MetricsResult) -> Iterable[list[Any]]:
    for c in result.chains:
        for pos, (u, iv) in enumerate(zip(c.units, c.estimates, strict=True)):
            kind = c.kinds[u]
            check = result.scorer_check(c.base, u)
            yield [
                c.base, c.stage, c.chain, c.metric, c.itt, pos, u, kind, *_iv(iv), c.k or None,
                c.n_personas, c.common[kind], c.dropped[u], u in c.blind, check.null_top_share if check else None, iv.flag,
            ]  # fmt: skip


def _scorer_rows(result: MetricsResult) -> Iterable[list[Any]]:
    for s in result.scorer_checks:
        yield [
            s.base, s.scorer, s.unit, s.control, *_iv(s.sensitivity), s.sensitivity.n_clusters,
            s.null_top_label, s.null_top_share, s.scorer_blind, s.flag,
        ]  # fmt: skip


def _retention_rows(result: MetricsResult) -> Iterable[list[Any]]:
    for r in result.retention:
        yield [
            r.base, r.stage, r.unit, r.control, r.itt, r.estimate,
            *((r.lo, r.hi) if has_interval(r.n_clusters, r.lo, r.hi) else (math.nan, math.nan)),
            r.reliable,
            r.n_clusters, r.k, r.n_personas, r.scorer_blind, r.flag,
        ]  # fmt: skip


LIKERT_FILE = "likert.csv"
LIKERT_COLUMNS = (
    "base", "stage", "slice", "scorer", "n_rows", "n_scored", "n_missing", "n_personas",
    "n_clusters", *(f"mean{s}" for s in _IV), "null", *(f"excess{s}" for s in _IV),
    "n_empty_resamples", "scorer_blind", "flag",
)  # fmt: skip


def _likert_rows(likert: LikertResult) -> Iterable[list[Any]]:
    for c in likert.cells:
        excess = [math.nan] * 4 if c.excess.fixed_by_construction else _iv(c.excess)
        if c.excess.fixed_by_construction:
            excess[0] = c.excess.estimate
        # the excess's flag names what the mean's does (and the null's missing readings)
        f = c.mean.flag if c.excess.fixed_by_construction else (c.excess.flag or c.mean.flag)
        if c.scorer_blind:
            f = f"SCORER BLIND: {BLIND_TEXT}" + (f"; {f}" if f else "")
        yield [
            *c.cell, LIKERT_SCORER, c.n_rows, c.n_scored, c.n_missing, c.n_personas,
            c.mean.n_clusters, *_iv(c.mean), c.null, *excess, c.excess.n_empty_resamples,
            c.scorer_blind, f,
        ]  # fmt: skip


# Tables a report writes only where the run has what they need: a later report that has not
# removes them, so a run folder never holds figures that no longer belong to its report.
OPTIONAL_FILES = (*AGREEMENT_FILES, LIKERT_FILE)


def write_likert(likert: LikertResult, out_dir: str | Path) -> Path:
    """likert.csv: the Likert judge's mean score and its excess over the base stage per cell
    (`stats.likert`); its rungs, totals and contrasts are in differences.csv."""
    return write_csv(Path(out_dir) / LIKERT_FILE, LIKERT_COLUMNS, _likert_rows(likert))


def settings_json(result: MetricsResult) -> dict[str, Any]:
    """The interval settings and the label sets, as written to stats.json."""
    return {
        "n_boot": result.n_boot,
        "ci": result.ci,
        "method": result.method,
        "seed": result.seed,
        "min_clusters": result.min_clusters,
        "small_sample": result.small_sample,
        "n_perm": result.n_perm,
        "positive_control": result.control,
        "primary_family": FAMILY_TEXT,
        "personas": result.personas,
        "label_sets": result.labels,
        "label_notes": [n.text() for n in result.label_notes],
        "cluster": "item_id",
    }


# Every table holds the rows of every scorer of the run, the classifier's first, under its
# `scorer` column (where its header puts it); these two tables' rows carry a scorer field already.
_REPLACES = {"metrics.csv", "scorer_check.csv"}


def _tables() -> dict[str, tuple[Sequence[str], Any]]:
    dist_head = (
        "base", "stage", "slice", "scorer", "label", "count", "share_of_scored",
        "share_of_attempted",
    )  # fmt: skip
    return {
        "metrics.csv": (METRICS_COLUMNS, _metrics_rows),
        "per_persona.csv": (PER_PERSONA_COLUMNS, _per_persona_rows),
        "confusion.csv": (
            ("base", "stage", "slice", "scorer", "true", "predicted", "count"),
            _confusion_rows,
        ),
        "pred_distribution.csv": (dist_head, _distribution_rows),
        "differences.csv": (DIFFERENCE_COLUMNS, _difference_rows),
        "chains.csv": (CHAIN_COLUMNS, _chain_rows),
        "scorer_check.csv": (SCORER_CHECK_COLUMNS, _scorer_rows),
        "retention.csv": (RETENTION_COLUMNS, _retention_rows),
        "depth.csv": (DEPTH_COLUMNS, _depth_rows),
    }


def _named_rows(
    name: str, head: Sequence[str], results: Mapping[str, MetricsResult], rows_of: Any
) -> Iterable[list[Any]]:
    at, replace = list(head).index("scorer"), name in _REPLACES
    for scorer, result in results.items():
        for row in rows_of(result):
            row = list(row)
            yield [*row[:at], scorer, *row[at + replace :]]


def _with_likert(rows: Iterable[list[Any]], likert: LikertResult | None) -> Iterable[list[Any]]:
    yield from rows
    if likert is not None:
        at = DIFFERENCE_COLUMNS.index("scorer")
        for row in _differences_of(likert.differences):
            yield [*row[:at], LIKERT_SCORER, *row[at:]]


def write_tables(
    result: MetricsResult,
    out_dir: str | Path,
    others: Mapping[str, MetricsResult] | None = None,
    likert: LikertResult | None = None,
) -> list[Path]:
    """Write metrics.csv, per_persona.csv, confusion.csv, pred_distribution.csv,
    differences.csv, chains.csv, scorer_check.csv, retention.csv, depth.csv and stats.json (settings,
    label sets) into `out_dir`. Every table has a `scorer` column: the rows of `result` (the
    run's classifier, `DEFAULT_SCORER`) come first, then those of each of `others` (scorer name
    -> its own statistics, `analysis.scorer_results`), each against its own null. `likert`: the
    Likert judge's figures (`stats.likert`): likert.csv, and its rungs in differences.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {DEFAULT_SCORER: result, **(others or {})}
    written = []
    for name, (head, rows_of) in _tables().items():
        rows = _named_rows(name, head, results, rows_of)
        if name == "differences.csv":
            rows = _with_likert(rows, likert)
        written.append(write_csv(out / name, head, rows))
    if likert is not None:
        written.append(write_likert(likert, out))
    stats_json = json.dumps(settings_json(result), indent=2) + "\n"
    return [*written, write_atomic(out / "stats.json", stats_json)]
