"""The analysis tail, one for every source of predictions: records -> statistics -> tables,
plots and the report.

`report_run` feeds it a run directory (generations joined with their scores); `report_predictions`
in `external` feeds it a predictions JSONL made elsewhere. Both end in `analyse`, so a run and
`charshift report --predictions` compute every figure the same way.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charshift.config import RunConfig, StatsConfig, config_to_dict
from charshift.inputs import surrogate_problem
from charshift.schema import (
    NULL_PERSONA,
    PROMPTED_EXPLICIT_STAGE,
    GenerationRow,
    PredictionRecord,
    Sample,
)
from charshift.slices import judge_units
from charshift.store import TABLES, RunStore, StoreError, table_files
from charshift.store import warn as store_warn
from charshift.store.table import shard_problem

if TYPE_CHECKING:
    from charshift.stats import MetricsResult
    from charshift.stats.agreement import Agreement
    from charshift.stats.likert import LikertResult


@dataclass
class AnalysisInput:
    """Everything the tail needs besides the output folder."""

    records: list[PredictionRecord]  # base rows with persona NULL_PERSONA (not yet expanded)
    personas: list[str]
    stats: StatsConfig
    title: str
    settings: dict[str, Any]
    samples: list[Sample] | None = None  # None: built from the records
    meaningless: bool = False
    published: str | None = None
    notes: list[str] = field(default_factory=list)
    # What a reader must see before anything else (an incomplete run, a label-set change): the
    # report shows these first, in a warning box at the very top.
    warnings: list[str] = field(default_factory=list)
    # the positive-control stage (the scorer check); None: none
    control: str | None = PROMPTED_EXPLICIT_STAGE
    # whether the run's scorers agree (`stats.agreement`); None: not computed (one source)
    agreement: Agreement | None = None
    # the statistics of the run's other label-giving scorers (`scorer_results`), by name: every
    # table carries their rows beside the classifier's, under its `scorer` column
    others: dict[str, MetricsResult] = field(default_factory=dict)
    # the Likert judge's figures (`stats.likert`); None: the run has no Likert judge
    likert: LikertResult | None = None
    svg: bool = False  # each figure also as SVG (`report.svg`)


def compute(inp: AnalysisInput) -> MetricsResult:
    """The statistics of `inp` (base outputs unexpanded: stats counts each once)."""
    from charshift import stats

    if not inp.records:
        raise ValueError("no predictions to analyse")
    return stats.compute_metrics(
        inp.records,
        inp.personas,
        n_boot=inp.stats.n_boot,
        ci=inp.stats.ci,
        method=inp.stats.method,
        seed=inp.stats.seed,
        n_perm=inp.stats.n_perm,
        small_sample=inp.stats.small_sample,
        control=inp.control,
    )


def analyse(
    inp: AnalysisInput,
    out_dir: Path,
    result: MetricsResult | None = None,
    publish: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
) -> Path:
    """Statistics (unless `result` is given), tables, plots and the report, under `out_dir`.
    Everything is written into a staging folder there first and moved into place in one short
    step under `publish()` (a run's report: its report lock and the check that the run is
    unchanged), so a report that is refused or fails leaves the previous one whole."""
    from charshift import report as report_mod
    from charshift import tables

    result = compute(inp) if result is None else result
    out = Path(out_dir)
    try:
        with report_mod.staging(out) as staged:
            written = tables.write_tables(result, staged, inp.others, inp.likert)
            if inp.agreement is not None and inp.agreement.compared:
                written += tables.write_agreement(inp.agreement, staged)
            names = {p.name for p in written}
            stale = [n for n in tables.OPTIONAL_FILES if n not in names and (out / n).exists()]
            report_mod.write_report(
                staged,
                inp.records,
                result,
                settings=inp.settings,
                samples=inp.samples,
                title=inp.title,
                meaningless=inp.meaningless,
                published=inp.published,
                notes=[*inp.notes, *(n.text() for n in result.label_notes)],
                warnings=inp.warnings,
                agreement=inp.agreement,
                likert=inp.likert,
                svg=inp.svg,
            )
            with publish():
                for p in written:
                    os.replace(p, out / p.name)
                for name in stale:  # a table an earlier report wrote that this one has not
                    (out / name).unlink(missing_ok=True)
                report_mod.swap_in(staged, out)
        return out / "report" / "index.html"
    except OSError as err:
        raise _naming_the_path(err, out) from None


def _naming_the_path(err: OSError, out: Path) -> OSError:
    """The same error, naming where it happened: a write that fails on a full disk (or past a
    file size limit) carries no file name, and the message was a bare `[Errno 28]`. A path in
    the report's staging folder is shown where the file was going."""
    from charshift.report import STAGING_PREFIX

    if err.filename is None:
        return OSError(
            err.errno, f"{err.strerror or err} (writing the tables and report)", str(out)
        )
    parts = Path(str(err.filename)).parts
    shown = Path(*(p for p in parts if not p.startswith(STAGING_PREFIX)))
    return OSError(err.errno, err.strerror or str(err), str(shown))


# --------------------------------------------------------------------------- a run directory


def run_classifier_ids(cfg: RunConfig, store: RunStore) -> tuple[dict[str, str], list[str]]:
    """(base -> the classifier id whose scores the report uses, warnings). The manifest records
    the ids; where it does not (deleted or damaged manifest), a base whose rows were scored by
    exactly one classifier uses that one, with a warning."""
    recorded = store.recorded("classifier_ids")
    base_of = {g.key: g.base for g in store.generations}
    found: dict[str, set[str]] = {}
    for sc in store.scores:
        if sc.key in base_of:
            found.setdefault(base_of[sc.key], set()).add(sc.classifier)
    ids: dict[str, str] = {}
    notes: list[str] = []
    for base in cfg.bases:
        if base.name in recorded:
            ids[base.name] = recorded[base.name]
            continue
        cands = sorted(found.get(base.name, ()))
        if len(cands) == 1:
            ids[base.name] = cands[0]
            notes.append(
                f"{store.manifest_path} records no classifier for base {base.name}; using "
                f"{cands[0]}, the one classifier in the run's scores for its rows "
                f"(`charshift score --run {store.root}` records it again)"
            )
        elif cands:
            raise StoreError(
                f"{store.manifest_path} records no classifier for base {base.name}, and its rows "
                f"were scored by several ({', '.join(cands)}); run `charshift score --run "
                f"{store.root}` to score with the config's classifier and record which it is"
            )
    return ids, notes


def _row_text(r: GenerationRow) -> str:
    return (r.text or "") + (r.final_reply or "")


def prediction_records(
    cfg: RunConfig, store: RunStore, cids: dict[str, str] | None = None
) -> list[PredictionRecord]:
    """Join a run's eval generations with their scores: one record per (row, unit), `slice` =
    the unit (see `charshift.units`); base rows keep the null persona. A unit with no text (the
    row's outcome is not an output) is a missing prediction; a unit not scored yet is left out.
    `cids`: base -> classifier id (default: `run_classifier_ids`)."""
    from charshift import lengths, units

    raw = cfg.scoring.text == "raw"
    if cids is None:
        cids = run_classifier_ids(cfg, store)[0]
    out: list[PredictionRecord] = []
    counters = lengths.run_counters(store, cids)
    # a stored text no tokenizer can take (a lone surrogate) is left out here as in scoring (the
    # score step named it), so it is a unit not scored, not a crash of the length counter
    rows = [r for r in store.generations if surrogate_problem(_row_text(r)) is None]
    for r, unit, text in units.row_units(rows, raw, counters):
        if r.base not in cids:
            continue
        sc = store.scores.get((r.key, cids[r.base], unit, units.text_hash(text))) if text else None
        if text and sc is None:
            continue  # not scored yet
        out.append(
            PredictionRecord(
                base=r.base,
                stage=r.stage,
                slice=unit,
                persona=r.persona or NULL_PERSONA,
                item_id=r.item_id,
                prediction=(sc.prediction or None) if sc else None,  # "": no verdict (a judge)
                sample_idx=r.sample_idx,
                probs=sc.probs if sc else None,
                outcome=r.outcome,
                text=text,
                key=r.key,
                scores=sc.scores if sc else None,
                judge_score=sc.judge_score if sc else None,
                judge_outcome=sc.judge_outcome if sc else None,
            )
        )
    return out


def browser_samples(records: Sequence[PredictionRecord], store: RunStore) -> list[Sample]:
    """The report's sample browser entries: each record with its whole conversation."""
    samples = []
    for rec in records:
        g: GenerationRow | None = store.generations.get(rec.key or "")
        if g is None:
            continue
        s = Sample.from_record(rec, g.key)
        s.persona = g.persona or s.persona
        s.messages, s.email, s.tool_log = g.messages, g.email, g.tool_log
        samples.append(s)
    return samples


@dataclass(frozen=True)
class CellCompleteness:
    """How far one (base, stage, slice) cell of a run got: eval rows planned, generated, with an
    output to score, and scored by the base's classifier."""

    base: str
    stage: str
    slice: str
    planned: int
    generated: int
    with_output: int
    scored: int

    @property
    def not_generated(self) -> int:
        return max(self.planned - self.generated, 0)

    @property
    def not_scored(self) -> int:
        return max(self.with_output - self.scored, 0)

    @property
    def complete(self) -> bool:
        return self.not_generated == 0 and self.not_scored == 0


def completeness(
    plan: Any, store: RunStore, cfg: RunConfig, classifier_ids: dict[str, str] | None = None
) -> list[CellCompleteness]:
    """Per cell of `plan` (a `planning.Plan`), in plan order: eval rows planned, generated, with
    output, scored. Pure: reads the store, loads no model."""
    from charshift import lengths, units

    cids = classifier_ids if classifier_ids is not None else run_classifier_ids(cfg, store)[0]
    counters = lengths.run_counters(store, cids)
    counts: dict[tuple[str, str, str], list[int]] = {}
    for r in plan.rows:
        if r.spec.split == "eval":
            cell = (r.condition.base, r.condition.stage, r.spec.slice)
            counts.setdefault(cell, [0, 0, 0, 0])[0] += 1
    generated: dict[str, tuple[str, str, str]] = {}
    with_output: set[str] = set()
    unscored: set[str] = set()  # rows with at least one unit that has text and no score
    for g, unit, text in units.row_units(store.generations, cfg.scoring.text == "raw", counters):
        cell = (g.base, g.stage, g.slice)
        if cell not in counts:
            continue
        generated[g.key] = cell
        if text:
            with_output.add(g.key)
            cid = cids.get(g.base)
            if cid is None or (g.key, cid, unit, units.text_hash(text)) not in store.scores:
                unscored.add(g.key)
    for key, cell in generated.items():
        c = counts[cell]
        c[1] += 1
        c[2] += key in with_output
        c[3] += key in with_output and key not in unscored
    return [CellCompleteness(*cell, *c) for cell, c in counts.items()]


def completeness_warnings(cells: Sequence[CellCompleteness], run: str | Path) -> list[str]:
    """A summary line and one line per incomplete cell (empty when the run is complete)."""
    gaps = [c for c in cells if not c.complete]
    if not gaps:
        return []
    planned = sum(c.planned for c in cells)
    missing = sum(c.not_generated for c in cells)
    unscored = sum(c.not_scored for c in cells)
    out = [
        f"This run is incomplete: {missing} of {planned} planned rows are not generated and "
        f"{unscored} of {sum(c.with_output for c in cells)} outputs are not scored, in "
        f"{len(gaps)} of {len(cells)} cells; the figures cover only what exists. Resume with "
        f"`charshift run CONFIG --out {run}` (or `charshift score --run {run}`)."
    ]
    for c in gaps:
        out.append(
            f"{c.base} / {c.stage} / {c.slice}: {c.planned} planned, {c.generated} generated, "
            f"{c.scored} of {c.with_output} outputs scored"
        )
    return out


def _completeness_notes(cfg: RunConfig, store: RunStore, cids: dict[str, str]) -> list[str]:
    from charshift.planning import build_plan

    try:
        plan = build_plan(cfg, dry=True)
    except (ValueError, OSError) as err:  # e.g. an id_prompts file that has since moved
        return [f"Could not rebuild the run's plan to check it is complete: {err}"]
    notes = completeness_warnings(completeness(plan, store, cfg, cids), store.root)
    return notes + _skip_warnings(notes, store) + shard_warnings(plan, store, cfg, cids)


def _skip_warnings(notes: list[str], store: RunStore) -> list[str]:
    """Where rows are missing because adapters were skipped, a resume alone cannot bring them:
    say so, naming the adapters."""
    skipped = sorted(store.recorded("skipped_adapters"))
    if not notes or not skipped:
        return []
    return [
        f"The rows of skipped adapter(s) {', '.join(skipped)} are generated only once the "
        "adapter loads (see its message below): fix the adapter or drop its stage or persona "
        "from the config; rerunning alone will not bring them. `--allow-skipped` accepts the gap."
    ]


@dataclass(frozen=True)
class ShardCompleteness:
    """How far one shard of a sharded run got: rows planned and generated, outputs of its eval
    rows and how many are scored (every unit) by the base's classifier."""

    shard: tuple[int, int]
    planned: int
    generated: int
    with_output: int
    scored: int

    @property
    def complete(self) -> bool:
        return self.generated >= self.planned and self.scored >= self.with_output


def shard_counts(store: RunStore) -> tuple[list[int], list[str]]:
    """The shard counts N a run was written with, from its table files' names and the
    `shard_start` events in its manifest; and a note for each event that names a shard no run
    can have (count 0, more than MAX_SHARDS, an index past the count), which is not one (such
    table files are not read: the store names them)."""
    found: set[int] = set()
    notes = []
    for stem in TABLES:
        for f in table_files(store.root, stem):
            m = re.search(r"\.shard-\d+-of-(\d+)\.jsonl$", f.name)
            found.update([int(m[1])] if m else [])
    for ev in store.manifest().get("events") or []:
        label = (
            ev.get("shard") if isinstance(ev, dict) and ev.get("event") == "shard_start" else None
        )
        if isinstance(label, str) and re.fullmatch(r"\d{1,12}/\d{1,12}", label):
            i, n = (int(p) for p in label.split("/"))
            why = shard_problem(i, n)
            if why:
                notes.append(
                    f"{store.manifest_path}: a shard_start event names shard {label}: {why}; ignored"
                )
            else:
                found.add(n)
    return sorted(found), notes


def shard_completeness(
    plan: Any, store: RunStore, cfg: RunConfig, cids: dict[str, str], n: int
) -> list[ShardCompleteness]:
    """Per shard of `n` (`planning.shard_of` on each item id): planned, generated, with output,
    scored. Pure: reads the store, loads no model."""
    from charshift import lengths, units
    from charshift.planning import shard_of, shard_sizes

    unscored: set[str] = set()
    with_output: set[str] = set()
    counters = lengths.run_counters(store, cids)
    for g, unit, text in units.row_units(store.generations, cfg.scoring.text == "raw", counters):
        if text:
            with_output.add(g.key)
            cid = cids.get(g.base)
            if cid is None or (g.key, cid, unit, units.text_hash(text)) not in store.scores:
                unscored.add(g.key)
    counts = [[p, 0, 0, 0] for p in shard_sizes(plan.rows, n)]
    of: dict[str, int] = {}
    for r in plan.rows:
        if r.key not in store.generations:
            continue
        c = counts[of.setdefault(r.spec.item_id, shard_of(r.spec.item_id, n))]
        c[1] += 1
        c[2] += r.key in with_output
        c[3] += r.key in with_output and r.key not in unscored
    return [ShardCompleteness((i, n), *c) for i, c in enumerate(counts)]


def shard_warnings(plan: Any, store: RunStore, cfg: RunConfig, cids: dict[str, str]) -> list[str]:
    """One line per incomplete shard, for each shard count the run was written with. `plan`
    may be a dry one: shards are assigned by item id, so PURE-DOVE prompts are read for theirs."""
    counts, out = shard_counts(store)
    if counts and cfg.id_prompts.source == "pure_dove":
        from charshift.planning import build_plan

        try:
            plan = build_plan(cfg)
        except (ValueError, OSError) as err:
            return [*out, f"Could not check the run's shards (their PURE-DOVE item ids): {err}"]
    for n in counts:
        gaps = [s for s in shard_completeness(plan, store, cfg, cids, n) if not s.complete]
        if not gaps:
            continue
        out.append(
            f"Sharded run ({n} shards): {len(gaps)} of {n} shards are incomplete: "
            + "; ".join(
                f"shard {s.shard[0]}/{n}: {s.planned - s.generated} of {s.planned} rows not "
                f"generated, {s.with_output - s.scored} of {s.with_output} outputs not scored"
                for s in gaps
            )
            + f". Resume a shard with `charshift run CONFIG --out {store.root} --shard I/{n}`, "
            "or all that is left with `charshift run CONFIG` unsharded."
        )
    return out


def _run_notes(cfg: RunConfig, store: RunStore) -> list[str]:
    """The report's notes on a run: its config's description (what the run is, and why a
    scorer is off), skipped adapters, units no scorer of the run can score."""
    notes = [f"About this run: {cfg.description}"] if cfg.description else []
    notes += [
        f"Skipped adapter {name}: {msg}" for name, msg in store.recorded("skipped_adapters").items()
    ]
    return notes + [
        f"Not scored: {unit} (the judge's behaviour rubric scores it; no text scorer can, and "
        "the run's scorers have no judge)"
        for unit in judge_units(cfg.slices)
        if "judge" not in cfg.scorers
    ]


def report_run(cfg: RunConfig, store: RunStore, out_dir: Path | None = None) -> Path:
    """The analysis tail over a run directory; the report goes to `out_dir` or the run's root.
    Warnings (an incomplete run, damage found in the store, a recovered classifier id) are
    printed to stderr and shown first in the report, in its warning box. The label sets go into
    the manifest when the store is open for writing (`run`); a read-only `report --run` leaves
    the manifest as it is (stats.json and the report carry them)."""
    cids, cid_notes = run_classifier_ids(cfg, store)
    records = prediction_records(cfg, store, cids)
    if not records:
        raise ValueError(_nothing_to_report(store, cids))
    warnings = cid_notes + _completeness_notes(cfg, store, cids)
    for w in warnings:
        store_warn(w)
    warnings += store.notes  # damage found when the store was opened (already printed)
    inp = AnalysisInput(
        records=records,
        personas=cfg.persona_names,
        stats=cfg.stats,
        title=f"charshift report: {cfg.name}",
        settings={"config": config_to_dict(cfg), "manifest": store.manifest()},
        samples=browser_samples(records, store),
        meaningless=cfg.meaningless,
        published=cfg.published,
        notes=_run_notes(cfg, store),
        warnings=warnings,
        control=cfg.analysis.positive_control,
        svg=cfg.report.svg,
    )
    by_records = scorer_records(cfg, store)
    by_scorer = scorer_results(cfg, store, by_records)
    inp.others = by_scorer
    if by_scorer:
        inp.notes.append(
            f"Every table has a `scorer` column: beside the classifier's rows, those of "
            f"{', '.join(by_scorer)}, each against its own null and with its own scorer check; "
            "the figures of this report read the classifier"
        )
    result = compute(inp)
    inp.likert = run_likert(inp, result, by_records)
    inp.agreement = run_agreement(inp, result, by_records, by_scorer)
    label_sets = {"labels": result.labels, "notes": [n.text() for n in result.label_notes]}
    if store.writable:
        inp.settings["manifest"] = store.update_manifest(label_sets=label_sets)
    else:  # `charshift report --run` reads the run and changes nothing in it
        inp.settings["manifest"] = {**inp.settings["manifest"], "label_sets": label_sets}
    out = Path(out_dir) if out_dir else store.root
    # written only if the run is as it was read, so a stale reader never overwrites a newer report
    return analyse(inp, out, result, publish=lambda: store.report_snapshot(out))


# The scorers besides the classifier that name a persona, so that the classifier's machinery
# (macro-F1 against each cell's own null) reads them as it reads the classifier.
LABEL_SCORERS = ("judge_identify", "persona_vector_text", "persona_vector_state")
# The scorers that give only a number (no persona): read by the agreement, not by the metrics.
NUMBER_SCORERS = ("judge_likert",)


def scorer_ids(store: RunStore, name: str) -> dict[str, str]:
    """base -> the id of scorer `name` (a reading or mode) that the manifest records."""
    known = store.manifest().get("scorers")
    if not isinstance(known, dict):
        return {}
    out = {}
    for base, entries in known.items():
        entry = entries.get(name) if isinstance(entries, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            out[base] = entry["id"]
    return out


def scorer_records(cfg: RunConfig, store: RunStore) -> dict[str, list[PredictionRecord]]:
    """Each scorer of `NUMBER_SCORERS` and `LABEL_SCORERS` the manifest records -> its records
    (`prediction_records` under its own ids; their `scores` and `judge_score` hold its numbers)."""
    out = {}
    for name in (*NUMBER_SCORERS, *LABEL_SCORERS):
        ids = scorer_ids(store, name)
        if ids:
            out[name] = prediction_records(cfg, store, ids)
    return out


def scorer_results(
    cfg: RunConfig, store: RunStore, records: dict[str, list[PredictionRecord]] | None = None
) -> dict[str, MetricsResult]:
    """The statistics of each label-giving scorer of `LABEL_SCORERS` the run has, computed from
    its own verdicts exactly as the classifier's (a judge left without a verdict is a missing
    prediction), with its own scorer check from the run's positive control. `records`: as
    `scorer_records` gives them (default: read here)."""
    records_of = scorer_records(cfg, store) if records is None else records
    out: dict[str, MetricsResult] = {}
    for name in LABEL_SCORERS:
        records = records_of.get(name, [])
        if any(r.prediction is not None for r in records):
            inp = AnalysisInput(
                records=records,
                personas=cfg.persona_names,
                stats=cfg.stats,
                title=name,
                settings={},
                control=cfg.analysis.positive_control,
            )
            out[name] = compute(inp)
    return out


def run_agreement(
    inp: AnalysisInput,
    result: MetricsResult,
    records: dict[str, list[PredictionRecord]],
    results: dict[str, MetricsResult],
) -> Agreement:
    """Whether the run's scorers agree (`stats.agreement`): the classifier's records and
    statistics (`inp`, `result`) beside every other scorer's, on the run's interval settings."""
    from charshift.stats import DEFAULT_SCORER
    from charshift.stats.agreement import compute_agreement
    from charshift.stats.compute import make_opts

    s = inp.stats
    o = make_opts(s.n_boot, s.ci, s.method, s.seed, result.min_clusters,
                  small_sample=s.small_sample, n_perm=0, control=None)  # fmt: skip
    likert = None if inp.likert is None else inp.likert.differences
    return compute_agreement(
        {DEFAULT_SCORER: inp.records, **records}, {DEFAULT_SCORER: result, **results}, o, likert
    )


def run_likert(
    inp: AnalysisInput, result: MetricsResult, records: dict[str, list[PredictionRecord]]
) -> LikertResult | None:
    """The Likert judge's figures (`stats.likert`) where the run has a Likert judge with a
    score, on the run's interval settings and positive control."""
    from charshift.stats.compute import make_opts
    from charshift.stats.likert import likert_result

    recs = records.get("judge_likert", [])
    if not any(r.judge_score is not None or r.scores for r in recs):
        return None
    s = inp.stats
    o = make_opts(s.n_boot, s.ci, s.method, s.seed, result.min_clusters,
                  small_sample=s.small_sample, n_perm=0, control=inp.control)  # fmt: skip
    return likert_result(recs, inp.personas, o)


def _nothing_to_report(store: RunStore, cids: dict[str, str]) -> str:
    if not len(store.generations) and len(store.scores):
        return (
            f"{store.root}/generations.jsonl is missing or empty, but the run holds "
            f"{len(store.scores)} scores: its generations are gone. Run `charshift run CONFIG "
            f"--out {store.root}` with the run's config to generate them again"
        )
    if not len(store.generations):
        return f"{store.root}: no generations yet; run `charshift run` (or `charshift generate`)"
    if not cids and not len(store.scores):
        return f"{store.root}: nothing scored yet; run `charshift score --run {store.root}` first"
    return (
        f"{store.root}: none of the {len(store.generations)} generations has an evaluated score "
        f"yet; run `charshift score --run {store.root}` first"
    )
