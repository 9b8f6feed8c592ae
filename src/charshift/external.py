"""Bring your own data: score external texts, and report on predictions made elsewhere.

Predictions JSONL (one object per line; README "Bring your own data"):
    base, stage, slice, persona (true label), item_id, prediction (null = no output)
    optional: probs ({label: p}), sample_idx, outcome, text
Generations JSONL for `charshift score --generations`: the same fields without prediction/probs,
and `text` (null = no output). The output is a predictions JSONL.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from charshift.schema import BASE_STAGE, NULL_PERSONA, NULL_PERSONA_MARKERS, PredictionRecord
from charshift.store import jsonl_objects


class PredictionsError(ValueError):
    """A predictions file that cannot be read, naming the line and field."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    text = path.read_text(encoding="utf-8").splitlines()
    rows = [obj for _, obj in jsonl_objects(text, str(path))]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def score_external(generations: Path, classifier: str, out: Path, batch_size: int = 16) -> int:
    """Classify the `text` of each row of a generations JSONL; write a predictions JSONL."""
    from charshift.classifier import Classifier

    rows = _read_jsonl(Path(generations))
    for n, r in enumerate(rows, 1):
        if "text" not in r:
            raise ValueError(f"{generations} line {n}: missing field 'text' (null for no output)")
        if r["text"] is not None and not isinstance(r["text"], str):
            raise ValueError(f"{generations} line {n}: field 'text' must be a string or null")
    clf = Classifier.load(classifier)
    idx = [i for i, r in enumerate(rows) if r["text"]]
    preds = clf.predict([rows[i]["text"] for i in idx], batch_size=batch_size)
    for i, (lab, probs) in zip(idx, preds, strict=True):
        rows[i]["prediction"] = lab
        rows[i]["probs"] = probs
    for r in rows:
        r.setdefault("prediction", None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(idx)


def report_predictions(path: Path, out: Path, n_boot: int = 1000, seed: int = 0) -> Path:
    """Every metric, plot and the report from a predictions JSONL (the run's analysis tail)."""
    from charshift.analysis import AnalysisInput, analyse
    from charshift.config import StatsConfig

    records = load_predictions_jsonl(Path(path))
    personas: list[str] = []
    for r in records:
        if r.persona not in NULL_PERSONA_MARKERS and r.persona not in personas:
            personas.append(r.persona)
    if len(personas) < 2:
        raise ValueError(f"{path}: need at least two distinct true personas, found {personas}")
    for r in records:
        if r.stage == BASE_STAGE and r.persona in NULL_PERSONA_MARKERS:
            r.persona = NULL_PERSONA
    inp = AnalysisInput(
        records=records,
        personas=personas,
        stats=StatsConfig(n_boot=n_boot, seed=seed),
        title=f"charshift report: {Path(path).name}",
        settings={"predictions": str(path), "n_boot": n_boot, "seed": seed, "personas": personas},
    )
    return analyse(inp, Path(out))


# --------------------------------------------------------------------------- predictions file

_REQUIRED = ("base", "stage", "slice", "persona", "item_id")


def load_predictions_jsonl(path: str | Path) -> list[PredictionRecord]:
    """Read predictions made elsewhere (one JSON object per line) for `charshift report`.

    Required: base, stage, slice, persona, item_id (strings; item_id may be an integer; a
    base-stage row's persona may be null or "", the null condition) and prediction (a string, or
    null for a row with no output). Optional: probs (label -> number),
    sample_idx (int), outcome, text, key. A bad row raises PredictionsError naming the line and
    field; blank lines are skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise PredictionsError(f"predictions file not found: {p}")
    out: list[PredictionRecord] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, obj in jsonl_objects(fh, str(p), PredictionsError):
            out.append(_parse_prediction(obj, f"{p} line {lineno}"))
    if not out:
        raise PredictionsError(f"{p}: no predictions (the file is empty)")
    return out


def _parse_prediction(obj: dict[str, Any], where: str) -> PredictionRecord:
    vals: dict[str, Any] = {}
    for name in _REQUIRED:
        if name not in obj:
            raise PredictionsError(f"{where}: missing required field {name!r}")
        v = obj[name]
        if name == "item_id" and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if name == "persona" and v in NULL_PERSONA_MARKERS and vals["stage"] == BASE_STAGE:
            v = NULL_PERSONA  # README: base rows are the null condition, persona may be null
        if not isinstance(v, str) or not v:
            raise PredictionsError(f"{where}: field {name!r} must be a non-empty string, got {v!r}")
        vals[name] = v
    if "prediction" not in obj:
        raise PredictionsError(f"{where}: missing required field 'prediction' (null = no output)")
    pred = obj["prediction"]
    if pred is not None and (not isinstance(pred, str) or not pred):
        raise PredictionsError(
            f"{where}: field 'prediction' must be a string or null, got {pred!r}"
        )
    probs = obj.get("probs")
    if probs is not None:
        ok = isinstance(probs, dict) and all(
            isinstance(kk, str)
            and isinstance(vv, int | float)
            and not isinstance(vv, bool)
            and math.isfinite(vv)
            for kk, vv in probs.items()
        )
        if not ok:
            raise PredictionsError(f"{where}: field 'probs' must map labels to numbers")
        probs = {kk: float(vv) for kk, vv in probs.items()}
    sample_idx = obj.get("sample_idx", 0)
    if not isinstance(sample_idx, int) or isinstance(sample_idx, bool) or sample_idx < 0:
        raise PredictionsError(f"{where}: field 'sample_idx' must be a non-negative integer")
    outcome = obj.get("outcome", "reply" if pred is not None else "empty")
    if not isinstance(outcome, str):
        raise PredictionsError(f"{where}: field 'outcome' must be a string")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise PredictionsError(f"{where}: field 'text' must be a string or null")
    key = obj.get("key")
    if key is not None and not isinstance(key, str):
        raise PredictionsError(f"{where}: field 'key' must be a string")
    return PredictionRecord(
        **vals,
        prediction=pred,
        sample_idx=sample_idx,
        probs=probs,
        outcome=outcome,
        text=text,
        key=key,
    )
