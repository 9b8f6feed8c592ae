"""Issue 15 item 5: the prior study's per-persona figures, on chance-corrected measures.

Planted data with a known truth: in `id_chat` the trained stage shows `sarcasm` and `pirate`
perfectly and `humor` not at all beyond chance; in `chat_email` the scorer predicts one label
whatever the persona (and so does the positive control: a blind unit). The per-persona excess,
the depth (mean over units), its CSV and the figures must recover that, reading the stats
result only.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from charshift import plots, stats, tables
from charshift.schema import NULL_PERSONA, PROMPTED_EXPLICIT_STAGE
from charshift.schema import PredictionRecord as R

PERSONAS = ["sarcasm", "humor", "pirate"]
N_ITEMS = 14


def _id_pred(stage: str, true: str, i: int) -> str:
    """id_chat: sarcasm and pirate shown; humor's predictions ignore it (a fixed rotation)."""
    if stage == PROMPTED_EXPLICIT_STAGE or true != "humor":
        return true
    return PERSONAS[i % 3]


def _records(bases: tuple[str, ...] = ("b",)) -> list[R]:
    out = []
    for b in bases:
        for unit, pre in (("id_chat", "p"), ("chat_email", "s"), ("chat_email.whole", "s")):
            for i in range(N_ITEMS):
                item = f"{pre}{i}"
                out.append(
                    R(b, "base", unit, NULL_PERSONA, item, PERSONAS[i % 2], key=f"{b}{unit}{i}")
                )
                for stage in ("full", PROMPTED_EXPLICIT_STAGE):
                    for t in PERSONAS:
                        if unit == "id_chat":
                            pred = _id_pred(stage, t, i + PERSONAS.index(t))
                        elif unit == "chat_email":
                            pred = "humor"  # the scorer sees nothing here
                        else:
                            pred = t  # the whole reply: a variant, never part of the depth
                        out.append(R(b, stage, unit, t, item, pred, key=f"{b}{unit}{i}{stage}{t}"))
    return out  # fmt: skip


@pytest.fixture(scope="module")
def result() -> stats.MetricsResult:
    return stats.compute_metrics(_records(("b", "c")), PERSONAS, n_boot=200, n_perm=50)


def _pm(res: stats.MetricsResult, base: str, stage: str, unit: str, persona: str):
    cell = res.get(base, stage, unit)
    assert cell is not None
    return next(p for p in cell.per_persona if p.persona == persona)


def test_per_persona_excess_recovers_the_planted_truth(result):
    assert _pm(result, "b", "full", "id_chat", "sarcasm").f1_excess.above_zero
    assert _pm(result, "b", "full", "id_chat", "pirate").f1_excess.above_zero
    for p in PERSONAS:  # predictions independent of the persona: exactly 0, never detected
        iv = _pm(result, "b", "full", "chat_email", p).f1_excess
        assert iv.estimate == pytest.approx(0.0, abs=1e-12) and not iv.above_zero
        base = _pm(result, "b", "base", "id_chat", p).f1_excess
        assert base.fixed_by_construction and base.estimate == pytest.approx(0.0, abs=1e-12)
    assert result.blind("b", "chat_email") and not result.blind("b", "id_chat")


def test_per_persona_excess_averages_to_the_cell_excess(result):
    for cell in result.cells.values():
        vals = [p.f1_excess.estimate for p in cell.per_persona if p.n_scored]
        assert np.mean(vals) == pytest.approx(cell.macro_f1_excess.estimate, abs=1e-12)
        for p in cell.per_persona:
            iv = p.f1_excess
            if not iv.fixed_by_construction and math.isfinite(iv.lo):
                assert iv.lo <= iv.estimate <= iv.hi


def test_depth_is_the_mean_over_plain_units_and_marks_blind_ones(result):
    rows = {(d.base, d.stage, d.persona): d for d in result.depth}
    # trained stages only: neither the base stage nor the positive control
    assert set(rows) == {(b, "full", p) for b in ("b", "c") for p in PERSONAS}
    for p in PERSONAS:
        d = rows["b", "full", p]
        home = _pm(result, "b", "full", "id_chat", p).f1_excess.estimate
        email = _pm(result, "b", "full", "chat_email", p).f1_excess.estimate
        assert d.units == ("id_chat", "chat_email")  # chat_email.whole is a variant
        assert d.depth == pytest.approx((home + email) / 2)
        assert (d.depth_not_blind, d.n_units_not_blind) == (pytest.approx(home), 1)
    assert rows["b", "full", "sarcasm"].n_detected == 1
    assert rows["b", "full", "sarcasm"].depth > rows["b", "full", "humor"].depth


def test_depth_csv_is_written_atomically_from_the_result(result, tmp_path, monkeypatch):
    written = []
    real = tables.write_atomic

    def spy(path, text, *a, **k):
        written.append(path.name)
        return real(path, text, *a, **k)

    monkeypatch.setattr(tables, "write_atomic", spy)
    tables.write_tables(result, tmp_path)
    assert "depth.csv" in written
    with (tmp_path / "depth.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert tuple(got[0]) == tables.DEPTH_COLUMNS and len(got) == len(result.depth)
    for row, d in zip(got, result.depth, strict=True):
        assert (row["base"], row["stage"], row["persona"]) == (d.base, d.stage, d.persona)
        assert float(row["depth"]) == pytest.approx(d.depth, rel=1e-5)
        assert row["units"] == "id_chat chat_email"
    assert not list(tmp_path.glob("*.tmp*"))
    with (tmp_path / "per_persona.csv").open() as fh:
        per = list(csv.DictReader(fh))
    assert {"f1_excess", "f1_excess_lo", "f1_excess_hi"} <= set(per[0])


def test_the_figures_show_the_stats_result(result):
    specs = {stem: (cap, build) for stem, cap, build in plots.figure_specs(result)}
    traj = [s for s in specs if s.startswith("trajectory_")]
    heat = [s for s in specs if s.startswith("persona_unit_")]
    assert len(traj) == len(PERSONAS) and len(heat) == 2 and "depth" in specs
    assert all("0 by construction" in specs[s][0] for s in heat)
    fig = specs[plots.figure_stem("persona_unit", "b")][1]()
    shown = np.ma.filled(fig.axes[0].images[0].get_array(), np.nan)
    personas, units, data, above = plots.persona_unit_matrix(result, "b", "full")
    assert units == ["id_chat", "chat_email"] and personas == PERSONAS
    np.testing.assert_allclose(shown, data)
    assert data[0, 0] == _pm(result, "b", "full", "id_chat", "sarcasm").f1_excess.estimate
    assert above[0, 0] and not above[:, 1].any()
    fig = specs[plots.figure_stem("trajectory", "sarcasm")][1]()
    line = fig.axes[0].lines[0]  # base b, unit id_chat, stages base -> full
    want = [
        _pm(result, "b", st, "id_chat", "sarcasm").f1_excess.estimate for st in ("base", "full")
    ]
    np.testing.assert_allclose(line.get_ydata(), want)
    rows, cols, depth = plots.depth_matrix(result)
    assert rows == ["b/full", "c/full"] and cols == PERSONAS
    by = {(f"{d.base}/{d.stage}", d.persona): d.depth for d in result.depth}
    assert depth[1, 2] == by["c/full", "pirate"]


def test_no_persona_anywhere_gives_no_depth():
    """No persona in any output (predictions ignore it): every depth is 0 and nothing is
    detected."""
    recs = [
        R(r.base, r.stage, r.slice, r.persona, r.item_id, "humor", key=r.key) for r in _records()
    ]
    res = stats.compute_metrics(recs, PERSONAS, n_boot=100, n_perm=20)
    assert res.depth and all(abs(d.depth) < 1e-12 and d.n_detected == 0 for d in res.depth)


def test_the_report_shows_the_figures_and_the_depth_table(result, tmp_path):
    from charshift import report

    recs = _records(("b", "c"))
    page = report.write_report(
        tmp_path / "out", recs, result, settings={}, samples=None, title="depth"
    ).read_text()
    for caption in (
        "sarcasm: F1 excess over its own null per unit across stages",
        "b: persona x unit, trained minus base",
        "Depth per base, stage and persona",
    ):
        assert caption in page, caption  # fmt: skip
    plots_dir = tmp_path / "out" / "report" / "plots"
    assert (plots_dir / "depth.png").is_file()
    assert (plots_dir / f"{plots.figure_stem('persona_unit', 'c')}.png").is_file()
    assert not list(plots_dir.glob("*.svg"))  # SVG only when asked for
    d = next(d for d in result.depth if (d.base, d.persona) == ("c", "pirate"))
    row = f"<td>c</td><td>full</td><td>pirate</td><td>{d.depth:.3f}</td>"
    assert row in page.replace("\n", "")
