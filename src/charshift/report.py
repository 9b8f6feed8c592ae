"""The run report: one self-contained `report/index.html` and a `report.md` for a paper draft.

Reading order: a warning box (what the caller says must be read first: an incomplete run, a
persona left out of a label set), the smoke banner, the answer (`charshift.summary`: one
compact table per base), the headline's prose (`charshift.headline`), the main figure, then
the figures' sections: metrics per cell, the classifier, the scorer check, whether the scorers
agree (`stats.agreement`, where the run has several), the ladder (every chain of
`ladder.CHAINS` per base and stage, with what each rung changes), contrasts, stage differences,
outcomes and differential censoring, per persona, predicted labels, confusion, figures, the
sample browser, method notes and the settings (the tool protocol named first).

Safety: every string from the data (names, slices, labels, model text) is escaped where it is
shown. HTML: `html.escape`; the sample browser's data sits in a `<script type="application/json">`
block in which every `<`, `>` and `&` is a JSON unicode escape (so neither `</script>` nor `<!--`
can occur inside it), and the page's script renders it with `textContent` only (the search is a
plain lowercase substring test, never a regular expression from the reader's input); the first
`STATIC_CARDS` cards are also written as static, `html.escape`d HTML, so the page shows them
without JavaScript. A card's id comes from its key (`sample_anchor`: letters, digits, `_`, `-`
and `.` only). A Content-Security-Policy allows no network access and runs only the page's own
script (by hash).

Markdown (plain, no HTML entities): a `<` that could open a tag and an `&` that could start an
entity are backslash-escaped, as are markdown control characters, and newlines become spaces
(`md_escape`); the settings' JSON sits in a code fence with `<`, `>`,
`&` and backticks written as JSON unicode escapes.

The sample browser: a search box (scored text, email, messages, prediction), filters (base,
stage, persona, unit, outcome, and the verdict: correct / wrong / no true label, the base stage
/ no output; `sample_verdict`), sorts (unit, stage, p(true persona) either way, text length),
pages of `BROWSER_PAGE` cards, system prompts collapsed, each tool call shown as a step, and a
permalink per card (`#s-...`) that opens the page at that sample whatever page it falls on.

Writing is atomic as a whole: the report folder and report.md are built in a staging folder
beside them (`out_dir/.report-staging-*`), then swapped in; if anything fails first (a figure, a
text that is not valid Unicode) the previous report stays as it was.

Layout written by `write_report(out_dir, ...)`:
  out_dir/report/index.html   the page (plots inlined as base64 PNG; CSS and JS inline)
  out_dir/report/plots/       every figure as PNG and SVG
  out_dir/report/summary.txt  the answer's tables as plain text (printed by `run` and `report`)
  out_dir/report.md           the headline and the tables in markdown, with method notes
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import html
import json
import math
import os
import re
import shutil
import string
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charshift.fileio import atomic_write_bytes, write_error_text
from charshift.headline import (
    BLIND,
    CENSORING_ALPHA,
    DAGGER,
    FIXED,
    PROTOCOLS,
    HeadlineContext,
    chain_heading,
    classifier_quality,
    context_from_settings,
    fmt_diff,
    fmt_iv,
    fmt_p,
    headline_text,
    num,
)
from charshift.ladder import split_unit
from charshift.outcomes import CensoringTest, censoring_tests, outcome_table
from charshift.plots import SavedFigure, make_figures
from charshift.published import published_for, published_text
from charshift.schema import (
    BASE_STAGE,
    NULL_PERSONA,
    NULL_PERSONA_MARKERS,
    OUTCOMES,
    SCORED_OUTCOMES,
    PredictionRecord,
    Sample,
    stable_hash,
)
from charshift.stats import (
    BLIND_TEXT,
    CellMetrics,
    ChainDecomposition,
    Difference,
    MetricsResult,
    Retention,
    ScorerCheck,
    has_interval,
    no_interval_text,
)
from charshift.stats.agreement import Agreement, ReadingAgreement, SignAgreement
from charshift.stats.family import FAMILY_TEXT
from charshift.stats.likert import LikertResult
from charshift.summary import legend, summary_tables, summary_text

__all__ = [
    "DAGGER",
    "FIXED",
    "HeadlineContext",
    "ReportError",
    "context_from_settings",
    "headline_text",
    "md_escape",
    "method_notes",
    "outcome_records",
    "prepare_report",
    "render_report",
    "ReportContent",
    "sample_anchor",
    "sample_verdict",
    "samples_from_records",
    "select_samples",
    "write_report",
]

MAX_SAMPLES = 2000
STAGING_PREFIX = ".report-staging-"
NULL_SHOWN = "(base: none)"  # how the base stage's null persona is shown
CENSORING_PERMUTATIONS = 2000


class ReportError(ValueError):
    """The report cannot be written; the previous report (if any) is left as it was."""


# --------------------------------------------------------------------------- formatting

_num, _iv, _diff_text = num, fmt_iv, fmt_diff
EXCESS = "macro_f1_excess"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


_MD_ALWAYS = re.compile(r"([\\`*|~#])")
_MD_LINK_CLOSE = re.compile(r"\](?=[(\[])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_MD_BLOCK_START = re.compile(r"^(\s*)([-+](?=\s|$)|\[|>|\d+[.)](?=\s|$))")


_MD_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # could open an HTML tag, comment or autolink
_MD_ENTITY = re.compile(r"&(?=#?[A-Za-z0-9]+;)")  # could read as an HTML entity


def md_escape(text: Any) -> str:
    """Text from the data, safe inside a markdown line or table cell, and still plain text: no
    HTML entities. A `<` that could open a tag and an `&` that could start an entity are
    backslash-escaped (CommonMark shows them as themselves), as are markdown control characters
    (an underscore inside a word, as in `chat_email`, is left as it is: it cannot start
    emphasis); `->` and `a < b` stay as they are; newlines become spaces."""
    s = re.sub(r"[\r\n\u2028\u2029]+", " ", str(text))
    s = _MD_ALWAYS.sub(r"\\\1", s)
    s = _MD_TAG_START.sub(r"\\<", s)
    s = _MD_ENTITY.sub(r"\\&", s)
    s = _MD_LINK_CLOSE.sub(r"\\]", s)
    return _MD_UNDERSCORE.sub(r"\\_", s)


def _md_block(text: Any) -> str:
    """`md_escape`, plus a block-start character is escaped: a list marker, a `>` (a quote),
    or the `[` of a link reference definition (`[x]: url`)."""

    def esc(m: re.Match[str]) -> str:
        mark = m.group(2)
        return m.group(1) + (mark[:-1] + "\\" + mark[-1] if mark[0].isdigit() else "\\" + mark)

    return _MD_BLOCK_START.sub(esc, md_escape(text), count=1)


def _json_text(obj: Any) -> str:
    """Indented JSON with `<`, `>`, `&` and backticks as unicode escapes: inert in a code fence
    and in HTML."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    for ch in "<>&`":
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text


def _persona_shown(p: Any) -> str:
    return NULL_SHOWN if p in NULL_PERSONA_MARKERS else str(p)


_CENSORING_NOTE = (
    "Outcomes and differential censoring: outcomes are counted per row (a scoring variant "
    "shares its slice's rows). Within each (base, stage, unit), a Pearson chi-square of output "
    f"vs missing by persona, its p-value from {CENSORING_PERMUTATIONS} permutations of the "
    "persona labels within each item and sample (the rows of one scenario share its "
    f"difficulty); p < {CENSORING_ALPHA} is marked 'differential censoring'. The tests are not "
    "corrected for multiple comparisons: about 1 in 20 falls below 0.05 when nothing is going on."
)


def _measure_notes(result: MetricsResult) -> list[str]:
    """What each figure measures: the label set, the chance correction, the two views."""
    k = len(result.personas)
    return [
        f"Label set: the run's {k} personas ({', '.join(result.personas)}), less, per base, any "
        "persona with no rows at all in one of its stages (a skipped adapter; listed in the notes "
        "above). A classifier prediction outside the label set counts as wrong.",
        "Chance correction: each cell has its own null, the macro-F1 expected if the "
        "predictions were independent of the true persona given the cell's own prediction "
        "shares and persona counts (per persona 2 n m / (N (n + m)); for the base null this is "
        "(1/K) sum 2q/(1 + Kq), lower the more skewed the scorer). The macro-F1 excess is "
        "macro-F1 minus that null, recomputed in every resample; p_null is its one-sided "
        f"permutation p-value ({result.n_perm} permutations of the persona labels within "
        "items); kappa is accuracy's chance correction. Persona is 'detected' where the "
        "excess interval lies above 0, never by comparison with the base stage. Raw macro-F1 "
        "stays, labelled raw.",
        "Conditional metrics use only rows with an output (a reply, an extracted or sent email) "
        "and average per-persona figures over the personas with a scored output (how many of K "
        "is shown); intention-to-treat (ITT) metrics use every attempted row, count a missing "
        "output as a wrong prediction and average over the personas with a row in the unit. A "
        "difference averages both sides over the same personas (scored on both sides, per "
        "resample: 'k of K'). Yield = rows with an output / rows attempted; backend failures "
        "(error, context overflow) are not persona misses: left out and counted on their own.",
    ]


def method_notes(result: MetricsResult) -> list[str]:
    """How every figure in the report is formed (shown in both the HTML and the markdown)."""
    small = (
        " With the small-sample correction (on): the expanded percentile interval, its tails cut "
        "at Phi(-sqrt(G/(G-1)) t_{G-1}) instead of alpha/2, G the clusters behind the figure."
        if result.small_sample
        else ""
    )
    return [
        *_measure_notes(result),
        f"Intervals: {result.ci:.0%} {result.method} cluster bootstrap with {result.n_boot} "
        "resamples. The cluster is the item (an ID prompt or an email scenario): all rows of an "
        "item (every persona and sample) are resampled together. Each cell has its own random "
        f"stream, seeded from (seed={result.seed}, base, stage, unit); chains, their rungs and "
        "the primary family share one draw per (base, item kind)."
        + small
        + (
            " BCa uses a jackknife over clusters for the acceleration."
            if result.method == "bca"
            else ""
        ),
        f"{DAGGER} marks an interval not to be trusted: fewer than {result.min_clusters} clusters "
        "carry it (for conditional figures, items with a scored output; for a difference, the "
        "fewer of its two sides; an unpaired difference reports the smaller side's count), or "
        "some resamples had nothing scored (counted, and left out of the interval), or it is "
        "undefined; the tables give the reason in their `flag` column, and the figures draw "
        f"such a bar hatched and faded. {BLIND} marks a unit where the positive control's "
        f"excess interval reaches 0: {BLIND_TEXT}.",
        f"Primary family, declared before looking: {FAMILY_TEXT}. A 'largest rung' named in "
        "the headline is selected after looking: its interval is not a test.",
        "Chains: every unit of a chain is estimated on the items common to all the chain's units "
        "of the same kind (prompts or scenarios) and on the personas defined in all of them, so "
        "the rungs add up exactly to the total; the size of those sets and the items left out "
        "are stated with each chain. A rung from prompt items to scenario items is an "
        "independent (unpaired) bootstrap, marked as such. Rungs and contrasts are "
        "closer-to-home minus further unit (positive = persona lost); stage differences are "
        "later minus earlier trained stage (positive = persona gained).",
        "The base stage (no adapter, no persona prompt) is an explicit null: it is generated once "
        "per item and sample, and each output is paired with every persona of the label set as "
        "its true label. Its predictions are independent of the persona by construction, so its "
        f"excess, kappa and accuracy are {FIXED}. Its role is the scorer's format bias: the share "
        "of its most-predicted label per unit, shown beside every rung.",
        _CENSORING_NOTE,
        "The predicted-label distribution shows what the classifier says per format, including "
        "labels outside the run's personas: a label that dominates a format in every stage "
        "(e.g. 'goodness' for neutral business prose) is a format prior, not persona expression.",
    ]


# --------------------------------------------------------------------------- table model
# Tables are built once as (headers, rows of plain strings) and rendered to HTML or markdown.

Table = tuple[list[str], list[list[str]]]


def _unit(result: MetricsResult, base: str, unit: str) -> str:
    """A unit's name, marked where the scorer is blind."""
    return f"{unit} {BLIND}" if result.blind(base, unit) else unit


def _metrics_table(result: MetricsResult, paper: bool) -> Table:
    head = [
        "base", "stage", "unit", "n", "yield", "macro-F1 excess [CI]", "p_null", "kappa [CI]",
        "macro-F1 (raw)", "its null", "personas scored", "excess ITT [CI]", "macro-F1 ITT (raw)",
        "accuracy", "accuracy ITT", "mean p(true)", "backend failures",
    ]  # fmt: skip
    if paper:
        head.append("published (raw)")
    rows = []
    for m in result.cells.values():
        row = [
            m.cell.base, m.cell.stage, _unit(result, m.cell.base, m.cell.slice),
            f"{m.n_scored}/{m.n_rows}", _iv(m.yield_, 2), _iv(m.macro_f1_excess),
            fmt_p(m.p_null), _iv(m.kappa), _iv(m.macro_f1), _num(m.macro_f1_null.estimate),
            f"{m.n_personas_scored}/{m.n_personas}", _iv(m.macro_f1_excess_itt),
            _iv(m.macro_f1_itt), _iv(m.accuracy), _iv(m.accuracy_itt), _num(m.mean_p_true),
            str(m.n_failed),
        ]  # fmt: skip
        if paper:
            row.append(published_text(*m.cell))
        rows.append(row)
    return head, rows


def _scorer_table(result: MetricsResult) -> Table:
    head = ["base", "scorer", "unit", "positive control", "sensitivity: control excess [CI]",
            "scorer blind", "base text: top label", "its share", "note"]  # fmt: skip
    rows = []
    for s in result.scorer_checks:
        blind = {True: f"YES {BLIND}", False: "no", None: "not checked"}[s.scorer_blind]
        rows.append([s.base, s.scorer, s.unit, s.control or "none", _iv(s.sensitivity), blind,
                     s.null_top_label or "–", _num(s.null_top_share, 2), _scorer_note(s)])  # fmt: skip
    return head, rows


def _scorer_note(s: ScorerCheck) -> str:
    if s.scorer_blind:
        return BLIND_TEXT
    return s.note or s.sensitivity.flag


def _retention_table(result: MetricsResult) -> Table:
    head = ["base", "stage", "unit", "view", "retention: excess / control's [CI]",
            "personas", "clusters", "flag"]  # fmt: skip
    rows = [
        [r.base, r.stage, _unit(result, r.base, r.unit), "ITT" if r.itt else "conditional",
         _ratio_text(r), f"{r.k} of {r.n_personas}", str(r.n_clusters), r.flag]
        for r in result.retention
    ]  # fmt: skip
    return head, rows


def _ratio_text(r: Retention) -> str:
    if r.estimate != r.estimate:
        return "undefined (the control's excess is not above 0)"
    if not has_interval(r.n_clusters, r.lo, r.hi):
        return f"{r.estimate:.2f}, interval {no_interval_text(r.n_clusters)}"
    dagger = "" if r.reliable else DAGGER
    return f"{r.estimate:.2f} [{_num(r.lo, 2)}, {_num(r.hi, 2)}]{dagger}"


def _family_table(result: MetricsResult) -> Table:
    head = ["base", "stage", "figure", "estimate [CI]", "simultaneous band", "p", "Holm p",
            "personas", "clusters", "verdict"]  # fmt: skip
    rows = []
    for d in result.family:
        what = (f"{d.a.slice}: excess over its own null" if d.kind == "excess"
                else f"{d.chain} total: {d.a.slice} -> {d.b.slice}")  # fmt: skip
        band = (
            f"[{d.lo_simul:+.3f}, {d.hi_simul:+.3f}]"
            if d.has_interval and d.lo_simul == d.lo_simul
            else no_interval_text(d.n_clusters)
            if not d.has_interval
            else "–"
        )
        marks = "".join(f" {BLIND} {u}" for u in d.blind)
        rows.append([d.a.base, d.a.stage, what + marks, _diff_text(d), band, fmt_p(d.p),
                     fmt_p(d.p_holm), f"{d.k} of {d.n_personas}", str(d.n_clusters),
                     _family_verdict(d)])  # fmt: skip
    return head, rows


def _family_verdict(d: Difference) -> str:
    if not d.has_interval and d.estimate == d.estimate:  # an estimate over one item
        return f"no claim: interval {no_interval_text(d.n_clusters)}"
    if d.lo_simul != d.lo_simul:
        return "undefined"
    if d.blind:
        return f"{BLIND} not evidence: the scorer is blind in {', '.join(d.blind)}"
    if d.kind == "excess":
        return "persona detected" if d.lo_simul > 0 else "not detected"
    if d.lo_simul > 0:
        return "persona lost"
    return "persona gained" if d.hi_simul < 0 else "no loss shown"


def _published_table(result: MetricsResult) -> Table:
    head = ["base", "stage", "unit", "ours: macro-F1 [CI]", "published", "value", "inside our CI"]
    rows = []
    for m in result.cells.values():
        for f in published_for(*m.cell):
            inside = m.macro_f1.lo <= f.value <= m.macro_f1.hi
            rows.append(
                [*m.cell, _iv(m.macro_f1), f.label, f"{f.value:.2f}", "yes" if inside else "no"]
            )
    return head, rows


def _classifier_table(result: MetricsResult, ctx: HeadlineContext) -> Table:
    head = ["base", "mode", "train / held-out texts", "held-out macro-F1 [CI]", "chance 1/K",
            "above chance", "lexical baseline macro-F1 [CI]", "warnings"]  # fmt: skip
    rows = []
    for base in result.bases:
        rep = ctx.classifiers.get(base)
        if not rep:
            given = ctx.classifier_sources.get(base)
            rows.append([base, "given" if given else "unknown", given or "", "not measured here",
                         "", "", "", ""])  # fmt: skip
            continue
        q = classifier_quality(base, rep, len(result.labels.get(base, result.personas)))
        n = f"{rep.get('n_train', '?')} / {rep.get('n_heldout', '?')}"
        verdict = "NO: figures from it are not persona retention" if q.at_chance else "yes"
        rows.append([base, q.mode, n, q.macro_f1, f"{q.chance:.3f}", verdict,
                     q.baseline or "not recorded", "; ".join(q.warnings)])  # fmt: skip
    return head, rows


def _flags(*items: tuple[str, Difference | None]) -> str:
    return "; ".join(f"{view}: {d.flag}" for view, d in items if d is not None and d.flag)


Decs = dict[tuple[str, bool], ChainDecomposition]  # (metric, itt) -> one chain's decomposition


def _decomp_groups(result: MetricsResult) -> list[Decs]:
    """Every metric and view of each (base, stage, chain), in result order; the base stage is
    left out (a null: its excess is 0 by construction, its role the scorer's format bias)."""
    groups: dict[tuple[str, str, str], Decs] = {}
    for dec in result.chains:
        if dec.stage != BASE_STAGE:
            groups.setdefault((dec.base, dec.stage, dec.chain), {})[(dec.metric, dec.itt)] = dec
    return list(groups.values())


def _bias(result: MetricsResult, base: str, unit: str) -> str:
    """The scorer's top label on neutral base text in `unit`, with its share."""
    check = result.scorer_check(base, unit)
    if check is None or check.null_top_label is None:
        return "–"
    return f"{check.null_top_label} {check.null_top_share:.0%}"


def _est(decs: Decs, key: tuple[str, bool], i: int) -> str:
    dec = decs.get(key)
    return _iv(dec.estimates[i]) if dec else ""


def _chain_units_table(result: MetricsResult, decs: Decs) -> Table:
    head = ["unit", "item kind", "common items", "items left out", "excess on common items",
            "excess ITT", "macro-F1 (raw)", "base text: top label"]  # fmt: skip
    ref = next(iter(decs.values()))
    rows = []
    for i, u in enumerate(ref.units):
        kind = ref.kinds.get(u, "")
        rows.append([
            _unit(result, ref.base, u), kind, str(ref.common.get(kind, "")),
            str(ref.dropped.get(u, 0)), _est(decs, (EXCESS, False), i),
            _est(decs, (EXCESS, True), i), _est(decs, ("macro_f1", False), i),
            _bias(result, ref.base, u),
        ])  # fmt: skip
    rows += [[u, "", "", "no records", "", "", "", ""] for u in ref.missing]
    return head, rows


_RUNG_HEAD = ["rung", "what it changes", "excess lost, conditional", "excess lost, ITT",
              "macro-F1 (raw) lost", "personas", "paired", "clusters",
              "base text: top label (from -> to)", "flag"]  # fmt: skip


def _rung_cells(decs: Decs, j: int | None) -> list[Difference | None]:
    out: list[Difference | None] = []
    for key in ((EXCESS, False), (EXCESS, True), ("macro_f1", False)):
        dec = decs.get(key)
        out.append(None if dec is None else (dec.total if j is None else dec.rungs[j]))
    return out


def _rung_row(result: MetricsResult, label: str, cells: list[Difference | None]) -> list[str]:
    cond, itt, raw = cells
    ref = next(d for d in cells if d is not None)
    texts = [(_diff_text(d) + (f" {BLIND}" if d.blind else "")) if d else "" for d in cells]
    k = f"{cond.k} of {cond.n_personas}" if cond else ""
    bias = f"{_bias(result, ref.a.base, ref.a.slice)} -> {_bias(result, ref.a.base, ref.b.slice)}"
    return [
        label, ref.changes, *texts, k, "paired" if ref.paired else "UNPAIRED",
        str(ref.n_clusters), bias, _flags(("conditional", cond), ("ITT", itt), ("raw", raw)),
    ]  # fmt: skip


def _chain_rungs_table(result: MetricsResult, decs: Decs) -> Table:
    ref = next(iter(decs.values()))
    rows = [
        _rung_row(result, f"{r.a.slice} -> {r.b.slice}", _rung_cells(decs, j))
        for j, r in enumerate(ref.rungs)
    ]
    t = ref.total
    rows.append(_rung_row(result, f"total: {t.a.slice} -> {t.b.slice}", _rung_cells(decs, None)))
    return _RUNG_HEAD, rows


def _pairing_text(ref: ChainDecomposition) -> str:
    paired = [f"{r.a.slice} -> {r.b.slice}" for r in ref.rungs if r.paired]
    unpaired = [
        f"{r.a.slice} -> {r.b.slice} ({r.note.removeprefix('unpaired: ')})"
        for r in ref.rungs
        if not r.paired
    ]
    parts = [f"Paired rungs: {', '.join(paired)}." if paired else "No rung is paired."]
    if unpaired:
        parts.append(f"Unpaired: {', '.join(unpaired)}.")
    parts.append(f"The rungs add up exactly to the total: {ref.note}.")
    return " ".join(parts)


def _contrast_table(result: MetricsResult) -> Table:
    head = ["base", "stage", "contrast", "what it changes", "excess lost, conditional",
            "excess lost, ITT", "macro-F1 (raw) lost", "personas", "paired", "clusters",
            "flag"]  # fmt: skip
    col = {(EXCESS, False): 4, (EXCESS, True): 5, ("macro_f1", False): 6}
    rows: dict[tuple, list[str]] = {}
    for d in result.differences:
        if d.kind != "contrast" or (d.metric, d.itt) not in col:
            continue
        key = (d.a.base, d.a.stage, f"{d.a.slice} -> {d.b.slice}")
        row = rows.setdefault(
            key, [*key, d.changes, "", "", "", "", "paired" if d.paired else "UNPAIRED",
                  str(d.n_clusters), ""],
        )  # fmt: skip
        row[col[(d.metric, d.itt)]] = _diff_text(d) + (f" {BLIND}" if d.blind else "")
        if (d.metric, d.itt) == (EXCESS, False):
            row[7] = f"{d.k} of {d.n_personas}"
        if d.flag:
            view = "ITT" if d.itt else "conditional"
            row[10] = "; ".join(x for x in (row[10], f"{d.metric} {view}: {d.flag}") if x)
    return head, list(rows.values())


def _stage_table(result: MetricsResult) -> Table:
    head = ["base", "unit", "stage", "minus stage", "metric", "gain, conditional", "gain, ITT",
            "clusters", "flag"]  # fmt: skip
    rows: dict[tuple, list[str]] = {}
    for d in result.differences:
        if d.kind != "stage":
            continue
        key = (d.a.base, _unit(result, d.a.base, d.a.slice), d.a.stage, d.b.stage, d.metric)
        row = rows.setdefault(key, [*key, "", "", str(d.n_clusters), ""])
        row[6 if d.itt else 5] = _diff_text(d)
        if d.flag:
            row[8] = "; ".join(
                x for x in (row[8], f"{'ITT' if d.itt else 'conditional'}: {d.flag}") if x
            )
    return head, list(rows.values())


def _per_persona_pivot(result: MetricsResult, slice_: str) -> Table:
    head = ["base/stage", *result.personas]
    rows = []
    for b in result.bases:
        for st in result.stages:
            m = result.get(b, st, slice_)
            if m is not None:
                by = {p.persona: p for p in m.per_persona}
                vals = [_num(by[p].f1.estimate, 2) if p in by else "n/a" for p in result.personas]
                rows.append([f"{b}/{st}", *vals])
    return head, rows


def _per_persona_detail(m: CellMetrics) -> Table:
    head = ["persona", "precision", "recall", "F1 [CI]", "F1 ITT [CI]", "n", "scored", "yield"]
    rows = [
        [p.persona, _num(p.precision), _num(p.recall), _iv(p.f1), _iv(p.f1_itt), str(p.n),
         str(p.n_scored), _num(p.yield_, 2)]
        for p in m.per_persona
    ]  # fmt: skip
    return head, rows


def _pred_dist_table(result: MetricsResult) -> Table:
    labels: list[str] = list(result.personas)
    for m in result.cells.values():
        labels += [lab for lab in m.pred_distribution if lab not in labels]
    head = ["base", "stage", "unit", *labels, "(no output, of attempted)"]
    rows = []
    for m in result.cells.values():
        shares = [
            _num(m.pred_distribution.get(lab, 0) / m.n_scored, 2) if m.n_scored else "–"
            for lab in labels
        ]
        rows.append([m.cell.base, m.cell.stage, _unit(result, m.cell.base, m.cell.slice),
                     *shares, _num(m.n_none / m.n_rows, 2) if m.n_rows else "–"])  # fmt: skip
    return head, rows


def _confusion_table(m: CellMetrics) -> Table:
    head = ["true \\ predicted", *m.confusion_cols]
    rows = [[p, *(str(int(v)) for v in m.confusion[i])] for i, p in enumerate(m.confusion_rows)]
    return head, rows


# --------------------------------------------------------------------------- outcomes


def outcome_records(records: Iterable[PredictionRecord]) -> list[PredictionRecord]:
    """The rows whose outcomes are counted: each base output once (records of an expanded base
    null, which share a key, collapse back to one null-persona row), and per slice only its
    default unit (a scoring variant scores the same rows, with the same outcomes), unless the
    slice is present only through variants."""
    recs = list(records)
    units = {r.slice for r in recs}
    seen: set[tuple[str, str, str]] = set()
    out = []
    for r in recs:
        slice_, variant = split_unit(r.slice)
        if variant is not None and slice_ in units:
            continue
        if r.stage == BASE_STAGE and r.key is not None:
            if (r.base, r.slice, r.key) in seen:
                continue
            seen.add((r.base, r.slice, r.key))
            r = dataclasses.replace(r, persona=NULL_PERSONA)
        out.append(r)
    return out


OutcomeRow = dict[str, object]
_OUTCOME_KEYS = ("base", "stage", "persona", "unit", "n", "failed", "yield")


def _outcome_rows(recs: Sequence[PredictionRecord], result: MetricsResult) -> list[OutcomeRow]:
    """`outcomes.outcome_table` in the report's order: base, stage, unit, persona."""
    orders = [
        {b: i for i, b in enumerate(result.bases)},
        {s: i for i, s in enumerate(result.stages)},
        {u: i for i, u in enumerate(result.slices)},
        {p: i for i, p in enumerate([NULL_PERSONA, *result.personas])},
    ]

    def key(r: OutcomeRow) -> tuple:
        vals = (r["base"], r["stage"], r["unit"], r["persona"])
        return tuple((o.get(str(v), len(o)), str(v)) for o, v in zip(orders, vals, strict=True))

    return sorted(outcome_table(recs), key=key)


def _outcome_columns(rows: Sequence[OutcomeRow]) -> list[str]:
    """The outcomes that occur, in `schema.OUTCOMES` order (then any unknown one)."""
    columns = dict.fromkeys([*OUTCOMES, *(k for r in rows for k in r)])
    return [o for o in columns if o not in _OUTCOME_KEYS and any(r.get(o) for r in rows)]


def _count(r: OutcomeRow, key: str) -> int:
    v = r.get(key, 0)
    return v if isinstance(v, int) else 0


def _outcome_table(rows: Sequence[OutcomeRow]) -> Table:
    used = _outcome_columns(rows)
    head = ["base", "stage", "persona", "unit", "rows", FAILED_HEAD, "yield", *used]
    body = []
    for r in rows:
        share = r["yield"]
        body.append(
            [str(r["base"]), str(r["stage"]), _persona_shown(r["persona"]), str(r["unit"]),
             str(r["n"]), str(_count(r, "failed")),
             _num(share if isinstance(share, float) else None, 2),
             *(str(_count(r, o)) for o in used)]
        )  # fmt: skip
    return head, body


FAILED_HEAD = "backend failures (not persona misses)"
# Both p-values of the censoring test sit side by side: the heads say which one decides.
P_PERM_HEAD = "p (permutation: used for the verdict)"
P_ASYM_HEAD = "p (asymptotic: for reference, not used)"


def _censoring_cols(t: CensoringTest | None) -> list[str]:
    """yield per persona, chi-square (dof), p (permutation), p (asymptotic), verdict."""
    if t is None:
        return ["", "–", "–", "–", "no personas to compare"]
    out_col = t.outcomes.index("output") if "output" in t.outcomes else None
    yields = []
    for p, row in zip(t.personas, t.table, strict=True):
        share = (row[out_col] / sum(row)) if (out_col is not None and sum(row)) else 0.0
        yields.append(f"{p} {share:.2f}")
    if not t.n_perm:
        return [", ".join(yields), "–", "–", "–", t.note]
    verdict = "DIFFERENTIAL CENSORING" if t.p_permutation < CENSORING_ALPHA else "no evidence"
    return [", ".join(yields), f"{t.statistic:.2f} ({t.dof})", f"{t.p_permutation:.4f}",
            f"{t.p_asymptotic:.4f}", verdict]  # fmt: skip


def _outcome_summary(rows: Sequence[OutcomeRow], tests: Sequence[CensoringTest]) -> Table:
    """One row per (base, stage, unit): outcome counts, yield, and the censoring test."""
    used = _outcome_columns(rows)
    cells: dict[tuple[str, str, str], list[OutcomeRow]] = {}
    for r in rows:
        cells.setdefault((str(r["base"]), str(r["stage"]), str(r["unit"])), []).append(r)
    by_test = {(t.base, t.stage, t.unit): t for t in tests}
    head = ["base", "stage", "unit", "rows", *used, FAILED_HEAD, "yield", "yield per persona",
            "chi-square (dof)", P_PERM_HEAD, P_ASYM_HEAD, "verdict"]  # fmt: skip
    body = []
    for key, group in cells.items():
        n = sum(_count(r, "n") for r in group)
        failed = sum(_count(r, "failed") for r in group)
        out = sum(_count(r, o) for r in group for o in SCORED_OUTCOMES)
        counts = [str(sum(_count(r, o) for r in group)) for o in used]
        share = out / (n - failed) if n > failed else None
        body.append([*key, str(n), *counts, str(failed), _num(share, 2),
                     *_censoring_cols(by_test.get(key))])  # fmt: skip
    return head, body


# --------------------------------------------------------------------------- renderers


def _html_table(t: Table, cls: str = "") -> str:
    head, rows = t
    ths = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    c = f' class="{_e(cls)}"' if cls else ""
    return f"<table{c}><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(t: Table) -> str:
    head, rows = t
    lines = [
        "| " + " | ".join(md_escape(h) for h in head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


class _Doc:
    """The report, built once and rendered to HTML and markdown side by side. Every text
    argument is plain text (escaped here); `raw_html` takes markup built by this module."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []

    def h1(self, text: str) -> None:
        self.html.append(f"<h1>{_e(text)}</h1>")
        self.md += [f"# {md_escape(text)}", ""]

    def h2(self, anchor: str, text: str) -> None:
        self.html.append(f'<h2 id="{_e(anchor)}">{_e(text)}</h2>')
        self.md += [f"## {md_escape(text)}", ""]

    def h3(self, text: str) -> None:
        self.html.append(f"<h3>{_e(text)}</h3>")
        self.md += [f"### {md_escape(text)}", ""]

    def p(self, text: str, md: bool = True) -> None:
        self.html.append(f"<p>{_e(text)}</p>")
        if md:
            self.md += [_md_block(text), ""]

    def table(self, t: Table, md: bool = True, empty: str = "") -> None:
        if not t[1] and empty:
            self.p(empty, md)
            return
        self.html.append(_html_table(t))
        if md:
            self.md += [_md_table(t), ""]

    def ul(self, items: Sequence[str], cls: str = "", md: bool = True) -> None:
        c = f' class="{_e(cls)}"' if cls else ""
        self.html.append(f"<ul{c}>" + "".join(f"<li>{_e(n)}</li>" for n in items) + "</ul>")
        if md and items:
            self.md += [f"- {_md_block(n)}" for n in items] + [""]

    def details(self, summary: str, t: Table, md: bool = False) -> None:
        """A collapsed table; in the markdown only with `md` (else the CSVs hold it)."""
        self.html.append(f"<details><summary>{_e(summary)}</summary>{_html_table(t)}</details>")
        if md:
            self.md += [f"**{md_escape(summary)}**", "", _md_table(t), ""]

    def raw_html(self, markup: str) -> None:
        self.html.append(markup)

    def md_lines(self, lines: Sequence[str]) -> None:
        self.md += [*lines, ""]


# --------------------------------------------------------------------------- samples


def samples_from_records(records: Iterable[PredictionRecord]) -> list[Sample]:
    """Minimal browser samples when no generation rows are at hand (e.g. --predictions).

    Records sharing a key (a base output expanded to every persona) give one sample.
    """
    out = []
    seen: set[str] = set()
    for i, r in enumerate(records):
        if r.key is not None:
            if r.key in seen:
                continue
            seen.add(r.key)
        out.append(Sample.from_record(r, r.key or f"row{i}"))
    return out


def select_samples(samples: Sequence[Sample], cap: int = MAX_SAMPLES) -> tuple[list[Sample], str]:
    """At most `cap` samples, stratified: round-robin over (base, stage, slice, persona) groups,
    a deterministic pseudo-random order within each group. Returns (samples, note)."""
    clean = list(samples)
    if len(clean) <= cap:
        chosen = clean
        note = f"All {len(clean)} samples are shown."
    else:
        groups: dict[tuple[str, ...], list[Sample]] = {}
        for s in clean:
            groups.setdefault((s.base, s.stage, s.slice, s.persona), []).append(s)
        for g in groups.values():
            g.sort(key=lambda s: stable_hash(["sample-order", s.key]))
        chosen, depth = [], 0
        while len(chosen) < cap:
            for g in groups.values():
                if depth < len(g) and len(chosen) < cap:
                    chosen.append(g[depth])
            depth += 1
        note = (
            f"{len(chosen)} of {len(clean)} samples are embedded, stratified: taken in turn from "
            "every (base, stage, slice, persona) group. The full data is in the run directory."
        )

    def order(s: Sample) -> tuple[str | int, ...]:
        return (s.base, s.stage, s.slice, s.persona, s.item_id, s.sample_idx)

    return sorted(chosen, key=order), note


def _json_for_script(obj: Any) -> str:
    """JSON that is inert inside a <script> element: no '<', '>' or '&' appear literally."""
    text = json.dumps(obj, ensure_ascii=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# --------------------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1300px;
padding:0 1.2em 3em;color:#222;line-height:1.4}
h1{margin-top:.8em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
.banner{background:#b00020;color:#fff;padding:.8em 1em;font-weight:bold;margin:1em 0}
.warnings{background:#fff4e5;border:2px solid #b35c00;padding:.6em 1em;margin:1em 0}
.warnings ul{margin:.3em 0}.headline{background:#f4f8fc;border-left:5px solid #4C72B0;
padding:.2em 1em;margin:1em 0}.headline h2{border:none;margin-top:.4em}.headline p{margin:.45em 0}
.notes li{margin:.2em 0}.fig{margin:1em 0}.fig img{max-width:100%;border:1px solid #eee}.main-fig img{max-height:36vh;width:auto}
.fig figcaption{font-size:.85em;color:#555}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:.4em;margin:.2em 0;
font-size:.85em}
.filters{position:sticky;top:0;z-index:1;background:#fff;padding:.4em 0;border-bottom:1px solid #ddd}
.filters label{margin-right:1em;display:inline-block;margin-bottom:.2em}
#sample-search{width:22em}.pager{margin:.6em 0}.pager button{margin-right:.6em}
.sample{border:1px solid #ccc;margin:.8em 0;padding:.5em;scroll-margin-top:5em}
.sample.linked,.sample:target{border:2px solid #4C72B0;box-shadow:0 0 0 3px #dbe6f4}
.sample .meta{font-weight:bold;font-size:.9em}.permalink{font-weight:normal;color:#4C72B0}
.msg{margin:.3em 0 .3em .5em}details.role-system>summary{cursor:pointer;color:#666}
.steps{margin:.2em 0;padding-left:1.6em}.step{margin:.3em 0}
.step-head{font-weight:bold;font-size:.85em}.arg-name{font-size:.75em;color:#666}
.verdict{font-weight:bold}.v-correct{color:#1b7f2a}.v-wrong{color:#b00020}
.v-no-label{color:#555}.v-no-output{color:#555;font-style:italic}
.role{font-size:.75em;text-transform:uppercase;color:#666}.role-user pre{background:#eef4ff}
.role-assistant pre{background:#f1fbef}.role-tool pre{background:#fff7e6}
.role-system pre{background:#f0f0f0}.email{border-left:4px solid #4C72B0;padding-left:.5em}
.prob{display:flex;align-items:center;font-size:.8em;margin:1px 0}
.prob .lab{width:10em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.prob .track{display:inline-block;width:20em;height:.8em;background:#eee;margin-right:.4em}
.prob .bar{display:block;height:100%;background:#4C72B0}
.ok{color:#1b7f2a}.bad{color:#b00020}nav a{margin-right:.8em}
"""

BROWSER_PAGE = 50  # sample cards per page of the browser
STATIC_CARDS = 20  # cards written as static HTML: what a reader sees without JavaScript
NO_TRUE_LABEL = frozenset({NULL_SHOWN, *(m for m in NULL_PERSONA_MARKERS if m is not None)})
VERDICTS = {
    "correct": "correct",
    "wrong": "wrong",
    "no-label": "no true label: base stage",
    "no-output": "no output",
}
_ANCHOR_SAFE = frozenset(string.ascii_letters + string.digits + "_-")
_BROWSER_FILTERS = (
    ("base", "base"), ("stage", "stage"), ("persona", "persona"), ("slice", "unit"),
    ("outcome", "outcome"),
)  # fmt: skip
_BROWSER_SORTS = (
    ("data", "base, stage, unit, persona, item"),
    ("unit", "unit first"),
    ("stage", "stage first"),
    ("ptrue-asc", "p(true persona) ascending: most confidently wrong first"),
    ("ptrue-desc", "p(true persona) descending"),
    ("length-desc", "scored text: longest first"),
    ("length-asc", "scored text: shortest first"),
)

_JS_TEMPLATE = """
(function () {
  "use strict";
  var PAGE = __PAGE__;
  var NO_LABEL = __NO_LABEL__;
  var ALL = "__all__";
  var data = JSON.parse(document.getElementById("sample-data").textContent);
  var fields = ["base", "stage", "persona", "slice", "outcome"];
  var selects = {};
  var hay = [];
  var anchors = null;
  var order = null;
  var hits = [];
  var start = 0;
  var end = PAGE;
  var query = "";
  var timer = null;
  var own = Object.prototype.hasOwnProperty;
  function byId(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function asText(v) {
    if (v === null || v === undefined) { return ""; }
    return typeof v === "string" ? v : JSON.stringify(v, null, 2);
  }
  function isObj(v) { return v !== null && typeof v === "object" && !Array.isArray(v); }
  function anchor(key) {
    var out = "s-";
    for (var ch of String(key)) {
      out += /^[A-Za-z0-9_-]$/.test(ch) ? ch : "." + ch.codePointAt(0).toString(16) + ".";
    }
    return out;
  }
  function noLabel(s) {
    return s.persona === null || s.persona === undefined || NO_LABEL.indexOf(s.persona) !== -1;
  }
  function verdict(s) {
    if (s.prediction === null || s.prediction === undefined) { return "no-output"; }
    if (noLabel(s)) { return "no-label"; }
    return s.prediction === s.persona ? "correct" : "wrong";
  }
  var VERDICT_TEXT = {"correct": "correct", "wrong": "wrong",
    "no-label": "no true label: base stage", "no-output": "no output"};
  function pTrue(s) {
    if (noLabel(s) || !isObj(s.probs) || !own.call(s.probs, s.persona)) { return null; }
    var p = Number(s.probs[s.persona]);
    return isNaN(p) ? null : p;
  }
  function scoredText(s) {
    if (typeof s.text === "string") { return s.text; }
    return isObj(s.email) ? asText(s.email.body) : "";
  }
  function haystack(s) {
    var parts = [asText(s.text), asText(s.prediction)];
    if (isObj(s.email)) { parts.push(asText(s.email.to), asText(s.email.subject), asText(s.email.body)); }
    (Array.isArray(s.messages) ? s.messages : []).forEach(function (m) {
      if (isObj(m)) { parts.push(asText(m.content), asText(m.tool_calls)); }
    });
    return parts.join("\\u0000").toLowerCase();
  }
  function argsBlock(args) {
    var wrap = el("div", "args");
    if (isObj(args)) {
      Object.keys(args).forEach(function (k) {
        wrap.appendChild(el("div", "arg-name", k));
        wrap.appendChild(el("pre", "", asText(args[k])));
      });
    } else if (args !== undefined && args !== null && args !== "") {
      wrap.appendChild(el("pre", "", asText(args)));
    }
    return wrap;
  }
  function step(head, args, result, hasResult) {
    var li = el("li", "step");
    li.appendChild(el("div", "step-head", head));
    li.appendChild(argsBlock(args));
    if (hasResult) {
      li.appendChild(el("div", "arg-name", "result"));
      li.appendChild(el("pre", "", asText(result)));
    }
    return li;
  }
  function callList(calls) {
    var ol = el("ol", "steps");
    (Array.isArray(calls) ? calls : [calls]).forEach(function (c, k) {
      var f = isObj(c) && isObj(c.function) ? c.function : (isObj(c) ? c : {arguments: c});
      ol.appendChild(step("call " + (k + 1) + ": " + asText(f.name || "?"), f.arguments, null, false));
    });
    return ol;
  }
  function toolSteps(log) {
    var d = el("details", "tools");
    d.open = true;
    d.appendChild(el("summary", "", "tool trajectory (" + log.length + " calls)"));
    var ol = el("ol", "steps");
    log.forEach(function (t, k) {
      t = isObj(t) ? t : {result: t};
      var ok = t.ok === true ? " (ok)" : (t.ok === false ? " (failed)" : "");
      var args = own.call(t, "arguments") ? t.arguments : t.args;
      var hasRes = own.call(t, "result") || own.call(t, "content");
      var res = own.call(t, "result") ? t.result : t.content;
      ol.appendChild(step("step " + (k + 1) + ": " + asText(t.tool || t.name || "?") + ok,
        args, res, hasRes));
    });
    d.appendChild(ol);
    return d;
  }
  function messageBox(m) {
    m = isObj(m) ? m : {content: m};
    var role = String(m.role || "?");
    var cls = "msg role-" + role.replace(/[^a-z]/g, "");
    var label = role + (m.name ? " (" + asText(m.name) + ")" : "") +
      (m.note ? " " + asText(m.note) : "");
    var parts = [];
    if (m.content !== undefined && m.content !== null && m.content !== "") {
      parts.push(el("pre", "", asText(m.content)));
    }
    if (m.tool_calls) { parts.push(callList(m.tool_calls)); }
    var box;
    if (role === "system") {
      box = el("details", cls);
      box.appendChild(el("summary", "role",
        label + ": " + asText(m.content).length + " characters (click to show)"));
    } else {
      box = el("div", cls);
      box.appendChild(el("div", "role", label));
    }
    parts.forEach(function (p) { box.appendChild(p); });
    return box;
  }
  function probBars(probs) {
    var wrap = el("div", "probs");
    var items = Object.keys(probs).map(function (k) { return [k, Number(probs[k])]; });
    items.sort(function (a, b) { return b[1] - a[1]; });
    items.slice(0, 5).forEach(function (kv) {
      var row = el("div", "prob");
      var lab = el("span", "lab", kv[0]);
      lab.setAttribute("title", kv[0]);
      row.appendChild(lab);
      var track = el("span", "track");
      var bar = el("span", "bar");
      bar.style.width = Math.max(0, Math.min(100, kv[1] * 100)).toFixed(1) + "%";
      track.appendChild(bar);
      row.appendChild(track);
      row.appendChild(el("span", "val", kv[1].toFixed(3)));
      wrap.appendChild(row);
    });
    return wrap;
  }
  function card(s) {
    var c = el("div", "sample");
    var id = anchor(s.key);
    var v = verdict(s);
    c.id = id;
    c.setAttribute("data-key", String(s.key));
    c.setAttribute("data-verdict", v);
    var meta = el("div", "meta", [s.base, s.stage, s.persona, s.slice].join(" / ") +
      "  item " + s.item_id + "  sample " + s.sample_idx + "  outcome " + s.outcome + "  ");
    var link = el("a", "permalink", "#" + id);
    link.href = "#" + id;
    meta.appendChild(link);
    c.appendChild(meta);
    var pred = el("div", "");
    pred.appendChild(el("span", "verdict v-" + v, "prediction: " +
      (v === "no-output" ? "(no output)" : s.prediction + " [" + VERDICT_TEXT[v] + "]")));
    c.appendChild(pred);
    if (isObj(s.probs)) { c.appendChild(probBars(s.probs)); }
    if (isObj(s.email)) {
      var em = el("div", "email");
      em.appendChild(el("div", "role", "extracted email"));
      em.appendChild(el("div", "", "To: " + asText(s.email.to)));
      em.appendChild(el("div", "", "Subject: " + asText(s.email.subject)));
      em.appendChild(el("pre", "", asText(s.email.body)));
      c.appendChild(em);
    } else if (s.text !== null && s.text !== undefined) {
      c.appendChild(el("div", "role", "scored text"));
      c.appendChild(el("pre", "scored", asText(s.text)));
    }
    var msgs = Array.isArray(s.messages) ? s.messages : [];
    if (msgs.length) {
      var conv = el("details", "conv");
      conv.appendChild(el("summary", "", "conversation (" + msgs.length + " messages)"));
      msgs.forEach(function (m) { conv.appendChild(messageBox(m)); });
      conv.open = true;
      c.appendChild(conv);
    }
    var log = Array.isArray(s.tool_log) ? s.tool_log : [];
    if (log.length) { c.appendChild(toolSteps(log)); }
    return c;
  }
  function keyed(fn, desc) {
    var keys = data.map(fn);
    return function (i, j) {
      var a = keys[i], b = keys[j];
      if (a === null || b === null) { return a === b ? i - j : (a === null ? 1 : -1); }
      if (a < b) { return desc ? 1 : -1; }
      if (a > b) { return desc ? -1 : 1; }
      return i - j;
    };
  }
  var SORTS = {
    "unit": function () { return keyed(function (s) { return String(s.slice); }); },
    "stage": function () { return keyed(function (s) { return String(s.stage); }); },
    "ptrue-asc": function () { return keyed(pTrue); },
    "ptrue-desc": function () { return keyed(pTrue, true); },
    "length-desc": function () { return keyed(function (s) { return scoredText(s).length; }, true); },
    "length-asc": function () { return keyed(function (s) { return scoredText(s).length; }); }
  };
  function sorted() {
    var idx = data.map(function (_, i) { return i; });
    var how = byId("sample-sort").value;
    if (own.call(SORTS, how)) { idx.sort(SORTS[how]()); }
    return idx;
  }
  function matches(i) {
    var s = data[i];
    for (var k = 0; k < fields.length; k++) {
      var v = selects[fields[k]].value;
      if (v !== ALL && String(s[fields[k]]) !== v) { return false; }
    }
    var want = byId("f-verdict").value;
    if (want !== ALL && verdict(s) !== want) { return false; }
    if (query) {
      if (hay[i] === undefined) { hay[i] = haystack(s); }
      if (hay[i].indexOf(query) === -1) { return false; }
    }
    return true;
  }
  function refilter() {
    if (order === null) { order = sorted(); }
    hits = order.filter(matches);
    start = 0;
    end = PAGE;
  }
  function status() {
    var last = Math.min(end, hits.length);
    byId("sample-count").textContent = String(hits.length);
    byId("sample-range").textContent = last > start ? (start + 1) + "\\u2013" + last : "0";
    byId("sample-prev").hidden = start === 0;
    byId("sample-next").hidden = end >= hits.length;
    byId("sample-more").hidden = end >= hits.length;
  }
  function append(from, to) {
    var frag = document.createDocumentFragment();
    hits.slice(from, to).forEach(function (i) { frag.appendChild(card(data[i])); });
    byId("sample-list").appendChild(frag);
  }
  function render() {
    byId("sample-list").textContent = "";
    append(start, end);
    status();
  }
  function reset() {
    fields.concat(["verdict"]).forEach(function (f) { byId("f-" + f).value = ALL; });
    byId("sample-search").value = "";
    query = "";
  }
  function goTo(id) {
    if (id.indexOf("s-") !== 0) { return; }
    if (anchors === null) { anchors = data.map(function (s) { return anchor(s.key); }); }
    var i = anchors.indexOf(id);
    if (i === -1) { return; }
    var pos = hits.indexOf(i);
    if (pos === -1) { reset(); refilter(); pos = hits.indexOf(i); }
    if (pos < start || pos >= end) {
      start = pos - (pos % PAGE);
      end = start + PAGE;
      render();
    }
    var old = document.querySelector(".sample.linked");
    if (old) { old.classList.remove("linked"); }
    var c = byId(id);
    if (c) { c.classList.add("linked"); c.scrollIntoView(); }
  }
  function fragment() {
    try { return decodeURIComponent(location.hash.slice(1)); } catch (err) { return ""; }
  }
  function update() { refilter(); render(); }
  fields.forEach(function (f) {
    var sel = byId("f-" + f);
    var seen = {};
    data.forEach(function (s) { seen[String(s[f])] = true; });
    Object.keys(seen).sort().forEach(function (v) {
      var o = el("option", "", v);
      o.value = v;
      sel.appendChild(o);
    });
    sel.addEventListener("change", update);
    selects[f] = sel;
  });
  byId("f-verdict").addEventListener("change", update);
  byId("sample-sort").addEventListener("change", function () { order = null; update(); });
  byId("sample-search").addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(function () {
      query = byId("sample-search").value.toLowerCase();
      update();
    }, 200);
  });
  byId("sample-more").addEventListener("click", function () {
    var from = end;
    end += PAGE;
    append(from, end);
    status();
  });
  function page(delta) {
    start = Math.max(0, start + delta);
    end = start + PAGE;
    render();
    byId("sample-status").scrollIntoView();
  }
  byId("sample-prev").addEventListener("click", function () { page(-PAGE); });
  byId("sample-next").addEventListener("click", function () { page(end - start); });
  document.addEventListener("keydown", function (e) {
    var t = e.target && e.target.tagName;
    if (e.key === "/" && t !== "INPUT" && t !== "SELECT" && t !== "TEXTAREA") {
      e.preventDefault();
      byId("sample-search").focus();
    }
  });
  window.addEventListener("hashchange", function () { goTo(fragment()); });
  byId("sample-nojs").hidden = true;
  byId("sample-controls").hidden = false;
  byId("sample-pager").hidden = false;
  update();
  var start0 = fragment();
  if (start0.indexOf("s-") === 0) {
    goTo(start0);
  } else if (start0 && byId(start0)) {
    byId(start0).scrollIntoView();
  }
})();
"""


_JS = _JS_TEMPLATE.replace("__PAGE__", str(BROWSER_PAGE)).replace(
    "__NO_LABEL__", json.dumps(sorted(NO_TRUE_LABEL))
)


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def sample_anchor(key: str) -> str:
    """The HTML id of a sample's card: "s-" and its key, every character other than an ASCII
    letter, digit, `_` or `-` written as `.HEX.` (its code point); the page's script builds the
    same id, and a link to `#id` opens the page at that sample."""
    return "s-" + "".join(c if c in _ANCHOR_SAFE else f".{ord(c):x}." for c in str(key))


def sample_verdict(s: Sample) -> str:
    """The browser's verdict on a sample: "no-output" (no prediction), "no-label" (a base-stage
    sample: its persona is the null persona, so there is no true label), else "correct" or
    "wrong". The page's script applies the same rule (its filter and its colours)."""
    if s.prediction is None:
        return "no-output"
    if s.persona is None or s.persona in NO_TRUE_LABEL:
        return "no-label"
    return "correct" if s.prediction == s.persona else "wrong"


def _as_text(v: Any) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else json.dumps(v, indent=2, ensure_ascii=False, default=str)


def _pre(v: Any) -> str:
    return f"<pre>{_e(_as_text(v))}</pre>"


def _static_args(args: Any) -> str:
    if isinstance(args, dict):
        inner = "".join(f'<div class="arg-name">{_e(k)}</div>{_pre(v)}' for k, v in args.items())
    else:
        inner = "" if args in (None, "") else _pre(args)
    return f'<div class="args">{inner}</div>'


def _static_step(head: str, args: Any, result: Any = None, has_result: bool = False) -> str:
    res = f'<div class="arg-name">result</div>{_pre(result)}' if has_result else ""
    return f'<li class="step"><div class="step-head">{_e(head)}</div>{_static_args(args)}{res}</li>'


def _static_calls(calls: Any) -> str:
    steps = []
    for k, c in enumerate(calls if isinstance(calls, list) else [calls], 1):
        f = c.get("function") if isinstance(c, dict) else None
        f = f if isinstance(f, dict) else (c if isinstance(c, dict) else {"arguments": c})
        steps.append(
            _static_step(f"call {k}: {_as_text(f.get('name') or '?')}", f.get("arguments"))
        )
    return f'<ol class="steps">{"".join(steps)}</ol>'


def _static_tool_log(log: list[Any]) -> str:
    steps = []
    for k, t in enumerate(log, 1):
        t = t if isinstance(t, dict) else {"result": t}
        ok = " (ok)" if t.get("ok") is True else " (failed)" if t.get("ok") is False else ""
        head = f"step {k}: {_as_text(t.get('tool') or t.get('name') or '?')}{ok}"
        args = t["arguments"] if "arguments" in t else t.get("args")
        has = "result" in t or "content" in t
        steps.append(
            _static_step(head, args, t["result"] if "result" in t else t.get("content"), has)
        )
    return (
        f'<details class="tools" open><summary>tool trajectory ({len(log)} calls)</summary>'
        f'<ol class="steps">{"".join(steps)}</ol></details>'
    )


def _static_message(m: Any) -> str:
    m = m if isinstance(m, dict) else {"content": m}
    role = str(m.get("role") or "?")
    cls = "msg role-" + re.sub("[^a-z]", "", role)
    label = role + (f" ({_as_text(m['name'])})" if m.get("name") else "")
    label += f" {_as_text(m['note'])}" if m.get("note") else ""
    body = "" if m.get("content") in (None, "") else _pre(m["content"])
    body += _static_calls(m["tool_calls"]) if m.get("tool_calls") else ""
    if role == "system":
        n = len(_as_text(m.get("content")))
        head = f'<summary class="role">{_e(label)}: {n} characters (click to show)</summary>'
        return f'<details class="{cls}">{head}{body}</details>'
    return f'<div class="{cls}"><div class="role">{_e(label)}</div>{body}</div>'


def _static_probs(probs: dict[str, Any]) -> str:
    rows = []
    top = sorted(probs.items(), key=lambda kv: -float(kv[1]))[:5]
    for lab, p in top:
        w = max(0.0, min(100.0, float(p) * 100))
        rows.append(
            f'<div class="prob"><span class="lab" title="{_e(lab)}">{_e(lab)}</span>'
            f'<span class="track"><span class="bar" style="width:{w:.1f}%"></span></span>'
            f'<span class="val">{float(p):.3f}</span></div>'
        )
    return f'<div class="probs">{"".join(rows)}</div>'


def _static_scored(s: Sample) -> str:
    if isinstance(s.email, dict):
        return (
            '<div class="email"><div class="role">extracted email</div>'
            f"<div>To: {_e(_as_text(s.email.get('to')))}</div>"
            f"<div>Subject: {_e(_as_text(s.email.get('subject')))}</div>"
            f"{_pre(s.email.get('body'))}</div>"
        )
    if s.text is None:
        return ""
    return f'<div class="role">scored text</div><pre class="scored">{_e(s.text)}</pre>'


def _static_card(s: Sample) -> str:
    """One sample's card as static, escaped HTML (the page's script replaces it when it runs)."""
    sid, v = sample_anchor(s.key), sample_verdict(s)
    meta = (
        " / ".join(str(x) for x in (s.base, s.stage, s.persona, s.slice))
        + f"  item {s.item_id}  sample {s.sample_idx}  outcome {s.outcome}  "
    )
    shown = "(no output)" if v == "no-output" else f"{s.prediction} [{VERDICTS[v]}]"
    conv = "".join(_static_message(m) for m in s.messages)
    if conv:
        conv = (
            f'<details class="conv" open><summary>conversation ({len(s.messages)} messages)'
            f"</summary>{conv}</details>"
        )
    return (
        f'<div class="sample" id="{_e(sid)}" data-key="{_e(s.key)}" data-verdict="{v}">'
        f'<div class="meta">{_e(meta)}<a class="permalink" href="#{_e(sid)}">#{_e(sid)}</a></div>'
        f'<div><span class="verdict v-{v}">prediction: {_e(shown)}</span></div>'
        + (_static_probs(s.probs) if isinstance(s.probs, dict) else "")
        + _static_scored(s)
        + conv
        + (_static_tool_log(s.tool_log) if s.tool_log else "")
        + "</div>"
    )


def _browser_controls() -> str:
    """The search box, the filters and the sort (hidden until the page's script fills them)."""
    filters = "".join(
        f'<label>{label} <select id="f-{f}"><option value="__all__">all</option></select></label>'
        for f, label in _BROWSER_FILTERS
    )
    verdicts = "".join(f'<option value="{v}">{_e(t)}</option>' for v, t in VERDICTS.items())
    sorts = "".join(f'<option value="{v}">{_e(t)}</option>' for v, t in _BROWSER_SORTS)
    return (
        '<label>search <input id="sample-search" type="search" autocomplete="off" '
        'placeholder="scored text, email, messages, prediction (press /)"></label>'
        f"{filters}"
        '<label>verdict <select id="f-verdict"><option value="__all__">all</option>'
        f"{verdicts}</select></label>"
        f'<label>sort <select id="sample-sort">{sorts}</select></label>'
    )


def _sample_browser(samples: list[Sample], note: str) -> str:
    """The sample browser: the first `STATIC_CARDS` samples as static HTML (what a reader sees
    without JavaScript), the controls, and every sample as inert JSON for the page's script."""
    n, k = len(samples), min(len(samples), STATIC_CARDS)
    shown = f"1\u2013{k}" if k else "0"
    return (
        f'<p id="sample-status">{_e(note)} Showing <span id="sample-range">{shown}</span> of '
        f'<span id="sample-count">{n}</span> matching samples<span id="sample-nojs"> (with '
        "JavaScript off: searching, filtering, sorting and paging need it)</span>. Model text is "
        "shown verbatim as plain text.</p>"
        f'<div class="filters" id="sample-controls" hidden>{_browser_controls()}</div>'
        f'<div id="sample-list">{"".join(_static_card(s) for s in samples[:k])}</div>'
        '<div class="pager" id="sample-pager" hidden>'
        '<button id="sample-prev" type="button" hidden>previous page</button> '
        '<button id="sample-next" type="button" hidden>next page</button> '
        f'<button id="sample-more" type="button" hidden>show {BROWSER_PAGE} more</button></div>'
        f'<script type="application/json" id="sample-data">{_json_for_script([x.to_dict() for x in samples])}</script>'
    )


# --------------------------------------------------------------------------- page sections


@dataclass
class ReportContent:
    """What the report shows besides the figures (built by `prepare_report`)."""

    result: MetricsResult
    title: str
    settings: Mapping[str, Any]
    meaningless: bool
    paper: bool
    notes: list[str]
    warnings: list[str]
    context: HeadlineContext
    outcomes: list[PredictionRecord]
    censoring: list[CensoringTest]
    samples: list[Sample]
    sample_note: str
    agreement: Agreement | None = None
    likert: LikertResult | None = None


_NAV = (
    ("answer", "Answer"), ("headline", "Headline"), ("metrics", "Metrics"), ("classifier", "Classifier"),
    ("scorer", "Scorer check"), ("agreement", "Scorers agree?"), ("family", "Primary family"), ("ladder", "Ladder"), ("contrasts", "Contrasts"), ("stages", "Stages"),
    ("outcomes", "Outcomes"), ("personas", "Per persona"), ("labels", "Predicted labels"),
    ("confusion", "Confusion"), ("figures", "Figures"), ("samples", "Samples"),
    ("method", "Method"), ("settings", "Settings"),
)  # fmt: skip


def _top(doc: _Doc, rep: ReportContent, main: Sequence[SavedFigure] = ()) -> None:
    """Title, the warning box, the smoke banner, the answer, the main figure (`main`, sized to
    fit the first screen below the answer) and the headline: what a person reads first."""
    doc.h1(rep.title)
    if rep.warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in rep.warnings)
        doc.raw_html(
            '<div class="warnings" id="warnings" role="alert"><strong>Read first</strong>'
            f"<ul>{items}</ul></div>"
        )
        doc.md_lines(["> **Read first**", ">", *(f"> - {md_escape(w)}" for w in rep.warnings)])
    if rep.meaningless:
        doc.raw_html(
            '<div class="banner" id="meaningless-banner">Smoke run: these numbers mean nothing. '
            "The models and classifier are tiny or untrained; this report only shows that the "
            "pipeline works.</div>"
        )
        doc.md_lines(["> **Smoke run: these numbers mean nothing.**"])
    _answer(doc, rep.result)
    for cap, png, svg in main:  # sized to the first screen; a click opens it at full size
        html_ = _figure_html(cap, png, svg).replace('class="fig"', 'class="fig main-fig"')
        html_ = html_.replace("<img ", f'<a href="plots/{_e(png.name)}"><img ', 1)
        doc.raw_html(html_.replace("<figcaption>", "</a><figcaption>", 1))
        doc.md += [_figure_md(cap, png, svg), ""]
    sentences = headline_text(rep.result, rep.context)
    doc.raw_html(
        '<section id="headline" class="headline"><h2>Headline</h2>'
        + "".join(f"<p>{_e(s)}</p>" for s in sentences)
        + "</section>"
    )
    doc.md += ["## Headline", ""] + [x for s in sentences for x in (_md_block(s), "")]


def _answer(doc: _Doc, result: MetricsResult) -> None:
    """The answer first: one compact table per base (`charshift.summary`), one legend."""
    tables = summary_tables(result)
    doc.raw_html('<section id="answer" class="answer"><h2>The answer</h2>')
    doc.md += ["## The answer", ""]
    for t in tables:
        doc.h3(t.base)
        if t.rows:
            doc.table((t.head, t.rows))
        for note in t.notes:
            doc.p(note)
    if tables:
        doc.p(legend(result))
    doc.raw_html("</section>")


def _nav(doc: _Doc, rep: ReportContent) -> None:
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in _NAV)
    doc.raw_html(f"<nav>{nav}</nav>")
    if rep.notes:
        doc.ul(rep.notes, cls="notes")


def _metrics_section(doc: _Doc, rep: ReportContent) -> None:
    res = rep.result
    doc.h2("metrics", "Metrics per cell")
    doc.p(
        f"{len(res.personas)} personas; {res.ci:.0%} cluster-bootstrap intervals in brackets "
        f"({DAGGER}: flagged; {BLIND}: a unit where the scorer is blind, {BLIND_TEXT}). n = "
        "rows with an output / rows attempted; a unit is a slice or a scoring variant "
        "SLICE.VARIANT. The chance-corrected figures come first: macro-F1 excess over the "
        "cell's own null (the macro-F1 expected if predictions ignored the persona, given the "
        "cell's own prediction shares), its permutation p-value and Cohen's kappa; raw "
        "macro-F1 is not chance-corrected."
    )
    doc.table(_metrics_table(res, rep.paper))
    if rep.paper:
        doc.h3("Against the published figures")
        doc.table(_published_table(res))


def _classifier_section(doc: _Doc, rep: ReportContent) -> None:
    doc.h2("classifier", "The classifier")
    doc.p(
        "Held-out quality of each classifier trained in this run, against chance 1/K and beside "
        "a lexical baseline (TF-IDF + logistic regression fitted and scored on the same split). "
        "A classifier whose interval reaches chance cannot support any persona figure below."
    )
    doc.table(_classifier_table(rep.result, rep.context))


def _scorer_section(doc: _Doc, rep: ReportContent) -> None:
    res = rep.result
    doc.h2("scorer", "Scorer check")
    doc.p(
        f"Can the scorer see persona in each unit? The positive control ({res.control or 'none'}"
        ": the persona told to show in every format) is scored in every unit; its macro-F1 "
        "excess is the scorer's sensitivity there. Where that interval reaches 0 the scorer is "
        f"blind ({BLIND}): {BLIND_TEXT}. The base stage (no persona) shows the scorer's format "
        "bias: the share of its most-predicted label on neutral text."
    )
    doc.table(_scorer_table(res), empty="No cells.")
    doc.h3("Retention relative to the positive control")
    doc.p(
        "Each stage's excess divided by the control's in the same unit, paired on shared items; "
        "flagged where the control's excess interval reaches 0."
    )
    doc.table(_retention_table(res), empty="No positive control in this run: no retention.")


def _reading_table(rows: Sequence[ReadingAgreement]) -> Table:
    head = ["base", "unit", "statistic", "between", "estimate [interval]", "rows paired",
            "rows left out (no reading: a / b)", "stages pooled"]  # fmt: skip
    out = []
    for r in rows:
        v = r.value
        shown = fmt_iv(v) if v.estimate == v.estimate else v.flag
        out.append([
            r.base, r.unit, r.statistic, f"{r.scorer_a} {r.reading_a} ~ {r.scorer_b} {r.reading_b}",
            shown, str(r.n_pairs), f"{r.n_left_out} ({r.missing_a} / {r.missing_b})",
            ", ".join(r.stages),
        ])  # fmt: skip
    return head, out


def _sign_table(rows: Sequence[SignAgreement]) -> Table:
    head = ["base / stage", "rung", "scorers", "a: excess lost", "b: excess lost", "verdicts",
            "agreement"]  # fmt: skip
    out = [
        [f"{s.base} / {s.stage}", f"{s.frm} -> {s.to}" + (" (total)" if s.kind == "total" else ""),
         f"{s.scorer_a} / {s.scorer_b}", fmt_diff(s.a) if s.a else "–",
         fmt_diff(s.b) if s.b else "–", f"{s.verdict_a} / {s.verdict_b}",
         s.agreement + (f" ({s.one_sided} only)" if s.one_sided else "")]
        for s in rows
    ]  # fmt: skip
    return head, out


def _agreement_section(doc: _Doc, rep: ReportContent) -> None:
    ag = rep.agreement
    doc.h2("agreement", "Do the scorers agree?")
    if ag is None or not ag.compared:
        who = f" ({', '.join(ag.scorers)})" if ag is not None and ag.scorers else ""
        doc.p(
            f"One scorer{who} gave these figures: there is nothing to compare it with, and no "
            "agreement.csv. A run with `scorers: [classifier, judge, persona_vector]` compares "
            "them here."
        )
        return
    doc.p(
        f"Scorers present: {', '.join(ag.scorers)}. Per base and unit, over the persona rows "
        "(the base stage has no true persona) both scorers read: Cohen's kappa between two "
        "scorers' correctness, Spearman's correlation between their numbers (the classifier's "
        "p(true), the Likert judge's score, the text projection on the row's persona), each "
        f"with a {rep.result.ci:.0%} cluster-bootstrap interval over items. Undefined (never 0) "
        "where a reading is constant. Rows without both readings are left out and counted."
    )
    doc.table(_reading_table(ag.readings), empty="No pair of these scorers reads a shared unit.")
    doc.h3("The sign of the loss, per rung")
    doc.p(
        "For each pair of scorers with their own statistics, each rung, chain total and contrast "
        "in macro-F1 excess (positive = persona lost): agree = both intervals exclude 0 on the "
        "same side; disagree = on opposite sides; inconclusive = anything else (an interval "
        "contains 0, there is none, or a scorer is blind there). 'X only': X finds a change the "
        "other cannot confirm, which is not a disagreement."
    )
    if not ag.signs:
        doc.p("No rung, chain total or contrast of this run has statistics from two scorers.")
        return
    counts = {k: sum(s.agreement == k for s in ag.signs) for k in ("agree", "disagree")}
    doc.p(
        f"{len(ag.signs)} comparisons: {counts['agree']} agree, {counts['disagree']} disagree, "
        f"{len(ag.signs) - sum(counts.values())} inconclusive."
    )
    shown = [s for s in ag.signs if s.agreement != "inconclusive" or s.one_sided]
    doc.table(_sign_table(shown), empty="No rung where either scorer finds a change.")
    doc.details("Every rung and pair of scorers", _sign_table(ag.signs))


def _likert_table(lk: LikertResult) -> Table:
    head = ["base / stage", "unit", "mean score", "base-stage null", "excess (points)",
            "scored / rows", "judge sees the control here"]  # fmt: skip
    seen = {True: "no (blind)", False: "yes", None: "not checked"}
    out = [
        [f"{c.cell.base} / {c.cell.stage}", c.cell.slice, fmt_iv(c.mean, 2),
         num(c.null, 2), fmt_iv(c.excess, 2), f"{c.n_scored} / {c.n_rows}",
         seen[c.scorer_blind]]
        for c in lk.cells
        if c.cell.stage != BASE_STAGE
    ]  # fmt: skip
    return head, out


def _likert_diff_table(lk: LikertResult) -> Table:
    head = ["base / stage", "kind", "from -> to", "excess lost (points)", "changes"]
    out = [
        [f"{d.a.base} / {d.a.stage}", d.kind + (f" ({d.chain})" if d.chain else ""),
         f"{d.a.slice} -> {d.b.slice}", fmt_diff(d, 2) + _likert_marks(d), d.changes]
        for d in lk.differences
    ]  # fmt: skip
    return head, out


def _likert_marks(d: Difference) -> str:
    marks = [" (blind)" if d.blind else ""]
    if 0 < d.k < d.n_personas:  # not the difference of the two cells' own figures
        marks.append(f" ({d.k} of {d.n_personas} personas, those scored in both units)")
    if not math.isfinite(d.estimate) and d.note:
        marks.append(f" ({d.note})")
    return "".join(marks)


def _likert_section(doc: _Doc, rep: ReportContent) -> None:
    lk = rep.likert
    if lk is None:
        return
    doc.h3("The Likert judge's own figures")
    doc.p(
        "The Likert judge gives a number (1-5: how fully the text expresses its row's persona), "
        "not a persona, so it has no macro-F1. Per cell: its mean score (per persona, then "
        "averaged over personas), the base stage's mean score against the same personas in the "
        "same unit (how persona-like the judge finds neutral text of this format), and the "
        f"excess of the one over the other, in Likert points, with a {rep.result.ci:.0%} "
        "cluster-bootstrap interval over items. Rows without a score are left out and counted. "
        "Its rungs (positive = persona lost) are in differences.csv under scorer judge_likert; "
        "likert.csv has every cell."
    )
    doc.table(_likert_table(lk), empty="No persona rows were scored by the Likert judge.")
    doc.details("The Likert judge's rungs, totals and contrasts", _likert_diff_table(lk))


def _family_section(doc: _Doc, rep: ReportContent) -> None:
    doc.h2("family", "Primary family")
    doc.p(f"Declared before looking: {FAMILY_TEXT}. The verdicts read the simultaneous band.")
    doc.table(_family_table(rep.result), empty="No trained stage: no primary family.")


def _ladder_section(doc: _Doc, rep: ReportContent) -> None:
    doc.h2("ladder", "Ladder decomposition")
    doc.p(
        "Every chain, per base and trained stage (exploratory, except the totals of the primary "
        "family): each unit's macro-F1 excess on the chain's common items and the personas "
        "defined in all of them, then each rung (what it changes, the excess lost with its "
        "interval, paired or not) and the total. Positive = persona lost. Beside each unit, "
        "the scorer's top label on neutral base text. The base stage is not laddered: it "
        "carries no persona (its excess is 0 by construction)."
    )
    groups = _decomp_groups(rep.result)
    if not groups:
        doc.p("Fewer than two units of any chain in this run: no decomposition.")
    for decs in groups:
        ref = next(iter(decs.values()))
        doc.h3(f"{ref.base} / {ref.stage}: {chain_heading(ref)}")
        doc.p(_pairing_text(decs.get((EXCESS, False), ref)))
        doc.table(_chain_units_table(rep.result, decs))
        doc.table(_chain_rungs_table(rep.result, decs))
    doc.h2("contrasts", "Contrasts")
    doc.p("Single comparisons outside a chain, paired on the items the two units share.")
    doc.table(_contrast_table(rep.result), empty="No contrast has both of its units in this run.")


def _stage_section(doc: _Doc, rep: ReportContent) -> None:
    doc.h2("stages", "Stage differences")
    doc.p(
        "Later minus earlier trained stage (positive = persona gained), paired on the shared "
        "items; exploratory. No stage is compared with the base stage: its excess is 0 by "
        "construction, so a cell's own excess (Metrics) already is that comparison."
    )
    doc.table(_stage_table(rep.result), empty="Only one stage per unit: no stage difference.")


def _outcomes_section(doc: _Doc, rep: ReportContent) -> None:
    doc.h2("outcomes", "Outcomes and differential censoring")
    doc.p(
        "How each row ended, per cell (a base output counted once), and whether producing an "
        "output depends on the persona (permutation chi-square of output vs missing by persona, "
        f"p < {CENSORING_ALPHA}: differential censoring). A persona whose outputs go missing "
        "more often than another's is a finding, not noise: conditional figures then compare "
        "personas on different items."
    )
    rows = _outcome_rows(rep.outcomes, rep.result)
    doc.table(_outcome_summary(rows, rep.censoring), empty="No rows.")
    if rows:
        doc.details("Outcomes by persona, stage and unit (every count)", _outcome_table(rows),
                    md=True)  # fmt: skip


def _depth_table(result: MetricsResult) -> Table:
    head = ["base", "stage", "persona", "depth", "units", "depth (scorer not blind)", "units",
            "units detected"]  # fmt: skip
    rows = [
        [d.base, d.stage, d.persona, _num(d.depth, 3), str(d.n_units),
         _num(d.depth_not_blind, 3), str(d.n_units_not_blind), str(d.n_detected)]
        for d in result.depth
    ]  # fmt: skip
    return head, rows


def _persona_section(doc: _Doc, rep: ReportContent) -> None:
    res = rep.result
    doc.h2("personas", "Per-persona F1 (conditional)")
    for sl in res.slices:
        blind = [b for b in res.bases if res.blind(b, sl)]
        doc.h3(sl + (f" {BLIND} (scorer blind for {', '.join(blind)})" if blind else ""))
        doc.table(_per_persona_pivot(res, sl))
    for m in res.cells.values():
        mark = f" {BLIND}" if m.scorer_blind else ""
        doc.details(f"{m.cell.label()}{mark}: per-persona details", _per_persona_detail(m))
    doc.h3("Depth per base, stage and persona (depth.csv)")
    doc.p(
        "Mean over units (each slice once) of the persona's F1 excess over its own null: the "
        "trained stage minus the base stage in excess, because the base stage's excess is 0 by "
        "construction. A point summary without an interval; the second mean leaves out the "
        f"units where the scorer is blind ({BLIND}), whose figures are not evidence."
    )
    doc.table(_depth_table(res), empty="No trained stage: no depth.")
    doc.h2("labels", "Predicted-label distribution")
    doc.p("Share of scored rows per predicted label (labels outside the run included).")
    doc.table(_pred_dist_table(res))
    doc.raw_html('<h2 id="confusion">Confusion matrices</h2>')
    for m in res.cells.values():
        doc.details(m.cell.label(), _confusion_table(m))


def _figure_html(caption: str, png: Path, svg: Path | None = None) -> str:
    b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    files = f"{png.stem}.png" + (" / .svg" if svg is not None else "")
    return (
        f'<figure class="fig"><img alt="{_e(caption)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{_e(caption)} ({_e(files)} in report/plots)</figcaption>"
        "</figure>"
    )


def _figure_md(caption: str, png: Path, svg: Path | None) -> str:
    files = [png, svg] if svg is not None else [png]
    return f"- {_md_block(caption)}: " + ", ".join(f"`report/plots/{f.name}`" for f in files)


def _figures_section(doc: _Doc, figures: Sequence[SavedFigure]) -> None:
    doc.h2("figures", "Figures")
    for cap, png, svg in figures:
        doc.raw_html(_figure_html(cap, png, svg))
        doc.md.append(_figure_md(cap, png, svg))
    doc.md.append("")


def _condition_table(settings: Mapping[str, Any], ctx: HeadlineContext) -> Table:
    cfg = settings.get("config") if isinstance(settings.get("config"), dict) else {}
    man = settings.get("manifest") if isinstance(settings.get("manifest"), dict) else {}
    p = ctx.tool_protocol
    rows = [["tool protocol", PROTOCOLS.get(p, p) if p else "not recorded"]]
    rows.append(["samples per item", str(ctx.n_samples) if ctx.n_samples else "not recorded"])
    for key in ("sampling", "scoring", "backend"):
        if isinstance(cfg.get(key), dict):
            rows.append([key, json.dumps(cfg[key], sort_keys=True, default=str)])
    for base, info in (
        (man.get("backends") or {}).items() if isinstance(man.get("backends"), dict) else []
    ):
        rows.append([f"backend of {base}", json.dumps(info, sort_keys=True, default=str)])
    return ["setting", "value"], rows


def _closing_sections(doc: _Doc, rep: ReportContent, figures: Sequence[SavedFigure]) -> None:
    _figures_section(doc, figures)
    doc.raw_html('<h2 id="samples">Sample browser</h2>')
    doc.raw_html(_sample_browser(rep.samples, rep.sample_note))
    doc.md_lines(["The sample browser is in `report/index.html`."])
    doc.h2("method", "Method notes")
    doc.ul(method_notes(rep.result))
    doc.h2("settings", "Settings")
    doc.p("The condition: what shapes the outputs besides the model and the persona.")
    doc.table(_condition_table(rep.settings, rep.context))
    text = _json_text(dict(rep.settings))
    doc.raw_html(f"<pre>{_e(text)}</pre>")
    doc.md_lines(["```json", text, "```"])


def render_report(rep: ReportContent, figures: Sequence[SavedFigure] = ()) -> tuple[str, str]:
    """(the HTML page, the markdown) of the report; `figures`: (caption, png, svg) to show."""
    doc = _Doc()
    main = [f for f in figures if f[1].stem.startswith("ladder_")]
    _top(doc, rep, main)
    figures = [f for f in figures if f not in main]
    _nav(doc, rep)
    for section in (_metrics_section, _classifier_section, _scorer_section, _agreement_section,
                    _likert_section, _family_section,
                    _ladder_section, _stage_section, _outcomes_section,
                    _persona_section):  # fmt: skip
        section(doc, rep)
    _closing_sections(doc, rep, figures)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{_csp()}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(rep.title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(doc.html)
        + f"<script>{_JS}</script></body></html>\n"
    )
    return page, "\n".join(doc.md) + "\n"


# --------------------------------------------------------------------------- writing


def _write_utf8(path: Path, text: str) -> None:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as err:
        near = err.object[max(0, err.start - 30) : err.end + 30]
        raise ReportError(
            f"cannot write {path.name}: the data holds text that is not valid Unicode "
            f"({err.reason}, near {near!r}); the previous report is left as it was"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, error=lambda p, err: ReportError(write_error_text(p, err)))


@contextlib.contextmanager
def staging(root: Path) -> Iterator[Path]:
    """A fresh folder beside the report, removed afterwards whatever happens."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    except OSError as err:
        raise ReportError(f"cannot write the report into {root}: {err.strerror or err}") from None
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


OUTCOME_FILES = ("outcomes.csv", "censoring.csv")
CENSORING_COLUMNS = (
    "base", "stage", "unit", "n_rows", "statistic", "dof", "p_asymptotic", "p_permutation",
    "n_perm", "personas", "outcomes", "table", "note",
)  # fmt: skip


def write_outcome_tables(rep: ReportContent, out: Path) -> None:
    """outcomes.csv (each row's outcome counted per base, stage, persona and unit, with the
    yield) and censoring.csv (the differential-censoring test per base, stage and unit: does a
    missing output depend on the persona?), the figures of the report's Outcomes section."""
    from charshift.tables import write_csv

    table = outcome_table(rep.outcomes)
    head = list(table[0]) if table else ["base", "stage", "persona", "unit", "n"]
    write_csv(out / OUTCOME_FILES[0], head, ([row[h] for h in head] for row in table))
    rows = (
        [t.base, t.stage, t.unit, t.n_rows, t.statistic, t.dof, t.p_asymptotic, t.p_permutation,
         t.n_perm, " ".join(t.personas), " ".join(t.outcomes), json.dumps(t.table), t.note]
        for t in rep.censoring
    )  # fmt: skip
    write_csv(out / OUTCOME_FILES[1], CENSORING_COLUMNS, rows)


def swap_in(staged: Path, root: Path) -> None:
    """Move the staged report folder and report.md into place; the old folder goes into the
    staging folder (removed with it). If the folder move fails, the old one is put back."""
    new, cur, old = staged / "report", root / "report", staged / "previous-report"
    had_old = cur.exists() or cur.is_symlink()
    if had_old:
        os.replace(cur, old)
    try:
        os.replace(new, cur)
    except OSError:
        if had_old:
            os.replace(old, cur)
        raise
    os.replace(staged / "report.md", root / "report.md")
    for name in OUTCOME_FILES:  # written beside report.md, from the same records
        if (staged / name).exists():
            os.replace(staged / name, root / name)


def prepare_report(
    records: Sequence[PredictionRecord],
    result: MetricsResult,
    *,
    settings: Mapping[str, Any],
    samples: list[Sample] | None,
    title: str,
    meaningless: bool = False,
    published: str | None = None,
    notes: Sequence[str] = (),
    warnings: Sequence[str] = (),
    context: HeadlineContext | None = None,
    max_samples: int = MAX_SAMPLES,
    agreement: Agreement | None = None,
    likert: LikertResult | None = None,
) -> ReportContent:
    """Everything the report shows besides the figures (see `write_report` for the arguments);
    computes the outcome counts and the differential-censoring tests."""
    notes = list(notes)
    if published and published != "paper":
        notes.append(f"Unknown published set {published!r}: only 'paper' is known.")
    ctx = context or context_from_settings(settings, meaningless)
    outcomes = outcome_records(records)
    tests = censoring_tests(
        outcomes, collapse=True, n_perm=CENSORING_PERMUTATIONS, seed=result.seed
    )
    ctx = dataclasses.replace(ctx, censoring=tests, meaningless=ctx.meaningless or meaningless,
                              agreement=agreement)  # fmt: skip
    pool = samples_from_records(records) if samples is None else samples
    shown, note = select_samples(pool, max_samples)
    return ReportContent(result, title, settings, meaningless, published == "paper", notes,
                         list(warnings), ctx, outcomes, tests, shown, note, agreement,
                         likert)  # fmt: skip


def write_report(
    out_dir: str | Path,
    records: Sequence[PredictionRecord],
    result: MetricsResult,
    *,
    settings: Mapping[str, Any],
    samples: list[Sample] | None,
    title: str,
    meaningless: bool = False,
    published: str | None = None,
    notes: Sequence[str] = (),
    warnings: Sequence[str] = (),
    context: HeadlineContext | None = None,
    max_samples: int = MAX_SAMPLES,
    agreement: Agreement | None = None,
    likert: LikertResult | None = None,
    svg: bool = False,
) -> Path:
    """Write report/index.html (self-contained), report/plots/* and report.md; return the HTML path.

    `records`: the predictions behind `result` (base outputs unexpanded or expanded: outcomes
    count each base output once). `samples`: `schema.Sample`s for the sample
    browser; None builds minimal ones from `records`. `warnings` are shown first, in a box at
    the top. `context`: facts for the headline (tool protocol, trained classifiers, ...); None
    reads them from `settings` ({"config": ..., "manifest": ...}). `agreement`: whether the
    run's scorers agree (`stats.agreement`; None: one source); `likert`: the Likert judge's
    figures (`stats.likert`; None: no Likert judge). `svg`: each figure also as SVG (PNG
    only by default). `published="paper"` sets the
    published OCT/DCT figures beside the run's own. The whole report is replaced atomically;
    on any failure the previous one is left as it was (ReportError for bad text or a folder
    that cannot be written).
    """
    root = Path(out_dir)
    content = prepare_report(
        records, result, settings=settings, samples=samples, title=title,
        meaningless=meaningless, published=published, notes=notes, warnings=warnings,
        context=context, max_samples=max_samples, agreement=agreement, likert=likert,
    )  # fmt: skip
    with staging(root) as staged:
        figures = make_figures(result, staged / "report" / "plots", svg=svg)
        page, md = render_report(content, figures)
        _write_utf8(staged / "report" / "index.html", page)
        _write_utf8(staged / "report.md", md)
        write_outcome_tables(content, staged)
        _write_utf8(staged / "report" / "summary.txt", summary_text(result))
        swap_in(staged, root)
    return root / "report" / "index.html"
