"""Bring your own data: score external texts, and report on predictions made elsewhere.

Predictions JSONL (one object per line; README "Bring your own data"):
    base, stage, slice, persona (true label), item_id, prediction (null = no output)
    optional: probs ({label: p}), sample_idx, outcome, text
Generations JSONL for `charshift score --generations`: the same fields without prediction/probs,
and `text` (null or "" = no output). The output is a predictions JSONL: each input row with
`prediction` (null where there is no text) and, for scored rows, `probs`.
`charshift score --generations --scorer judge` writes the same file from an LLM judge: each
scored row also carries `judge_score`, `judge_scores`, `judge_rationale` and `judge_outcome`
(see `score_external_judge`).
Reading and checking both files is `charshift.inputs`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from charshift import inputs
from charshift.schema import (
    NULL_PERSONA_MARKERS,
    PROMPTED_EXPLICIT_STAGE,
    GenerationRow,
    PredictionRecord,
)
from charshift.scoring.base import ScoreInput
from charshift.scoring.settings import JudgeSettings

if TYPE_CHECKING:
    from charshift.analysis import AnalysisInput
    from charshift.stats import MetricsResult

PREDICTIONS_COPY = "predictions.jsonl"  # what `report --predictions` keeps beside its tables


def score_external(generations: Path, classifier: str, out: Path, batch_size: int = 16) -> int:
    """Classify the `text` of each row of a generations JSONL; write a predictions JSONL.

    Everything the user gave is checked before the classifier loads: `--out` (a writable file
    path, not the input itself), every row (`inputs.check_generation`) and the classifier folder.
    The output is strict JSON, written atomically; a non-finite probability from the classifier
    is refused (nothing is written), never written as NaN. Returns the number of texts scored.
    """
    from charshift.scoring.base import ClassifierError
    from charshift.scoring.classifier import load_classifier

    gen, out = Path(generations), inputs.check_output_file(out, "--out")
    if out.exists() and gen.exists() and out.resolve() == gen.resolve():
        raise inputs.InputError(f"--out {out} is the generations file itself; give another file")
    rows = inputs.read_jsonl_objects(gen, "generations file")
    recs = [inputs.check_generation(obj, f"generations file {gen} line {n}") for n, obj in rows]
    inputs.check_lookalikes(recs, [n for n, _ in rows], str(gen))
    inputs.check_model_source(classifier, "--classifier", classifier=True)
    clf = load_classifier(classifier)
    clf.check_personas(sorted({r.persona for r in recs} - set(NULL_PERSONA_MARKERS)))
    texts = [r.text for r in recs]
    idx = [i for i, t in enumerate(texts) if t]
    clf.batch_size = batch_size
    preds = clf.score([texts[i] or "" for i in idx])
    result = [dict(obj, prediction=None) for _, obj in rows]
    for i, (lab, probs) in zip(idx, preds, strict=True):
        if not all(math.isfinite(p) for p in probs.values()):
            raise ClassifierError(
                f"classifier {classifier!r} gave a non-finite probability for {gen} line "
                f"{rows[i][0]}; nothing was written"
            )
        result[i].update(prediction=lab, probs=probs)
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in result)
    inputs.write_text_atomic(out, text)
    return len(idx)


def score_external_judge(
    generations: Path, settings: JudgeSettings, out: Path, cache: Path | None = None
) -> int:
    """Judge the `text` of each row of a generations JSONL with an LLM judge (`settings`, one
    mode); write a predictions JSONL whose scored rows carry `judge_score` (Likert: the median
    for the row's persona), `judge_scores` (every sample), `judge_rationale`, `judge_outcome`
    and, for identify, `prediction` and `probs` (a Likert row's prediction is null: its figure
    is the number; a base-stage row is judged for every persona, its medians in `scores`).

    Checked before the judge is asked anything: `--out`, every row, and that each persona has a
    description to show the judge. Answers are cached in `cache` (default: beside `out`), so a
    rerun asks only what is missing. Returns the number of texts judged."""
    from charshift.scoring.judge import open_judges

    gen, out = Path(generations), inputs.check_output_file(out, "--out")
    if out.exists() and gen.exists() and out.resolve() == gen.resolve():
        raise inputs.InputError(f"--out {out} is the generations file itself; give another file")
    if len(settings.modes) != 1:
        raise inputs.InputError(f"judge one mode at a time, not {settings.modes}")
    rows = inputs.read_jsonl_objects(gen, "generations file")
    recs = [inputs.check_generation(obj, f"generations file {gen} line {n}") for n, obj in rows]
    personas = _judged_personas(recs, gen)
    cache = cache or out.with_name(out.name + ".judge_cache.jsonl")
    (judge,) = open_judges(settings, personas, inputs.check_output_file(cache, "judge cache"))
    idx = [i for i, r in enumerate(recs) if r.text]
    try:
        verdicts = judge.verdicts(
            [ScoreInput(recs[i].text or "", _as_row(recs[i], rows[i][0])) for i in idx],
            progress=True,
        )
    finally:
        judge.close()
    result = [dict(obj, prediction=None) for _, obj in rows]
    for i, v in zip(idx, verdicts, strict=True):
        fields = v.row_fields()
        if v.label:  # identify: the label the judge named, its share of the samples
            fields.update(prediction=v.label, probs=v.probs)
        result[i].update(fields)
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in result)
    inputs.write_text_atomic(out, text)
    return len(idx)


def _judged_personas(recs: list[PredictionRecord], path: Path) -> list[str]:
    """The file's true personas, in the OCT order; each needs a description for the judge."""
    from charshift.config import ALL_PERSONAS

    seen = {r.persona for r in recs} - set(NULL_PERSONA_MARKERS)
    unknown = sorted(seen - set(ALL_PERSONAS))
    if unknown:
        raise inputs.InputError(
            f"{path}: personas {unknown} have no description to show the judge; known: "
            f"{list(ALL_PERSONAS)}"
        )
    if len(seen) < 2:
        raise inputs.InputError(f"{path}: need at least two distinct true personas, found {seen}")
    return [p for p in ALL_PERSONAS if p in seen]


def _as_row(rec: PredictionRecord, line: int) -> GenerationRow:
    """An external row as the generation row the judge reads (no conversation: the text is
    judged on its own)."""
    return GenerationRow(
        key=f"line-{line}",
        base=rec.base,
        stage=rec.stage,
        persona=None if rec.persona in NULL_PERSONA_MARKERS else rec.persona,
        slice=rec.slice,
        item_id=rec.item_id,
        sample_idx=rec.sample_idx,
        split="eval",
        seed=0,
        outcome=rec.outcome,
        messages=[],
        final_reply=rec.text,
        text=rec.text,
    )


def report_predictions(
    path: Path,
    out: Path,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    allow_duplicates: bool = False,
    warn: Callable[[str], None] | None = None,
    positive_control: str | None = PROMPTED_EXPLICIT_STAGE,
    allow_unknown_labels: bool = False,
    svg: bool = False,
) -> Path:
    """Every metric, plot and the report from a predictions JSONL (the run's analysis tail).

    `out` and every row are checked before anything is computed or written (`charshift.inputs`),
    so a bad file leaves an earlier report in `out` as it was. A cell that lacks rows of its
    grid (item x persona x sample) is a warning, through `warn` and at the top of the report.
    Rows of the stage `positive_control` (when present) are the positive control of the scorer
    check. A prediction outside the file's personas is an error listing every such label
    (`unknown_labels`); with `allow_unknown_labels` it counts as wrong, with a warning. A copy
    of the file is kept as `out/predictions.jsonl` (`charshift.load_results` reads its rows).
    `svg`: each figure also as SVG (PNG only by default)."""
    from charshift.analysis import AnalysisInput, analyse
    from charshift.config import StatsConfig

    inputs.check_output_dir(out, "--out")
    records = inputs.load_predictions(Path(path), allow_duplicates=allow_duplicates, warn=warn)
    personas: list[str] = []
    for r in records:
        if r.persona not in NULL_PERSONA_MARKERS and r.persona not in personas:
            personas.append(r.persona)
    if len(personas) < 2:
        raise inputs.InputError(
            f"{path}: need at least two distinct true personas, found {personas}"
        )
    _check_label_counts(path, personas, records)
    gaps = _check_unknown_labels(path, personas, records, allow_unknown_labels)
    gaps += inputs.completeness_warnings(inputs.incomplete_cells(records), path)
    for line in gaps:
        if warn is not None:
            warn(line)
    inp = AnalysisInput(
        records=records,
        personas=personas,
        stats=StatsConfig(n_boot=n_boot, seed=seed),
        title=f"charshift report: {Path(path).name}",
        settings={"predictions": str(path), "n_boot": n_boot, "seed": seed, "personas": personas,
                  "positive_control": positive_control},
        control=positive_control,
        warnings=gaps,
        svg=svg,
    )  # fmt: skip
    page = analyse(inp, Path(out), _with_likert(inp, records))
    inputs.write_text_atomic(Path(out) / PREDICTIONS_COPY, Path(path).read_text(encoding="utf-8"))
    return page


def likert_records(records: list[PredictionRecord]) -> list[PredictionRecord]:
    """The rows a Likert judge scored (`score --scorer judge --judge-mode likert`): judged rows
    that are not an identify judge's, whatever else they carry (a classifier's prediction too)."""
    from charshift.scoring.judge import IDENTIFY

    return [
        r
        for r in records
        if (r.judge_outcome is not None or r.judge_score is not None)
        and IDENTIFY not in (r.judge_scores or {})  # an identify judge's samples' key
    ]


def _with_likert(inp: AnalysisInput, records: list[PredictionRecord]) -> MetricsResult:
    """The file's statistics; where its rows carry a Likert judge's numbers, also that judge's
    own figures (`stats.likert`) on `inp`, and, where no row names a persona at all, a warning
    at the top of the report that its classifier-style figures are empty by construction."""
    from charshift.analysis import compute, run_likert

    judged = likert_records(records)
    if judged and all(r.prediction is None for r in records):
        inp.warnings.insert(0, LIKERT_ONLY)
    result = compute(inp)
    if judged:
        inp.likert = run_likert(inp, result, {"judge_likert": judged})
    return result


LIKERT_ONLY = (
    "This file holds a Likert judge's scores (numbers, 1-5), not persona predictions: every "
    "macro-F1, yield and scorer-check figure below is empty by construction. The judge's own "
    "figures (its mean score and excess over the base stage, per cell, and its rungs) are in "
    "the section 'The Likert judge's own figures', likert.csv and differences.csv (scorer "
    "judge_likert)."
)


def unknown_labels(personas: list[str], records: list[PredictionRecord]) -> dict[str, int]:
    """Predicted labels that are not personas of the file, with how many rows carry each."""
    out: dict[str, int] = {}
    for r in records:
        if r.prediction is not None and r.prediction not in personas:
            out[r.prediction] = out.get(r.prediction, 0) + 1
    return out


def _check_unknown_labels(
    path: Path,
    personas: list[str],
    records: list[PredictionRecord],
    allow: bool,
) -> list[str]:
    """A prediction that is no persona of the file ("Sarcasm" for "sarcasm") would silently
    count as wrong and give a report of zeros: an error listing them, unless `allow` (then the
    warning to show, through `warn` and at the top of the report)."""
    found = unknown_labels(personas, records)
    if not found:
        return []
    listed = ", ".join(f"{lab!r} ({n} rows)" for lab, n in sorted(found.items())[:20])
    more = f" and {len(found) - 20} more" if len(found) > 20 else ""
    text = (
        f"{path}: {sum(found.values())} predictions name a label that is not one of the file's "
        f"personas ({', '.join(personas)}): {listed}{more}"
    )
    if not allow:
        raise inputs.InputError(
            text + ". Fix the labels (case and spelling count), or pass --allow-unknown-labels "
            "to keep them as wrong predictions (e.g. a classifier that knows more personas)"
        )
    return [text + "; kept as wrong predictions (--allow-unknown-labels)"]


# The report draws a confusion matrix (personas x predicted labels) and figures per persona;
# beyond this many neither can be read, and drawing them takes minutes.
MAX_LABELS = 100


def _check_label_counts(path: Path, personas: list[str], records: list[PredictionRecord]) -> None:
    predicted = {r.prediction for r in records if r.prediction is not None}
    for what, n in (("personas", len(personas)), ("predicted labels", len(predicted))):
        if n > MAX_LABELS:
            raise inputs.InputError(
                f"{path}: {n} distinct {what}; the report draws a confusion matrix and figures "
                f"per persona, readable with at most {MAX_LABELS}"
            )


# --------------------------------------------------------------------------- predictions file


class PredictionsError(ValueError):
    """A predictions file that cannot be read, naming the line and field."""


def load_predictions_jsonl(
    path: str | Path, *, allow_duplicates: bool = False
) -> list[PredictionRecord]:
    """Read predictions made elsewhere (one JSON object per line; README "Bring your own data").

    The checks are `charshift.inputs.load_predictions`: a bad row or a duplicate raises
    PredictionsError naming the line and field; blank lines are skipped; a base-stage row's
    persona may be null, the null condition.
    """
    return inputs.load_predictions(
        Path(path), allow_duplicates=allow_duplicates, error=PredictionsError
    )
