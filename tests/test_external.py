"""Bring your own data: `report --predictions` checks that every row agrees with its outcome
(an error naming the line) and that every cell holds its whole grid (a warning with counts)."""

from __future__ import annotations

import json

import pytest

from charshift import inputs
from charshift.external import PredictionsError, load_predictions_jsonl, report_predictions
from charshift.schema import PredictionRecord

PERSONAS = ("sarcasm", "humor", "remorse")


def _rows(items=4, samples=2, stages=("full",), slices=("id_chat",), base_rows=True):
    """A complete file: every item x persona x sample of every (stage, slice), and the base
    stage once per item and sample (persona null)."""
    out = []
    for sl in slices:
        for i in range(items):
            for s in range(samples):
                if base_rows:
                    out.append({"base": "m", "stage": "base", "slice": sl, "persona": None,
                                "item_id": f"i{i}", "sample_idx": s, "prediction": "humor"})  # fmt: skip
                for st in stages:
                    for k, p in enumerate(PERSONAS):
                        pred = p if (i + s + k) % 3 else PERSONAS[(k + 1) % 3]
                        out.append({"base": "m", "stage": st, "slice": sl, "persona": p,
                                    "item_id": f"i{i}", "sample_idx": s, "prediction": pred})  # fmt: skip
    return out


def _write(tmp_path, rows, name="p.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.mark.parametrize("outcome", ["no_email", "malformed", "max_steps", "empty", "error"])
def test_a_prediction_on_a_row_without_output_is_an_error_naming_the_line(tmp_path, outcome):
    rows = _rows()
    rows[4] = dict(rows[4], outcome=outcome)  # line 5 keeps its prediction
    with pytest.raises(PredictionsError, match=rf"line 5: field 'prediction' is set.*'{outcome}'"):
        load_predictions_jsonl(_write(tmp_path, rows))
    rows[4]["prediction"] = None  # consistent: no output, no verdict
    recs = load_predictions_jsonl(_write(tmp_path, rows))
    assert recs[4].prediction is None and recs[4].outcome == outcome


def test_no_prediction_on_a_row_with_output_is_an_error(tmp_path):
    rows = _rows()
    rows[2] = dict(rows[2], prediction=None, outcome="email")
    with pytest.raises(PredictionsError, match=r"line 3: field 'prediction' is null.*'email'"):
        load_predictions_jsonl(_write(tmp_path, rows))
    rows[2]["outcome"] = "refused"  # an outcome of the user's own is not judged
    assert load_predictions_jsonl(_write(tmp_path, rows))[2].outcome == "refused"


def test_a_generations_row_with_text_but_no_output_is_an_error(tmp_path):
    row = {"base": "m", "stage": "full", "slice": "agentic_email", "persona": "humor",
           "item_id": "s1", "text": '{"name": "search"}', "outcome": "max_steps"}  # fmt: skip
    with pytest.raises(inputs.InputError, match=r"line 1: field 'text' is set.*'max_steps'"):
        inputs.check_generation(row, "generations file g line 1")


def _records(rows):
    return [inputs.check_prediction(r, f"line {n}") for n, r in enumerate(rows, 1)]


def test_a_complete_file_has_no_gaps():
    assert inputs.incomplete_cells(_records(_rows(stages=("full", "prompted")))) == []


def test_missing_rows_are_counted_per_cell_and_persona():
    rows = _rows(slices=("id_chat", "chat_email"))
    drop = {("chat_email", "full", "humor", "i1", 0), ("chat_email", "full", "humor", "i2", 1),
            ("chat_email", "full", "sarcasm", "i3", 0), ("id_chat", "base", None, "i0", 1)}  # fmt: skip
    kept = [
        r for r in rows
        if (r["slice"], r["stage"], r["persona"], r["item_id"], r["sample_idx"]) not in drop
    ]  # fmt: skip
    gaps = {(g.stage, g.slice): g for g in inputs.incomplete_cells(_records(kept))}
    assert set(gaps) == {("full", "chat_email"), ("base", "id_chat")}
    full = gaps[("full", "chat_email")]
    assert (full.items, full.personas, full.samples, full.expected, full.present) == (
        4, 3, 2, 24, 21,
    )  # fmt: skip
    assert full.missing_by_persona == {"humor": 2, "sarcasm": 1}
    assert full.example == ("i1", "humor", 0)
    base = gaps[("base", "id_chat")]
    assert (base.personas, base.expected, base.present) == (1, 8, 7)  # the null persona only
    lines = inputs.completeness_warnings(list(gaps.values()), "p.jsonl")  # file order
    assert "2 cell(s)" in lines[0] and "4 rows missing" in lines[0]
    assert "(none: base) 1" in lines[1]
    assert lines[2].startswith("m / full / chat_email: 3 of 24 rows missing (4 items x 3 ")
    assert "humor 2, sarcasm 1" in lines[2]


def test_an_item_missing_from_a_whole_cell_is_a_gap():
    """The slice's items come from every cell: a stage that skipped an item shows it."""
    rows = [
        r
        for r in _rows(stages=("full", "prompted"))
        if (r["stage"], r["item_id"]) != ("prompted", "i3")
    ]
    (gap,) = inputs.incomplete_cells(_records(rows))
    assert (gap.stage, gap.expected - gap.present) == ("prompted", 3 * 2)
    assert gap.missing_by_persona == dict.fromkeys(PERSONAS, 2)


def test_report_predictions_warns_and_shows_the_gaps(tmp_path):
    rows = [r for r in _rows() if not (r["stage"] == "full" and r["item_id"] == "i0")]
    said: list[str] = []
    path = report_predictions(_write(tmp_path, rows), tmp_path / "out", n_boot=20, warn=said.append)
    assert len(said) == 2 and "m / full / id_chat: 6 of 24 rows missing" in said[1]
    html = path.read_text()
    assert "6 of 24 rows missing" in html
    quiet: list[str] = []
    report_predictions(
        _write(tmp_path, _rows(), "q.jsonl"), tmp_path / "q", n_boot=20, warn=quiet.append
    )
    assert quiet == []


def test_records_are_typed():
    (rec,) = _records(_rows(items=1, samples=1)[:1])
    assert isinstance(rec, PredictionRecord) and rec.persona == "__null__"
