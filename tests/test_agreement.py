"""Do the scorers agree (`charshift.stats.agreement`): simulations with a known truth, the
no-effect case included, the rows a missing reading leaves out, and the sign categories."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from charshift.schema import PredictionRecord
from charshift.stats import agreement as ag
from charshift.stats.intervals import Opts
from charshift.stats.results import Cell, Difference, MetricsResult

PERSONAS = ("sarcasm", "humor")
OPTS = Opts(n_boot=400, ci=0.95, method="percentile", seed=0, min_clusters=10)


def _rec(item: int, j: int, pred: str | None, **kw: object) -> PredictionRecord:
    persona = PERSONAS[j % 2]
    return PredictionRecord(
        base="b", stage="prompted", slice="id_chat", persona=persona, item_id=f"q{item}",
        prediction=pred, sample_idx=j // 2, **kw,
    )  # fmt: skip


def _label(persona: str, ok: bool, wrong: str = "") -> str:
    return persona if ok else (wrong or next(p for p in PERSONAS if p != persona))


def _kappa_records(rng: np.random.Generator, rho: float, n_items: int = 60, per: int = 4):
    """Classifier and identify-judge correctness sharing a draw with item probability rho_i
    (mean `rho`), else independent, marginals 1/2: the population kappa is `rho` exactly."""
    cls, jud = [], []
    for i in range(n_items):
        rho_i = rng.beta(8 * rho, 8 * (1 - rho)) if 0 < rho < 1 else rho
        for j in range(per):
            s = rng.random() < 0.5
            a, b = (s, s) if rng.random() < rho_i else (rng.random() < 0.5, rng.random() < 0.5)
            p = PERSONAS[j % 2]
            cls.append(_rec(i, j, _label(p, a)))
            jud.append(_rec(i, j, _label(p, b, wrong="none" if j % 3 else "")))
    return {"classifier": cls, "judge_identify": jud}


def _spearman_records(rng: np.random.Generator, shared: bool, n_items: int = 60, per: int = 4):
    """Classifier p(true) = sigmoid(u_i + e) and a text projection v_i + e' with item effects:
    with `shared` (v = u) the population Spearman is 6/pi asin(1/4), else 0."""
    cls, vec = [], []
    for i in range(n_items):
        u = rng.normal()
        v = u if shared else rng.normal()
        for j in range(per):
            x, y = u + rng.normal(), v + rng.normal()
            p = PERSONAS[j % 2]
            q = 1 / (1 + math.exp(-x))
            cls.append(_rec(i, j, p, probs={p: q, _label(p, False): 1 - q}))
            vec.append(_rec(i, j, p, scores={p: y, _label(p, False): -y}))
    return {"classifier": cls, "persona_vector_text": vec}


def _only(rows: list[ag.ReadingAgreement], statistic: str) -> ag.ReadingAgreement:
    (row,) = [r for r in rows if r.statistic == statistic]
    return row


def _coverage(make, statistic: str, truth: float, reps: int = 40) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    hits, ests = 0, []
    for _ in range(reps):
        row = _only(ag.reading_agreement(make(rng), OPTS), statistic)
        v = row.value
        ests.append(v.estimate)
        hits += v.lo <= truth <= v.hi
    return hits / reps, float(np.mean(ests))


def test_the_weighted_statistics_are_those_of_the_repeated_sample():
    """A resample weights each row by how often its item was drawn: its kappa and Spearman are
    exactly those of the sample with the rows repeated (ties included)."""
    rng = np.random.default_rng(0)
    x = rng.integers(1, 6, 30).astype(float)  # Likert-like: many ties
    y = x + rng.normal(0, 2, 30)
    a, b = (rng.random(30) < 0.5).astype(float), (rng.random(30) < 0.6).astype(float)
    w = rng.integers(0, 4, (5, 30)).astype(float)
    rho = ag.weighted_spearman(x, y, w)
    kap = ag.weighted_kappa(a, b, w)
    for k in range(5):
        rep = np.repeat(np.arange(30), w[k].astype(int))
        assert rho[k] == pytest.approx(spearmanr(x[rep], y[rep]).statistic, abs=1e-9)
        ra, rb = a[rep], b[rep]
        pa, pb, po = ra.mean(), rb.mean(), (ra == rb).mean()
        pe = pa * pb + (1 - pa) * (1 - pb)
        assert kap[k] == pytest.approx((po - pe) / (1 - pe), abs=1e-9)


def test_scorers_reading_one_latent_recover_kappa_and_spearman():
    """(a) Known truth: kappa 0.6, Spearman 6/pi asin(1/4) = 0.483; the estimates centre on
    them and the 95% cluster-bootstrap intervals cover them in most of 40 simulations."""
    cover, mean = _coverage(lambda r: _kappa_records(r, 0.6), ag.KAPPA, 0.6)
    assert abs(mean - 0.6) < 0.05 and cover >= 0.85, (cover, mean)
    truth = 6 / math.pi * math.asin(0.25)
    cover, mean = _coverage(lambda r: _spearman_records(r, True), ag.SPEARMAN, truth)
    assert abs(mean - truth) < 0.05 and cover >= 0.85, (cover, mean)


def test_independent_scorers_cover_zero():
    """(b) The no-effect case: independent correctness (kappa 0) and independent readings with
    item effects of their own (Spearman 0): the intervals cover 0 in most simulations."""
    cover, mean = _coverage(lambda r: _kappa_records(r, 0.0), ag.KAPPA, 0.0)
    assert abs(mean) < 0.05 and cover >= 0.85, (cover, mean)
    cover, mean = _coverage(lambda r: _spearman_records(r, False), ag.SPEARMAN, 0.0)
    assert abs(mean) < 0.05 and cover >= 0.85, (cover, mean)


def test_a_constant_reading_is_undefined_not_zero(tmp_path):
    """(c) A classifier right on every row: kappa is undefined (an empty cell), never 0; a
    Likert judge giving 3 to everything: Spearman undefined."""
    from charshift.tables import write_agreement

    recs = _kappa_records(np.random.default_rng(0), 0.5, n_items=12)
    recs["classifier"] = [_rec(i, j, PERSONAS[j % 2]) for i in range(12) for j in range(4)]
    recs["judge_likert"] = [_rec(i, j, None, judge_score=3.0) for i in range(12) for j in range(4)]
    rows = ag.reading_agreement(recs, OPTS)
    kappa = _only(rows, ag.KAPPA)
    assert math.isnan(kappa.value.estimate) and "constant" in kappa.value.flag
    assert kappa.n_pairs == 48 and not kappa.value.has_interval
    rho = _only(rows, ag.SPEARMAN)
    assert (rho.reading_a, rho.reading_b) == ("p_true", "score")
    # the classifier gave no probabilities here: p(true) is a missing reading on every row
    assert rho.n_pairs == 0 and rho.missing_a == 48 and math.isnan(rho.value.estimate)
    out = ag.Agreement(["classifier", "judge_identify"], rows)
    path = write_agreement(out, tmp_path)[0]
    import csv

    with path.open() as fh:
        table = list(csv.DictReader(fh))
    cell = next(r for r in table if r["statistic"] == "kappa")
    assert cell["estimate"] == "" and cell["lo"] == "" and "constant" in cell["flag"]


def test_missing_readings_are_counted_not_dropped():
    """(d) Rows without both readings are left out and counted, per scorer; base-stage rows (no
    true persona) are not in the pool at all."""
    recs = _kappa_records(np.random.default_rng(3), 0.5, n_items=20)
    cls, jud = recs["classifier"], recs["judge_identify"]
    for r in jud[:7]:
        r.prediction = None  # unparseable judge answers
    for r in cls[5:9]:
        r.prediction = None  # no output: rows 5, 6 miss both readings
    del jud[-3:]  # not judged yet
    cls.append(PredictionRecord("b", "base", "id_chat", "__null__", "q0", "humor"))
    row = _only(ag.reading_agreement(recs, OPTS), ag.KAPPA)
    assert (row.missing_a, row.missing_b) == (4, 10)
    assert row.n_left_out == 7 + 2 + 3 == 80 - row.n_pairs
    # items q0 and q1 (rows 0-7) keep no pair: 18 of 20 items carry the estimate
    assert row.stages == ("prompted",) and row.value.n_clusters == 18


def _diff(stage: str, to: str, est: float, lo: float, hi: float, **kw: object) -> Difference:
    base = dict(kind="rung", a=Cell("b", stage, "chat_email"), b=Cell("b", stage, to),
                metric=ag.EXCESS, itt=False, estimate=est, lo=lo, hi=hi, n_clusters=20,
                paired=True, chain="agentic")  # fmt: skip
    return Difference(**{**base, **kw})  # type: ignore[arg-type]


def _result(diffs: list[Difference]) -> MetricsResult:
    return MetricsResult(list(PERSONAS), {}, [], {}, 400, 0.95, "percentile", 0,
                         differences=diffs)  # fmt: skip


def test_sign_agreement_categories():
    """(e) Constructed differences: both intervals above 0 agree, opposite signs disagree, an
    interval containing 0 (or none, or a blind scorer, or no such rung) is inconclusive, with
    the scorer that found the change named; ITT, other metrics and the base stage are not read."""
    units = ["u1", "u2", "u3", "u4", "u5", "u6"]
    cls = [_diff("prompted", u, 0.3, 0.1, 0.5) for u in units[:5]]
    cls.append(_diff("prompted", "u6", -0.3, -0.5, -0.1))
    jud = [
        _diff("prompted", "u1", 0.2, 0.05, 0.4),  # agree
        _diff("prompted", "u2", -0.2, -0.4, -0.05),  # disagree
        _diff("prompted", "u3", 0.05, -0.1, 0.2),  # contains 0
        _diff("prompted", "u4", 0.3, 0.1, 0.5, blind=("u4",)),  # blind
        _diff("prompted", "u5", 0.3, 0.3, 0.3, n_clusters=1),  # one item: no interval
        _diff("prompted", "u6", -0.2, -0.4, -0.1),  # both gain: agree
        _diff("prompted", "u1", 0.3, 0.1, 0.5, itt=True),
        _diff("prompted", "u1", 0.3, 0.1, 0.5, metric="accuracy"),
        _diff("base", "u1", 0.3, 0.1, 0.5),
    ]
    rows = ag.sign_agreement({"classifier": _result(cls), "judge_identify": _result(jud)})
    got = {r.to: (r.verdict_a, r.verdict_b, r.agreement, r.one_sided) for r in rows}
    assert got == {
        "u1": ("loss", "loss", "agree", ""),
        "u2": ("loss", "gain", "disagree", ""),
        "u3": ("loss", "contains 0", "inconclusive", "classifier"),
        "u4": ("loss", "blind", "inconclusive", ""),
        "u5": ("loss", "no interval", "inconclusive", ""),
        "u6": ("gain", "gain", "agree", ""),
    }
    gone = ag.sign_agreement({"classifier": _result(cls[:1]), "judge_identify": _result([])})
    assert [(r.verdict_b, r.agreement) for r in gone] == [("absent", "inconclusive")]


def test_one_scorer_compares_nothing():
    recs = _kappa_records(np.random.default_rng(0), 0.5, n_items=4)
    one = ag.compute_agreement({"classifier": recs["classifier"]}, {}, OPTS)
    assert one.scorers == ["classifier"] and not one.compared and not one.readings
    # a judge that never answered is present: every row is left out, and counted
    silent = [_rec(i, j, None) for i in range(4) for j in range(4)]
    two = ag.compute_agreement({**recs, "judge_identify": silent}, {}, OPTS)
    assert two.scorers == ["classifier", "judge_identify"] and two.compared
    (row,) = two.readings
    assert (row.n_pairs, row.n_left_out, row.missing_b) == (0, 16, 16)
    assert math.isnan(row.value.estimate) and row.value.flag == "undefined: no paired rows"


EVIL = "b<i>|`x"


def _ladder_records(good: str, rng: np.random.Generator) -> list[PredictionRecord]:
    """Persona rows of base EVIL in id_chat and id_chat.short (a contrast): the scorer names
    the persona on every row of unit `good` and guesses at random in the other."""
    out = []
    for unit in ("id_chat", "id_chat.short"):
        for i in range(20):
            for j in range(2):
                p = PERSONAS[j]
                pred = p if unit == good else PERSONAS[int(rng.integers(2))]
                out.append(PredictionRecord(EVIL, "full", unit, p, f"q{i}", pred))
    return out


def _analyse(out, records, result, agreement):
    from charshift import analysis
    from charshift.config import StatsConfig

    inp = analysis.AnalysisInput(records=records, personas=list(PERSONAS), stats=StatsConfig(),
                                 title="t", settings={}, control=None, agreement=agreement)  # fmt: skip
    return analysis.analyse(inp, out, result)


def test_bca_intervals_come_from_the_cluster_jackknife():
    recs = _spearman_records(np.random.default_rng(2), True)
    bca = Opts(n_boot=400, ci=0.95, method="bca", seed=0, min_clusters=10)
    v = _only(ag.reading_agreement(recs, bca), ag.SPEARMAN).value
    p = _only(ag.reading_agreement(recs, OPTS), ag.SPEARMAN).value
    assert v.estimate == p.estimate and v.lo < v.estimate < v.hi and v.reliable
    assert (v.lo, v.hi) != (p.lo, p.hi)


def test_a_disagreement_reaches_the_report_and_the_headline(tmp_path):
    """Simulated: the classifier reads persona at id_chat and not in the short cut (a loss);
    the judge the other way round (a gain). The statistics find both, the pair disagrees, and
    the report's section and the headline's one line name it, every name escaped."""
    from charshift import report, stats

    rng = np.random.default_rng(0)
    recs = {"classifier": _ladder_records("id_chat", rng),
            "judge_identify": _ladder_records("id_chat.short", rng)}  # fmt: skip
    res = {n: stats.compute_metrics(r, list(PERSONAS), n_boot=200, n_perm=0, control=None)
           for n, r in recs.items()}  # fmt: skip
    agreement = ag.compute_agreement(recs, res, OPTS)
    (sign,) = [s for s in agreement.signs if s.to == "id_chat.short"]
    assert (sign.verdict_a, sign.verdict_b, sign.agreement) == ("loss", "gain", "disagree")
    line = report.headline_text(res["classifier"], report.HeadlineContext(agreement=agreement))
    said = [s for s in line if s.startswith("The scorers disagree")]
    assert len(said) == 1 and "classifier loses persona" in said[0]
    assert "judge_identify gains persona" in said[0] and "id_chat -> id_chat.short" in said[0]
    path = _analyse(tmp_path, recs["classifier"], res["classifier"], agreement)
    page, md = path.read_text(encoding="utf-8"), (tmp_path / "report.md").read_text()
    assert (tmp_path / "agreement.csv").is_file() and (tmp_path / "agreement_signs.csv").is_file()
    assert 'id="agreement"' in page and "Do the scorers agree?" in md
    assert EVIL not in page and "b&lt;i&gt;|`x" in page
    assert report.md_escape(EVIL) in md and EVIL not in md
    assert "disagree" in page[page.index('id="agreement"') :]
    alone = ag.compute_agreement({"classifier": recs["classifier"]}, res, OPTS)
    alone_dir = tmp_path / "alone"
    _analyse(alone_dir, recs["classifier"], res["classifier"], alone)
    md = (alone_dir / "report.md").read_text()
    assert not (alone_dir / "agreement.csv").exists()  # one scorer: nothing written
    assert "One scorer (classifier) gave these figures" in md
    assert "The scorers disagree" not in md
