"""The Likert judge's figures (stats.likert) recover a planted truth, including none at all."""

from __future__ import annotations

import math

import numpy as np
import pytest

from charshift.schema import BASE_STAGE, NULL_PERSONA, PredictionRecord
from charshift.stats.intervals import Opts
from charshift.stats.likert import LIKERT_EXCESS, likert_result
from charshift.stats.results import Cell

PERSONAS = ["humor", "remorse", "sarcasm"]
UNITS = ["id_chat", "scenario_chat"]  # the email_step chain's first rung (items of two kinds)
SAME_KIND = ["chat_email", "email_syscontext"]  # the agentic chain's first rung (one kind)


def _opts(seed: int = 0) -> Opts:
    return Opts(n_boot=400, ci=0.95, method="percentile", seed=seed, min_clusters=5,
                control="prompted_explicit")  # fmt: skip


def _clip(v: float) -> float:
    return float(min(5.0, max(1.0, v)))  # the Likert scale's ends


def simulate(
    effect: dict[str, float], *, n_items: int = 30, seed: int = 0, units: list[str] = UNITS,
    unscored: float = 0.0, control_effect: float = 1.5,
) -> list[PredictionRecord]:  # fmt: skip
    """Base rows scored ~2 against every persona (item effects shared by stages); a trained
    stage's own-persona score = base level + effect[unit]; the control = base + control_effect."""
    rng = np.random.default_rng(seed)
    recs = []
    for unit in units:
        kind = "prompt" if unit == "id_chat" else "scenario"
        for i in range(n_items):
            item, level = f"{kind}:{i}", 2.0 + rng.normal(0, 0.5)
            scores = {p: _clip(level + rng.normal(0, 0.3)) for p in PERSONAS}
            recs.append(PredictionRecord("m", BASE_STAGE, unit, NULL_PERSONA, item, None,
                                         scores=scores))  # fmt: skip
            for p in PERSONAS:
                for stage, d in (("trained", effect[unit]), ("prompted_explicit", control_effect)):
                    v = _clip(level + d + rng.normal(0, 0.3))
                    missing = rng.random() < unscored
                    recs.append(PredictionRecord("m", stage, unit, p, item, None,
                                                 scores=None if missing else {p: v},
                                                 judge_score=None if missing else v))  # fmt: skip
    return recs


def _cell(result, stage: str, unit: str):
    return next(c for c in result.cells if c.cell == Cell("m", stage, unit))


def _rung(result, stage: str = "trained"):
    return next(d for d in result.differences if d.kind == "rung" and d.a.stage == stage)


def test_a_planted_excess_and_its_fall_are_recovered() -> None:
    result = likert_result(simulate({"id_chat": 1.0, "scenario_chat": 0.2}), PERSONAS, _opts())
    home, away = _cell(result, "trained", "id_chat"), _cell(result, "trained", "scenario_chat")
    assert home.excess.lo < 1.0 < home.excess.hi and home.excess.lo > 0.5
    assert away.excess.lo < 0.2 < away.excess.hi
    assert home.mean.estimate == pytest.approx(home.null + home.excess.estimate)
    rung = _rung(result)
    assert rung.metric == LIKERT_EXCESS and not rung.paired  # prompts vs scenarios
    assert rung.lo > 0 and rung.lo < 0.8 < rung.hi
    assert rung.estimate == pytest.approx(home.excess.estimate - away.excess.estimate)
    base = _cell(result, BASE_STAGE, "id_chat")
    assert base.excess.fixed_by_construction and math.isnan(base.null)
    assert result.blind[("m", "id_chat")] is False


def test_no_effect_gives_intervals_that_hold_zero_at_their_level() -> None:
    covered_cell = covered_rung = 0
    repeats = 60
    for seed in range(repeats):
        result = likert_result(
            simulate({u: 0.0 for u in SAME_KIND}, seed=seed, units=SAME_KIND, n_items=20),
            PERSONAS, _opts(seed),
        )  # fmt: skip
        cell = _cell(result, "trained", "chat_email").excess
        covered_cell += cell.lo <= 0 <= cell.hi
        rung = _rung(result)
        assert rung.paired
        covered_rung += rung.lo <= 0 <= rung.hi
    assert covered_cell >= 0.88 * repeats
    assert covered_rung >= 0.88 * repeats


def test_rows_without_a_score_are_counted_and_flagged_not_read_as_low() -> None:
    recs = simulate({"id_chat": 1.0, "scenario_chat": 1.0}, unscored=0.3, seed=3)
    home = _cell(likert_result(recs, PERSONAS, _opts()), "trained", "id_chat")
    assert home.n_rows == 90 and 0 < home.n_missing < 45
    assert "have no score" in home.excess.flag
    assert home.excess.lo < 1.0 < home.excess.hi  # the missing ones did not pull it down


def test_a_blind_judge_marks_the_differences_in_its_units() -> None:
    recs = simulate({"id_chat": 0.0, "scenario_chat": 0.0}, control_effect=0.0, seed=5)
    result = likert_result(recs, PERSONAS, _opts())
    assert result.blind[("m", "id_chat")] is True
    assert set(_rung(result).blind) == {"id_chat", "scenario_chat"}


def test_one_item_has_no_interval() -> None:
    recs = simulate({"id_chat": 1.0, "scenario_chat": 1.0}, n_items=1)
    home = _cell(likert_result(recs, PERSONAS, _opts()), "trained", "id_chat")
    assert home.excess.n_clusters == 1 and not home.excess.has_interval


def test_report_predictions_of_a_likert_file_writes_its_figures(tmp_path) -> None:
    """A Likert-judged predictions file (prediction null, the number in judge_score; a base row's
    medians per persona in scores): `report --predictions` writes likert.csv with the planted
    excess, the judge's rungs in differences.csv and its section in the report."""
    import csv
    import json

    from charshift.external import report_predictions

    recs = simulate({"id_chat": 1.0, "scenario_chat": 0.0}, n_items=12)
    lines = []
    for r in recs:
        row = {k: v for k, v in r.to_dict().items() if v is not None and k != "probs"}
        row.update(prediction=None, text="some text", judge_outcome="ok")
        row["persona"] = None if r.stage == BASE_STAGE else r.persona
        if r.judge_score is None and r.stage != BASE_STAGE:
            row["judge_outcome"] = "unparseable"
        lines.append(json.dumps(row))
    path = tmp_path / "likert.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report_predictions(path, tmp_path / "out", n_boot=200, positive_control="prompted_explicit")
    with (tmp_path / "out" / "likert.csv").open() as fh:
        cells = {(r["stage"], r["slice"]): r for r in csv.DictReader(fh)}
    home, away = cells[("trained", "id_chat")], cells[("trained", "scenario_chat")]
    assert float(home["excess_lo"]) > 0.4 and float(home["excess_hi"]) > 1.0
    assert float(away["excess_lo"]) < 0 < float(away["excess_hi"])
    assert home["scorer"] == "judge_likert" and home["n_scored"] == home["n_rows"] == "36"
    with (tmp_path / "out" / "differences.csv").open() as fh:
        rungs = [r for r in csv.DictReader(fh) if r["scorer"] == "judge_likert"]
    rung = next(r for r in rungs if r["kind"] == "rung" and r["stage_a"] == "trained")
    assert rung["metric"] == LIKERT_EXCESS and float(rung["lo"]) > 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "The Likert judge's own figures" in md
    assert "holds a Likert judge's scores (numbers, 1-5), not persona predictions" in md
    # a later report of a file without a Likert judge leaves no stale likert.csv behind
    from charshift.external import report_predictions as again

    plain = []
    for line in lines:
        row = {k: v for k, v in json.loads(line).items() if not k.startswith("judge")}
        row.pop("scores", None)
        plain.append({**row, "prediction": row["persona"] or PERSONAS[0]})
    path.write_text("".join(json.dumps(r) + "\n" for r in plain))
    again(path, tmp_path / "out", n_boot=50, positive_control="prompted_explicit")
    assert (tmp_path / "out" / "metrics.csv").is_file()
    assert not (tmp_path / "out" / "likert.csv").exists()


def test_base_readings_lost_for_one_persona_are_counted_and_flag_the_excess() -> None:
    """A base row judged for every persona but unparseable for one: that reading is missing
    (not the whole row scored), and the trained cell's excess names the null's missing ones."""
    recs = simulate({"id_chat": 1.0, "scenario_chat": 0.0}, n_items=10)
    for r in recs[:5]:
        if r.stage == BASE_STAGE:
            r.scores.pop("humor")
    result = likert_result(recs, PERSONAS, _opts())
    base = _cell(result, BASE_STAGE, "id_chat")
    assert base.n_rows == 30 and base.n_missing == sum(r.stage == BASE_STAGE for r in recs[:5])
    home = _cell(result, "trained", "id_chat")
    assert "of the base stage (the null) have no score" in home.excess.flag


def test_expanded_base_rows_with_the_number_in_judge_score_are_read() -> None:
    recs = []
    for r in simulate({"id_chat": 1.0, "scenario_chat": 0.0}, n_items=12):
        if r.stage != BASE_STAGE:
            recs.append(r)
            continue
        for p, v in r.scores.items():  # one record per persona, the number in judge_score only
            recs.append(PredictionRecord("m", BASE_STAGE, r.slice, p, r.item_id, None,
                                         judge_score=v))  # fmt: skip
    home = _cell(likert_result(recs, PERSONAS, _opts()), "trained", "id_chat")
    assert home.excess.lo > 0.4 and home.n_missing == 0


def test_a_rung_over_a_persona_subset_says_so_and_a_unit_without_base_rows_is_kept() -> None:
    recs = simulate({"id_chat": 1.0, "scenario_chat": 0.0}, n_items=12)
    no_sarcasm = [r for r in recs if not (r.stage == "trained" and r.slice == "scenario_chat"
                                          and r.persona == "sarcasm")]  # fmt: skip
    rung = _rung(likert_result(no_sarcasm, PERSONAS, _opts()))
    assert (rung.k, rung.n_personas) == (2, 3) and "2 of 3 personas" in rung.note
    no_base = [r for r in recs if not (r.stage == BASE_STAGE and r.slice == "scenario_chat")]
    rung = _rung(likert_result(no_base, PERSONAS, _opts()))
    assert math.isnan(rung.estimate) and "no base-stage rows in scenario_chat" in rung.flag


def test_a_total_over_two_units_is_its_one_rung() -> None:
    result = likert_result(simulate({"id_chat": 1.0, "scenario_chat": 0.0}), PERSONAS, _opts())
    rung = _rung(result)
    total = next(d for d in result.differences if d.kind == "total" and d.a.stage == "trained")
    assert (total.estimate, total.lo, total.hi) == (rung.estimate, rung.lo, rung.hi)


def test_rows_with_a_prediction_and_a_likert_score_feed_both(tmp_path) -> None:
    """A file whose rows carry a classifier's prediction and a Likert judge's score: both sets
    of figures, and no warning that the predictions are empty."""
    import csv
    import json

    from charshift.external import report_predictions

    lines = []
    for r in simulate({"id_chat": 1.0, "scenario_chat": 0.0}, n_items=10):
        row = {k: v for k, v in r.to_dict().items() if v is not None and k != "probs"}
        row.update(prediction=r.persona if r.stage != BASE_STAGE else PERSONAS[0], text="t",
                   judge_outcome="ok", persona=None if r.stage == BASE_STAGE else r.persona)  # fmt: skip
        lines.append(json.dumps(row))
    path = tmp_path / "both.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report_predictions(path, tmp_path / "out", n_boot=100, positive_control="prompted_explicit")
    with (tmp_path / "out" / "likert.csv").open() as fh:
        stages = {r["stage"] for r in csv.DictReader(fh)}
    assert {"trained", "prompted_explicit", BASE_STAGE} <= stages
    assert "not persona predictions" not in (tmp_path / "out" / "report.md").read_text()
