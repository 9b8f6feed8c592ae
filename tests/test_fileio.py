"""The one atomic writer and the one strict JSONL reader (charshift.fileio), through their users."""

import json
import os
from pathlib import Path

import pytest

from charshift import fileio, inputs, prompts, tables
from charshift.schema import GenerationRow
from charshift.store import JsonlTable, RunStore


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_new_files_follow_the_umask(tmp_path, umask_027):
    """A CSV table, an external predictions file, the manifest and the config: 0666 minus the
    umask (colleagues on a shared run folder can read them), not mkstemp's 0600."""
    csv = tables.write_csv(tmp_path / "t.csv", ["a"], [[1]])
    inputs.write_text_atomic(tmp_path / "preds.jsonl", "{}\n")
    with RunStore(tmp_path / "run", warn=lambda _m: None) as s:
        s.write_config({"name": "x"})
        s.update_manifest(seeds={"sampling": 1})
    made = [csv, tmp_path / "preds.jsonl", tmp_path / "run/manifest.json"]
    assert {p.name: _mode(p) for p in [*made, tmp_path / "run/config.yaml"]} == {
        "t.csv": 0o640, "preds.jsonl": 0o640, "manifest.json": 0o640, "config.yaml": 0o640,
    }  # fmt: skip


def test_a_replaced_file_keeps_its_mode_whatever_the_umask(tmp_path, umask_027):
    p = fileio.atomic_write_text(tmp_path / "f", "one")
    os.chmod(p, 0o604)
    fileio.atomic_write_text(p, "two")
    assert _mode(p) == 0o604 and p.read_text() == "two"


def test_a_failed_write_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.csv"
    target.write_text("old")

    def full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(fileio.WriteError, match=r"could not write .*f\.csv: No space left"):
        tables.write_csv(target, ["a"], [[1]])
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.csv"]


def test_a_prompts_file_with_a_key_given_twice_is_refused_naming_the_line(tmp_path):
    """The prompts reader is the strict one: JSON allows a repeated key and Python keeps the last,
    so `{"prompt": "a", "prompt": "b"}` silently became "b"."""
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "x", "prompt": "ok"}\n{"id": "y", "prompt": "a", "prompt": "b"}\n')
    with pytest.raises(prompts.PromptError, match=r"line 2: key 'prompt' is given twice"):
        prompts.load_prompts_file(p)


def _row(text: str) -> dict:
    return GenerationRow(
        key="k", base="b", stage="prompted", persona="humor", slice="id_chat", item_id="p1",
        sample_idx=0, split="eval", seed=1, outcome="reply", messages=[], final_reply=text,
        text=text,
    ).to_dict()  # fmt: skip


def test_a_table_line_with_a_key_given_twice_is_damage_not_its_last_value(tmp_path):
    p = tmp_path / "generations.jsonl"
    line = json.dumps(_row("kept"))[:-1] + ', "text": "swapped"}'
    p.write_text(line + "\n")
    t = JsonlTable(p, GenerationRow, writable=False)
    assert len(t) == 0 and "key 'text' is given twice" in t.found[0].reason


def test_the_run_tables_read_what_json_dumps_writes(tmp_path):
    """Model output is stored as json.dumps writes it: NaN and deep nesting (a tool call's
    arguments) are rows, not damage, or they would be redone forever."""
    row = _row("x")
    row["meta"] = {"score": float("nan"), "args": json.loads("[" * 60 + "]" * 60)}
    p = tmp_path / "generations.jsonl"
    p.write_text(json.dumps(row) + "\n")
    t = JsonlTable(p, GenerationRow, writable=False)
    assert len(t) == 1 and not t.found


def test_user_files_stay_strict(tmp_path):
    p = tmp_path / "preds.jsonl"
    p.write_text('{"a": NaN}\n')
    with pytest.raises(inputs.InputError, match="line 1: NaN is not a JSON number"):
        inputs.read_jsonl_objects(p)
    p.write_text('{"a": 1}\n{"b": ' + "[" * 40 + "]" * 40 + "}")
    with pytest.raises(inputs.InputError, match="line 2: JSON nested too deeply.*cut off"):
        inputs.read_jsonl_objects(p)
