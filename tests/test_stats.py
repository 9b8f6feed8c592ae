"""Tests for charshift.stats: metric definitions, intervals, differences, writers, loader."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from charshift import stats
from charshift.schema import NULL_PERSONA
from charshift.schema import PredictionRecord as R
from charshift.stats import Cell, PredictionsError

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
    return [R("b", "full", "id_chat", t, f"i{i}", p) for i, (t, p) in enumerate(rows)]


def test_hand_computed_small_case():
    res = stats.compute_metrics(_hand_records(), [S, H, RM, L], n_boot=50, differences=False)
    m = res.get("b", "full", "id_chat")
    # conditional: 6 scored rows. sarcasm tp1 fp1 fn1 -> F1 0.5; humor tp1 fp1 fn1 -> 0.5;
    # remorse tp0 fn2 -> 0; loving tp0 fp1 -> 0. Macro = 1.0 / 4 = 0.25. Accuracy 2/6.
    assert m.macro_f1.estimate == pytest.approx(0.25)
    assert m.accuracy.estimate == pytest.approx(2 / 6)
    # ITT: 8 rows. sarcasm tp1 fp1 fn2 -> 2/5 = 0.4; humor tp1 fp1 fn2 -> 0.4; others 0.
    assert m.macro_f1_itt.estimate == pytest.approx(0.2)
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
    assert per[L].f1.estimate == 0.0 and per[L].precision == 0.0
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
    m = stats.compute_metrics(recs, personas, n_boot=20, differences=False).get(
        "b", "s", "chat_email"
    )
    sc = [r for r in recs if r.prediction is not None]
    y, yp = [r.persona for r in sc], [r.prediction for r in sc]
    if sc:
        want = f1_score(y, yp, labels=personas, average="macro", zero_division=0)
        assert m.macro_f1.estimate == pytest.approx(want, abs=1e-12)
        assert m.accuracy.estimate == pytest.approx(accuracy_score(y, yp), abs=1e-12)
        per = f1_score(y, yp, labels=personas, average=None, zero_division=0)
        assert [p.f1.estimate for p in m.per_persona] == pytest.approx(list(per), abs=1e-12)
    ya, ypa = [r.persona for r in recs], [r.prediction or "__none__" for r in recs]
    want_itt = f1_score(ya, ypa, labels=personas, average="macro", zero_division=0)
    assert m.macro_f1_itt.estimate == pytest.approx(want_itt, abs=1e-12)
    assert m.accuracy_itt.estimate == pytest.approx(accuracy_score(ya, ypa), abs=1e-12)


def test_itt_never_above_conditional_accuracy_and_equal_without_missing():
    recs = _hand_records()
    full = [r for r in recs if r.prediction is not None]
    m = stats.compute_metrics(full, [S, H, RM, L], n_boot=20, differences=False).get(
        "b", "full", "id_chat"
    )
    assert m.macro_f1_itt == m.macro_f1  # same counts, same draw: identical intervals
    assert m.accuracy_itt.estimate == m.accuracy.estimate
    m2 = stats.compute_metrics(recs, [S, H, RM, L], n_boot=20, differences=False).get(
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
        want = f1_score(
            [r.persona for r in sc], [r.prediction for r in sc], labels=personas,
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
    m = stats.compute_metrics(recs, personas, n_boot=20, differences=False)
    base = m.get("b", "base", "id_chat")
    per = {p.persona: p for p in base.per_persona}
    assert per[S].recall == pytest.approx(1.0)  # the one scored base output says sarcasm
    assert per[H].recall == 0.0
    assert base.n_rows == 6 and base.n_clusters == 2


def test_cell_without_outputs_has_undefined_conditional_metrics(tmp_path):
    recs = [R("b", "s", "agentic_email", p, f"i{i}", None) for i in range(4) for p in (S, H)]
    recs.append(R("b", "s", "chat_email", S, "i0", S))
    res = stats.compute_metrics(recs, [S, H], n_boot=50)
    m = res.get("b", "s", "agentic_email")
    assert math.isnan(m.macro_f1.estimate) and math.isnan(m.accuracy.estimate)
    assert math.isnan(m.per_persona[0].f1.estimate)
    assert m.macro_f1_itt == stats.Interval(0.0, 0.0, 0.0) and m.yield_.estimate == 0.0
    stats.write_tables(res, tmp_path)
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
                recs, ("b", "s", "chat_email"), ("b", "s", "agentic_email"), metric, itt,
                n_boot=200, method=method,
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
        recs, ("b", "full", "chat_email"), ("b", "full", "agentic_email"), "accuracy", n_boot=500
    )
    want = accuracy_score([r.persona for r in a], [r.prediction for r in a]) - accuracy_score(
        [r.persona for r in b], [r.prediction for r in b]
    )
    assert d.estimate == pytest.approx(want, abs=1e-12)
    assert d.lo < 0.2 < d.hi  # the true shift is 0.8 * 0.25 = 0.2
    assert d.lo > 0.1
    unpaired = stats.paired_difference(
        recs, ("b", "full", "chat_email"), ("b", "full", "agentic_email"), "accuracy",
        n_boot=500, paired=False,
    )  # fmt: skip
    assert not unpaired.paired and unpaired.estimate == pytest.approx(d.estimate)
    assert (d.hi - d.lo) < 0.7 * (unpaired.hi - unpaired.lo)


def test_paired_difference_needs_shared_items():
    recs = [R("b", "s", "id_chat", S, "p1", S), R("b", "s", "chat_email", S, "s1", S)]
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


def test_ladder_decomposition_paired_and_unpaired_rungs():
    recs = _ladder_records()
    lad = stats.ladder_decomposition(recs, "llama", "full", n_boot=300)
    assert lad is not None
    assert lad.slices == ["id_chat", "chat_email", "tool_email_oneshot", "agentic_email"]
    assert [r.paired for r in lad.rungs] == [False, True, True]
    assert "unpaired" in lad.rungs[0].note
    assert lad.rungs[0].n_clusters == 40 + 25 and lad.rungs[1].n_clusters == 25
    res = stats.compute_metrics(recs, [S, H, RM], n_boot=300, differences=False)
    f = {c.slice: m.macro_f1.estimate for c, m in res.cells.items()}
    assert lad.total.estimate == pytest.approx(f["id_chat"] - f["agentic_email"])
    assert sum(r.estimate for r in lad.rungs) == pytest.approx(lad.total.estimate)
    for r in lad.rungs + [lad.total]:
        assert r.lo <= r.estimate <= r.hi
    itt = stats.ladder_decomposition(recs, "llama", "full", itt=True, n_boot=100)
    assert itt is not None and itt.itt and itt.total.estimate != lad.total.estimate
    assert stats.ladder_decomposition(recs, "llama", "full", ["id_chat"], n_boot=10) is None


def test_compute_metrics_differences_cover_ladders_and_stages():
    recs = _ladder_records()
    recs += [R("llama", "base", r.slice, NULL_PERSONA, r.item_id, S) for r in recs[::3]]
    res = stats.compute_metrics(recs, [S, H, RM], n_boot=100)
    kinds = {d.kind for d in res.differences}
    assert kinds == {"ladder_rung", "ladder_total", "stage"}
    stage_rows = [d for d in res.differences if d.kind == "stage"]
    assert all(d.a.stage == "full" and d.b.stage == "base" and d.paired for d in stage_rows)
    assert len(res.ladders) == 2 * 2 * 2  # 2 stages x 2 metrics x (conditional, ITT)


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
    stats.write_tables(res, tmp_path)
    with (tmp_path / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == stats.METRICS_COLUMNS
    assert len(rows) == 4
    first = rows[0]
    assert first["slice"] == "id_chat" and int(first["n_rows"]) == 40 * 3
    assert float(first["macro_f1_lo"]) <= float(first["macro_f1"]) <= float(first["macro_f1_hi"])
    with (tmp_path / "per_persona.csv").open() as fh:
        per = list(csv.DictReader(fh))
    assert tuple(per[0].keys()) == stats.PER_PERSONA_COLUMNS and len(per) == 4 * 3
    with (tmp_path / "confusion.csv").open() as fh:
        conf = list(csv.DictReader(fh))
    assert len(conf) == 4 * 3 * 5
    assert sum(int(r["count"]) for r in conf if r["slice"] == "id_chat") == 120
    with (tmp_path / "differences.csv").open() as fh:
        diffs = list(csv.DictReader(fh))
    assert {d["kind"] for d in diffs} == {"ladder_rung", "ladder_total"}
    with (tmp_path / "pred_distribution.csv").open() as fh:
        dist = list(csv.DictReader(fh))
    assert any(d["label"] == "(no output)" for d in dist)
    assert json.loads((tmp_path / "stats.json").read_text())["cluster"] == "item_id"


# --------------------------------------------------------------------------- loader


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
    recs = stats.load_predictions_jsonl(p)
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
        stats.load_predictions_jsonl(p)
    assert " line 2:" in str(err.value)


def test_load_predictions_bad_json_and_empty(tmp_path):
    p = _write(tmp_path, ['{"base": "b",'])
    with pytest.raises(PredictionsError, match=r" line 1: not valid JSON"):
        stats.load_predictions_jsonl(p)
    p = _write(tmp_path, ["[1, 2]"])
    with pytest.raises(PredictionsError, match="JSON object"):
        stats.load_predictions_jsonl(p)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(PredictionsError, match="empty"):
        stats.load_predictions_jsonl(empty)
    with pytest.raises(PredictionsError, match="not found"):
        stats.load_predictions_jsonl(tmp_path / "nope.jsonl")
