import json

import pytest

from charshift.schema import GenerationRow, RecordError, ScoreRow
from charshift.store import JsonlTable, RunStore, StoreError


def _g(key, text="x", **kw):
    return GenerationRow(
        key=key, base="b", stage="prompted", persona="humor", slice="id_chat", item_id="p1",
        sample_idx=0, split="eval", seed=1, outcome="reply", messages=[], final_reply=text,
        text=text, **kw,
    )  # fmt: skip


def _table(p):
    return JsonlTable(p, GenerationRow)


def test_append_skips_known_keys(tmp_path):
    t = _table(tmp_path / "g.jsonl")
    assert t.append([_g("a", "1"), _g("b", "2")]) == 2
    assert t.append([_g("a", "99"), _g("c", "3")]) == 1
    lines = (tmp_path / "g.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "b", "c"]
    assert t.get("a").text == "1"


def test_rows_read_back_as_the_same_typed_records(tmp_path):
    row = _g("a", "hello", email={"to": "x", "subject": None, "body": "hi"}, meta={"n": [1]})
    _table(tmp_path / "g.jsonl").append([row])
    back = _table(tmp_path / "g.jsonl").get("a")
    assert isinstance(back, GenerationRow) and back == row


def test_reopen_resumes(tmp_path):
    _table(tmp_path / "g.jsonl").append([_g("a"), _g("b")])
    t = _table(tmp_path / "g.jsonl")
    assert "a" in t and "b" in t and "c" not in t
    assert len(t) == 2


def test_truncated_last_line_is_dropped_and_redone(tmp_path):
    p = tmp_path / "g.jsonl"
    _table(p).append([_g("a", "hello"), _g("b", "world")])
    raw = p.read_bytes()
    p.write_bytes(raw[:-7])  # cut the second row mid-write
    t = _table(p)
    assert t.repaired_bytes > 0
    assert "a" in t and "b" not in t
    t.append([_g("b", "world")])
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["a", "b"]


def test_composite_keys(tmp_path):
    t = JsonlTable(tmp_path / "s.jsonl", ScoreRow, ("key", "classifier"))
    t.append([ScoreRow("a", "x", "text", "humor", {}), ScoreRow("a", "y", "text", "humor", {})])
    assert ("a", "x") in t and ("a", "y") in t and ("a", "z") not in t


def test_from_dict_names_the_bad_field():
    d = _g("a").to_dict()
    with pytest.raises(RecordError, match="'seed'"):
        GenerationRow.from_dict({**d, "seed": "7"})
    with pytest.raises(RecordError, match="missing required field 'outcome'"):
        GenerationRow.from_dict({k: v for k, v in d.items() if k != "outcome"})
    with pytest.raises(RecordError, match="unknown field"):
        GenerationRow.from_dict({**d, "colour": "red"})
    with pytest.raises(RecordError, match="expected a JSON object"):
        GenerationRow.from_dict(None)


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
