"""Tests of the scorer seam (charshift.scoring): the registry, the `scorers:` config, opening a
run's scorer, and folders written by an earlier charshift still loading and scoring the same.

`fixtures/lexical_probe_v1` and `fixtures/embedding_probe_v1` were written by the probe code as it
stood before the scoring package (charshift.probe, commit 525655b), with the predictions and the
identity it gave then beside them (`*.expected.json`). The embedding probe reads the packaged
MiniLM encoder and checks its weights against the recorded sha256, as any user's old probe folder
does.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

from charshift import config as cfgmod
from charshift import pipeline
from charshift.schema import stable_hash
from charshift.scoring.base import Scorer, ScorerContext, ScorerError, open_scorer
from charshift.scoring.classifier import load_classifier
from charshift.scoring.hf_classifier import Classifier
from charshift.scoring.registry import DEFAULT_SCORERS, SCORERS, check_scorer_names
from charshift.scoring.settings import TrainSettings
from charshift.store import StoreError

FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------------------- old folders


@pytest.mark.parametrize("name", ["lexical_probe_v1", "embedding_probe_v1"])
def test_a_probe_folder_of_the_earlier_format_loads_and_scores_the_same(name):
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    clf = load_classifier(str(FIXTURES / name), device="cpu")
    assert clf.labels == ["sarcasm", "humor", "remorse", "loving"]
    got = clf.predict(expected["texts"], max_length=64)
    for (label, probs), (want_label, want_probs) in zip(got, expected["predictions"], strict=True):
        assert label == want_label
        assert probs == pytest.approx(want_probs, abs=1e-6)
    assert len({label for label, _ in got}) > 2  # the recorded predictions are not one label
    # the same provenance, so the same score id (`ScoreRow.classifier`) as before the move
    old = {**expected["identity"], "source": clf.source}
    assert clf.provenance == old
    assert clf.identity == stable_hash(old, 12)


# ---------------------------------------------------------------------------- the registry


def test_every_available_scorer_has_an_opener_and_the_rest_are_refused(monkeypatch):
    for kind in SCORERS.values():
        if kind.available:
            module, _, function = kind.opener.partition(":")
            assert callable(getattr(importlib.import_module(module), function))
    available = [k.name for k in SCORERS.values() if k.available]
    assert available == ["classifier", "judge", "persona_vector"]
    assert check_scorer_names(available) == available
    from charshift.scoring import registry

    reserved = registry.ScorerKind("telepathy", "a scorer not written yet")
    monkeypatch.setitem(registry.SCORERS, "telepathy", reserved)
    with pytest.raises(ValueError, match="\\['telepathy'\\] are not available yet"):
        check_scorer_names(["classifier", "telepathy"])
    with pytest.raises(ValueError, match="unknown scorer"):
        check_scorer_names(["clasifier"])
    with pytest.raises(ValueError, match="given twice"):
        check_scorer_names(["classifier", "classifier"])


def _smoke() -> dict:
    return cfgmod.config_to_dict(cfgmod.load_preset("smoke"))


def test_config_scorers_default_and_validation():
    cfg = cfgmod.parse_config(_smoke())
    assert cfg.scorers == list(DEFAULT_SCORERS) == ["classifier"]
    for bad, said in (
        (["classifier", "judge"], "judge: `scorers` names judge, so the config needs a `judge`"),
        (["judge"], r"leaves out classifier, which every run needs.*\[classifier, judge\]"),
        (["nope"], "scorers:.*unknown"),
        ([], "scorers:.*at least"),
    ):
        with pytest.raises(cfgmod.ConfigError, match=said):
            cfgmod.parse_config({**_smoke(), "scorers": bad})
    with_training = cfgmod.parse_config({**_smoke(), "classifier_training": {"mode": "probe"}})
    assert isinstance(with_training.classifier_training, TrainSettings)


def test_a_stored_config_from_before_scorers_resumes_as_the_same_run(tmp_path):
    """A run started before `scorers:` existed: its config.yaml resolves (the classifier, as it
    always was) and a resume with today's resolved config is accepted, not refused as another
    run."""
    older = {k: v for k, v in _smoke().items() if k != "scorers"}
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(older, sort_keys=False))
    assert cfgmod.parse_config(older).scorers == ["classifier"]
    with pipeline.prepare_run(cfgmod.parse_config(_smoke()), out) as store:
        assert store.read_config()["scorers"] == ["classifier"]
    with pytest.raises(StoreError, match="different config"):
        other = cfgmod.parse_config({**_smoke(), "name": "other"})
        pipeline.prepare_run(other, out).close()


# ---------------------------------------------------------------------------- opening


def test_the_run_opens_its_classifier_through_the_registry(tmp_path):
    cfg = cfgmod.parse_config(_smoke())
    base = cfg.bases[0]
    scorer = open_scorer("classifier", ScorerContext(cfg, base, tmp_path, tmp_path / "cache"))
    assert isinstance(scorer, Classifier) and isinstance(scorer, Scorer)
    assert scorer.source == base.classifier and scorer.provenance["kind"] == "tiny"
    assert (scorer.batch_size, scorer.max_length) == (32, 256)  # the preset's `scoring`
    with pytest.raises(ScorerError, match="no `judge` section"):
        open_scorer("judge", ScorerContext(cfg, base, tmp_path))
    trained_here = cfg.bases[0].model_copy(update={"classifier": None})
    with pytest.raises(ScorerError, match="cannot load"):  # nothing trained in the run yet
        open_scorer("classifier", ScorerContext(cfg, trained_here, tmp_path / "run"))
    with pytest.raises(ScorerError, match="no run to train one in"):
        open_scorer("classifier", ScorerContext(cfg, trained_here, None))


def test_a_run_trains_its_classifier_and_scores_through_the_registry(tmp_path):
    """generate -> train in the run (a lexical probe) -> score through the registry: every score
    carries the id the manifest records for the base, and a rerun scores nothing again."""
    from charshift.schema import ScoreRow

    data = {
        **_smoke(),
        "stages": ["base", "prompted"],
        "personas": ["sarcasm", "humor", "remorse"],
        "slices": ["id_chat"],
        "items": {},  # the preset's scaffold banks: no slice of this run renders them
        "id_prompts": {"source": "bundled", "n_eval": 4, "n_train": 12, "seed": 0},
        "classifier_training": {
            "mode": "probe", "probe_features": "lexical", "probe_c_grid": [1.0], "n_boot": 50,
        },
    }  # fmt: skip
    data["sampling"] = {**data["sampling"], "max_tokens": 12, "n_samples": 1}
    data["bases"] = [{"name": "tinyllama", "model": "tiny:llama"}]
    cfg = cfgmod.parse_config(data)
    with pipeline.prepare_run(cfg, tmp_path / "run") as store:
        pipeline.generate(cfg, store)
        pipeline.ensure_classifiers(cfg, store)
        first = pipeline.score(cfg, store)
        again = pipeline.score(cfg, store)
        manifest = store.manifest()
        scores: list[ScoreRow] = list(store.scores)
    report = json.loads((tmp_path / "run/classifier/tinyllama/train_report.json").read_text())
    assert report["mode"] == "probe" and report["probe"]["features"] == "lexical"
    assert manifest["trained_classifiers"]["tinyllama"]["mode"] == "probe"
    sid = manifest["classifier_ids"]["tinyllama"]
    assert sid == stable_hash(manifest["classifiers"]["tinyllama"], 12)
    assert first["scored"] == len(scores) > 0 and {s.classifier for s in scores} == {sid}
    assert again == {"scored": 0, "already": len(scores)}


def test_a_run_scores_with_the_classifier_the_judge_and_persona_vectors(tmp_path, tiny_llama):
    """scorers: [classifier, judge, persona_vector] on a tiny Llama: the vectors are fitted from
    the run's own training rows, every eval unit is scored by each reading and mode (the judge
    also scores the tool loop's behaviour unit), each under the id the manifest records; a
    rerun asks nothing, and a judge answer is never a score unless it parsed."""
    from charshift.schema import JUDGE_OUTCOMES, ScoreRow

    data = {
        **_smoke(),
        "stages": ["base", "prompted"],
        "personas": ["sarcasm", "humor"],
        "slices": ["id_chat", "agentic_actions"],
        "items": {"agentic_actions": {"n": 1}},
        "id_prompts": {"source": "bundled", "n_eval": 2, "n_train": 8, "seed": 0},
        "scorers": ["classifier", "judge", "persona_vector"],
        "judge": {
            "model": str(tiny_llama), "backend": {"kind": "hf", "device": "cpu", "dtype": "float32"},
            "samples": 2, "retries": 0, "max_tokens": 24, "constrained": True,
        },
    }  # fmt: skip
    data["sampling"] = {**data["sampling"], "max_tokens": 12, "n_samples": 1}
    data["bases"] = [{**data["bases"][0], "classifier": "tiny:modernbert:sarcasm,humor"}]
    cfg = cfgmod.parse_config(data)
    with pipeline.prepare_run(cfg, tmp_path / "run") as store:
        pipeline.generate(cfg, store)
        pipeline.ensure_scorers(cfg, store)
        first = pipeline.score(cfg, store)
        again = pipeline.score(cfg, store)
        manifest = store.manifest()
        scores: list[ScoreRow] = list(store.scores)
        eval_rows = [r for r in store.generations if r.split == "eval" and r.slice == "id_chat"]
        pipeline.report(cfg, store)
    ids = {name: e["id"] for name, e in manifest["scorers"]["tinyllama"].items()}
    assert set(ids) == {
        "classifier", "judge_likert", "judge_identify", "persona_vector_text",
        "persona_vector_state",
    }  # fmt: skip
    by = {name: [s for s in scores if s.classifier == sid] for name, sid in ids.items()}
    n_chat = sum(bool(r.text) for r in eval_rows)
    for name in ids:  # every reading and mode scored every id_chat reply
        assert sum(s.unit == "id_chat" for s in by[name]) == n_chat > 0, name
    assert any(s.unit == "agentic_actions.behaviour" for s in by["judge_likert"])
    assert not any(s.unit.endswith(".behaviour") for s in by["classifier"])
    vec = manifest["persona_vectors"]["tinyllama"]
    assert (tmp_path / "run" / vec["file"]).is_file() and vec["rows"]["fit"]["humor"] > 0
    for s in by["persona_vector_text"]:
        assert set(s.scores or {}) == {"sarcasm", "humor"} and s.prediction in s.scores
    for s in by["judge_likert"] + by["judge_identify"]:
        assert s.judge_outcome in JUDGE_OUTCOMES
        assert (s.judge_outcome == "ok") == bool(s.scores or s.prediction), s
    assert first["scored"] == len(scores) and again == {"scored": 0, "already": len(scores)}
    # each label-giving scorer's cells, against their own null, beside the classifier's in
    # metrics.csv (its `scorer` column); every table names the scorer of each row
    import csv

    def read(name: str) -> list[dict[str, str]]:
        with (tmp_path / "run" / name).open() as fh:
            return list(csv.DictReader(fh))

    table = read("metrics.csv")
    cells = {(r["scorer"], r["stage"], r["slice"]): r for r in table}
    assert len(cells) == len(table) and ("classifier", "prompted", "id_chat") in cells
    for name in ("per_persona.csv", "differences.csv", "chains.csv", "scorer_check.csv"):
        rows = read(name)
        assert {r["scorer"] for r in rows} <= {"classifier", *ids}, name
    names = {r["scorer"] for r in read("per_persona.csv")}
    assert {"classifier", "persona_vector_text", "persona_vector_state"} <= names
    for name in ("persona_vector_text", "persona_vector_state"):
        cell = cells[(name, "prompted", "id_chat")]
        assert int(cell["n_scored"]) == int(cell["n_rows"]) > 0
        assert cell["macro_f1_null"] != "" and cell["macro_f1_excess"] != ""
    ident = [s for s in by["judge_identify"] if s.unit == "id_chat"]
    verdicts = sum(s.judge_outcome == "ok" for s in ident)
    if ("judge_identify", "prompted", "id_chat") in cells:  # only where a verdict was given
        row = cells[("judge_identify", "prompted", "id_chat")]
        assert int(row["n_scored"]) <= verdicts  # no verdict is a missing prediction
    assert "persona_vector_text" in (tmp_path / "run" / "report.md").read_text()
    _assert_agreement(tmp_path / "run", eval_rows)
    # the Likert judge's own figures exist exactly where it gave a score
    # (answers constrained to the schema: the tiny judge's Likert answers parse)
    assert any(s.judge_outcome == "ok" for s in by["judge_likert"])
    with (tmp_path / "run" / "likert.csv").open() as fh:
        likert = {(r["stage"], r["slice"]): r for r in csv.DictReader(fh)}
    assert int(likert[("prompted", "id_chat")]["n_rows"]) == persona_rows(eval_rows)
    assert "The Likert judge's own figures" in (tmp_path / "run" / "report.md").read_text()


def persona_rows(eval_rows: list) -> int:
    return sum(r.stage == "prompted" for r in eval_rows)  # the base stage has no persona


def _assert_agreement(run: Path, eval_rows: list) -> None:
    """The run's agreement tables: kappa (classifier ~ identify judge) and Spearman (classifier
    p(true) ~ Likert score ~ text projection) over the persona rows of id_chat, every row either
    paired or counted as left out; the sign table; the report's section."""
    import csv

    from charshift.tables import AGREEMENT_COLUMNS, SIGN_COLUMNS

    with (run / "agreement.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == AGREEMENT_COLUMNS
        table = list(reader)
    with (run / "agreement_signs.csv").open() as fh:
        assert tuple(csv.DictReader(fh).fieldnames or ()) == SIGN_COLUMNS
    pairs = {
        (r["statistic"], r["scorer_a"], r["scorer_b"]): r for r in table if r["unit"] == "id_chat"
    }
    assert set(pairs) == {
        ("kappa", "classifier", "judge_identify"),
        ("spearman", "classifier", "judge_likert"),
        ("spearman", "classifier", "persona_vector_text"),
        ("spearman", "judge_likert", "persona_vector_text"),
        ("spearman", "classifier", "persona_vector_state"),
        ("spearman", "persona_vector_text", "persona_vector_state"),
    }
    n_persona = persona_rows(eval_rows)
    for row in pairs.values():
        assert int(row["n_pairs"]) + int(row["n_left_out"]) == n_persona > 0, row
        assert row["stages"] == "prompted"
    text = pairs[("spearman", "classifier", "persona_vector_text")]
    assert int(text["n_pairs"]) == sum(r.stage == "prompted" and bool(r.text) for r in eval_rows)
    assert "Do the scorers agree?" in (run / "report.md").read_text()
