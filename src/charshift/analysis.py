"""The analysis tail, one for every source of predictions: records -> statistics -> tables,
plots and the report.

`report_run` feeds it a run directory (generations joined with their scores); `report_predictions`
in `external` feeds it a predictions JSONL made elsewhere. Both end in `analyse`, so a run and
`charshift report --predictions` compute every figure the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charshift.config import RunConfig, StatsConfig, config_to_dict
from charshift.schema import NULL_PERSONA, GenerationRow, PredictionRecord
from charshift.store import RunStore

if TYPE_CHECKING:
    from charshift.stats import MetricsResult


@dataclass
class AnalysisInput:
    """Everything the tail needs besides the output folder."""

    records: list[PredictionRecord]  # base rows with persona NULL_PERSONA (not yet expanded)
    personas: list[str]
    stats: StatsConfig
    title: str
    settings: dict[str, Any]
    samples: list[dict[str, Any]] | None = None  # None: built from the records
    meaningless: bool = False
    published: str | None = None
    notes: list[str] = field(default_factory=list)
    # What a reader must see before anything else (an incomplete run, a label-set change): the
    # report shows these first, in a warning box at the very top.
    warnings: list[str] = field(default_factory=list)


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
    )


def analyse(inp: AnalysisInput, out_dir: Path, result: MetricsResult | None = None) -> Path:
    """Statistics (unless `result` is given), tables, plots and the report, under `out_dir`."""
    from charshift import report as report_mod
    from charshift import tables

    result = compute(inp) if result is None else result
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables.write_tables(result, out)
    return report_mod.write_report(
        out,
        inp.records,
        result,
        settings=inp.settings,
        samples=inp.samples,
        title=inp.title,
        meaningless=inp.meaningless,
        published=inp.published,
        notes=[*inp.notes, *(n.text() for n in result.label_notes)],
        warnings=inp.warnings,
    )


# --------------------------------------------------------------------------- a run directory


def prediction_records(cfg: RunConfig, store: RunStore) -> list[PredictionRecord]:
    """Join a run's eval generations with their scores: one record per (row, unit), `slice` =
    the unit (see `charshift.units`); base rows keep the null persona. A unit with no text (the
    row's outcome is not an output) is a missing prediction; a unit not scored yet is left out."""
    from charshift import units

    raw = cfg.scoring.text == "raw"
    cids: dict[str, str] = store.manifest().get("classifier_ids", {})
    out: list[PredictionRecord] = []
    for r, unit, text in units.row_units(store.generations, raw):
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
                prediction=sc.prediction if sc else None,
                sample_idx=r.sample_idx,
                probs=sc.probs if sc else None,
                outcome=r.outcome,
                text=text,
                key=r.key,
            )
        )
    return out


def browser_samples(records: Sequence[PredictionRecord], store: RunStore) -> list[dict[str, Any]]:
    """The report's sample browser entries: each record with its whole conversation."""
    samples = []
    for rec in records:
        g: GenerationRow | None = store.generations.get(rec.key or "")
        if g is None:
            continue
        samples.append(
            {
                "key": rec.key,
                "base": rec.base,
                "stage": rec.stage,
                "persona": g.persona or "(base: none)",
                "slice": rec.slice,
                "item_id": rec.item_id,
                "sample_idx": rec.sample_idx,
                "outcome": rec.outcome,
                "messages": g.messages,
                "text": rec.text,
                "email": g.email,
                "prediction": rec.prediction,
                "probs": rec.probs,
                "tool_log": g.tool_log,
            }
        )
    return samples


def report_run(cfg: RunConfig, store: RunStore, out_dir: Path | None = None) -> Path:
    """The analysis tail over a run directory; the report goes to `out_dir` or the run's root."""
    records = prediction_records(cfg, store)
    if not records:
        raise ValueError(f"{store.root}: nothing scored yet; run `charshift score` first")
    notes = [
        f"Skipped adapter {name}: {msg}"
        for name, msg in (store.manifest().get("skipped_adapters") or {}).items()
    ]
    inp = AnalysisInput(
        records=records,
        personas=list(cfg.personas),
        stats=cfg.stats,
        title=f"charshift report: {cfg.name}",
        settings={"config": config_to_dict(cfg), "manifest": store.manifest()},
        samples=browser_samples(records, store),
        meaningless=cfg.meaningless,
        published=cfg.published,
        notes=notes,
    )
    result = compute(inp)
    inp.settings["manifest"] = store.update_manifest(
        label_sets={"labels": result.labels, "notes": [n.text() for n in result.label_notes]}
    )
    return analyse(inp, Path(out_dir) if out_dir else store.root, result)
