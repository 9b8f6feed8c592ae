"""Issue 16: a run fails early and loudly, and nothing a server dropped is final.

- the preflight (dry run included) names every missing local path before any model loads;
- the cost-estimate options go with --dry-run only;
- a run that left rows out (a skipped adapter, error rows, unscored outputs) exits 3 with a
  summary, unless --allow-skipped; the manifest records what is missing;
- `--retry-errors` redoes the rows that ended in an error; the store keeps one row per key and
  the replaced line in the quarantine file.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from charshift import pipeline
from charshift.backends.scripted import ScriptedBackend, echo_text
from charshift.cli import INCOMPLETE_EXIT, app
from charshift.config import ConfigError, parse_config
from charshift.schema import GenResult, stable_hash
from charshift.store import RunStore, quarantine_path, read_quarantine

runner = CliRunner()


def _cfg(**over):
    cfg = {
        "name": "loud",
        "meaningless": True,
        "bases": [
            {"name": "tinyllama", "model": "tiny:llama",
             "classifier": "tiny:modernbert:sarcasm,humor"},
        ],
        "stages": ["base", "prompted"],
        "personas": ["sarcasm", "humor"],
        "slices": ["id_chat"],
        "sampling": {"max_tokens": 8, "seed": 0},
        "backend": {"kind": "hf", "batch_size": 16, "device": "cpu", "dtype": "float32"},
        "id_prompts": {"source": "bundled", "n_eval": 3, "seed": 0},
        "scoring": {"batch_size": 16, "max_length": 64},
        "stats": {"n_boot": 20, "seed": 0},
    }  # fmt: skip
    cfg.update(over)
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _with_adapters(cfg: dict, folder: Path) -> dict:
    cfg["bases"][0]["adapters"] = {"full": {"path": f"{folder}/{{persona}}"}}
    cfg["stages"] = ["base", "full"]
    return cfg


# -- preflight -------------------------------------------------------------------------------------


def test_a_missing_adapter_folder_is_named_by_the_dry_run(tmp_path, tiny_lora_dir):
    (tmp_path / "adapters").mkdir()
    shutil.copytree(tiny_lora_dir("llama", 1), tmp_path / "adapters" / "sarcasm")
    cfg = _write(tmp_path / "c.yaml", _with_adapters(_cfg(), tmp_path / "adapters"))
    res = runner.invoke(app, ["run", str(cfg), "--dry-run"])
    assert res.exit_code == 2, res.output
    assert "bases.0.adapters.full.path (humor): adapter folder not found" in res.output
    assert "(sarcasm)" not in res.output  # the folder that is there is not named


def test_every_missing_path_is_named_before_any_model_loads(tmp_path, monkeypatch):
    (tmp_path / "adapters" / "humor").mkdir(parents=True)  # a folder, but no adapter in it
    cfg = _with_adapters(_cfg(), tmp_path / "adapters")
    cfg["bases"][0]["classifier"] = str(tmp_path / "no-classifier")
    cfg["id_prompts"] = {"source": "file", "path": str(tmp_path / "prompts.jsonl")}
    cfg["persona_prompts"] = {"source": "constitutions", "path": str(tmp_path / "const")}
    cfg["classifier_training"] = {"encoder": str(tmp_path / "enc"), "stage": "full"}

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline, "make_backend", no_model)
    parsed = parse_config(cfg)
    with pytest.raises(ConfigError) as err:
        pipeline.run_all(parsed, tmp_path / "run")
    for named in [
        "id_prompts.path: file not found",
        "bases.0.classifier: folder not found",
        "bases.0.adapters.full.path (sarcasm): adapter folder not found",
        "bases.0.adapters.full.path (humor): ",
        "is not an adapter folder (no adapter_config.json)",
        "classifier_training.encoder: folder not found",
        "persona_prompts.path: folder not found",
    ]:
        assert named in str(err.value), named
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--throughput", "100"],
        ["--throughput-from", "bench.json"],
        ["--calibrate-from", "runs/pilot"],
        ["--expected-fraction", "0.4"],
        ["--throughput-from", "b.json", "--throughput-path", "hf-mixed"],
    ],
)
def test_cost_options_require_the_dry_run(tmp_path, flags):
    res = runner.invoke(app, ["run", "--preset", "smoke", "--out", str(tmp_path / "r"), *flags])
    assert res.exit_code == 2, res.output
    assert f"{flags[0]}" in res.output and "go with --dry-run" in res.output
    assert not (tmp_path / "r").exists()


def test_real_run_options_are_refused_with_the_dry_run():
    res = runner.invoke(app, ["run", "--preset", "smoke", "--dry-run", "--retry-errors"])
    assert res.exit_code == 2 and "--retry-errors" in res.output


# -- exit status ---------------------------------------------------------------------------------


@pytest.fixture
def gated(tmp_path, tiny_llama, tiny_lora_dir, monkeypatch):
    """A config whose `humor` adapter folder holds a config but no weights: it passes the
    preflight and fails to load (as a gated or broken adapter does)."""
    monkeypatch.setenv("CHARSHIFT_CACHE", str(tmp_path / "cache"))
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    shutil.copytree(tiny_lora_dir("llama", 1), adapters / "sarcasm")
    shutil.copytree(tiny_lora_dir("llama", 2), adapters / "remorse")
    (adapters / "humor").mkdir()
    shutil.copy(adapters / "sarcasm" / "adapter_config.json", adapters / "humor")
    cfg = _with_adapters(_cfg(personas=["sarcasm", "humor", "remorse"]), adapters)
    cfg["bases"][0]["classifier"] = "tiny:modernbert:sarcasm,humor,remorse"
    cfg["bases"][0]["model"] = str(tiny_llama)
    return _write(tmp_path / "c.yaml", cfg), adapters


def test_a_skipped_adapter_fails_the_run_with_a_summary(tmp_path, gated):
    cfg, adapters = gated
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", str(cfg), "--out", str(out)])
    assert res.exit_code == INCOMPLETE_EXIT, res.output
    assert "report: " in res.output  # the report is written: the rows that exist are reported
    assert "run of " in res.output and "3 of 12 planned rows not generated" in res.output
    assert "skipped adapter tinyllama/full/humor" in res.output
    assert "tinyllama/full/humor: 3 rows not generated" in res.output
    assert "rerunning alone will not bring them" in (out / "report.md").read_text()
    done = json.loads((out / "manifest.json").read_text())["completion"]["run"]
    assert done["complete"] is False and done["not_generated"] == {"tinyllama/full/humor": 3}
    assert list(done["skipped_adapters"]) == ["tinyllama/full/humor"] and done["not_scored"] == 0

    res = runner.invoke(app, ["run", str(cfg), "--out", str(out), "--allow-skipped"])
    assert res.exit_code == 0 and "skipped adapter tinyllama/full/humor" in res.output

    shutil.rmtree(adapters / "humor")  # the adapter is repaired: the run completes
    shutil.copytree(adapters / "sarcasm", adapters / "humor")
    res = runner.invoke(app, ["run", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["completion"]["run"]["complete"] is True
    assert manifest["skipped_adapters"] == {}  # the skip the rerun repaired is not on record


# -- retry errors --------------------------------------------------------------------------------


class FlakyServer(ScriptedBackend):
    """A backend whose first reply to every other prompt is a dropped request (a 503, as a server
    under load answers), and whose later replies are normal."""

    def __init__(self, seen: set[str]) -> None:
        super().__init__(self.reply)
        self.seen = seen

    def reply(self, req):
        text = echo_text(req)
        if int(stable_hash(text, 4), 16) % 2 and text not in self.seen:
            self.seen.add(text)
            return GenResult("", "error", error="HTTP 503: server overloaded")
        return text


def test_retry_errors_replaces_error_rows_and_keeps_one_row_per_key(tmp_path, monkeypatch):
    seen: set[str] = set()
    monkeypatch.setattr(pipeline, "make_backend", lambda *a, **k: FlakyServer(seen))
    cfg = _write(tmp_path / "c.yaml", _cfg())
    out = tmp_path / "run"
    res = runner.invoke(app, ["generate", str(cfg), "--out", str(out)])
    assert res.exit_code == INCOMPLETE_EXIT, res.output
    with RunStore(out, create=False, writable=False) as s:
        errors = {r.key for r in s.generations if r.outcome == "error"}
    assert errors and f"{len(errors)} ended in an error" in res.output
    assert "--retry-errors" in res.output

    res = runner.invoke(app, ["generate", str(cfg), "--out", str(out)])  # a plain rerun: no
    assert res.exit_code == INCOMPLETE_EXIT and '"generated": 0' in res.output  # retry

    res = runner.invoke(app, ["generate", str(cfg), "--out", str(out), "--retry-errors"])
    assert res.exit_code == 0, res.output
    summary = next(x for x in res.output.splitlines() if x.startswith('{"planned"'))
    assert json.loads(summary)["retried"] == len(errors)
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == len({x["key"] for x in lines}) == 9
    assert not [x for x in lines if x["outcome"] == "error"]
    aside = read_quarantine(quarantine_path(out / "generations.jsonl"))
    assert {json.loads(d.raw)["key"] for d in aside} == errors
    assert all(json.loads(d.raw)["outcome"] == "error" for d in aside)
    assert all(d.reason.startswith("replaced by the row of its key") for d in aside)
    with RunStore(out, create=False, writable=False) as s:  # a reader finds nothing amiss
        assert not s.notes and len(s.generations) == 9


def test_a_retry_left_uncompacted_by_a_crash_still_reads_as_the_retry(tmp_path):
    """The error row first, its retry appended after (a crash before compaction): readers take
    the retry, and the next writer sets the error line aside."""
    from charshift.schema import GenerationRow

    def row(outcome, text):
        return GenerationRow(
            key="k", base="b", stage="base", persona=None, slice="id_chat", item_id="p",
            sample_idx=0, split="eval", seed=1, outcome=outcome, messages=[], final_reply=text,
            text=text,
        ).to_dict()  # fmt: skip

    (tmp_path / "generations.jsonl").write_text(
        json.dumps(row("error", None)) + "\n" + json.dumps(row("reply", "hi")) + "\n"
    )
    (tmp_path / "config.yaml").write_text("name: x\n")
    with RunStore(tmp_path, create=False, writable=False) as s:
        assert s.generations.get("k").text == "hi" and not s.notes
    with RunStore(tmp_path, create=False) as s:
        assert s.generations.get("k").text == "hi"
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 1
    (aside,) = read_quarantine(quarantine_path(tmp_path / "generations.jsonl"))
    assert aside.line == 1 and "replaced by the row of its key at generations.jsonl line 2" in (
        aside.reason
    )
