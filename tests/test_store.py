import json

import pytest

from charshift.store import JsonlTable, RunStore, StoreError


def test_append_skips_known_keys(tmp_path):
    t = JsonlTable(tmp_path / "g.jsonl")
    assert t.append([{"key": "a", "v": 1}, {"key": "b", "v": 2}]) == 2
    assert t.append([{"key": "a", "v": 99}, {"key": "c", "v": 3}]) == 1
    lines = (tmp_path / "g.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "b", "c"]
    assert t.get("a")["v"] == 1


def test_reopen_resumes(tmp_path):
    JsonlTable(tmp_path / "g.jsonl").append([{"key": "a"}, {"key": "b"}])
    t = JsonlTable(tmp_path / "g.jsonl")
    assert "a" in t and "b" in t and "c" not in t
    assert len(t) == 2


def test_truncated_last_line_is_dropped_and_redone(tmp_path):
    p = tmp_path / "g.jsonl"
    JsonlTable(p).append([{"key": "a", "x": "hello"}, {"key": "b", "x": "world"}])
    raw = p.read_bytes()
    p.write_bytes(raw[:-7])  # cut the second row mid-write
    t = JsonlTable(p)
    assert t.repaired_bytes > 0
    assert "a" in t and "b" not in t
    t.append([{"key": "b", "x": "world"}])
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["a", "b"]


def test_corrupt_line_in_middle_truncates_from_there(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text('{"key": "a"}\n{"key": \n{"key": "c"}\n')
    t = JsonlTable(p)
    assert "a" in t and "c" not in t
    assert p.read_text() == '{"key": "a"}\n'


def test_composite_keys(tmp_path):
    t = JsonlTable(tmp_path / "s.jsonl", ("key", "classifier"))
    t.append([{"key": "a", "classifier": "x"}, {"key": "a", "classifier": "y"}])
    assert ("a", "x") in t and ("a", "y") in t and ("a", "z") not in t


def test_run_store_refuses_other_config(tmp_path):
    s = RunStore(tmp_path / "run")
    s.write_config({"name": "a", "n": 1})
    s.write_config({"name": "a", "n": 1})  # same config: fine (resume)
    with pytest.raises(StoreError, match="different config"):
        s.write_config({"name": "a", "n": 2})


def test_manifest_records_provenance(tmp_path):
    s = RunStore(tmp_path / "run")
    m = s.update_manifest(seeds={"sampling": 3})
    assert m["packages"]["torch"]
    assert m["seeds"] == {"sampling": 3}
    s.log_event("x", n=1)
    assert s.manifest()["events"][-1]["event"] == "x"
