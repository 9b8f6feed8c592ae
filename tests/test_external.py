"""Bring your own data: `report --predictions` checks that every row agrees with its outcome
(an error naming the line) and that every cell holds its whole grid (a warning with counts)."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_the_example_predictions_file_is_current_and_its_truth_is_recovered(tmp_path):
    """examples/predictions.jsonl is what scripts/make_example_predictions.py writes (no drift),
    and `report --predictions` on it recovers the planted truth: persona above its own null on
    home ground, lost in email (hit 0.8 -> 0.45), and the base stage's excess 0."""
    import csv
    import importlib.util

    from typer.testing import CliRunner

    from charshift.cli import app

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "make_example_predictions", root / "scripts" / "make_example_predictions.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = root / "examples" / "predictions.jsonl"
    assert path.read_text(encoding="utf-8") == mod.render()
    out = tmp_path / "rep"
    res = CliRunner().invoke(
        app, ["report", "--predictions", str(path), "--out", str(out), "--n-boot", "300"]
    )
    assert res.exit_code == 0, res.output
    with (out / "metrics.csv").open() as fh:
        cells = {(r["stage"], r["slice"]): r for r in csv.DictReader(fh)}
    assert float(cells[("prompted", "id_chat")]["macro_f1_excess_lo"]) > 0
    assert float(cells[("base", "id_chat")]["macro_f1_excess"]) == 0
    with (out / "differences.csv").open() as fh:
        (total,) = [d for d in csv.DictReader(fh)
                    if d["family"] == "primary" and d["chain"] == "email_step"]  # fmt: skip
    assert float(total["lo_simul"]) > 0  # the planted loss, in the simultaneous band


def test_the_annotated_example_config_plans(tmp_path):
    """examples/config.yaml is a valid config whose dry run plans every stage, slice and
    persona, the user's own included, without loading a model."""
    from typer.testing import CliRunner

    from charshift.cli import app

    root = Path(__file__).resolve().parents[1]
    res = CliRunner().invoke(app, ["run", str(root / "examples" / "config.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "stoic (own)" in res.output and "agentic_email" in res.output
    assert "classifier (trained in this run)" in res.output
