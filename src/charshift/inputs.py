"""What a user hands in, read and checked before any work: JSONL files, model folders, output paths.

Every problem is an `InputError` (a ValueError) that names the file, the line and the field, raised
before a classifier loads or a metric is computed, and before any output is written:

- `read_jsonl_objects(path, what)`: the objects of a JSONL file, one per non-blank line, read by
  the package's one strict reader (`fileio.read_jsonl`: see there what it refuses).
- `check_prediction(obj, where)`: one row of a predictions file (README "Bring your own data") ->
  a `PredictionRecord`; `check_generation(obj, where)`: one row of a generations file -> the same
  record with no prediction and the text to classify.
  A judged row (`score --generations --scorer judge`) may also carry `judge_score`,
  `judge_scores`, `judge_rationale`, `judge_outcome` and `scores`, each checked
  (`check_judge_fields`) and kept on the record; with a `judge_outcome` an output row may have
  no prediction (a Likert judge's figure is a number).
- `load_predictions(path)`: a whole predictions file, duplicates refused (or kept once, on request).
  A row is consistent or refused: a prediction on a row whose `outcome` says there was no output
  (`no_email`, `malformed`, `max_steps`, ...), or no prediction on a row whose outcome is an
  output (`reply`, `email`), names its line.
- `incomplete_cells(records)` / `completeness_warnings`: every (base, stage, slice) cell should
  hold every item x persona x sample of its grid; what is missing is a warning naming the cell
  and the counts (the figures then cover only the rows given).
- `check_output_file` / `check_output_dir`: an output path that can be written, checked up front;
  `write_text_atomic`: the output itself, complete or not at all (`fileio`'s atomic writer).
- `check_model_source(spec, what)`: a local model or classifier folder is a model folder.

Texts holding a lone surrogate (`"\\ud800"` is legal JSON but no UTF-8 text can hold it) are
refused with their line and field, not escaped: every output is UTF-8, and silently rewriting a
model's output would change what is scored and shown.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charshift import fileio
from charshift.schema import (
    BASE_STAGE,
    JUDGE_OUTCOMES,
    NULL_PERSONA,
    NULL_PERSONA_MARKERS,
    OUTCOMES,
    SCORED_OUTCOMES,
    PredictionRecord,
)

MAX_LABEL_CHARS = 200  # base, stage, slice, persona, item_id, prediction, outcome, probs labels
PROBS_SUM_TOLERANCE = 0.01  # |sum(probs) - 1|: rounding to 3 decimals over 11 labels stays inside
_LABEL_FIELDS = ("base", "stage", "slice", "persona", "item_id")
# In a label (a table cell, a file name, a heading): C0/C1 controls, DEL, line/paragraph separators
# and bidirectional overrides, any of which breaks or disguises what a table shows.
_BAD_LABEL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# A judged row's fields (`score --generations --scorer judge`), and the Likert scale's ends.
JUDGE_FIELDS = ("judge_score", "judge_scores", "judge_rationale", "judge_outcome", "scores")
JUDGE_MIN, JUDGE_MAX = 1.0, 5.0
# The outcomes that say a row produced nothing to score (schema.OUTCOMES less the outputs).
NO_OUTPUT_OUTCOMES = tuple(o for o in OUTCOMES if o not in SCORED_OUTCOMES)

Error = type[Exception]


class InputError(ValueError):
    """An input file, row or path that cannot be used, naming the file, line and field."""


# --------------------------------------------------------------------------------------- reading


def read_jsonl_objects(
    path: str | Path, what: str = "input file", error: Error = InputError
) -> list[tuple[int, dict[str, Any]]]:
    """`fileio.read_jsonl_objects` with InputError: the one strict JSONL reader (see fileio)."""
    return fileio.read_jsonl_objects(path, what, error)


_json_type = fileio.json_type


# ------------------------------------------------------------------------------------ row checks


def surrogate_problem(text: str) -> str | None:
    """'holds a lone surrogate (\\ud800 at character 4)' where `text` holds one (legal in JSON,
    but no UTF-8 file and no tokenizer can take it), else None."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    return f"holds a lone surrogate (\\u{ord(m.group()):04x} at character {m.start() + 1})"


def replace_surrogates(text: str) -> tuple[str, int]:
    """`text` with each lone surrogate replaced by U+FFFD (what a UTF-8 decoder puts for bytes it
    cannot read), and how many were replaced."""
    return _SURROGATE.subn("\ufffd", text)


def check_text(v: Any, field: str, where: str, error: Error = InputError) -> str | None:
    """A free text (a model output): a string or null, with no lone surrogate."""
    if v is None:
        return None
    if not isinstance(v, str):
        raise error(f"{where}: field {field!r} must be a string or null, got {_json_type(v)}")
    problem = surrogate_problem(v)
    if problem:
        raise error(f"{where}: field {field!r} {problem}, which no UTF-8 output can carry")
    return v


@functools.lru_cache(maxsize=4096)
def _label_problem(v: str) -> str | None:
    """What is wrong with a string as a label, or None (cached: labels repeat on every row)."""
    if not v:
        return "must be a non-empty string, got ''"
    if len(v) > MAX_LABEL_CHARS:
        return f"is longer than {MAX_LABEL_CHARS} characters"
    problem = surrogate_problem(v)
    if problem:
        return problem
    m = _BAD_LABEL_CHARS.search(v)
    if m:
        return (
            f"holds a control character (U+{ord(m.group()):04X} at character {m.start() + 1}), "
            "which would break the tables and the report"
        )
    hidden = next((i for i, c in enumerate(v) if unicodedata.category(c) == "Cf"), None)
    if hidden is not None:
        return (
            f"holds an invisible format character (U+{ord(v[hidden]):04X} at character "
            f"{hidden + 1}), so it would look like another label and count apart from it"
        )
    if not unicodedata.is_normalized("NFC", v):
        return (
            f"is not in Unicode NFC form (it looks like {unicodedata.normalize('NFC', v)!r} "
            "but would count apart from it); write it in NFC"
        )
    if v != v.strip():
        return f"has leading or trailing whitespace: {v!r}"
    return None


def check_label(v: Any, field: str, where: str, error: Error = InputError) -> str:
    """A label (a table cell, a file name part): a non-empty, short, printable string."""
    if not isinstance(v, str):
        raise error(f"{where}: field {field!r} must be a non-empty string, got {_json_type(v)}")
    problem = _label_problem(v)
    if problem:
        raise error(f"{where}: field {field!r} {problem}")
    return v


def _labels(obj: dict[str, Any], where: str, error: Error) -> dict[str, str]:
    vals: dict[str, str] = {}
    for name in _LABEL_FIELDS:
        if name not in obj:
            raise error(f"{where}: missing required field {name!r}")
        v = obj[name]
        if name == "item_id" and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if name == "persona" and v in NULL_PERSONA_MARKERS:
            if obj.get("stage") != BASE_STAGE:
                raise error(
                    f"{where}: field 'persona' is {v!r} (no persona), allowed only on "
                    f"stage {BASE_STAGE!r} rows"
                )
            vals[name] = NULL_PERSONA
            continue
        vals[name] = check_label(v, name, where, error)
    return vals


def _row_extras(obj: dict[str, Any], where: str, error: Error) -> dict[str, Any]:
    """sample_idx, outcome, text and key: the optional fields of both row kinds."""
    sample_idx = obj.get("sample_idx", 0)
    if not isinstance(sample_idx, int) or isinstance(sample_idx, bool) or sample_idx < 0:
        raise error(f"{where}: field 'sample_idx' must be a non-negative integer")
    out: dict[str, Any] = {"sample_idx": sample_idx}
    for name in ("outcome", "key"):
        if obj.get(name) is not None:
            out[name] = check_label(obj[name], name, where, error)
    out["text"] = check_text(obj.get("text"), "text", where, error)
    return out


def check_probs(v: Any, where: str, error: Error = InputError) -> dict[str, float] | None:
    """`probs`: null, or label -> probability in [0, 1], summing to 1 within the tolerance."""
    if v is None:
        return None
    if not isinstance(v, dict) or not v:
        raise error(f"{where}: field 'probs' must map labels to numbers, got {_json_type(v)}")
    out: dict[str, float] = {}
    for k, p in v.items():
        check_label(k, "probs", where, error)
        if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p):
            raise error(f"{where}: field 'probs' must map labels to numbers; {k!r} -> {p!r:.40}")
        if not 0.0 <= p <= 1.0:
            raise error(f"{where}: field 'probs': {k!r} -> {p} is not a probability in [0, 1]")
        out[k] = float(p)
    total = math.fsum(out.values())
    if abs(total - 1.0) > PROBS_SUM_TOLERANCE:
        raise error(
            f"{where}: field 'probs' sums to {total:.4g}, not 1 (within {PROBS_SUM_TOLERANCE}); "
            "give every label's probability"
        )
    return out


def _number(v: Any, field: str, where: str, error: Error, lo: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise error(f"{where}: field {field!r} must be a finite number, got {v!r:.40}")
    if lo is not None and not lo <= v <= JUDGE_MAX:
        raise error(f"{where}: field {field!r} must lie in [{lo:g}, {JUDGE_MAX:g}], got {v}")
    return float(v)


def _label_map(v: Any, field: str, where: str, error: Error) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise error(f"{where}: field {field!r} must map labels to values, got {_json_type(v)}")
    for k in v:
        check_label(k, field, where, error)
    return v


def check_judge_fields(
    obj: dict[str, Any], where: str, error: Error = InputError
) -> dict[str, Any]:
    """The optional fields of a judged row (`score --generations --scorer judge`): `judge_score`
    (a Likert median, 1-5, or null), `judge_scores` (label -> list of samples: a Likert number,
    a label, or null for an unparseable one), `judge_rationale` (label -> text or null),
    `judge_outcome` (one of schema.JUDGE_OUTCOMES) and `scores` (label -> a finite number)."""
    out: dict[str, Any] = {}
    if obj.get("judge_score") is not None:
        out["judge_score"] = _number(obj["judge_score"], "judge_score", where, error, JUDGE_MIN)
    if obj.get("judge_scores") is not None:
        samples = _label_map(obj["judge_scores"], "judge_scores", where, error)
        for k, vals in samples.items():
            if not isinstance(vals, list):
                raise error(f"{where}: field 'judge_scores': {k!r} must hold a list of samples")
            for x in vals:
                if isinstance(x, str):
                    check_label(x, "judge_scores", where, error)
                elif x is not None:
                    _number(x, "judge_scores", where, error, JUDGE_MIN)
        out["judge_scores"] = samples
    if obj.get("judge_rationale") is not None:
        why = _label_map(obj["judge_rationale"], "judge_rationale", where, error)
        out["judge_rationale"] = {
            k: check_text(t, "judge_rationale", where, error) for k, t in why.items()
        }
    if obj.get("judge_outcome") is not None:
        if obj["judge_outcome"] not in JUDGE_OUTCOMES:
            raise error(f"{where}: field 'judge_outcome' must be one of {list(JUDGE_OUTCOMES)}")
        out["judge_outcome"] = obj["judge_outcome"]
    if obj.get("scores") is not None:
        scores = _label_map(obj["scores"], "scores", where, error)
        out["scores"] = {k: _number(x, "scores", where, error) for k, x in scores.items()}
    return out


def check_prediction(
    obj: dict[str, Any], where: str, error: Error = InputError
) -> PredictionRecord:
    """One predictions row -> its record. A base-stage row's null persona becomes NULL_PERSONA.
    A judged row (`judge_outcome` given) may have an output and no prediction: a Likert judge
    gives a number, and an unparseable answer is no prediction."""
    vals = _labels(obj, where, error)
    if "prediction" not in obj:
        raise error(f"{where}: missing required field 'prediction' (null = no output)")
    pred = obj["prediction"]
    if pred is not None:
        pred = check_label(pred, "prediction", where, error)
    extras = _row_extras(obj, where, error)
    judged = check_judge_fields(obj, where, error)
    extras.setdefault("outcome", "reply" if pred is not None or judged else "empty")
    given = pred is not None or "judge_outcome" in judged
    _check_consistent(given, extras["outcome"], "prediction", where, error)
    probs = check_probs(obj.get("probs"), where, error)
    return PredictionRecord(**vals, prediction=pred, probs=probs, **extras, **judged)


def _check_consistent(given: bool, outcome: str, field: str, where: str, error: Error) -> None:
    """A row's verdict (or text to score) and its outcome must agree: something scored on a
    row that says it had no output would count as an output, and an output without one would
    silently leave the conditional figures. Outcomes outside schema.OUTCOMES are not judged."""
    if given and outcome in NO_OUTPUT_OUTCOMES:
        raise error(
            f"{where}: field {field!r} is set, but field 'outcome' is {outcome!r}, which says "
            f"the row has no output; give {field} null, or an output's outcome "
            f"({', '.join(SCORED_OUTCOMES)})"
        )
    if not given and outcome in SCORED_OUTCOMES:
        raise error(
            f"{where}: field {field!r} is null (no output), but field 'outcome' is {outcome!r}, "
            f"an output; give its {field}, or the outcome that says why there is none "
            f"({', '.join(NO_OUTPUT_OUTCOMES)})"
        )


def check_generation(
    obj: dict[str, Any], where: str, error: Error = InputError
) -> PredictionRecord:
    """One generations row (`score --generations`): the predictions fields with `text` instead of
    `prediction`. Returns its record, with no prediction yet and `text` the text to classify
    (None: no output; an empty text is no output). A null persona becomes NULL_PERSONA."""
    vals = _labels(obj, where, error)
    if "text" not in obj:
        raise error(f"{where}: missing required field 'text' (null = no output)")
    for name in ("prediction", "probs", *JUDGE_FIELDS):
        if name in obj:
            raise error(
                f"{where}: field {name!r} is set; a generations file carries texts to score, "
                "not predictions (is this a predictions file?)"
            )
    extras = _row_extras(obj, where, error)
    extras["text"] = extras["text"] or None
    extras.setdefault("outcome", "reply" if extras["text"] else "empty")
    _check_consistent(extras["text"] is not None, extras["outcome"], "text", where, error)
    return PredictionRecord(**vals, prediction=None, **extras)


_LOOKALIKE_FIELDS = (*_LABEL_FIELDS, "prediction")


def check_lookalikes(
    records: Sequence[PredictionRecord],
    lines: Sequence[int],
    source: str,
    error: Error = InputError,
) -> None:
    """Two distinct labels of one field that are the same after Unicode NFKC normalisation (a
    fullwidth letter, a ligature: they look alike but would count as two labels) are an error
    naming both lines. Invisible characters and non-NFC labels are refused row by row."""
    for name in _LOOKALIKE_FIELDS:
        seen: dict[str, tuple[str, int]] = {}
        values: dict[str, int] = {}
        for r, line in zip(records, lines, strict=True):
            v = getattr(r, name)
            if v is not None and v not in values:
                values[v] = line
        for v, line in values.items():
            first = seen.setdefault(unicodedata.normalize("NFKC", v), (v, line))
            if first[0] != v:
                raise error(
                    f"{source} lines {first[1]} and {line}: field {name!r} holds {first[0]!r} and "
                    f"{v!r}, which look alike (the same after Unicode NFKC normalisation) but "
                    "would count as two labels; write one of them as the other"
                )


def _row_key(r: PredictionRecord) -> tuple[str, str, str, str, str, int]:
    return (r.base, r.stage, r.slice, r.persona, r.item_id, r.sample_idx)


def find_duplicates(records: Sequence[PredictionRecord]) -> list[tuple[int, int, bool]]:
    """(index of the first row, index of a later row with its key, whether they differ) for every
    row whose key (base, stage, slice, persona, item_id, sample_idx) an earlier row holds."""
    first: dict[tuple[str, str, str, str, str, int], int] = {}
    out = []
    for i, r in enumerate(records):
        j = first.setdefault(_row_key(r), i)
        if j != i:
            out.append((j, i, records[j] != r))
    return out


def load_predictions(
    path: str | Path,
    *,
    allow_duplicates: bool = False,
    error: Error = InputError,
    warn: Callable[[str], None] | None = None,
) -> list[PredictionRecord]:
    """Every row of a predictions file, checked. Rows that repeat a key (base, stage, slice,
    persona, item_id, sample_idx) are an error naming both lines, identical or not: counted twice
    they would weigh twice. With `allow_duplicates`, the first row of each key is kept (as the run
    store keeps the first write of a key) and `warn` says how many were dropped and how many of
    them disagreed with the row kept."""
    p = Path(path)
    rows = read_jsonl_objects(p, "predictions file", error)
    lines = [n for n, _ in rows]
    records = [check_prediction(obj, f"predictions file {p} line {n}", error) for n, obj in rows]
    check_lookalikes(records, lines, str(p), error)
    dups = find_duplicates(records)
    if not dups:
        return records
    n_conf = sum(c for _, _, c in dups)
    i, j, conflict = dups[0]
    names = ("base", "stage", "slice", "persona", "item_id", "sample_idx")
    key = ", ".join(f"{k}={v!r}" for k, v in zip(names, _row_key(records[i]), strict=True))
    summary = f"{len(dups)} row(s) repeat an earlier row's key, {n_conf} of them with other values"
    if not allow_duplicates:
        what = "conflicting duplicate" if conflict else "duplicate"
        raise error(
            f"{p} lines {lines[i]} and {lines[j]}: {what} rows for ({key}); {summary}. Every "
            "row must be unique, or pass --allow-duplicates to keep the first of each"
        )
    if warn is not None:
        warn(f"{p}: {summary}; kept the first of each (e.g. line {lines[i]}, not {lines[j]})")
    drop = {j2 for _, j2, _ in dups}
    return [r for k, r in enumerate(records) if k not in drop]


# ------------------------------------------------------------------------------- completeness


@dataclass(frozen=True)
class CellGap:
    """A (base, stage, slice) cell of a predictions file that lacks rows of its grid: the
    items of its slice x the personas of its stage x the samples of its slice."""

    base: str
    stage: str
    slice: str
    items: int
    personas: int
    samples: int
    present: int
    missing_by_persona: dict[str, int]
    example: tuple[str, str, int]  # one missing (item_id, persona, sample_idx)

    @property
    def expected(self) -> int:
        return self.items * self.personas * self.samples

    def text(self) -> str:
        per = ", ".join(f"{_shown(p)} {n}" for p, n in sorted(self.missing_by_persona.items()))
        item, persona, sample = self.example
        return (
            f"{self.base} / {self.stage} / {self.slice}: {self.expected - self.present} of "
            f"{self.expected} rows missing ({self.items} items x {self.personas} personas x "
            f"{self.samples} samples); missing per persona: {per}; e.g. item {item!r}, persona "
            f"{_shown(persona)}, sample {sample}"
        )


def _shown(persona: str) -> str:
    return "(none: base)" if persona == NULL_PERSONA else persona


def incomplete_cells(records: Sequence[PredictionRecord]) -> list[CellGap]:
    """The cells of `records` that lack rows of their grid, in order of first appearance.

    A slice's grid is every item id and sample number seen in that slice (any base or stage);
    a stage's personas are the file's true personas, or only the null persona for a stage whose
    rows all carry it (the base stage, generated once per item and sample)."""
    items: dict[str, set[str]] = {}
    samples: dict[str, set[int]] = {}
    stage_personas: dict[str, set[str]] = {}
    cells: dict[tuple[str, str, str], set[tuple[str, str, int]]] = {}
    for r in records:
        items.setdefault(r.slice, set()).add(r.item_id)
        samples.setdefault(r.slice, set()).add(r.sample_idx)
        stage_personas.setdefault(r.stage, set()).add(r.persona)
        cells.setdefault((r.base, r.stage, r.slice), set()).add(
            (r.item_id, r.persona, r.sample_idx)
        )
    file_personas = {p for ps in stage_personas.values() for p in ps} - {NULL_PERSONA}
    gaps = []
    for (base, stage, slice_), have in cells.items():
        seen = stage_personas[stage]
        personas = seen if seen == {NULL_PERSONA} else file_personas | (seen & {NULL_PERSONA})
        grid = [
            (i, p, s)
            for i in sorted(items[slice_])
            for p in sorted(personas)
            for s in sorted(samples[slice_])
        ]
        missing = [g for g in grid if g not in have]
        if missing:
            by_persona: dict[str, int] = {}
            for _, p, _ in missing:
                by_persona[p] = by_persona.get(p, 0) + 1
            dims = (len(items[slice_]), len(personas), len(samples[slice_]))
            gaps.append(CellGap(base, stage, slice_, *dims, len(have), by_persona, missing[0]))
    return gaps


def completeness_warnings(gaps: Sequence[CellGap], source: str | Path) -> list[str]:
    """A summary line and one line per incomplete cell (nothing when every cell is whole)."""
    if not gaps:
        return []
    missing = sum(g.expected - g.present for g in gaps)
    head = (
        f"{source}: {len(gaps)} cell(s) lack rows of their grid ({missing} rows missing in all; "
        "a cell's grid is every item x persona x sample of its slice and stage): the figures "
        "cover only the rows given, and a paired difference only the items present on both "
        "sides."
    )
    return [head, *(g.text() for g in gaps)]


# ------------------------------------------------------------------------------------ model folders


def _path_like(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec in (".", "..")


def read_model_config(folder: Path, what: str, error: Error = InputError) -> dict[str, Any]:
    """The config.json of a model folder; an error if the folder is not a model folder."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise error(f"{what}: {folder} is not a model folder (it has no config.json)")
    try:
        if cfg.stat().st_size > 16 << 20:
            raise error(f"{what}: {cfg} is too large to be a model config")
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise error(f"{what}: {cfg} cannot be read as JSON ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{what}: {cfg} is not a JSON object")
    return data


def check_model_source(
    spec: str, what: str, *, classifier: bool, error: Error = InputError
) -> None:
    """A model or classifier given as a local path must be a model folder of the right kind.

    Scheme specs (`tiny:`, `packaged:`, `hub:`) and hub ids (ORG/NAME that is no local folder) are
    left to the loaders. Nothing is hashed or walked: only the folder's config.json is read.
    """
    scheme = spec.partition(":")[0]
    if scheme in ("tiny", "packaged", "hub") and ":" in spec:
        return
    p = Path(spec).expanduser()
    if p.is_file():
        raise error(f"{what}: {spec} is a file, not a model folder")
    if not p.is_dir():
        if _path_like(spec):
            raise error(f"{what}: folder not found: {spec}")
        return
    cfg = read_model_config(p, what, error)
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    is_clf = any(a.endswith("ForSequenceClassification") for a in archs)
    if classifier and archs and not is_clf:
        raise error(f"{what}: {spec} is not a sequence classifier (architectures: {archs})")
    if (
        not classifier
        and archs
        and all(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in archs)
    ):
        raise error(f"{what}: {spec} is a classifier, not a chat model (architectures: {archs})")


# ------------------------------------------------------------------------------------ output paths


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, what: str, error: Error) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".charshift-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise error(f"{what}: cannot write in {folder}: {err.strerror or err}") from None


def _check_creatable(path: Path, what: str, error: Error) -> None:
    """The folders up to `path` can be created: the nearest existing one is a writable folder."""
    anc = _nearest_existing(path.parent if path.parent != path else path)
    if not anc.is_dir():
        raise error(f"{what}: {anc} is a file, so {path} cannot be created under it")
    _probe_writable(anc, what, error)


def check_output_file(path: str | Path, what: str = "--out", error: Error = InputError) -> Path:
    """An output file that can be written (replacing a regular file is fine); errors up front."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what}: {p} is a folder; give a file name")
    if p.exists() and not p.is_file():
        raise error(f"{what}: {p} exists and is not a regular file")
    _check_creatable(p, what, error)
    return p


def check_output_dir(path: str | Path, what: str = "--out", error: Error = InputError) -> Path:
    """An output folder that exists and is writable, or can be created; errors up front."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise error(f"{what}: {p} exists and is not a folder")
    if p.is_dir():
        _probe_writable(p, what, error)
    else:
        _check_creatable(p, what, error)
    return p


def name_max(folder: str | Path) -> int:
    """The longest file name, in bytes, that the file system of `folder` (or of its nearest
    existing ancestor) takes; 255, the common limit, where it cannot say."""
    try:
        return int(os.pathconf(_nearest_existing(Path(folder)), "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_name_lengths(
    names: Sequence[tuple[str, str, int]], folder: str | Path, error: Error = InputError
) -> None:
    """Each (what, name, extra bytes a file name made from it adds) fits the file system of
    `folder` (`name_max`); an error naming `what`, the name's bytes and the limit."""
    limit = name_max(folder)
    for what, name, extra in names:
        n = len(os.fsencode(name))
        if n + extra > limit:
            made = f" (and {n + extra} with what the run adds to it)" if extra else ""
            raise error(
                f"{what}: {name[:40]!r}{'...' if len(name) > 40 else ''} is {n} bytes as a "
                f"file name{made}; file names under {folder} are limited to {limit} bytes"
            )


def write_text_atomic(path: str | Path, text: str, error: Error = InputError) -> None:
    """Write `text` (UTF-8) to `path` all at once (`fileio.atomic_write_text`): the file is the
    old one or the complete new one, never a partial write; a failure is `error` naming it."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise error(fileio.write_error_text(p, err)) from None
    fileio.atomic_write_text(p, text, error=lambda q, err: error(fileio.write_error_text(q, err)))
