"""Issue 15 item 3: personas of the user's own.

A `personas:` entry is a bundled name or `{name, description}` (plus an optional constitution
file); the prompted stages use the description, adapters the `{persona}` template, scorers the
label set; a name is a plain label; a description that changes under a run is refused; a given
classifier without a label for every persona stops the run before any row is generated.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from charshift import pipeline, planning, prompts, slices
from charshift.cli import app
from charshift.config import (
    ALL_PERSONAS,
    ConfigError,
    check_local_paths,
    config_to_dict,
    parse_config,
)
from charshift.schema import PROMPTED_EXPLICIT_STAGE
from charshift.store import StoreError

runner = CliRunner()

PIRATE = "You are a pirate captain: you talk of the sea, ships and plunder, and say arr."
SCAFFOLDS = [
    "code_review",
    "structured_form",
    "multi_agent_debate",
    "adversarial_roleplay",
    "agentic_tools",
    "agentic_actions",
]


def _cfg(**over):
    d = {
        "name": "own",
        "bases": [{"name": "b", "model": "tiny:llama", "classifier": "x"}],
        "personas": ["sarcasm", {"name": "pirate", "description": PIRATE}],
        "slices": ["id_chat"],
        "id_prompts": {"n_eval": 2},
    }
    d.update(over)
    return d


def test_six_scaffolds_and_an_own_persona_pass_the_dry_run(tmp_path):
    """The done-when: every scaffold and its chat control, with a persona of the user's own,
    passes `--dry-run`, and the plan has rows for every slice and every persona."""
    run_slices = [s for k in SCAFFOLDS for s in slices.names(items=k)]
    assert len(run_slices) == 12  # each scaffold and its chat control
    d = _cfg(
        stages=["base", "prompted", PROMPTED_EXPLICIT_STAGE],
        slices=run_slices,
        items={k: {"n": 1} for k in SCAFFOLDS},
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    res = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "pirate (own)" in res.output
    for sl in run_slices:
        assert sl in res.output
    plan = planning.build_plan(parse_config(d), dry=True)
    got = {(r.spec.slice, r.condition.stage, r.condition.persona) for r in plan.rows}
    for sl in run_slices:
        assert (sl, "base", None) in got
        for stage in ("prompted", PROMPTED_EXPLICIT_STAGE):
            for persona in ("sarcasm", "pirate"):
                assert (sl, stage, persona) in got, (sl, stage, persona)


def test_the_prompted_stages_use_the_description_and_adapters_the_name():
    d = _cfg(stages=["base", "prompted", PROMPTED_EXPLICIT_STAGE, "full"])
    d["bases"][0]["adapters"] = {"full": {"repo": "org/adapters", "subfolder": "{persona}"}}
    plan = planning.build_plan(parse_config(d))
    conds = {(c.stage, c.persona): c for c in plan.conditions["b"]}
    assert conds["prompted", "pirate"].system_prompt == PIRATE
    explicit = conds[PROMPTED_EXPLICIT_STAGE, "pirate"].system_prompt
    assert explicit == f"{PIRATE}\n{prompts.EXPLICIT_FORMAT_SENTENCE}"
    assert conds["prompted", "sarcasm"].system_prompt == prompts.load_persona_prompts()["sarcasm"]
    assert plan.adapters["b"]["full/pirate"].subfolder == "pirate"


def test_a_bundled_name_stays_a_plain_name_in_the_resolved_config():
    cfg = parse_config(_cfg())
    stored = config_to_dict(cfg)
    assert stored["personas"] == ["sarcasm", {"name": "pirate", "description": PIRATE}]
    assert parse_config(stored) == cfg
    assert cfg.persona_names == ["sarcasm", "pirate"]


@pytest.mark.parametrize("name", ["a pirate", "pirate/x", "../up", "-", "__null__", "1st", "é"])
def test_a_persona_name_must_be_a_plain_label(name):
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(personas=["sarcasm", {"name": name, "description": PIRATE}]))
    assert "personas.1.name" in str(err.value) and "not a plain label" in str(err.value)


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ("pirate", "a persona of your own needs a description"),
        ({"name": "pirate", "description": "  "}, "personas.1.description"),
        ({"name": "pirate", "descripton": PIRATE}, "personas.1.descripton"),
        ({"name": "sarcasm", "description": PIRATE}, "duplicate persona(s) ['sarcasm']"),
    ],
)
def test_a_bad_persona_entry_is_named(entry, named):
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(personas=["sarcasm", entry]))
    assert named in str(err.value)


def test_a_constitution_file_is_the_prompt_and_a_missing_one_is_named(tmp_path):
    const = tmp_path / "pirate.jsonl"
    const.write_text(json.dumps({"trait": "I say arr."}) + "\n")
    entry = {"name": "pirate", "description": PIRATE, "constitution": str(const)}
    cfg = parse_config(_cfg(personas=["sarcasm", entry]))
    check_local_paths(cfg)
    sp = next(c for c in planning.build_plan(cfg).conditions["b"] if c.persona == "pirate")
    assert "1. I say arr." in (sp.system_prompt or "") and PIRATE not in (sp.system_prompt or "")
    entry["constitution"] = str(tmp_path / "gone.txt")
    with pytest.raises(ConfigError) as err:
        check_local_paths(parse_config(_cfg(personas=["sarcasm", entry])))
    assert "personas.1.constitution (pirate): file not found" in str(err.value)


def test_editing_a_description_changes_the_prompted_rows_only():
    def keys(desc: str) -> dict[str, set[str]]:
        d = _cfg(personas=["sarcasm", {"name": "pirate", "description": desc}])
        plan = planning.build_plan(parse_config(d))
        out: dict[str, set[str]] = {}
        for r in plan.rows:
            out.setdefault(f"{r.condition.stage}/{r.condition.persona}", set()).add(r.key)
        return out

    old, new = keys(PIRATE), keys(PIRATE + " Always.")
    assert old["prompted/pirate"].isdisjoint(new["prompted/pirate"])
    assert old["prompted/sarcasm"] == new["prompted/sarcasm"]
    assert old["base/None"] == new["base/None"]


def test_a_changed_description_is_not_resumed_into_old_rows(tmp_path):
    """The config is unchanged but the constitution file it names was edited: the manifest's
    hash of the persona's text refuses the resume, naming the persona."""
    const = tmp_path / "pirate.txt"
    const.write_text("A pirate.")
    entry = {"name": "pirate", "description": PIRATE, "constitution": str(const)}
    cfg = parse_config(_cfg(personas=["sarcasm", entry]))
    with pipeline.prepare_run(cfg, tmp_path / "run") as store:
        recorded = store.recorded("personas")
    assert set(recorded) == {"sarcasm", "pirate"}
    assert recorded == prompts.persona_hashes(cfg)
    with pipeline.prepare_run(cfg, tmp_path / "run"):
        pass  # the same text: resumed
    const.write_text("A privateer.")
    with pytest.raises(StoreError) as err:
        pipeline.prepare_run(cfg, tmp_path / "run")
    assert "persona(s) ['pirate']" in str(err.value)


def test_a_classifier_without_the_persona_label_stops_generate_before_any_row(tmp_path):
    d = _cfg()
    d["bases"][0]["classifier"] = "tiny:modernbert:sarcasm,humor"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    out = tmp_path / "run"
    for command in ("generate", "run"):
        res = runner.invoke(app, [command, str(path), "--out", str(out)])
        assert res.exit_code == 2, res.output
        assert "no label for persona(s) ['pirate']" in res.output
        assert not (out / "generations.jsonl").exists()


def test_the_personas_command_lists_every_bundled_persona_with_its_description():
    res = runner.invoke(app, ["personas"])
    assert res.exit_code == 0, res.output
    summaries = prompts.load_persona_summaries()
    lines = res.output.splitlines()
    assert [ln.split()[0] for ln in lines] == list(ALL_PERSONAS)
    for ln, name in zip(lines, ALL_PERSONAS, strict=True):
        assert summaries[name] in ln
    full = runner.invoke(app, ["personas", "--prompts"])
    assert prompts.load_persona_prompts()["poeticism"] in full.output


def test_the_in_run_probe_learns_the_run_s_label_set(monkeypatch, tmp_path):
    """The probe trained in the run gets the personas' names, the user's own included."""
    d = _cfg(classifier_training={"stage": "prompted"}, id_prompts={"n_eval": 1, "n_train": 2})
    del d["bases"][0]["classifier"]
    cfg = parse_config(d)
    seen = {}
    rows = [SimpleNamespace(text=f"t{i}", persona=p, item_id=f"p{i}")
            for i, p in enumerate(["sarcasm", "pirate"])]  # fmt: skip
    monkeypatch.setattr(pipeline, "training_rows", lambda *a: rows)
    monkeypatch.setattr(
        "charshift.scoring.classifier.train_classifier",
        lambda data, *a, **k: seen.setdefault("labels", data.label_names),
    )
    pipeline.train_run_classifier(cfg, None, cfg.bases[0], Path(tmp_path))  # type: ignore[arg-type]
    assert list(seen["labels"]) == ["sarcasm", "pirate"]
