"""Outcomes by persona and stage, and the differential-censoring test (planted truth both ways)."""

from __future__ import annotations

import numpy as np
import pytest

from charshift import outcomes
from charshift.schema import NULL_PERSONA, PredictionRecord

PERSONAS = ["sarcasm", "humor", "remorse", "loving"]


def _records(miss_rate: dict[str, float], n_items: int, seed: int, difficulty: float = 0.0):
    """Agentic rows: each scenario once per persona; a row is censored (`max_steps`) with its
    persona's rate, plus a per-scenario difficulty shared by every persona."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_items):
        hard = rng.random() < difficulty
        for p in PERSONAS:
            missed = hard or rng.random() < miss_rate[p]
            out.append(
                PredictionRecord(
                    "b", "full", "agentic_email", p, f"scenario:s{i}",
                    None if missed else p, outcome="max_steps" if missed else "email",
                )
            )  # fmt: skip
    return out


def test_outcome_table_counts():
    recs = _records(dict.fromkeys(PERSONAS, 0.5), 20, 0)
    recs.append(PredictionRecord("b", "base", "agentic_email", NULL_PERSONA, "scenario:s0", None,
                                 outcome="malformed"))  # fmt: skip
    table = outcomes.outcome_table(recs)
    by = {(r["stage"], r["persona"]): r for r in table}
    for p in PERSONAS:
        row = by[("full", p)]
        assert row["email"] + row["max_steps"] == row["n"] == 20
        assert row["yield"] == row["email"] / 20
    assert by[("base", NULL_PERSONA)]["malformed"] == 1 and by[("base", NULL_PERSONA)]["n"] == 1


def test_planted_differential_censoring_is_found():
    rates = {"sarcasm": 0.7, "humor": 0.1, "remorse": 0.1, "loving": 0.1}
    t = outcomes.censoring_test(
        _records(rates, 40, 1, difficulty=0.2), "b", "full", "agentic_email", n_perm=500
    )
    assert t is not None and t.p_permutation < 0.01 and t.p_asymptotic < 0.01
    assert t.dof == 3 and t.personas == PERSONAS and sum(map(sum, t.table)) == t.n_rows == 160


def test_no_censoring_difference_is_not_flagged_too_often():
    """Same rates for every persona (with shared scenario difficulty): the permutation test must
    reject at 5% in about 5% of simulations, not more."""
    rejections = 0
    sims = 60
    for s in range(sims):
        recs = _records(dict.fromkeys(PERSONAS, 0.3), 25, 100 + s, difficulty=0.3)
        t = outcomes.censoring_test(recs, "b", "full", "agentic_email", n_perm=199, seed=s)
        rejections += t.p_permutation < 0.05
    assert rejections <= 8  # 5% of 60 is 3; 8 or more has probability < 1%


def test_degenerate_cells():
    recs = _records(dict.fromkeys(PERSONAS, 0.0), 5, 0)
    t = outcomes.censoring_test(recs, "b", "full", "agentic_email")
    assert t.statistic == 0 and t.p_permutation == 1.0 and "one outcome" in t.note
    base = [PredictionRecord("b", "base", "x", NULL_PERSONA, "i", None, outcome="no_email")]
    assert outcomes.censoring_test(base, "b", "base", "x") is None
    assert outcomes.censoring_tests(base) == []


def test_collapse_compares_output_and_missing():
    recs = _records({"sarcasm": 0.6, "humor": 0.0, "remorse": 0.0, "loving": 0.0}, 30, 3)
    t = outcomes.censoring_test(recs, "b", "full", "agentic_email", collapse=True, n_perm=200)
    assert t.outcomes == ["missing", "output"] and t.p_permutation < 0.01


@pytest.mark.parametrize("table, stat", [([[10, 0], [0, 10]], 20.0), ([[5, 5], [5, 5]], 0.0)])
def test_chi_square_known_values(table, stat):
    got, dof = outcomes.chi_square(np.array(table))
    assert got == pytest.approx(stat) and dof == 1


def test_backend_failures_are_not_censoring():
    """Sarcasm's rows hit a backend error on 16 of 20 scenarios (a server fault, not the
    persona): counted as failures, left out of the yield and of the censoring test (before,
    the test read them as sarcasm's missing outputs: differential censoring)."""
    recs = _records(dict.fromkeys(PERSONAS, 0.0), 20, 0)
    recs = [
        PredictionRecord(r.base, r.stage, r.slice, r.persona, r.item_id, None, outcome="error")
        if r.persona == "sarcasm" and int(r.item_id.split("s")[-1]) < 16
        else r
        for r in recs
    ]
    t = outcomes.censoring_test(recs, "b", "full", "agentic_email", collapse=True, n_perm=300)
    assert t is not None and t.n_rows == 80 - 16 and t.dof == 0
    by = {r["persona"]: r for r in outcomes.outcome_table(recs)}
    assert (by["sarcasm"]["failed"], by["sarcasm"]["error"], by["sarcasm"]["n"]) == (16, 16, 20)
    assert by["sarcasm"]["yield"] == 1.0 and by["humor"]["failed"] == 0
