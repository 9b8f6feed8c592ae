import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from charshift import analysis, fileio, planning, units
from charshift.config import config_to_dict, load_preset
from charshift.schema import GenerationRow, RecordError, ScoreRow
from charshift.store import (
    JsonlTable,
    LockHeldError,
    RunStore,
    StoreError,
    StoreWriteError,
    quarantine_path,
    read_quarantine,
)
from charshift.store import table as table_mod

REPO = Path(__file__).resolve().parents[1]


def _g(key, text="x", **kw):
    return GenerationRow(
        key=key, base="b", stage="prompted", persona="humor", slice="id_chat", item_id="p1",
        sample_idx=0, split="eval", seed=1, outcome="reply", messages=[], final_reply=text,
        text=text, **kw,
    )  # fmt: skip


def _line(row):
    return json.dumps(row.to_dict(), ensure_ascii=False).encode() + b"\n"


def _table(p, writable=True):
    return JsonlTable(p, GenerationRow, writable=writable)


def _quiet(_msg):
    pass


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(folder).iterdir()}


def test_append_skips_known_keys(tmp_path):
    t = _table(tmp_path / "g.jsonl")
    assert t.append([_g("a", "1"), _g("b", "2")]) == 2
    assert t.append([_g("a", "99"), _g("c", "3"), _g("c", "4")]) == 1
    lines = (tmp_path / "g.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "b", "c"]
    assert t.get("a").text == "1" and t.get("c").text == "3"


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


def test_truncated_last_line_is_set_aside_and_redone(tmp_path):
    # (was: the cut-off line was truncated away; now it is kept in the quarantine file)
    p = tmp_path / "g.jsonl"
    _table(p).append([_g("a", "hello"), _g("b", "world")])
    raw = p.read_bytes()
    p.write_bytes(raw[:-7])  # cut the second row mid-write
    t = _table(p)
    assert [(d.line, d.reason.split(":")[0]) for d in t.set_aside] == [(2, "cut off")]
    assert "a" in t and "b" not in t
    t.append([_g("b", "world")])
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["a", "b"]
    assert [d.raw for d in read_quarantine(quarantine_path(p))] == [raw[:-7].split(b"\n")[1]]


def test_a_good_last_line_without_newline_is_kept(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_bytes(_line(_g("a")) + _line(_g("b"))[:-1])
    assert len(_table(p, writable=False)) == 2
    t = _table(p)
    assert len(t) == 2 and not t.found and p.read_bytes().endswith(b"\n")
    t.append([_g("c")])
    assert len(_table(p)) == 3


DAMAGE = [
    (b"{not json", "not valid JSON"),
    (b"null", "expected a JSON object, got null"),
    (b"[1, 2]", "expected a JSON object, got an array"),
    (b'{"text": "no key"}', "missing required field 'key'"),
    (b'{"key": "z", "base": 3}', "field 'base' must be str"),
    (b'{"key": "\xff\xfe"}', "not valid UTF-8 (byte 0xff"),
]


def test_every_kind_of_damage_is_named_and_every_good_line_kept(tmp_path):
    p = tmp_path / "g.jsonl"
    good = [_g(k, k * 3) for k in "abcdefg"]
    blob = b""
    expected = {}
    for i, row in enumerate(good[:-1]):
        blob += _line(row)
        if i < len(DAMAGE):
            blob += DAMAGE[i][0] + b"\n"
            expected[blob.count(b"\n")] = DAMAGE[i]
    blob += _line(good[-1])[:-9]  # a cut-off last line
    expected[blob.count(b"\n") + 1] = (_line(good[-1])[:-9], "cut off")
    p.write_bytes(blob)
    before = _snapshot(tmp_path)

    reader = _table(p, writable=False)  # a reader: skips, reports, changes nothing
    assert _snapshot(tmp_path) == before
    assert [r.key for r in reader] == list("abcdef")
    assert {d.line: d.raw for d in reader.found} == {n: raw for n, (raw, _) in expected.items()}
    for d in reader.found:
        assert expected[d.line][1] in d.reason, (d.line, d.reason)
    (msg,) = reader.describe()
    assert str(p) in msg and "7 of 13 lines" in msg and "not changed" in msg

    writer = _table(p)  # a writer: sets them aside, verbatim, then the table is clean
    assert [r.key for r in writer] == list("abcdef")
    assert p.read_bytes() == b"".join(_line(r) for r in good[:-1])
    q = read_quarantine(quarantine_path(p))
    assert {(d.line, d.raw) for d in q} == {(n, raw) for n, (raw, _) in expected.items()}
    assert "Set aside" in writer.describe()[0] and str(quarantine_path(p)) in writer.describe()[0]
    again = _table(p)
    assert not again.found and len(read_quarantine(quarantine_path(p))) == len(expected)


def test_duplicate_key_keeps_the_first_and_reports_it(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_bytes(_line(_g("a", "first")) + _line(_g("b")) + _line(_g("a", "second")))
    t = _table(p)
    assert t.get("a").text == "first"
    (d,) = t.found
    assert d.line == 3 and "different content" in d.reason and "line 1 is kept" in d.reason
    assert [x.raw + b"\n" for x in read_quarantine(quarantine_path(p))] == [
        _line(_g("a", "second"))
    ]


def test_an_interrupted_repair_does_not_repeat_quarantine_entries(tmp_path, monkeypatch):
    p = tmp_path / "g.jsonl"
    p.write_bytes(_line(_g("a")) + b"garbage\n" + _line(_g("b")))
    real = table_mod.atomic_write_bytes

    def fail_on_table(path, data, **kw):
        if Path(path) == p:
            raise StoreWriteError("simulated crash")
        real(path, data, **kw)

    monkeypatch.setattr(table_mod, "atomic_write_bytes", fail_on_table)
    with pytest.raises(StoreWriteError):
        _table(p)  # the quarantine was written, the table not yet rewritten
    monkeypatch.setattr(table_mod, "atomic_write_bytes", real)
    t = _table(p)
    assert len(t) == 2
    assert [d.raw for d in read_quarantine(quarantine_path(p))] == [b"garbage"]


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    p = tmp_path / "g.jsonl"
    t = _table(p)
    t.append([_g("a")])
    before = p.read_bytes()
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data[:10]))  # part of the batch gets out, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StoreWriteError, match=r"No space left on device \(ENOSPC\)") as err:
        t.append([_g("b"), _g("c")])
    assert str(p) in str(err.value)
    monkeypatch.setattr(os, "write", real_write)
    assert p.read_bytes() == before and "b" not in t
    assert t.append([_g("b"), _g("c")]) == 2 and len(_table(p)) == 3


def test_a_failed_manifest_write_leaves_no_temp_file(tmp_path, monkeypatch):
    s = RunStore(tmp_path / "run", warn=_quiet)
    s.update_manifest(seeds={"sampling": 3})
    before = (tmp_path / "run" / "manifest.json").read_bytes()

    def fail(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StoreWriteError, match="manifest.json: No space left"):
        s.update_manifest(seeds={"sampling": 4})
    monkeypatch.undo()
    assert not list((tmp_path / "run").glob("*tmp*")) and not list((tmp_path / "run").glob(".*"))
    assert (tmp_path / "run" / "manifest.json").read_bytes() == before
    s.close()


def test_atomic_writes_use_unique_temp_names_and_keep_the_mode(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    fileio.atomic_write_text(target, "one")
    os.chmod(target, 0o640)
    names = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (names.append(a), real(a, b)))
    fileio.atomic_write_text(target, "two")
    fileio.atomic_write_text(target, "three")
    assert len(set(names)) == 2 and all(Path(n).parent == tmp_path for n in names)
    assert target.read_text() == "three" and target.stat().st_mode & 0o777 == 0o640


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
    with RunStore(tmp_path / "run") as s:
        s.write_config({"name": "a", "n": 1})
        s.write_config({"name": "a", "n": 1})  # same config: fine (resume)
        with pytest.raises(StoreError, match="different config"):
            s.write_config({"name": "a", "n": 2})


def test_manifest_records_provenance(tmp_path):
    with RunStore(tmp_path / "run") as s:
        m = s.update_manifest(seeds={"sampling": 3})
        assert m["packages"]["torch"]
        assert m["seeds"] == {"sampling": 3}
        s.log_event("x", n=1)
        assert s.manifest()["events"][-1]["event"] == "x"


# -- the run directory: readers, config, manifest -------------------------------------------------


def _run_with_rows(root, rows, config=None):
    with RunStore(root, warn=_quiet) as s:
        s.write_config(config or {"name": "t"})
        s.generations.append(rows)
    return root


def test_a_reader_takes_no_lock_and_refuses_to_write(tmp_path):
    root = _run_with_rows(tmp_path / "run", [_g("a"), _g("b")])
    with RunStore(root, warn=_quiet) as writer:  # a reader opens while a writer holds the lock
        reader = RunStore(root, writable=False)
        assert len(reader.generations) == 2
        with pytest.raises(StoreError, match="read-only"):
            reader.generations.append([_g("c")])
        with pytest.raises(StoreError, match="read-only"):
            reader.update_manifest(x=1)
        writer.generations.append([_g("c")])
    assert len(RunStore(root, writable=False).generations) == 3


def test_a_reader_leaves_every_file_byte_for_byte(tmp_path):
    root = _run_with_rows(tmp_path / "run", [_g("a"), _g("b")])
    with open(root / "generations.jsonl", "ab") as f:
        f.write(b"garbage\n" + _line(_g("c"))[:-5])
    (root / "manifest.json").write_text("{broken")
    before = _snapshot(root)
    s = RunStore(root, writable=False, warn=_quiet)
    assert len(s.generations) == 2 and s.manifest() == {}
    assert _snapshot(root) == before
    assert any("manifest.json is damaged" in n for n in s.notes)


def test_a_damaged_manifest_is_set_aside_by_a_writer(tmp_path):
    root = _run_with_rows(tmp_path / "run", [_g("a")])
    (root / "manifest.json").write_bytes(b'{"half": ')
    with RunStore(root, warn=_quiet) as s:
        s.update_manifest(seeds={"x": 1})
        assert any("set aside as manifest.damaged-" in n for n in s.notes)
    (aside,) = root.glob("manifest.damaged-*.json")
    assert aside.read_bytes() == b'{"half": '
    assert json.loads((root / "manifest.json").read_text())["seeds"] == {"x": 1}


def test_missing_config_is_named_or_recovered(tmp_path):
    cfg = {"name": "t", "n": 1}
    root = _run_with_rows(tmp_path / "run", [_g("a"), _g("b")], cfg)
    (root / "config.yaml").unlink()
    seen = []
    s = RunStore(root, create=False, writable=False, warn=seen.append)
    assert s.read_config() == cfg  # from the manifest's copy, with a warning
    assert "config.yaml is missing" in seen[-1]
    with RunStore(root, warn=_quiet) as w:
        with pytest.raises(StoreError, match="differs from the run's"):
            w.write_config({"name": "t", "n": 2})
        w.write_config(cfg)
    assert (root / "config.yaml").exists()
    # no config and no manifest: the stored rows must all belong to the config given
    (root / "config.yaml").unlink()
    (root / "manifest.json").unlink()
    with pytest.raises(StoreError, match=r"config.yaml is missing.*Restore config.yaml"):
        RunStore(root, create=False, writable=False)
    with RunStore(root, warn=_quiet) as w:
        with pytest.raises(StoreError, match="1 of them are not rows of the config given"):
            w.write_config(cfg, planned_keys=lambda: {"a"})
        w.write_config(cfg, planned_keys=lambda: {"a", "b", "c"})
        assert any("every stored row is a row of the config given" in n for n in w.notes)


def test_a_damaged_config_is_named(tmp_path):
    root = _run_with_rows(tmp_path / "run", [_g("a")])
    (root / "config.yaml").write_bytes(b"name: [unclosed\n")
    with pytest.raises(StoreError, match="config.yaml is damaged"):
        RunStore(root, create=False, writable=False).read_config()
    (root / "config.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(StoreError, match="config.yaml is damaged"):
        RunStore(root, create=False, writable=False).read_config()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files (see test_reliability)")
def test_a_read_only_table_stops_a_writer_before_any_work(tmp_path):
    root = _run_with_rows(tmp_path / "run", [_g("a")])
    os.chmod(root / "generations.jsonl", 0o444)
    with pytest.raises(StoreWriteError, match=r"generations.jsonl: Permission denied"):
        RunStore(root)
    assert len(RunStore(root, writable=False).generations) == 1


# -- the writer lock ------------------------------------------------------------------------------


HOLDER = textwrap.dedent(
    """
    import sys, time
    from charshift.store import RunStore
    s = RunStore(sys.argv[1], shard=None if sys.argv[2] == "-" else (int(sys.argv[2]), 2))
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
    """
)


def _holder(root, shard="-", seconds=60):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), shard, str(seconds)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    root = tmp_path / "run"
    p = _holder(root)
    try:
        with pytest.raises(LockHeldError, match=rf"pid {p.pid} on .* started") as err:
            RunStore(root)
        assert str(root / "writer.lock") in str(err.value)
        # a shard would redo the unsharded writer's rows: refused too, naming it (test_shards.py)
        with pytest.raises(LockHeldError, match=rf"unsharded charshift process \(pid {p.pid}"):
            RunStore(root, shard=(0, 2))
    finally:
        p.kill()
        p.wait()


def test_a_writer_in_the_same_process_is_refused_until_closed(tmp_path):
    first = RunStore(tmp_path / "run")
    with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
        RunStore(tmp_path / "run")
    first.close()
    RunStore(tmp_path / "run").close()
    assert not (tmp_path / "run" / "writer.lock.info").exists()


def test_a_stale_lock_of_a_killed_writer_is_taken_over(tmp_path):
    root = tmp_path / "run"
    p = _holder(root)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (root / "writer.lock.info").exists()
    seen = []
    with RunStore(root, warn=seen.append):
        pass
    assert any(f"left by pid {p.pid}" in m and "no longer runs" in m for m in seen), seen


SHARD_WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from charshift.schema import GenerationRow
    from charshift.store import RunStore
    root, i, n_rows = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    s = RunStore(root, shard=(i, 2))
    s.write_config({"name": "sharded"})
    (root / f"ready{i}").touch()
    while not (root / f"ready{1 - i}").exists():  # both hold their locks at once
        time.sleep(0.01)
    for j in range(n_rows):
        row = GenerationRow(key=f"s{i}-{j}", base="b", stage="base", persona=None,
            slice="id_chat", item_id=f"p{j}", sample_idx=0, split="eval", seed=j,
            outcome="reply", messages=[], final_reply="t", text="t")
        s.generations.append([row])
        s.log_event("row", shard=i, j=j)
    s.update_manifest(shards={str(i): "done"})
    s.close()
    """
)


def test_two_shard_writers_never_contend_and_the_union_is_the_sum(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARD_WRITER, str(root), str(i), "40"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    files = sorted(p.name for p in root.glob("generations*.jsonl"))
    assert files == ["generations.shard-0-of-2.jsonl", "generations.shard-1-of-2.jsonl"]
    union = RunStore(root, writable=False, warn=_quiet).generations
    keys = sorted(r.key for r in union)
    assert keys == sorted(f"s{i}-{j}" for i in (0, 1) for j in range(40))
    m = json.loads((root / "manifest.json").read_text())
    assert m["shards"] == {"0": "done", "1": "done"}  # no update lost between the shards
    assert len([e for e in m["events"] if e["event"] == "row"]) == 80
    # a shard's writer reads every file but appends only to its own
    with RunStore(root, shard=(0, 2), warn=_quiet) as s0:
        assert len(s0.generations) == 80 and "s1-3" in s0.generations
        s0.generations.append([_g("new")])
    assert b'"new"' in (root / "generations.shard-0-of-2.jsonl").read_bytes()
    assert b'"new"' not in (root / "generations.shard-1-of-2.jsonl").read_bytes()


def test_shard_argument_is_checked(tmp_path):
    with pytest.raises(StoreError, match="shard"):
        RunStore(tmp_path / "run", shard=(2, 2))


# -- completeness and classifier ids (analysis) --------------------------------------------------


def _smoke_store(tmp_path, plan, n_generated, n_scored, cid="c1"):
    """A store holding the first `n_generated` eval rows of the plan, every unit of `n_scored` of
    those with an output scored."""
    rows = [r for r in plan.rows if r.spec.split == "eval"][:n_generated]

    def outcome(r, has_output):
        if r.spec.output == "reply":
            return "reply" if has_output else "empty"
        return "email" if has_output else "no_email"

    gens = [
        GenerationRow(
            key=r.key,
            base=r.condition.base,
            stage=r.condition.stage,
            persona=r.condition.persona,
            slice=r.spec.slice,
            item_id=r.spec.item_id,
            sample_idx=r.sample_idx,
            split="eval",
            seed=0,
            outcome=outcome(r, bool(i % 5)),
            messages=[],
            final_reply="t",
            text="t" if i % 5 else None,
        )  # fmt: skip
        for i, r in enumerate(rows)
    ]
    scored = {g.key for g in [g for g in gens if g.text][:n_scored]}
    root = tmp_path / "run"
    with RunStore(root, warn=_quiet) as s:
        s.write_config(config_to_dict(plan.cfg))
        s.generations.append(gens)
        s.scores.append(
            ScoreRow(g.key, cid, "text", "humor", {}, unit, units.text_hash(text))
            for g, unit, text in units.row_units(gens)
            if text and g.key in scored
        )
        s.update_manifest(classifier_ids={"tinyllama": cid})
    return root, gens


def test_completeness_counts_every_cell(tmp_path):
    cfg = load_preset("smoke")
    plan = planning.build_plan(cfg)
    root, gens = _smoke_store(tmp_path, plan, 200, 100)
    s = RunStore(root, writable=False, warn=_quiet)
    cells = analysis.completeness(plan, s, cfg)
    evals = [r for r in plan.rows if r.spec.split == "eval"]
    assert sum(c.planned for c in cells) == len(evals)
    assert sum(c.generated for c in cells) == 200
    assert sum(c.with_output for c in cells) == sum(1 for g in gens if g.text)
    assert sum(c.scored for c in cells) == 100
    for c in cells:  # per cell, against a count made here
        in_cell = [g for g in gens if (g.base, g.stage, g.slice) == (c.base, c.stage, c.slice)]
        assert c.generated == len(in_cell)
        assert c.planned == sum(
            1 for r in evals if (r.condition.stage, r.spec.slice) == (c.stage, c.slice)
        )
    warnings = analysis.completeness_warnings(cells, root)
    assert warnings[0].startswith(f"This run is incomplete: {len(evals) - 200} of {len(evals)}")
    assert len(warnings) == 1 + sum(not c.complete for c in cells)


def test_classifier_ids_recovered_from_scores_without_a_manifest(tmp_path):
    cfg = load_preset("smoke")
    plan = planning.build_plan(cfg)
    root, gens = _smoke_store(tmp_path, plan, 20, 10)
    (root / "manifest.json").unlink()
    s = RunStore(root, writable=False, warn=_quiet)
    ids, notes = analysis.run_classifier_ids(cfg, s)
    assert ids == {"tinyllama": "c1"} and "manifest.json records no classifier" in notes[0]
    assert len(analysis.prediction_records(cfg, s)) > 0
    with RunStore(root, warn=_quiet) as w:
        w.scores.append([ScoreRow(gens[1].key, "c2", "text", "humor", {}, "id_chat", "h")])
    s = RunStore(root, writable=False, warn=_quiet)
    with pytest.raises(StoreError, match="scored by several .*c1, c2.*charshift score --run"):
        analysis.run_classifier_ids(cfg, s)


def test_lock_info_names_pid_host_and_start(tmp_path):
    with RunStore(tmp_path / "run"):
        info = json.loads((tmp_path / "run" / "writer.lock.info").read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"]


def test_resume_accepts_a_config_resolved_by_an_older_version(tmp_path):
    """A field added since the run started takes its default: the same run, not a different one."""
    from charshift.config import parse_config

    cfg = config_to_dict(load_preset("smoke"))
    older = {k: v for k, v in cfg.items() if k != "description"}  # as if `description` were new
    norm = lambda d: config_to_dict(parse_config({**d, "description": cfg["description"]}))  # noqa: E731
    with RunStore(tmp_path / "run", warn=_quiet) as s:
        s.write_config(older)
    with RunStore(tmp_path / "run", warn=_quiet) as s:
        s.write_config(cfg, normalise=norm)
        assert s.read_config() == cfg
        with pytest.raises(StoreError, match="different config"):
            s.write_config({**cfg, "name": "other"}, normalise=norm)
