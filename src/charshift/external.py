"""Bring your own data: score external texts, and report on predictions made elsewhere.

Predictions JSONL (one object per line; README "Bring your own data"):
    base, stage, slice, persona (true label), item_id, prediction (null = no output)
    optional: probs ({label: p}), sample_idx, outcome, text
Generations JSONL for `charshift score --generations`: the same fields without prediction/probs,
and `text` (null = no output). The output is a predictions JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from charshift.schema import BASE_STAGE, NULL_PERSONA, NULL_PERSONA_MARKERS
from charshift.store import jsonl_objects


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
    from charshift import stats
    from charshift.analysis import AnalysisInput, analyse
    from charshift.config import StatsConfig

    records = stats.load_predictions_jsonl(Path(path))
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
