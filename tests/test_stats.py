"""Tests for charshift.stats (metric definitions, intervals, chains, differences), the table
writers (charshift.tables) and the predictions reader (charshift.external)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from charshift import ladder, stats, tables
from charshift.external import PredictionsError, load_predictions_jsonl
from charshift.schema import NULL_PERSONA, derive_seed
from charshift.schema import PredictionRecord as R
from charshift.stats import Cell

S, H, RM, L = "sarcasm", "humor", "remorse", "loving"


def _hand_records() -> list[R]:
    rows = [
        (S, S),
        (S, H),
        (S, None),
        (H, H),
        (H, "goodness"),  # outside the run's label set: wrong
        (RM, S),
        (H, None),
        (RM, L),  # loving has no support but is predicted
    ]
    recs = [R("b", "full", "id_chat", t, f"i{i}", p) for i, (t, p) in enumerate(rows)]
    # loving has rows in the stage (another slice), so it stays in the base's label set
    return recs + [R("b", "full", "chat_email", L, "s0", L)]


def test_hand_computed_small_case():
    res = stats.compute_metrics(_hand_records(), [S, H, RM, L], n_boot=50, differences=False)
    m = res.get("b", "full", "id_chat")
    # conditional: 6 scored rows. sarcasm tp1 fp1 fn1 -> F1 0.5; humor tp1 fp1 fn1 -> 0.5;
    # remorse tp0 fn2 -> 0; loving has no scored output of its own (only a false positive):
    # left out of the conditional average. Macro = 1.0 / 3. Accuracy 2/6.
    assert m.macro_f1.estimate == pytest.approx(1 / 3)
    assert (m.n_personas_scored, m.n_personas) == (3, 4)
    assert m.accuracy.estimate == pytest.approx(2 / 6)
    # ITT: 8 rows. sarcasm tp1 fp1 fn2 -> 2/5 = 0.4; humor tp1 fp1 fn2 -> 0.4; remorse 0;
    # loving has no row in this unit: left out of the ITT average too (3 personas attempted)
    assert m.macro_f1_itt.estimate == pytest.approx(0.8 / 3)
    assert m.n_personas_attempted == 3
    assert m.accuracy_itt.estimate == pytest.approx(2 / 8)
    assert m.yield_.estimate == pytest.approx(6 / 8)
    assert (m.n_rows, m.n_scored, m.n_none) == (8, 6, 2)
    per = {p.persona: p for p in m.per_persona}
    assert per[S].precision == pytest.approx(0.5) and per[S].recall == pytest.approx(0.5)
    assert per[S].f1.estimate == pytest.approx(0.5)
    assert per[S].f1_itt.estimate == pytest.approx(0.4)
    assert per[S].yield_ == pytest.approx(2 / 3)
    assert per[RM].yield_ == pytest.approx(1.0)
    assert per[L].n == 0 and math.isnan(per[L].yield_)
    assert math.isnan(per[L].f1.estimate) and per[L].precision == 0.0
    assert math.isnan(per[L].f1_itt.estimate)
    # confusion row for sarcasm: S, H, R, L, other, none
    assert m.confusion_cols == [S, H, RM, L, "other", "none"]
    assert m.confusion[0].tolist() == [1, 1, 0, 0, 0, 1]
    assert m.confusion[1].tolist() == [0, 1, 0, 0, 1, 1]
    assert m.pred_distribution == {S: 2, H: 2, L: 1, "goodness": 1}


@pytest.mark.parametrize("seed", range(12))
def test_metrics_match_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    personas = list(stats.ALL_PERSONAS[:k])
    outside = ["goodness", "misalignment"] if k < 4 else ["poeticism"]
    # some personas may get no support at all
    support = personas[: max(1, int(rng.integers(1, k + 1)))]
    labels = personas + outside + [None]
    recs = []
    for i in range(int(rng.integers(20, 300))):
        t = support[int(rng.integers(0, len(support)))]
        p = t if rng.random() < 0.4 else labels[int(rng.integers(0, len(labels)))]
        recs.append(R("b", "s", "chat_email", t, f"it{i % 17}", p))
    # every persona has rows in the stage (another slice): all K stay in the label set
    other = [R("b", "s", "id_chat", t, "p0", t) for t in personas]
    m = stats.compute_metrics(recs + other, personas, n_boot=20, differences=False).get(
        "b", "s", "chat_email"
    )
    sc = [r for r in recs if r.prediction is not None]
    y, yp = [r.persona for r in sc], [r.prediction for r in sc]
    if sc:
        # conditional: averaged over the personas with a scored output
        scored = [p for p in personas if p in set(y)]
        want = f1_score(y, yp, labels=scored, average="macro", zero_division=0)
        assert m.macro_f1.estimate == pytest.approx(want, abs=1e-12)
        assert m.n_personas_scored == len(scored) and m.n_personas == k
        assert m.accuracy.estimate == pytest.approx(accuracy_score(y, yp), abs=1e-12)
        per = f1_score(y, yp, labels=scored, average=None, zero_division=0)
        got = {p.persona: p.f1.estimate for p in m.per_persona}
        assert [got[p] for p in scored] == pytest.approx(list(per), abs=1e-12)
        assert all(math.isnan(got[p]) for p in personas if p not in scored)
    ya, ypa = [r.persona for r in recs], [r.prediction or "__none__" for r in recs]
    # ITT: averaged over the personas with a row in the cell (every row counts)
    attempted = [p for p in personas if p in set(ya)]
    want_itt = f1_score(ya, ypa, labels=attempted, average="macro", zero_division=0)
    assert m.n_personas_attempted == len(attempted)
    assert m.macro_f1_itt.estimate == pytest.approx(want_itt, abs=1e-12)
    assert m.accuracy_itt.estimate == pytest.approx(accuracy_score(ya, ypa), abs=1e-12)


def test_itt_never_above_conditional_accuracy_and_equal_without_missing():
    recs = [r for r in _hand_records() if r.persona != L]
    full = [r for r in recs if r.prediction is not None]
    # every persona of [S, H, RM] has a scored output, none is missing: the views coincide
    m = stats.compute_metrics(full, [S, H, RM], n_boot=20, differences=False).get(
        "b", "full", "id_chat"
    )
    assert m.macro_f1_itt == m.macro_f1  # same counts, same draw: identical intervals
    assert m.accuracy_itt.estimate == m.accuracy.estimate
    m2 = stats.compute_metrics(recs, [S, H, RM], n_boot=20, differences=False).get(
        "b", "full", "id_chat"
    )
    assert m2.accuracy_itt.estimate < m2.accuracy.estimate


def test_bootstrap_resamples_equal_a_plain_recomputation():
    """The matrix path gives, per resample, exactly sklearn's macro-F1 on the resampled rows."""
    rng = np.random.default_rng(3)
    personas = [S, H, RM]
    recs = [
        R(
            "b",
            "s",
            "id_chat",
            personas[i % 3],
            f"c{i % 11}",
            [S, H, RM, "goodness", None][rng.integers(0, 5)],
        )
        for i in range(120)
    ]
    draws = stats.bootstrap_draws(recs, personas, ("b", "s", "id_chat"), n_boot=25, seed=5)
    by_cluster = {c: [r for r in recs if r.item_id == c] for c in draws.clusters}
    for b in range(25):
        rows = [
            r
            for c, n in zip(draws.clusters, draws.weights[b], strict=True)
            for _ in range(int(n))
            for r in by_cluster[c]
        ]
        ya = [r.persona for r in rows]
        ypa = [r.prediction or "__none__" for r in rows]
        sc = [r for r in rows if r.prediction is not None]
        scored = [p for p in personas if any(r.persona == p for r in sc)]
        want = f1_score(
            [r.persona for r in sc], [r.prediction for r in sc], labels=scored,
            average="macro", zero_division=0,
        )  # fmt: skip
        assert draws.values["macro_f1"][b] == pytest.approx(want, abs=1e-12)
        want_itt = f1_score(ya, ypa, labels=personas, average="macro", zero_division=0)
        assert draws.values["macro_f1_itt"][b] == pytest.approx(want_itt, abs=1e-12)
    assert draws.weights.sum(axis=1).tolist() == [len(draws.clusters)] * 25


def test_expand_base_null():
    personas = [S, H, RM]
    recs = [
        R("b", "base", "id_chat", NULL_PERSONA, "i1", S, key="k1"),
        R("b", "base", "id_chat", None, "i2", None, key="k2"),  # type: ignore[arg-type]
        R("b", "full", "id_chat", H, "i1", H, key="k3"),
    ]
    out = stats.expand_base_null(recs, personas)
    assert len(out) == 3 + 3 + 1
    base1 = [r for r in out if r.key == "k1"]
    assert [r.persona for r in base1] == personas
    assert all(r.prediction == S and r.item_id == "i1" for r in base1)
    assert stats.expand_base_null(out, personas) == out  # idempotent
    # the base null's recall per persona is the share of base outputs given that persona
    m = stats.compute_metrics(recs[:2], personas, n_boot=20, differences=False)
    base = m.get("b", "base", "id_chat")
    per = {p.persona: p for p in base.per_persona}
    assert per[S].recall == pytest.approx(1.0)  # the one scored base output says sarcasm
    assert per[H].recall == 0.0
    # counts are per output (2 base outputs), not per (output, persona) pair
    assert base.n_rows == 2 and base.n_scored == 1 and base.n_clusters == 2


def test_cell_without_outputs_has_undefined_conditional_metrics(tmp_path):
    recs = [R("b", "s", "agentic_email", p, f"i{i}", None) for i in range(4) for p in (S, H)]
    recs.append(R("b", "s", "chat_email", S, "i0", S))
    res = stats.compute_metrics(recs, [S, H], n_boot=50)
    m = res.get("b", "s", "agentic_email")
    assert math.isnan(m.macro_f1.estimate) and math.isnan(m.accuracy.estimate)
    assert math.isnan(m.per_persona[0].f1.estimate)
    itt = m.macro_f1_itt
    assert (itt.estimate, itt.lo, itt.hi) == (0.0, 0.0, 0.0) and m.yield_.estimate == 0.0
    assert not m.macro_f1.reliable and "undefined" in m.macro_f1.flag
    assert not itt.reliable and "4 cluster(s)" in itt.flag  # 4 items < MIN_CLUSTERS
    tables.write_tables(res, tmp_path)
    with (tmp_path / "metrics.csv").open() as fh:
        row = next(r for r in csv.DictReader(fh) if r["slice"] == "agentic_email")
    assert row["macro_f1"] == "" and row["macro_f1_itt"] == "0" and row["n_scored"] == "0"


def test_unknown_true_persona_is_an_error():
    with pytest.raises(ValueError, match="poeticism"):
        stats.compute_metrics([R("b", "s", "x", "poeticism", "i", S)], [S, H], n_boot=10)


def _clustered_accuracy_cell(rng, n_clusters=60, per=8, mean=0.7):
    """Two personas; each cluster has its own hit rate ~ Beta with the given mean."""
    recs = []
    rates = rng.beta(7 * mean / 0.7, 7 * (1 - mean) / 0.7, size=n_clusters)
    for c in range(n_clusters):
        for j in range(per):
            t = S if j % 2 == 0 else H
            wrong = H if t == S else S
            recs.append(R("b", "s", "id_chat", t, f"c{c}", t if rng.random() < rates[c] else wrong))
    return recs


def test_interval_coverage_on_clustered_data():
    """95% intervals of accuracy cover the true value (0.7) in 88-99% of 200 simulations."""
    rng = np.random.default_rng(2024)
    hits = 0
    n_sim = 200
    for sim in range(n_sim):
        recs = _clustered_accuracy_cell(rng)
        m = stats.compute_metrics([*recs], [S, H], n_boot=300, seed=sim, differences=False)
        iv = m.get("b", "s", "id_chat").accuracy
        hits += iv.lo <= 0.7 <= iv.hi
    assert 0.88 <= hits / n_sim <= 0.99


def test_cluster_bootstrap_is_wider_than_the_row_bootstrap_for_clustered_data():
    rng = np.random.default_rng(7)
    recs = _clustered_accuracy_cell(rng, n_clusters=40, per=20)
    clustered = stats.compute_metrics(recs, [S, H], n_boot=400, differences=False)
    rows_as_items = [
        R(r.base, r.stage, r.slice, r.persona, f"row{i}", r.prediction) for i, r in enumerate(recs)
    ]
    naive = stats.compute_metrics(rows_as_items, [S, H], n_boot=400, differences=False)
    wc = clustered.get("b", "s", "id_chat").accuracy
    wn = naive.get("b", "s", "id_chat").accuracy
    assert wc.estimate == wn.estimate
    assert (wc.hi - wc.lo) > 1.5 * (wn.hi - wn.lo)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_identical_cells_have_zero_difference(method):
    base = _clustered_accuracy_cell(np.random.default_rng(1), n_clusters=30)
    other = [R(r.base, r.stage, "chat_email", r.persona, r.item_id, r.prediction) for r in base]
    b2 = [R(r.base, r.stage, "agentic_email", r.persona, r.item_id, r.prediction) for r in base]
    recs = other + b2
    for metric in ("macro_f1", "accuracy"):
        for itt in (False, True):
            d = stats.paired_difference(
                recs, ("b", "s", "chat_email"), ("b", "s", "agentic_email"), metric=metric,
                itt=itt, n_boot=200, method=method,
            )  # fmt: skip
            assert (d.estimate, d.lo, d.hi) == (0.0, 0.0, 0.0)
            assert d.paired and d.n_clusters == 30


def test_paired_difference_recovers_a_known_shift():
    rng = np.random.default_rng(11)
    personas = [S, H, RM, L]
    a, b = [], []
    for item in range(300):
        for t in personas:
            wrong = personas[(personas.index(t) + 1) % 4]
            pa = t if rng.random() < 0.8 else wrong
            # b: the same output, but a quarter of the correct ones turned wrong
            pb = wrong if (pa == t and rng.random() < 0.25) else pa
            a.append(R("b", "full", "chat_email", t, f"s{item}", pa))
            b.append(R("b", "full", "agentic_email", t, f"s{item}", pb))
    recs = a + b
    d = stats.paired_difference(
        recs,
        ("b", "full", "chat_email"),
        ("b", "full", "agentic_email"),
        metric="accuracy",
        n_boot=500,
    )
    want = accuracy_score([r.persona for r in a], [r.prediction for r in a]) - accuracy_score(
        [r.persona for r in b], [r.prediction for r in b]
    )
    assert d.estimate == pytest.approx(want, abs=1e-12)
    assert d.lo < 0.2 < d.hi  # the true shift is 0.8 * 0.25 = 0.2
    assert d.lo > 0.1
    unpaired = stats.paired_difference(
        recs, ("b", "full", "chat_email"), ("b", "full", "agentic_email"), metric="accuracy",
        n_boot=500, paired=False,
    )  # fmt: skip
    assert not unpaired.paired and unpaired.estimate == pytest.approx(d.estimate)
    assert (d.hi - d.lo) < 0.7 * (unpaired.hi - unpaired.lo)


def test_paired_difference_needs_shared_items():
    recs = [R("b", "s", "id_chat", p, "p1", S) for p in (S, H)]
    recs += [R("b", "s", "chat_email", p, "s1", S) for p in (S, H)]
    with pytest.raises(ValueError, match="share no item ids"):
        stats.paired_difference(
            recs, ("b", "s", "id_chat"), ("b", "s", "chat_email"), personas=[S, H], n_boot=10
        )


def _ladder_records() -> list[R]:
    rng = np.random.default_rng(5)
    personas = [S, H, RM]
    out = []
    for sl, acc in (
        ("id_chat", 0.9),
        ("chat_email", 0.7),
        ("tool_email_oneshot", 0.6),
        ("agentic_email", 0.4),
    ):
        ids = [f"p{i}" for i in range(40)] if sl == "id_chat" else [f"sc{i}" for i in range(25)]
        for it in ids:
            for t in personas:
                p = t if rng.random() < acc else (None if rng.random() < 0.3 else H)
                out.append(R("llama", "full", sl, t, it, p))
    return out


def test_chain_decomposition_paired_and_unpaired_rungs():
    recs = _ladder_records()
    step = stats.chain_decomposition(recs, "llama", "full", chain="email_step", n_boot=300)
    assert step is not None and step.units == ["id_chat", "chat_email"]
    assert step.kinds == {"id_chat": "prompt", "chat_email": "scenario"}
    (rung,) = step.rungs
    # unpaired: the smaller side's clusters govern its reliability, and are reported
    assert not rung.paired and "unpaired" in rung.note and rung.n_clusters == 25
    # the three units between are missing: the rung bundles their changes, and says so
    assert rung.changes.startswith("BUNDLE of 4 changes")
    assert all(r.changes in rung.changes for r in ladder.EMAIL_STEP_CHAIN.rungs)
    main = stats.chain_decomposition(recs, "llama", "full", n_boot=300)
    assert main is not None and main.chain == "agentic"
    assert main.units == ["chat_email", "tool_email_oneshot", "agentic_email"]
    assert main.missing == ["email_syscontext"]
    assert [r.paired for r in main.rungs] == [True, True]
    assert main.rungs[1].changes == ladder.MAIN_CHAIN.rungs[2].changes
    assert main.rungs[0].n_clusters == 25 and main.common == {"scenario": 25}
    res = stats.compute_metrics(recs, [S, H, RM], n_boot=300, differences=False)
    f = {c.slice: m.macro_f1.estimate for c, m in res.cells.items()}
    # every item is common here, so the chain's unit estimates are the cells' own
    assert main.total.estimate == pytest.approx(f["chat_email"] - f["agentic_email"])
    assert sum(r.estimate for r in main.rungs) == pytest.approx(main.total.estimate, abs=1e-12)
    for r in main.rungs + [main.total]:
        assert r.lo <= r.estimate <= r.hi
    itt = stats.chain_decomposition(recs, "llama", "full", itt=True, n_boot=100)
    assert itt is not None and itt.itt and itt.total.estimate != main.total.estimate
    only = [r for r in recs if r.slice == "chat_email"]
    assert stats.chain_decomposition(only, "llama", "full", n_boot=10) is None
    with pytest.raises(ValueError, match="unknown chain"):
        stats.chain_decomposition(recs, "llama", "full", chain="nope", n_boot=10)


def test_compute_metrics_differences_cover_chains_and_stages():
    recs = _ladder_records()
    recs += [R("llama", "base", r.slice, NULL_PERSONA, r.item_id, S) for r in recs[::3]]
    res = stats.compute_metrics(recs, [S, H, RM], n_boot=100)
    kinds = {d.kind for d in res.differences}
    # no "full minus base" stage row: the base stage is a null, not evidence
    assert kinds == {"rung", "total", "excess"}
    # 2 stages x 2 chains x 3 metrics x (conditional, ITT)
    assert len(res.chains) == 2 * 2 * 3 * 2
    # both sides the base null: accuracy differences are fixed by construction
    base_acc = [d for d in res.differences if d.a.stage == "base" and d.metric == "accuracy"]
    assert base_acc and all(d.fixed_by_construction and math.isnan(d.lo) for d in base_acc)


def test_each_cell_is_seeded_on_its_own():
    recs = _ladder_records()
    alone = [r for r in recs if r.slice == "chat_email"]
    a = stats.compute_metrics(alone, [S, H, RM], n_boot=200, seed=3, differences=False)
    b = stats.compute_metrics(list(reversed(recs)), [S, H, RM], n_boot=200, seed=3)
    key = Cell("llama", "full", "chat_email")
    assert a.cells[key].macro_f1 == b.cells[key].macro_f1
    assert a.cells[key].per_persona == b.cells[key].per_persona
    c = stats.compute_metrics(alone, [S, H, RM], n_boot=200, seed=4, differences=False)
    assert c.cells[key].macro_f1.estimate == a.cells[key].macro_f1.estimate
    assert (c.cells[key].macro_f1.lo, c.cells[key].macro_f1.hi) != (
        a.cells[key].macro_f1.lo,
        a.cells[key].macro_f1.hi,
    )


def test_bca_interval_is_sane():
    recs = _clustered_accuracy_cell(np.random.default_rng(9), n_clusters=80)
    p = stats.compute_metrics(recs, [S, H], n_boot=1000, differences=False).get("b", "s", "id_chat")
    b = stats.compute_metrics(recs, [S, H], n_boot=1000, method="bca", differences=False).get(
        "b", "s", "id_chat"
    )
    assert b.accuracy.lo < b.accuracy.estimate < b.accuracy.hi
    assert b.accuracy.lo == pytest.approx(p.accuracy.lo, abs=0.02)
    assert b.accuracy.hi == pytest.approx(p.accuracy.hi, abs=0.02)
    with pytest.raises(ValueError, match="interval method"):
        stats.compute_metrics(recs, [S, H], n_boot=10, method="normal")  # type: ignore[arg-type]


def test_write_tables(tmp_path):
    recs = _ladder_records()
    res = stats.compute_metrics(recs, [S, H, RM], n_boot=50)
    paths = tables.write_tables(res, tmp_path)
    assert {p.name for p in paths} == {
        "metrics.csv", "per_persona.csv", "confusion.csv", "pred_distribution.csv",
        "differences.csv", "chains.csv", "scorer_check.csv", "retention.csv", "depth.csv",
        "stats.json",
    }  # fmt: skip
    with (tmp_path / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == tables.METRICS_COLUMNS
    assert len(rows) == 4
    first = rows[0]
    assert first["slice"] == "id_chat" and int(first["n_rows"]) == 40 * 3
    assert float(first["macro_f1_lo"]) <= float(first["macro_f1"]) <= float(first["macro_f1_hi"])
    assert first["macro_f1_reliable"] == "True" and first["n_personas"] == "3"
    with (tmp_path / "per_persona.csv").open() as fh:
        per = list(csv.DictReader(fh))
    assert tuple(per[0].keys()) == tables.PER_PERSONA_COLUMNS and len(per) == 4 * 3
    with (tmp_path / "confusion.csv").open() as fh:
        conf = list(csv.DictReader(fh))
    assert len(conf) == 4 * 3 * 5
    assert sum(int(r["count"]) for r in conf if r["slice"] == "id_chat") == 120
    with (tmp_path / "differences.csv").open() as fh:
        diffs = list(csv.DictReader(fh))
    assert {d["kind"] for d in diffs} == {"rung", "total", "excess"}
    assert {d["chain"] for d in diffs if d["kind"] != "excess"} == {"email_step", "agentic"}
    with (tmp_path / "chains.csv").open() as fh:
        chains = list(csv.DictReader(fh))
    assert {(c["chain"], c["slice"]) for c in chains} >= {("agentic", "tool_email_oneshot")}
    with (tmp_path / "pred_distribution.csv").open() as fh:
        dist = list(csv.DictReader(fh))
    assert any(d["label"] == "(no output)" for d in dist)
    settings = json.loads((tmp_path / "stats.json").read_text())
    assert settings["cluster"] == "item_id" and settings["min_clusters"] == stats.MIN_CLUSTERS
    assert settings["label_sets"] == {"llama": [S, H, RM]} and settings["label_notes"] == []
    assert not list(tmp_path.glob("*.tmp"))


def test_csv_cells_cannot_be_formulas_but_numbers_stay_numbers(tmp_path):
    evil = ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    recs = [
        R("b", "s", "chat_email", p, f"s{i}", evil[(i + j) % len(evil)] if i % 2 else p)
        for i in range(12)
        for j, p in enumerate((S, H))
    ]
    recs += [R("b", "s", "agentic_email", p, f"s{i}", p) for i in range(12) for p in (S, H)]
    res = stats.compute_metrics(recs, [S, H], n_boot=30)
    tables.write_tables(res, tmp_path)
    with (tmp_path / "pred_distribution.csv").open(newline="") as fh:
        labels = [r["label"] for r in csv.DictReader(fh)]
    for e in evil:
        assert "'" + e in labels and e not in labels
    with (tmp_path / "differences.csv").open(newline="") as fh:
        diffs = list(csv.DictReader(fh))
    negative = [d for d in diffs if d["estimate"].startswith("-")]
    assert negative and all(float(d["estimate"]) < 0 for d in negative)
    assert tables.neutralise("-0.5") == "'-0.5"  # a string is neutralised, a number is not
    written = tables.write_csv(tmp_path / "n.csv", ["x"], [[-0.5], ["-0.5"]])
    assert written.read_bytes() == b"x\r\n-0.5\r\n'-0.5\r\n"


def test_tables_are_written_atomically(tmp_path, monkeypatch):
    target = tmp_path / "t.csv"
    tables.write_csv(target, ["a"], [[1]])
    before = target.read_text()

    def broken(src, dst):
        raise OSError("disk full")

    from charshift import fileio  # the package's one atomic writer, which tables uses

    monkeypatch.setattr(fileio.os, "replace", broken)
    with pytest.raises(fileio.WriteError, match="disk full"):
        tables.write_csv(target, ["a"], [[2]])
    assert target.read_text() == before  # the old table stands, whole
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temporary file left


# --------------------------------------------------------------------------- issue 7 defects


def _three_personas_c_silent() -> list[R]:
    """a and b classified perfectly; c never produces an output."""
    return [
        R("b", "full", "chat_email", p, f"s{i}", None if p == RM else p)
        for i in range(12)
        for p in (S, H, RM)
    ]


def test_defect4_conditional_macro_f1_averages_personas_with_output():
    m = stats.compute_metrics(_three_personas_c_silent(), [S, H, RM], n_boot=200).get(
        "b", "full", "chat_email"
    )
    assert m.accuracy.estimate == 1.0
    assert m.macro_f1.estimate == pytest.approx(1.0)  # was 0.667, the same as ITT
    assert (m.n_personas_scored, m.n_personas) == (2, 3)
    assert m.macro_f1_itt.estimate == pytest.approx(2 / 3)
    assert (m.macro_f1.lo, m.macro_f1.hi) == (1.0, 1.0)  # every resample: 1.0 over a and b
    assert math.isnan({p.persona: p for p in m.per_persona}[RM].f1.estimate)


def test_defect4_each_resample_averages_its_own_scored_personas():
    """remorse has one output, in one item: a resample without that item averages over two
    personas, one with it over three (never a structural 0 for remorse)."""
    recs = [
        R("b", "full", "chat_email", p, f"s{i}", p if p != RM else (H if i == 0 else None))
        for i in range(15)
        for p in (S, H, RM)
    ]
    draws = stats.bootstrap_draws(recs, [S, H, RM], ("b", "full", "chat_email"), n_boot=300)
    with_rm = draws.weights[:, list(draws.clusters).index("s0")] > 0
    assert 0 < with_rm.sum() < 300
    assert draws.values["n_personas_scored"][with_rm].tolist() == [3.0] * int(with_rm.sum())
    assert draws.values["n_personas_scored"][~with_rm].tolist() == [2.0] * int((~with_rm).sum())
    assert np.all(draws.values["macro_f1"][~with_rm] == 1.0)
    # with remorse's one (wrong) output: remorse F1 0, humor's precision drops
    assert np.all(draws.values["macro_f1"][with_rm] < 0.7)


def _skipped_adapter() -> list[R]:
    """Three personas; remorse's adapter was skipped at `full` (no rows there at all). In
    `full`: sarcasm 17/20 right (3 said humor), humor 17/20 right (3 said sarcasm)."""
    recs = []
    for i in range(20):
        recs.append(R("b", "full", "id_chat", S, f"i{i}", S if i < 17 else H))
        recs.append(R("b", "full", "id_chat", H, f"i{i}", H if i < 17 else S))
        for p in (S, H, RM):
            # prompted: every persona present; one sarcasm output is classified remorse
            pred = RM if (p == S and i == 0) else p
            recs.append(R("b", "prompted", "id_chat", p, f"i{i}", pred))
        recs.append(R("b", "base", "id_chat", NULL_PERSONA, f"i{i}", RM if i < 5 else S))
    return recs


def test_defect5_skipped_persona_leaves_the_label_set_of_its_base():
    recs = _skipped_adapter()
    recs += [R("other", "full", "id_chat", p, f"i{i}", p) for i in range(12) for p in (S, H, RM)]
    res = stats.compute_metrics(recs, [S, H, RM], n_boot=100)
    full = res.get("b", "full", "id_chat")
    assert full.macro_f1_itt.estimate == pytest.approx(0.85)  # was 0.567: a structural 0
    assert full.macro_f1.estimate == pytest.approx(0.85)
    assert full.n_personas == 2 and [p.persona for p in full.per_persona] == [S, H]
    assert res.labels == {"b": [S, H], "other": [S, H, RM]}
    (note,) = res.label_notes
    assert (note.base, note.persona, note.stages, note.n_rows_set_aside) == ("b", RM, ("full",), 20)
    assert "remorse" in note.text() and "skipped adapter" in note.text()
    # every cell of that base: remorse is out, and a prediction of remorse is wrong ("other")
    pr = res.get("b", "prompted", "id_chat")
    assert pr.n_rows == 40 and pr.confusion_rows == [S, H]
    assert pr.confusion[0].tolist() == [19, 0, 1, 0]  # sarcasm: 19 right, 1 said remorse
    assert pr.accuracy.estimate == pytest.approx(39 / 40)
    base = res.get("b", "base", "id_chat")
    assert base.n_personas == 2 and base.confusion_cols == [S, H, "other", "none"]
    assert base.confusion.tolist() == [[15, 0, 5, 0]]
    assert res.get("other", "full", "id_chat").n_personas == 3  # another base keeps it


def test_defect5_too_few_personas_left_is_an_error():
    recs = [R("b", "full", "id_chat", S, f"i{i}", S) for i in range(3)]
    recs += [R("b", "prompted", "id_chat", p, f"i{i}", p) for i in range(3) for p in (S, H)]
    with pytest.raises(ValueError, match="base 'b'.*at least two personas"):
        stats.compute_metrics(recs, [S, H], n_boot=10)


def _uneven_items() -> list[R]:
    """The main chain with different item sets per unit (partial runs, unscored rows)."""
    rng = np.random.default_rng(0)
    spans = {
        "chat_email": range(20),
        "email_syscontext": range(20),
        "tool_email_oneshot": range(15),
        "agentic_email": range(5, 20),
    }
    acc = {"chat_email": 0.9, "email_syscontext": 0.7, "tool_email_oneshot": 0.6,
           "agentic_email": 0.3}  # fmt: skip
    recs = []
    for u, span in spans.items():
        for i in span:
            rate = min(1.0, acc[u] * (0.3 + 1.4 * (i % 7) / 6))
            for p in (S, H, RM):
                pred = p if rng.random() < rate else (None if rng.random() < 0.3 else H)
                recs.append(R("b", "full", u, p, f"scenario:s{i}", pred))
    return recs


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy"])
@pytest.mark.parametrize("itt", [False, True])
def test_defect3_rungs_add_up_to_the_total_when_item_sets_differ(metric, itt):
    recs = _uneven_items()
    dec = stats.chain_decomposition(recs, "b", "full", metric=metric, itt=itt, n_boot=200)
    assert dec is not None and dec.units == list(ladder.MAIN_CHAIN.units)
    # old code: rungs summed to 0.485 against a total of 0.461 (macro-F1, conditional)
    assert sum(r.estimate for r in dec.rungs) == pytest.approx(dec.total.estimate, abs=1e-12)
    assert dec.common == {"scenario": 10}  # s5..s14
    assert dec.dropped == {"chat_email": 10, "email_syscontext": 10, "tool_email_oneshot": 5,
                           "agentic_email": 5}  # fmt: skip
    assert "10 scenario items" in dec.note and "agentic_email 5" in dec.note
    assert [r.changes for r in dec.rungs] == [r.changes for r in ladder.MAIN_CHAIN.rungs]
    assert all(r.paired and r.chain == "agentic" for r in dec.rungs)
    # each unit's estimate is its metric on the common items
    common = {f"scenario:s{i}" for i in range(5, 15)}
    on_common = [r for r in recs if r.item_id in common]
    res = stats.compute_metrics(on_common, [S, H, RM], n_boot=10, differences=False)
    name = f"{metric}_itt" if itt else metric
    for u, iv in zip(dec.units, dec.estimates, strict=True):
        assert iv.estimate == pytest.approx(getattr(res.get("b", "full", u), name).estimate)
    for j, r in enumerate(dec.rungs):
        assert r.estimate == pytest.approx(
            dec.estimates[j].estimate - dec.estimates[j + 1].estimate
        )


def test_chain_with_bca_intervals_still_adds_up():
    res = stats.compute_metrics(_uneven_items(), [S, H, RM], n_boot=200, method="bca")
    (dec,) = [c for c in res.chains if c.metric == "macro_f1" and not c.itt]
    assert sum(r.estimate for r in dec.rungs) == pytest.approx(dec.total.estimate, abs=1e-12)
    for d in [*dec.rungs, dec.total]:
        assert d.lo <= d.estimate <= d.hi and d.reliable


def test_defect3_every_resample_telescopes_with_one_draw_per_item_kind():
    recs = _uneven_items()
    recs += [R("b", "full", "id_chat", p, f"prompt:p{i}", p if i % 3 else H)
             for i in range(30) for p in (S, H, RM)]  # fmt: skip
    recs += [R("b", "full", "scenario_chat", p, f"scenario:s{i}", p if i % 4 else S)
             for i in range(3, 18) for p in (S, H, RM)]  # fmt: skip
    draws = stats.chain_draws(recs, "b", "full", chain="email_step", n_boot=100)
    assert draws is not None and draws.units == ["id_chat", "scenario_chat", "chat_email"]
    assert draws.kinds == {"id_chat": "prompt", "scenario_chat": "scenario",
                           "chat_email": "scenario"}  # fmt: skip
    assert set(draws.weights) == {"prompt", "scenario"}
    assert list(draws.common["scenario"]) == sorted(f"scenario:s{i}" for i in range(3, 18))
    for name in ("macro_f1", "accuracy_itt"):
        v = [draws.values[u][name] for u in draws.units]
        rungs = [v[0] - v[1], v[1] - v[2]]
        assert np.allclose(rungs[0] + rungs[1], v[0] - v[2], atol=1e-12)
    dec = stats.chain_decomposition(recs, "b", "full", chain="email_step", n_boot=100)
    assert dec is not None
    assert [r.paired for r in dec.rungs] == [False, True]  # prompt -> scenario is unpaired
    assert dec.rungs[0].n_clusters == 15 and dec.rungs[1].n_clusters == 15
    assert dec.rungs[0].changes == ladder.EMAIL_STEP_CHAIN.rungs[0].changes
    assert dec.rungs[1].changes.startswith("BUNDLE of 3 changes")
    assert dec.missing == ["chat_email.whole", "chat_email.head"]


def test_item_kind_follows_the_namespace_then_the_slice_family():
    assert stats.item_kind("chat_email", ["scenario:a", "scenario:b"]) == "scenario"
    assert stats.item_kind("id_chat", ["prompt:1"]) == "prompt"
    assert stats.item_kind("id_chat.short", ["17", "18"]) == "prompt"
    assert stats.item_kind("scenario_chat", ["17"]) == "scenario"


def test_contrasts_are_paired_and_name_what_they_change():
    recs = _ladder_records()
    recs += [R(r.base, r.stage, "chat_email_multiturn", r.persona, r.item_id,
               r.persona if r.item_id.endswith("1") else r.prediction)
             for r in recs if r.slice == "chat_email"]  # fmt: skip
    res = stats.compute_metrics(recs, [S, H, RM], n_boot=100)
    con = [d for d in res.differences if d.kind == "contrast"]
    assert len(con) == 6  # one contrast x 3 metrics x 2 views (no id_chat.short here)
    assert all(d.paired and d.changes == ladder.CONTRASTS[0].changes for d in con)
    assert {(d.a.slice, d.b.slice) for d in con} == {("chat_email", "chat_email_multiturn")}


def test_defect9_base_counts_are_per_output():
    recs = [R("b", "base", "id_chat", NULL_PERSONA, f"i{i}", [S, H, None, "goodness"][i % 4])
            for i in range(12)]  # fmt: skip
    recs += [R("b", "full", "id_chat", p, f"i{i}", p) for i in range(12) for p in (S, H, RM)]
    m = stats.compute_metrics(recs, [S, H, RM], n_boot=50).get("b", "base", "id_chat")
    assert (m.n_rows, m.n_scored, m.n_none) == (12, 9, 3)  # was 36, 27, 9
    assert m.null and m.confusion_rows == [stats.NULL_ROW]
    assert m.confusion.tolist() == [[3, 3, 0, 3, 3]]
    assert m.pred_distribution == {S: 3, H: 3, "goodness": 3}
    assert all(p.n == 12 and p.n_scored == 9 for p in m.per_persona)
    assert m.mean_p_true is None


def test_defect9_base_accuracy_is_fixed_by_construction():
    recs = [R("b", "base", "id_chat", NULL_PERSONA, f"i{i}", [S, H, RM][i % 3]) for i in range(30)]
    m = stats.compute_metrics(recs, [S, H, RM], n_boot=50).get("b", "base", "id_chat")
    for iv in (m.accuracy, m.accuracy_itt):
        assert iv.estimate == pytest.approx(1 / 3) and iv.fixed_by_construction
        assert math.isnan(iv.lo) and math.isnan(iv.hi) and not iv.reliable
        assert "fixed by construction" in iv.flag
    assert not m.macro_f1.fixed_by_construction and m.macro_f1.reliable  # F1 is a real figure


@pytest.mark.parametrize(("n_items", "reliable"), [(1, False), (9, False), (10, True)])
def test_defect9_few_clusters_flag_the_interval(n_items, reliable):
    rng = np.random.default_rng(n_items)
    recs = [
        R("b", "full", "id_chat", p, f"i{i}", p if rng.random() < 0.7 else H)
        for i in range(n_items)
        for p in (S, H)
        for _ in range(5)
    ]
    m = stats.compute_metrics(recs, [S, H], n_boot=100).get("b", "full", "id_chat")
    for iv in (m.macro_f1, m.accuracy, m.macro_f1_itt, m.accuracy_itt, m.yield_):
        assert iv.reliable is reliable and iv.n_clusters == n_items
        assert ("fewer than 10" in iv.flag) is not reliable
    assert all(p.f1.reliable is reliable for p in m.per_persona)


def test_defect9_conditional_clusters_count_only_items_with_an_output():
    recs = [R("b", "full", "chat_email", p, f"s{i}", p if i < 4 else None)
            for i in range(30) for p in (S, H)]  # fmt: skip
    m = stats.compute_metrics(recs, [S, H], n_boot=100).get("b", "full", "chat_email")
    assert m.accuracy.n_clusters == 4 and not m.accuracy.reliable
    assert m.accuracy_itt.n_clusters == 30 and m.accuracy_itt.reliable


def test_defect9_empty_resamples_are_counted(tmp_path):
    # 12 items, one with an output: about (11/12)^12 = 35% of resamples have nothing scored
    recs = [R("b", "full", "agentic_email", p, f"s{i}", p if i == 0 else None)
            for i in range(12) for p in (S, H)]  # fmt: skip
    m = stats.compute_metrics(recs, [S, H], n_boot=400).get("b", "full", "agentic_email")
    draws = stats.bootstrap_draws(recs, [S, H], ("b", "full", "agentic_email"), n_boot=400)
    empty = int(np.isnan(draws.values["accuracy"]).sum())
    assert 60 < empty < 220
    assert m.accuracy.n_empty_resamples == empty == m.macro_f1.n_empty_resamples
    assert f"{empty} of 400 resamples had nothing scored" in m.accuracy.flag
    assert m.accuracy_itt.n_empty_resamples == 0
    tables.write_tables(stats.compute_metrics(recs, [S, H], n_boot=400), tmp_path)
    with (tmp_path / "metrics.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["n_empty_resamples"] == str(empty) and "resamples had nothing" in row["flag"]
    d = stats.paired_difference(
        recs + [R("b", "full", "chat_email", r.persona, r.item_id, r.persona) for r in recs],
        ("b", "full", "chat_email"), ("b", "full", "agentic_email"), n_boot=400,
    )  # fmt: skip
    assert d.n_empty_resamples > 0 and not d.reliable


# --------------------------------------------------------------------------- loader (external)


def _write(tmp_path, lines):
    p = tmp_path / "preds.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_predictions_ok(tmp_path):
    good = {"base": "b", "stage": "full", "slice": "id_chat", "persona": S, "item_id": 3}
    p = _write(
        tmp_path,
        [
            json.dumps({**good, "prediction": S, "probs": {S: 0.9, H: 0.1}, "sample_idx": 1}),
            "",
            json.dumps({**good, "prediction": None, "outcome": "no_email", "text": None}),
        ],
    )
    base = {**good, "stage": "base", "persona": None, "prediction": H}
    with p.open("a") as fh:
        fh.write(json.dumps(base) + "\n" + json.dumps({**base, "persona": "", "item_id": 4}) + "\n")
    recs = load_predictions_jsonl(p)
    assert [r.persona for r in recs[2:]] == [NULL_PERSONA, NULL_PERSONA]  # base: the null
    recs = recs[:2]
    assert len(recs) == 2
    assert recs[0].item_id == "3" and recs[0].probs == {S: 0.9, H: 0.1} and recs[0].sample_idx == 1
    assert recs[1].prediction is None and recs[1].outcome == "no_email"


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"stage": "s", "slice": "x", "persona": S, "item_id": "i", "prediction": S}, "'base'"),
        ({"base": "b", "stage": "s", "slice": "x", "persona": S, "item_id": "i"}, "'prediction'"),
        ({"base": "b", "stage": "s", "slice": "x", "persona": S, "item_id": "i", "prediction": 3}, "'prediction'"),
        ({"base": "b", "stage": "s", "slice": "x", "persona": "", "item_id": "i", "prediction": S}, "'persona'"),
        ({"base": "b", "stage": "s", "slice": "x", "persona": S, "item_id": "i", "prediction": S, "probs": {S: "high"}}, "'probs'"),
        ({"base": "b", "stage": "s", "slice": "x", "persona": S, "item_id": "i", "prediction": S, "sample_idx": -1}, "'sample_idx'"),
    ],
)  # fmt: skip
def test_load_predictions_bad_field(tmp_path, row, match):
    ok = {"base": "b", "stage": "s", "slice": "x", "persona": S, "item_id": "i", "prediction": S}
    p = _write(tmp_path, [json.dumps(ok), json.dumps(row)])
    with pytest.raises(PredictionsError, match=match) as err:
        load_predictions_jsonl(p)
    assert " line 2:" in str(err.value)


def test_load_predictions_bad_json_and_empty(tmp_path):
    p = _write(tmp_path, ['{"base": "b",'])
    with pytest.raises(PredictionsError, match=r" line 1: not valid JSON"):
        load_predictions_jsonl(p)
    p = _write(tmp_path, ["[1, 2]"])
    with pytest.raises(PredictionsError, match="JSON object"):
        load_predictions_jsonl(p)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(PredictionsError, match="empty"):
        load_predictions_jsonl(empty)
    with pytest.raises(PredictionsError, match="not found"):
        load_predictions_jsonl(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- issue 13


def _perfect(unit: str, personas: list[str], items: int, prefix: str = "i") -> list[R]:
    return [R("b", "full", unit, p, f"{prefix}{i}", p) for i in range(items) for p in personas]


def test_defect13_persona_absent_by_design_leaves_the_itt_label_set():
    """id_chat.short exists only where the condition wrote an email body: remorse has none. A
    perfect scorer then loses nothing on the length contrast, in ITT as in conditional (the
    ITT contrast read +0.25: remorse's absent rows averaged in as F1 0)."""
    p4 = [S, H, RM, L]
    recs = _perfect("id_chat", p4, 12) + _perfect("id_chat.short", [S, H, L], 12)
    res = stats.compute_metrics(recs, p4, n_boot=100)
    short = res.get("b", "full", "id_chat.short")
    assert short.macro_f1_itt.estimate == pytest.approx(1.0)
    assert (short.n_personas_attempted, short.n_personas) == (3, 4)
    length = [d for d in res.differences if d.kind == "contrast" and d.metric == "macro_f1"]
    assert {d.itt for d in length} == {False, True}
    for d in length:
        assert d.estimate == pytest.approx(0.0, abs=1e-12), d
        assert (d.k, d.n_personas) == (3, 4)


def test_defect13_conditional_differences_compare_the_same_personas():
    """In agentic_email remorse never produces an output; in chat_email it does, and is
    classified badly (as a label outside the run). Both units classify sarcasm, humor and loving perfectly: comparing the
    same three personas, nothing is lost (before: chat_email averaged remorse's 0 in, so the
    rung read a gain of 0.25)."""
    p4 = [S, H, RM, L]
    recs = [
        R("b", "full", u, p, f"scenario:s{i}",
          ("goodness" if u == "chat_email" else None) if p == RM else p)
        for u in ("chat_email", "agentic_email") for i in range(12) for p in p4
    ]  # fmt: skip
    res = stats.compute_metrics(recs, p4, n_boot=100)
    dec = next(d for d in res.chains if d.chain == "agentic" and d.metric == "macro_f1"
               and not d.itt)  # fmt: skip
    assert dec.total.estimate == pytest.approx(0.0, abs=1e-12)
    assert (dec.k, dec.n_personas) == (3, 4) and (dec.total.k, dec.total.n_personas) == (3, 4)
    assert "3 of 4 personas" in dec.note
    # the unit estimates are over those three personas too, so the rungs still add up
    assert [iv.estimate for iv in dec.estimates] == pytest.approx([1.0, 1.0])
    # per resample: a paired difference of two cells averages over the personas scored in both
    d = stats.paired_difference(
        recs, ("b", "full", "chat_email"), ("b", "full", "agentic_email"), personas=p4,
        n_boot=100,
    )  # fmt: skip
    assert (d.estimate, d.lo, d.hi, d.k) == (0.0, 0.0, 0.0, 3)


def test_defect13_backend_failures_are_not_persona_misses():
    """A backend error or a context overflow says nothing about the persona: left out of the
    ITT figures (before: counted as misses, 2 of 12 sarcasm rows) and counted on their own."""
    rows = _perfect("chat_email", [S, H], 12)
    rows = [
        dataclasses.replace(r, prediction=None, outcome=["error", "context_overflow"][i % 2])
        if r.persona == S and i < 2 else r
        for i, r in enumerate(sorted(rows, key=lambda r: r.persona != S))
    ]  # fmt: skip
    m = stats.compute_metrics(rows, [S, H], n_boot=50).get("b", "full", "chat_email")
    assert m.macro_f1_itt.estimate == pytest.approx(1.0) and m.yield_.estimate == 1.0
    assert (m.n_rows, m.n_failed) == (22, 2)
    only_failed = [dataclasses.replace(r, outcome="error", prediction=None) for r in rows[:4]]
    res = stats.compute_metrics(
        rows + [dataclasses.replace(r, slice="agentic_email") for r in only_failed], [S, H],
        n_boot=20,
    )  # fmt: skip
    assert res.failed_only == [Cell("b", "full", "agentic_email")]
    assert res.get("b", "full", "agentic_email") is None


def test_defect13_small_sample_intervals_use_the_expanded_tails():
    """With G clusters the interval cuts Phi(-sqrt(G/(G-1)) t_{G-1}(0.975)) of the resamples at
    each end (10 clusters: 0.86%, not 2.5%), so 10 clusters cover at least 0.93
    (scripts/coverage_min_clusters.py); without the correction, the plain percentile."""
    from scipy.stats import norm
    from scipy.stats import t as student_t

    from charshift.stats.intervals import tail

    want = norm.cdf(-math.sqrt(10 / 9) * student_t.ppf(0.975, 9))
    assert tail(0.95, 10) == pytest.approx(want) and 0.0085 < want < 0.0087
    assert tail(0.95, 10, small_sample=False) == pytest.approx(0.025)
    assert tail(0.95, 1000) == pytest.approx(0.025, abs=0.0005)
    recs = _clustered_accuracy_cell(np.random.default_rng(3), n_clusters=10)
    draws = stats.bootstrap_draws(recs, [S, H], ("b", "s", "id_chat"), n_boot=400)
    for small, level in ((True, want), (False, 0.025)):
        m = stats.compute_metrics(recs, [S, H], n_boot=400, differences=False,
                                  small_sample=small).get("b", "s", "id_chat")  # fmt: skip
        lo, hi = np.quantile(draws.values["accuracy"], [level, 1 - level])
        assert (m.accuracy.lo, m.accuracy.hi) == pytest.approx((lo, hi))


def test_null_and_excess_by_hand_and_in_every_resample():
    """Per persona F1null = 2 n m / (N (n + m)); excess = F1 - F1null, averaged; recomputed
    from each resample's own counts."""
    rows = [(S, S), (S, S), (S, H), (H, H), (H, S), (H, "goodness"), (RM, H), (RM, None)]
    recs = [R("b", "full", "id_chat", t, f"i{i % 4}", p) for i, (t, p) in enumerate(rows)]
    m = stats.compute_metrics(recs, [S, H, RM], n_boot=200, differences=False).get(
        "b", "full", "id_chat"
    )
    # scored: 7 rows; true n = (3, 3, 1); predicted m = (3, 3, 0) (+1 other)
    n, mm, big_n = np.array([3, 3, 1]), np.array([3, 3, 0]), 7
    null = 2 * n * mm / (big_n * (n + mm))
    f1 = np.array([2 * 2 / 6, 2 * 1 / 6, 0.0])
    assert m.macro_f1_null.estimate == pytest.approx(null.mean())
    assert m.macro_f1_excess.estimate == pytest.approx((f1 - null).mean())
    assert [p.f1_null for p in m.per_persona] == pytest.approx(list(null))
    draws = stats.bootstrap_draws(recs, [S, H, RM], ("b", "full", "id_chat"), n_boot=200)
    v = draws.values
    assert np.allclose(v["macro_f1_excess"], v["macro_f1"] - v["macro_f1_null"], equal_nan=True)
    assert np.nanstd(v["macro_f1_null"]) > 0  # the null moves with each resample's shares


@pytest.mark.parametrize("seed", range(4))
def test_kappa_matches_sklearn(seed):
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(seed)
    labels = [S, H, RM, "goodness", None]
    recs = [
        R("b", "s", "id_chat", t, f"i{i}", t if rng.random() < 0.5 else labels[rng.integers(5)])
        for i in range(60) for t in (S, H, RM)
    ]  # fmt: skip
    m = stats.compute_metrics(recs, [S, H, RM], n_boot=20, differences=False).get(
        "b", "s", "id_chat"
    )
    sc = [r for r in recs if r.prediction is not None]
    want = cohen_kappa_score([r.persona for r in sc], [r.prediction for r in sc])
    assert m.kappa.estimate == pytest.approx(want, abs=1e-12)
    want_itt = cohen_kappa_score([r.persona for r in recs], [r.prediction or "-" for r in recs])
    assert m.kappa_itt.estimate == pytest.approx(want_itt, abs=1e-12)


def test_base_null_is_fixed_by_construction_and_gives_the_brief_formula():
    """Base macro-F1 = (1/K) sum 2q/(1 + Kq); it is its own null, so its excess and kappa are 0,
    fixed by construction."""
    preds = [S] * 26 + [H] * 2 + [RM] * 1 + [L] * 1  # 87% one label
    recs = [R("b", "base", "id_chat", NULL_PERSONA, f"i{i}", p) for i, p in enumerate(preds)]
    recs += _perfect("id_chat", [S, H, RM, L], 30)
    m = stats.compute_metrics(recs, [S, H, RM, L], n_boot=50).get("b", "base", "id_chat")
    q = np.array([26, 2, 1, 1]) / 30
    assert m.macro_f1.estimate == pytest.approx(np.mean(2 * q / (1 + 4 * q)))
    assert m.macro_f1_null.estimate == pytest.approx(m.macro_f1.estimate)
    for iv in (m.macro_f1_excess, m.macro_f1_excess_itt, m.kappa, m.kappa_itt):
        assert iv.estimate == pytest.approx(0.0, abs=1e-12) and iv.fixed_by_construction
        assert math.isnan(iv.lo) and "fixed by construction" in iv.flag
    assert math.isnan(m.p_null) and m.n_perm == 0


def test_permutations_stay_within_items_and_equal_a_plain_recomputation():
    rng = np.random.default_rng(4)
    p3 = [S, H, RM]
    recs = [
        R("b", "s", "id_chat", t, f"i{i}", [S, H, RM, None, "goodness"][rng.integers(5)])
        for i in range(9) for t in p3 for _ in range(1 + i % 2)
    ]  # fmt: skip
    perm = stats.permutation_draws(recs, p3, ("b", "s", "id_chat"), n_perm=30, seed=2)
    from charshift.stats.compute import prepare
    from charshift.stats.counts import encode_counts, statistics
    from charshift.stats.nulls import _groups

    data = prepare(recs, p3).cells[Cell("b", "s", "id_chat")]
    cid, t, p = data.rows
    labels, valid, order = _groups(cid, t)
    keys = np.random.default_rng(
        derive_seed("charshift.stats.perm", 2, "b", "s", "id_chat")
    ).random((30, *labels.shape), dtype=np.float32)
    keys[:, ~valid] = 2.0
    for b in range(30):
        shuffled = np.take_along_axis(labels, np.argsort(keys[b], axis=-1), -1)[valid]
        tb = np.empty_like(t)
        tb[order] = shuffled
        # within items: each item keeps its own multiset of true labels
        for c in np.unique(cid):
            assert sorted(tb[cid == c]) == sorted(t[cid == c])
        st = statistics(encode_counts(tb, p, cid, len(data.clusters), 3).sum(axis=0))
        for name in ("macro_f1", "macro_f1_itt", "macro_f1_excess", "kappa", "accuracy_itt"):
            assert perm[name][b] == pytest.approx(float(st[name]), nan_ok=True), name


def test_p_null_is_small_for_a_real_persona_and_not_for_none():
    rng = np.random.default_rng(8)
    p4 = [S, H, RM, L]
    real = [R("b", "full", "id_chat", t, f"i{i}", t if rng.random() < 0.6 else p4[rng.integers(4)])
            for i in range(20) for t in p4]  # fmt: skip
    none = [R("b", "full", "chat_email", t, f"s{i}", p4[rng.integers(4)])
            for i in range(20) for t in p4]  # fmt: skip
    res = stats.compute_metrics(real + none, p4, n_boot=50, differences=False, n_perm=500)
    assert res.get("b", "full", "id_chat").p_null < 0.01
    assert res.get("b", "full", "chat_email").p_null > 0.05
    assert res.get("b", "full", "id_chat").n_perm == 500


def test_holm_by_hand():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, float("nan"), 0.01]) == pytest.approx([0.5, float("nan"), 0.02],
                                                                  nan_ok=True)  # fmt: skip
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def _family_records() -> list[R]:
    """Two trained stages and the control, id_chat and two units of each chain."""
    rng = np.random.default_rng(12)
    p3 = [S, H, RM]
    out = []
    for st, hit in (("prompted", 0.7), ("full", 0.8), ("prompted_explicit", 0.9)):
        for unit, loss in (("id_chat", 0), ("scenario_chat", 0.1), ("chat_email", 0.2),
                           ("agentic_email", 0.4)):  # fmt: skip
            kind = "prompt" if unit == "id_chat" else "scenario"
            for i in range(14):
                for t in p3:
                    ok = rng.random() < hit - loss
                    out.append(R("b", st, unit, t, f"{kind}:{i}", t if ok else p3[rng.integers(3)]))
        out += [R("b", "base", "id_chat", NULL_PERSONA, f"prompt:{i}", S) for i in range(14)]
    return out


def test_primary_family_is_declared_joint_and_adjusted():
    res = stats.compute_metrics(_family_records(), [S, H, RM], n_boot=300)
    fam = res.family
    # per trained stage (not base, not the control): the home excess and each chain's total
    want = {(st, kind, chain) for st in ("prompted", "full")
            for kind, chain in (("excess", ""), ("total", "email_step"), ("total", "agentic"))}  # fmt: skip
    assert {(d.a.stage, d.kind, d.chain) for d in fam} == want
    assert all(d.metric == "macro_f1_excess" and not d.itt for d in fam)
    for d in fam:
        assert d.lo_simul <= d.lo <= d.estimate <= d.hi <= d.hi_simul  # simultaneous is wider
        assert d.p <= d.p_holm <= 1
    assert stats.holm([d.p for d in fam]) == pytest.approx([d.p_holm for d in fam])
    others = [d for d in res.differences if d.family != "primary"]
    assert others and all(math.isnan(d.p_holm) and math.isnan(d.lo_simul) for d in others)
    assert all(0 <= d.p <= 1 for d in others if not d.fixed_by_construction)
    # joint draws: both stages' chains use the base's one draw per item kind
    a = stats.chain_draws(_family_records(), "b", "prompted", n_boot=50)
    b = stats.chain_draws(_family_records(), "b", "full", n_boot=50)
    assert np.array_equal(a.weights["scenario"], b.weights["scenario"])
    home = next(d for d in fam if d.kind == "excess" and d.a.stage == "full")
    cell = res.get("b", "full", "id_chat")
    assert home.estimate == pytest.approx(cell.macro_f1_excess.estimate)
    assert (home.b.stage, home.k, home.n_personas) == (stats.OWN_NULL, 3, 3)


def _demo_shaped_records(seed: int) -> list[R]:
    """The quick demo's shape: 10 prompt items at home, ONE scenario item behind every chain."""
    rng = np.random.default_rng(seed)
    p3 = [S, H, RM]
    out = []
    for st, hit in (("prompted", 0.45), ("prompted_explicit", 0.8)):
        for unit in ("id_chat", "scenario_chat", "chat_email", "agentic_email"):
            kind, n = ("prompt", 10) if unit == "id_chat" else ("scenario", 1)
            for i in range(n):
                for t in p3:
                    ok = rng.random() < hit
                    out.append(R("b", st, unit, t, f"{kind}:{i}", t if ok else p3[rng.integers(3)]))
    for unit in ("id_chat", "scenario_chat", "chat_email", "agentic_email"):
        kind, n = ("prompt", 10) if unit == "id_chat" else ("scenario", 1)
        out += [R("b", "base", unit, NULL_PERSONA, f"{kind}:{i}", p3[rng.integers(3)])
                for i in range(n)]  # fmt: skip
    return out


@pytest.mark.parametrize("seed", range(8))
def test_the_simultaneous_band_holds_each_members_interval_and_one_item_has_neither(seed):
    """Regression (the quick demo): the home excess's percentile interval, widened by its
    permutation null, reached below its symmetric max-t band (lo 0.055 < lo_simul 0.089); and a
    chain total over one scenario item had no interval but a p-value (0.08) that entered Holm."""
    res = stats.compute_metrics(_demo_shaped_records(seed), [S, H, RM], n_boot=300)
    assert res.family
    for d in res.family:
        if d.has_interval:
            assert d.lo_simul <= d.lo <= d.hi <= d.hi_simul, d
        else:
            assert math.isnan(d.p) and math.isnan(d.p_holm) and math.isnan(d.lo_simul), d
    assert any(not d.has_interval and d.kind == "total" for d in res.family)
    from charshift.report import _family_verdict

    for d in res.family:  # the report's family table: no claim on one item, not "undefined"
        if not d.has_interval and math.isfinite(d.estimate):
            assert _family_verdict(d).startswith("no claim: interval n/a (1 item)"), d


def test_members_over_one_item_leave_the_others_band_alone():
    """Review finding: a one-item chain total (g = 1, no band of its own) entered the family's
    small-sample expansion as its smallest member and switched it off, narrowing the home
    member's band by about 15%. The home band is the same with and without those members."""
    rng = np.random.default_rng(5)
    p3, recs = [S, H, RM], []
    for st, hit in (("prompted", 0.34), ("full", 0.34), ("prompted_explicit", 0.9)):
        for unit in ("id_chat", "scenario_chat", "chat_email", "agentic_email"):
            kind, n = ("prompt", 6) if unit == "id_chat" else ("scenario", 1)
            for i in range(n):
                for t in p3:
                    ok = rng.random() < hit
                    recs.append(
                        R("b", st, unit, t, f"{kind}:{i}", t if ok else p3[rng.integers(3)])
                    )
    for unit in ("id_chat", "scenario_chat", "chat_email", "agentic_email"):
        kind, n = ("prompt", 6) if unit == "id_chat" else ("scenario", 1)
        recs += [R("b", "base", unit, NULL_PERSONA, f"{kind}:{i}", p3[rng.integers(3)])
                 for i in range(n)]  # fmt: skip
    home_only = [r for r in recs if r.slice == "id_chat"]
    bands = []
    for rs in (home_only, recs):
        res = stats.compute_metrics(rs, [S, H, RM], n_boot=300)
        homes = sorted(
            (d.a.stage, d.lo_simul, d.hi_simul) for d in res.family if d.kind == "excess"
        )
        assert len(homes) == 2
        bands.append(homes)
    flat = [[v for b in one for v in b[1:]] for one in bands]
    assert flat[0] == pytest.approx(flat[1])


def test_scorer_check_flags_a_blind_unit_and_marks_its_figures(tmp_path):
    """The control shows its persona in id_chat and chat_email; in agentic_email the scorer's
    verdicts are noise: blind there, and every figure of agentic_email says so."""
    rng = np.random.default_rng(1)
    p3 = [S, H, RM]
    recs = []
    for st in ("full", "prompted_explicit"):
        for unit in ("id_chat", "chat_email", "agentic_email"):
            kind = "prompt" if unit == "id_chat" else "scenario"
            for i in range(15):
                for t in p3:
                    seen = unit != "agentic_email" and rng.random() < 0.9
                    recs.append(
                        R("b", st, unit, t, f"{kind}:{i}", t if seen else p3[rng.integers(3)])
                    )
        recs += [R("b", "base", u, NULL_PERSONA, f"{k}:{i}", S if u == "agentic_email" or i % 3
                   else H) for u, k in (("id_chat", "prompt"), ("agentic_email", "scenario"))
                 for i in range(15)]  # fmt: skip
    res = stats.compute_metrics(recs, p3, n_boot=200)
    checks = {s.unit: s for s in res.scorer_checks}
    assert checks["agentic_email"].scorer_blind is True
    assert checks["id_chat"].scorer_blind is False and checks["chat_email"].scorer_blind is False
    assert checks["agentic_email"].null_top_share == pytest.approx(1.0)
    assert checks["agentic_email"].null_top_label == S
    assert checks["id_chat"].null_top_share == pytest.approx(10 / 15)
    assert res.get("b", "full", "agentic_email").scorer_blind is True
    assert res.get("b", "full", "chat_email").scorer_blind is False
    total = next(d for d in res.family if d.chain == "agentic")
    assert total.blind == ("agentic_email",)
    ret = {(r.unit, r.itt): r for r in res.retention}
    assert "control's excess interval reaches 0" in ret[("agentic_email", False)].flag
    full_id = res.get("b", "full", "id_chat").macro_f1_excess.estimate
    ctrl_id = res.get("b", "prompted_explicit", "id_chat").macro_f1_excess.estimate
    assert ret[("id_chat", False)].estimate == pytest.approx(full_id / ctrl_id)
    tables.write_tables(res, tmp_path)
    with (tmp_path / "scorer_check.csv").open() as fh:
        rows = {r["unit"]: r for r in csv.DictReader(fh)}
    assert tuple(next(iter(rows.values()))) == tables.SCORER_CHECK_COLUMNS
    assert (
        rows["agentic_email"]["scorer_blind"] == "True"
        and rows["id_chat"]["scorer_blind"] == "False"
    )
    assert (
        float(rows["agentic_email"]["sensitivity_lo"])
        <= 0
        < float(rows["id_chat"]["sensitivity_lo"])
    )
    assert rows["agentic_email"]["scorer"] == "classifier"
    with (tmp_path / "metrics.csv").open() as fh:
        metrics = list(csv.DictReader(fh))
    blind = [m for m in metrics if m["slice"] == "agentic_email"]
    assert blind and all(m["scorer_blind"] == "True" and "SCORER BLIND" in m["flag"] for m in blind)
    with (tmp_path / "differences.csv").open() as fh:
        diffs = list(csv.DictReader(fh))
    assert any(d["family"] == "primary" and d["scorer_blind"] == "True" for d in diffs)
    assert {d["metric"] for d in diffs} == {"macro_f1", "accuracy", "macro_f1_excess"}


def test_without_a_control_nothing_is_marked_blind():
    recs = [r for r in _family_records() if r.stage != "prompted_explicit"]
    res = stats.compute_metrics(recs, [S, H, RM], n_boot=50)
    assert not res.has_control("b") and res.retention == []
    assert all(s.scorer_blind is None and "not checked" in s.note for s in res.scorer_checks)
    res = stats.compute_metrics(_family_records(), [S, H, RM], n_boot=50, control=None)
    assert {d.a.stage for d in res.family} == {"prompted", "full", "prompted_explicit"}
