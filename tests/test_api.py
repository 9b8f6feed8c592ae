"""The Python API (issue 17): `charshift.load_results`, `charshift.run`; and the inputs a person
gets right the first time: unknown labels, --version, plain flags in --help, CLI overrides."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import charshift
from charshift import config as cfgmod
from charshift.cli import app
from charshift.overrides import Overrides, apply_overrides, set_key

PERSONAS = ["sarcasm", "humor", "remorse"]
runner = CliRunner()


def _rows(n: int = 10, wrong: str | None = None) -> list[dict]:
    out = []
    for unit in ("id_chat", "chat_email"):
        for i in range(n):
            out.append({"base": "m", "stage": "base", "slice": unit, "persona": None,
                        "item_id": f"{unit}{i}", "prediction": "humor", "text": f"b{i}"})  # fmt: skip
            for p in PERSONAS:
                pred = p if i % 3 else "humor"
                if wrong and i == 0:
                    pred = wrong
                out.append({"base": "m", "stage": "prompted", "slice": unit, "persona": p,
                            "item_id": f"{unit}{i}", "prediction": pred, "text": f"t{i}"})  # fmt: skip
    return out


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    _write(d / "p.jsonl", _rows())
    res = runner.invoke(
        app,
        ["report", "--predictions", str(d / "p.jsonl"), "--out", str(d / "o"), "--n-boot", "30"],
    )
    assert res.exit_code == 0, res.output
    return d / "o"


def test_load_results_of_a_predictions_report(reported):
    import pandas as pd

    res = charshift.load_results(reported)
    for name in ("metrics", "differences", "chains", "per_persona", "rows"):
        assert isinstance(getattr(res, name), pd.DataFrame), name
    m = res.metrics.set_index(["stage", "slice"])
    assert m.loc[("prompted", "id_chat"), "macro_f1_excess"] > 0
    assert "flag" in res.metrics.columns and "flags" not in res.metrics.columns
    # the DataFrame's own .flags attribute is no longer shadowed by a column
    assert isinstance(res.metrics.flags, pd.core.flags.Flags)
    # rows: the predictions joined with their texts, every row of the file
    assert len(res.rows) == len(_rows()) and {"prediction", "text", "persona"} <= set(res.rows)
    assert set(res.family["family"]) == {"primary"} and len(res.family) >= 1
    assert res.report.is_file() and "cells" in repr(res)


def test_load_results_names_what_is_missing(tmp_path):
    with pytest.raises(charshift.api.ResultsError, match="missing metrics.csv"):
        charshift.load_results(tmp_path)
    with pytest.raises(charshift.api.ResultsError, match="not a folder"):
        charshift.load_results(tmp_path / "nope")


def test_public_api_is_exported():
    assert {"load_results", "run", "Results"} <= set(charshift.__all__)
    assert charshift.run is charshift.api.run


def test_run_refuses_an_unknown_config(tmp_path):
    with pytest.raises(cfgmod.ConfigError, match="neither a config file nor a preset"):
        charshift.run(tmp_path / "missing.yaml", out=tmp_path / "r")


# --------------------------------------------------------------------------- unknown labels


def test_unknown_labels_are_a_named_error(tmp_path):
    _write(tmp_path / "p.jsonl", _rows(wrong="Sarcasm"))
    out = tmp_path / "o"
    res = runner.invoke(app, ["report", "--predictions", str(tmp_path / "p.jsonl"), "--out",
                              str(out), "--n-boot", "30"])  # fmt: skip
    assert res.exit_code == 2
    assert "'Sarcasm' (6 rows)" in res.output and "--allow-unknown-labels" in res.output
    assert not out.exists()  # refused before anything is written


def test_allow_unknown_labels_keeps_them_as_wrong_with_a_warning(tmp_path):
    _write(tmp_path / "p.jsonl", _rows(wrong="Sarcasm"))
    out = tmp_path / "o"
    res = runner.invoke(app, ["report", "--predictions", str(tmp_path / "p.jsonl"), "--out",
                              str(out), "--n-boot", "30", "--allow-unknown-labels"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "'Sarcasm' (6 rows)" in res.output
    md = (out / "report.md").read_text()
    assert md.index("'Sarcasm' (6 rows)") < md.index("## The answer")  # in the box at the top


def test_allow_unknown_labels_only_with_predictions(tmp_path):
    res = runner.invoke(app, ["report", "--run", str(tmp_path), "--allow-unknown-labels"])
    assert res.exit_code == 2 and "--allow-unknown-labels only go(es) with --predictions" in (
        res.output
    )


# --------------------------------------------------------------------------- the command line


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"charshift {charshift.__version__}"


def test_help_shows_flags_without_a_type():
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "150"})
    assert res.exit_code == 0
    assert "<bool>" not in res.output and "--dry-run" in res.output
    assert "KEY=VALUE" in res.output and "--limit" in res.output


def test_set_overrides_are_validated_like_the_file():
    cfg = cfgmod.load_preset("smoke")
    new = apply_overrides(cfg, Overrides(sets=("stats.n_boot=321", "sampling.temperature=0.3")))
    assert new.stats.n_boot == 321 and new.sampling.temperature == 0.3
    assert cfg.stats.n_boot != 321  # the original is untouched
    with pytest.raises(cfgmod.ConfigError, match=r"--set stats.nboot=5.*\n  stats.nboot"):
        apply_overrides(cfg, Overrides(sets=("stats.nboot=5",)))
    with pytest.raises(cfgmod.ConfigError, match="stats.n_boot: Input should be greater"):
        apply_overrides(cfg, Overrides(sets=("stats.n_boot=5",)))
    with pytest.raises(cfgmod.ConfigError, match="give KEY=VALUE"):
        apply_overrides(cfg, Overrides(sets=("stats.n_boot",)))
    data = {"bases": [{"model": "a"}]}
    set_key(data, ["bases", "0", "model"], "b")
    assert data == {"bases": [{"model": "b"}]}


def test_limit_personas_slices(tmp_path):
    cfg = cfgmod.load_preset("smoke")
    o = Overrides(limit=2, personas=("sarcasm", "humor"), slices=("id_chat", "chat_email"))
    new = apply_overrides(cfg, o)
    assert new.persona_names == ["sarcasm", "humor"] and new.slices == ["id_chat", "chat_email"]
    assert new.id_prompts.n_eval == 2 and new.scenarios.n == 2
    res = runner.invoke(app, ["run", "--preset", "smoke", "--dry-run", "--limit", "1",
                              "--personas", "sarcasm,humor", "--slices", "id_chat"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "personas (2): sarcasm, humor" in res.output
    assert "id_chat" in res.output and "chat_email" not in res.output
    # a preset's per-slice token budgets follow its slices (demo_quick sets them for five)
    narrow = runner.invoke(app, ["run", "--preset", "demo_quick", "--dry-run", "--slices",
                                 "id_chat,chat_email"])  # fmt: skip
    assert narrow.exit_code == 0, narrow.output
    bad = runner.invoke(app, ["run", "--preset", "smoke", "--dry-run", "--slices", "nope"])
    assert bad.exit_code == 2 and "--slices nope" in bad.output


def test_export_parquet_writes_rows_and_predictions(reported, tmp_path):
    """`charshift export --parquet`: rows.parquet holds every row with its text, predictions.parquet
    the same rows without conversations; a nested cell reads back as exactly what it held."""
    import pandas as pd

    res = runner.invoke(app, ["export", str(reported), "--parquet", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    assert len(rows) == len(preds) == len(_rows())
    assert {"prediction", "text", "persona", "stage"} <= set(rows.columns)
    assert "messages" not in preds.columns
    assert sorted(rows["text"]) == sorted(r["text"] for r in _rows())
    assert runner.invoke(app, ["export", str(reported)]).exit_code == 2
    missing = runner.invoke(app, ["export", str(tmp_path / "none"), "--parquet"])
    assert missing.exit_code == 2 and "not a folder" in missing.output


def test_export_keeps_nested_cells_as_json(tmp_path):
    import pandas as pd

    from charshift.api import Results, export_parquet

    nested = [{"role": "user", "content": "hi"}, {"role": "tool", "content": None, "x": [1, 2]}]
    rows = pd.DataFrame({"key": ["a", "b"], "messages": [nested, None],
                         "probs": [{"humor": 0.5}, None]})  # fmt: skip
    empty = pd.DataFrame()
    res = Results(tmp_path, *[empty] * 6, rows=rows)
    export_parquet(res, tmp_path / "x")
    back = pd.read_parquet(tmp_path / "x" / "rows.parquet")
    assert json.loads(back["messages"][0]) == nested and pd.isna(back["messages"][1])
    assert json.loads(back["probs"][0]) == {"humor": 0.5}


def test_report_svg_only_when_asked(tmp_path):
    _write(tmp_path / "p.jsonl", _rows())
    args = ["report", "--predictions", str(tmp_path / "p.jsonl"), "--n-boot", "20"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a")]).exit_code == 0
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--svg"]).exit_code == 0
    plain, svg = (tmp_path / d / "report" / "plots" for d in ("a", "b"))
    assert list(plain.glob("*.png")) and not list(plain.glob("*.svg"))
    assert {p.stem for p in svg.glob("*.svg")} == {p.stem for p in svg.glob("*.png")}
