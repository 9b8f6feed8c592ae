"""The answer first (issue 17): the summary table per base, its place at the top of the report
and the terminal, and honest small numbers (no interval behind fewer than two clusters)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from charshift import plots, report, stats, summary
from charshift.cli import app
from charshift.headline import fmt_diff, fmt_iv
from charshift.schema import NULL_PERSONA
from charshift.schema import PredictionRecord as R

PERSONAS = ["sarcasm", "humor", "remorse", "goodness"]
UNITS = {"id_chat": "p", "scenario_chat": "s", "chat_email": "s", "agentic_email": "s"}


def world(signal: dict[str, float], seed: int = 0, n: int = 14, one_item: str = "") -> list[R]:
    """Base outputs skewed to one label; `prompted` shows its persona with probability
    signal[unit] (else a uniform guess); the control `prompted_explicit` with 0.8 everywhere.
    `one_item`: a unit with a single item."""
    rng = np.random.default_rng(seed)
    out = []
    for unit, pre in UNITS.items():
        for it in [f"{pre}{i}" for i in range(1 if unit == one_item else n)]:
            out.append(R("llama", "base", unit, NULL_PERSONA, it,
                         str(rng.choice(PERSONAS, p=[0.7, 0.1, 0.1, 0.1])), key=f"{unit}{it}"))  # fmt: skip
            for stage, s in (("prompted", signal.get(unit, 0.0)), ("prompted_explicit", 0.8)):
                for t in PERSONAS:
                    pred = t if rng.random() < s else str(rng.choice(PERSONAS))
                    out.append(R("llama", stage, unit, t, it, pred))
    return out


@pytest.fixture(scope="module")
def planted() -> stats.MetricsResult:
    sig = {"id_chat": 0.9, "scenario_chat": 0.9, "chat_email": 0.85, "agentic_email": 0.05}
    return stats.compute_metrics(world(sig, n=20), PERSONAS, n_boot=200, n_perm=100)


@pytest.fixture(scope="module")
def null() -> stats.MetricsResult:
    return stats.compute_metrics(world({}, seed=1), PERSONAS, n_boot=200, n_perm=100)


def _row(t: summary.SummaryTable, stage: str) -> dict[str, str]:
    row = next(r for r in t.rows if r[0] == stage)
    return dict(zip(t.head, row, strict=True))


def test_one_row_per_trained_stage_with_the_family_figures(planted):
    (t,) = summary.summary_tables(planted)
    assert t.base == "llama" and [r[0] for r in t.rows] == ["prompted"]  # not base, not control
    row = _row(t, "prompted")
    home = next(d for d in planted.family if d.kind == "excess")
    # the numbers are the family's own (simultaneous band), never recomputed
    assert row["home ground (id_chat): excess"] == (
        f"{home.estimate:+.2f} [{home.lo_simul:+.2f}, {home.hi_simul:+.2f}] detected"
    )
    agentic = row["agentic loss (chat_email -> agentic_email)"]
    assert agentic.endswith(" lost"), agentic
    assert row["scorer check"] == "sees persona in 4 of 4 units"
    assert row["yield"] == "100% everywhere"


def test_no_effect_claims_nothing(null):
    (t,) = summary.summary_tables(null)
    row = _row(t, "prompted")
    assert row["home ground (id_chat): excess"].endswith("not detected")
    losses = [v for k, v in row.items() if k.endswith(")") and "loss" in k]
    assert len(losses) == 2 and all(v.endswith("no loss shown") for v in losses)
    verdicts = [c.rsplit("] ", 1)[-1] for c in t.rows[0][1:4]]
    assert verdicts == ["not detected", "no loss shown", "no loss shown"]


def test_report_and_markdown_open_with_the_answer_then_main_figure_then_prose(planted, tmp_path):
    recs = world({"id_chat": 0.9}, n=12)
    res = stats.compute_metrics(recs, PERSONAS, n_boot=50, n_perm=50)
    path = report.write_report(tmp_path, recs, res, settings={}, samples=None, title="t")
    page = path.read_text()
    answer, headline = page.index('id="answer"'), page.index('id="headline"')
    figure = page.index("<figure")
    assert answer < figure < headline < page.index('id="metrics"') < page.index('id="figures"')
    assert "macro-F1 excess over each cell" in page[figure : page.index("</figure>")]
    md = (tmp_path / "report.md").read_text()
    assert md.index("## The answer") < md.index("ladder_") < md.index("## Headline")
    assert md.index("## Headline") < md.index("## Metrics per cell")
    text = (tmp_path / "report" / "summary.txt").read_text()
    assert text == summary.summary_text(res) and "home ground (id_chat): excess" in text


def test_report_command_prints_the_same_table(tmp_path):
    recs = world({"id_chat": 0.9}, n=12)
    lines = [
        json.dumps({"base": r.base, "stage": r.stage, "slice": r.slice,
                    "persona": None if r.persona == NULL_PERSONA else r.persona,
                    "item_id": r.item_id, "prediction": r.prediction})
        for r in recs
    ]  # fmt: skip
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(
        app, ["report", "--predictions", str(f), "--out", str(tmp_path / "o"), "--n-boot", "50"]
    )
    assert res.exit_code == 0, res.output
    printed = (tmp_path / "o" / "report" / "summary.txt").read_text().rstrip("\n")
    assert printed in res.output and "home ground (id_chat): excess" in printed
    assert res.output.index(printed) < res.output.index("report: ")


# --------------------------------------------------------------------------- small numbers


def test_an_interval_behind_one_cluster_is_not_an_interval():
    one = stats.Interval(0.67, 0.67, 0.67, n_clusters=1)
    assert not one.has_interval and fmt_iv(one) == "0.670, interval n/a (1 item)"
    two = stats.Interval(0.67, 0.5, 0.8, n_clusters=2)
    assert two.has_interval and fmt_iv(two).startswith("0.670 [0.500, 0.800]")
    # no error bar at all, not a zero-width one
    err = plots._yerr([one, two])
    assert np.isnan(err[:, 0]).all() and np.allclose(err[:, 1], [0.17, 0.13])
    # its dagger sits on the bar, not on an end that is no interval
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    plots._daggers(ax, np.array([0.0]), [stats.Interval(0.5, 0.9, 0.9, n_clusters=1, flag="x")])
    (mark,) = ax.texts
    assert mark.get_position()[1] == pytest.approx(0.52)


def test_one_item_unit_prints_na_and_claims_nothing():
    recs = world(
        {"id_chat": 0.9, "chat_email": 0.9, "agentic_email": 0.9}, one_item="agentic_email"
    )
    res = stats.compute_metrics(recs, PERSONAS, n_boot=100, n_perm=50)
    cell = res.get("llama", "prompted", "agentic_email")
    assert cell.n_clusters == 1 and not cell.macro_f1_excess.has_interval
    check = res.scorer_check("llama", "agentic_email")
    assert check.scorer_blind is None and "n/a (1 item)" in check.note  # neither blind nor seeing
    total = next(d for d in res.family if d.chain == "agentic")
    assert not total.has_interval and fmt_diff(total).endswith("interval n/a (1 item)")
    row = _row(summary.summary_tables(res)[0], "prompted")
    assert row["agentic loss (chat_email -> agentic_email)"].endswith(
        "interval n/a (1 item) no claim"
    )
    lines = report.headline_text(res)
    assert not any("persona lost" in s for s in lines)
    scorer = next(s for s in lines if s.startswith("Scorer check"))
    assert "not checked: agentic_email (the positive control's interval is n/a (1 item))" in scorer
    _, md = report.render_report(report.prepare_report(recs, res, settings={}, samples=None,
                                                       title="t"))  # fmt: skip
    assert "0.67 [0.67, 0.67]" not in md and "n/a (1 item)" in md


def test_censoring_table_says_which_p_value_decides():
    recs = world({"id_chat": 0.9}, n=12)
    res = stats.compute_metrics(recs, PERSONAS, n_boot=30, n_perm=30)
    _, md = report.render_report(report.prepare_report(recs, res, settings={}, samples=None,
                                                       title="t"))  # fmt: skip
    head = next(line for line in md.splitlines() if "chi-square (dof)" in line)
    assert "p (permutation: used for the verdict)" in head
    assert "p (asymptotic: for reference, not used)" in head


def test_has_interval_rule():
    assert not stats.has_interval(1, 0.1, 0.2) and not stats.has_interval(5, math.nan, 0.2)
    assert stats.has_interval(2, 0.1, 0.2)
    assert (
        stats.no_interval_text(1) == "n/a (1 item)" and stats.no_interval_text(0) == "n/a (0 items)"
    )


def test_csv_leaves_the_ends_of_a_one_item_figure_empty(tmp_path):
    import csv

    from charshift import tables

    recs = world(
        {"id_chat": 0.9, "chat_email": 0.9, "agentic_email": 0.9}, one_item="agentic_email"
    )
    res = stats.compute_metrics(recs, PERSONAS, n_boot=50, n_perm=20)
    tables.write_tables(res, tmp_path)
    with open(tmp_path / "metrics.csv") as f:
        rows = {(r["stage"], r["slice"]): r for r in csv.DictReader(f)}
    one, many = rows[("prompted", "agentic_email")], rows[("prompted", "id_chat")]
    assert (
        one["macro_f1_excess"] != ""
        and one["macro_f1_excess_lo"] == one["macro_f1_excess_hi"] == ""
    )
    assert many["macro_f1_excess_lo"] != "" and float(many["macro_f1_excess_lo"]) > 0
    with open(tmp_path / "differences.csv") as f:
        total = next(r for r in csv.DictReader(f) if r["family"] == "primary"
                     and r["chain"] == "agentic")  # fmt: skip
    assert total["estimate"] != "" and total["lo"] == total["lo_simul"] == ""


def test_two_bases_two_tables_one_legend(tmp_path):
    import dataclasses

    recs = world({"id_chat": 0.9}, n=10)
    recs += [dataclasses.replace(r, base="qwen") for r in world({}, seed=4, n=10)]
    res = stats.compute_metrics(recs, PERSONAS, n_boot=50, n_perm=20)
    tables = summary.summary_tables(res)
    assert [t.base for t in tables] == ["llama", "qwen"]
    assert _row(tables[0], "prompted")["home ground (id_chat): excess"].endswith(" detected")
    assert _row(tables[1], "prompted")["home ground (id_chat): excess"].endswith("not detected")
    text = summary.summary_text(res)
    assert text.count(summary.legend(res)) == 1 and text.index("llama") < text.index("qwen")
    _, md = report.render_report(report.prepare_report(recs, res, settings={}, samples=None,
                                                       title="t"))  # fmt: skip
    answer = md[md.index("## The answer") : md.index("## Headline")]
    assert answer.count("### ") == 2 and answer.count(summary.legend(res)) == 1
