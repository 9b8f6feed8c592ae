"""Sharded runs: which rows a shard takes (pure), how sharded and unsharded writers of one run are
kept apart, the union of the shards' files, and a real Ray run on CPU whose merged store equals
an unsharded run's, row for row."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from charshift import analysis, executors, pipeline, planning
from charshift.cli import app
from charshift.config import parse_config
from charshift.schema import GenerationRow
from charshift.store import LockHeldError, ModeLockError, RunStore

REPO = Path(__file__).resolve().parents[1]


def _cfg(**over):
    d = {
        "bases": [
            {"name": "a", "model": "tiny:llama", "classifier": "x"},
            {"name": "b", "model": "tiny:qwen2", "classifier": "y"},
        ],
        "personas": ["sarcasm", "humor"],
        "stages": ["base", "prompted"],
        "slices": ["id_chat", "id_chat_prefill", "chat_email", "agentic_email"],
        "sampling": {"n_samples": 2},
        "id_prompts": {"n_eval": 12},
        "scenarios": {"n": 8},
    }
    d.update(over)
    return parse_config(d)


# -- which rows a shard takes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"), [("0/1", (0, 1)), ("3/8", (3, 8)), (" 7 / 8 ", (7, 8))]
)
def test_parse_shard(text, expected):
    assert planning.parse_shard(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8/8", "shard index 8 is not in 0..7"),
        ("1/0", "shard count must be 1..1024"),
        ("-1/4", "expected I/N"),
        ("2", "expected I/N"),
        ("a/b", "expected I/N"),
        ("1/2/3", "expected I/N"),
    ],
)
def test_parse_shard_refuses_with_the_flag_named(text, message):
    with pytest.raises(ValueError, match="--shard") as err:
        planning.parse_shard(text)
    assert message in str(err.value)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_every_row_in_exactly_one_shard_and_every_item_whole(n):
    plan = planning.build_plan(_cfg())
    parts = [planning.select_shard(plan.rows, (i, n)) for i in range(n)]
    keys = [r.key for part in parts for r in part]
    assert sorted(keys) == sorted(r.key for r in plan.rows)  # each row once, none lost
    home: dict[str, int] = {}
    for i, part in enumerate(parts):
        for r in part:
            assert home.setdefault(r.spec.item_id, i) == i  # every base, stage, slice, sample
    assert planning.shard_sizes(plan.rows, n) == [len(p) for p in parts]
    assert planning.select_shard(plan.rows, None) == plan.rows


def test_assignment_depends_on_the_item_alone():
    plan = planning.build_plan(_cfg())
    rows = list(plan.rows)
    random.Random(0).shuffle(rows)
    for i in range(3):
        a = {r.key for r in planning.select_shard(plan.rows, (i, 3))}
        assert a == {r.key for r in planning.select_shard(rows, (i, 3))}  # row order
    # a plan with other items (fewer scenarios, other slices): shared items keep their shard
    other = planning.build_plan(_cfg(scenarios={"n": 3}, slices=["id_chat", "chat_email"]))
    ours = {r.spec.item_id for r in planning.select_shard(plan.rows, (1, 3))}
    theirs = {r.spec.item_id for r in planning.select_shard(other.rows, (1, 3))}
    shared = {r.spec.item_id for r in other.rows}
    assert theirs == ours & shared


def test_shards_are_roughly_balanced():
    items = [f"prompt:{i}" for i in range(4000)] + [f"scenario:s{i}" for i in range(1000)]
    for n in (2, 3, 8, 16):
        sizes = Counter(planning.shard_of(it, n) for it in items)
        mean = len(items) / n
        assert set(sizes) == set(range(n))
        # multinomial: sd = sqrt(mean (1 - 1/n)); 5 sd is far past chance, tight for a bias
        sd = (mean * (1 - 1 / n)) ** 0.5
        assert all(abs(c - mean) < 5 * sd for c in sizes.values()), (n, sizes)


def test_one_more_shard_moves_only_the_items_it_wins():
    items = [f"prompt:{i}" for i in range(3000)]
    for n in (1, 2, 4, 7):
        before = [planning.shard_of(it, n) for it in items]
        after = [planning.shard_of(it, n + 1) for it in items]
        moved = [a for b, a in zip(before, after, strict=True) if a != b]
        assert set(moved) <= {n}  # an item leaves its shard only for the new one
        share = len(moved) / len(items)
        assert abs(share - 1 / (n + 1)) < 0.04, (n, share)


# -- sharded and unsharded writers ----------------------------------------------------------------


def _quiet(_msg):
    pass


def _row(key, item):
    return GenerationRow(
        key=key, base="b", stage="base", persona=None, slice="id_chat", item_id=item,
        sample_idx=0, split="eval", seed=0, outcome="reply", messages=[], final_reply="t",
        text="t",
    )  # fmt: skip


def test_an_unsharded_writer_and_a_shard_exclude_each_other(tmp_path):
    root = tmp_path / "run"
    with RunStore(root, warn=_quiet):
        with pytest.raises(
            ModeLockError, match=f"unsharded charshift process \\(pid {os.getpid()}"
        ):
            RunStore(root, shard=(1, 4), warn=_quiet)
    with RunStore(root, shard=(1, 4), warn=_quiet):
        with pytest.raises(ModeLockError) as err:
            RunStore(root, warn=_quiet)
        msg = str(err.value)
        assert f"shard 1 of 4 (pid {os.getpid()}" in msg and "--shard I/4" in msg
        with RunStore(root, shard=(2, 4), warn=_quiet):  # shards of one count run together
            pass
        with pytest.raises(LockHeldError, match="shard 1 of 4"):  # but not one shard twice
            RunStore(root, shard=(1, 4), warn=_quiet)
    RunStore(root, warn=_quiet).close()  # one after the other: fine


def test_shards_of_another_count_are_refused(tmp_path):
    root = tmp_path / "run"
    with RunStore(root, shard=(0, 2), warn=_quiet):
        with pytest.raises(ModeLockError, match=r"written in 2 shards .*shard 0 of 2 \(pid"):
            RunStore(root, shard=(0, 3), warn=_quiet)
    with RunStore(root, shard=(0, 3), warn=_quiet):  # once they are done, another count may go
        pass


def test_locks_are_released_when_opening_fails(tmp_path):
    root = tmp_path / "run"
    with RunStore(root, shard=(0, 2), warn=_quiet):
        with pytest.raises(LockHeldError):
            RunStore(root, shard=(0, 2), warn=_quiet)
    RunStore(root, warn=_quiet).close()  # the refused shard left no shared hold behind


def test_readers_see_the_union_once_and_writers_skip_what_any_file_holds(tmp_path):
    root = tmp_path / "run"
    with RunStore(root, shard=(0, 2), warn=_quiet) as s0:
        s0.write_config({"name": "union"})
        s0.generations.append([_row("k1", "prompt:1"), _row("k2", "prompt:2")])
    with RunStore(root, shard=(1, 2), warn=_quiet) as s1:
        assert "k1" in s1.generations  # a shard's writer reads every file
        s1.generations.append([_row("k1", "prompt:1"), _row("k3", "prompt:3")])
    with RunStore(root, warn=_quiet) as whole:  # an unsharded writer after the shards
        assert whole.generations.append([_row("k2", "prompt:2"), _row("k4", "prompt:4")]) == 1
    reader = RunStore(root, writable=False, warn=_quiet)
    assert sorted(r.key for r in reader.generations) == ["k1", "k2", "k3", "k4"]
    assert not reader.notes  # no key was written twice
    files = sorted(p.name for p in root.glob("generations*.jsonl"))
    assert files == [
        "generations.jsonl",
        "generations.shard-0-of-2.jsonl",
        "generations.shard-1-of-2.jsonl",
    ]


# -- the command line -----------------------------------------------------------------------------

runner = CliRunner()

SMALL = {
    "name": "small",
    "description": "shards test: tiny models, a few items",
    "meaningless": True,
    "bases": [
        {
            "name": "tinyllama",
            "model": "tiny:llama",
            "classifier": "tiny:modernbert:sarcasm,humor",
            "adapters": {"full": {"path": "tiny-lora:{persona}"}},
        }
    ],
    "stages": ["base", "prompted", "full"],
    "personas": ["sarcasm", "humor"],
    "slices": ["id_chat", "id_chat_prefill", "chat_email", "agentic_email"],
    "sampling": {"max_tokens": 10, "n_samples": 2, "seed": 0},
    "backend": {"kind": "hf", "batch_size": 16, "device": "cpu", "dtype": "float32"},
    "id_prompts": {"source": "bundled", "n_eval": 4, "seed": 0},
    "scenarios": {"n": 2, "seed": 0},
    "rollout": {"max_steps": 2, "step_margin": 0, "max_malformed": 1},
    "scoring": {"batch_size": 16, "max_length": 128},
    "stats": {"n_boot": 20, "seed": 0},
}


def _write_cfg(path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(SMALL))
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard", "2/2"], "shard index 2 is not in 0..1"),
        (["--executor", "ray", "--shard", "0/2"], "give one of the two"),
        (["--executor", "dask"], "--executor: 'dask' is not one of local, ray"),
        (["--shards", "2"], "--shards and --ray-address go with --executor ray"),
    ],
)
def test_run_refuses_bad_shard_flags(tmp_path, args, message):
    cfg = _write_cfg(tmp_path / "c.yaml")
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "r").exists()


def test_dry_run_of_a_shard_counts_its_rows(tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml")
    res = runner.invoke(app, ["run", str(cfg), "--dry-run", "--shard", "1/3"])
    assert res.exit_code == 0, res.output
    plan = planning.build_plan(parse_config(SMALL))
    sizes = planning.shard_sizes(plan.rows, 3)
    assert f"rows per shard (3 shards): {sizes}" in res.output
    assert f"this shard (1/3): {sizes[1]} rows" in res.output
    total = next(line for line in res.output.splitlines() if line.strip().startswith("total"))
    assert int(total.split()[1]) == sizes[1]  # the cost covers the shard's rows only


# -- real runs: one unsharded, one over Ray; the merged store equals it ---------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    old = os.environ.get("CHARSHIFT_CACHE")
    os.environ["CHARSHIFT_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("CHARSHIFT_CACHE", None)
    else:
        os.environ["CHARSHIFT_CACHE"] = old


@pytest.fixture(scope="module")
def local_ray(cache):
    """One local Ray for the module, started the way `--executor ray` starts it (its runtime_env
    carries the cache and the import path, so workers import this tree)."""
    ray = pytest.importorskip("ray")
    assert os.environ["CHARSHIFT_CACHE"] == str(cache)
    executors._start_ray(ray, None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    pipeline.run_all(parse_config(SMALL), out)
    return out


def _table(run: Path, stem: str) -> dict:
    store = RunStore(run, writable=False, warn=_quiet)
    rows = store.generations if stem == "generations" else store.scores
    return {tuple(getattr(r, f) for f in rows.key_fields): r.to_dict() for r in rows}


def _same_scores(a: dict, b: dict) -> bool:
    """Equal score rows, probabilities to 1e-6 (a row scored in another batch differs in float32
    rounding, never in its prediction)."""
    if a.keys() != b.keys():
        return False
    for k, r in a.items():
        s = b[k]
        if {**r, "probs": None} != {**s, "probs": None}:
            return False
        if any(abs(r["probs"][p] - s["probs"][p]) > 1e-6 for p in r["probs"]):
            return False
    return True


@pytest.mark.slow
def test_a_ray_run_equals_an_unsharded_run_row_for_row(local_ray, reference, tmp_path):
    cfg = parse_config(SMALL)
    n = 3
    plan = planning.build_plan(cfg)
    assert all(planning.shard_sizes(plan.rows, n)), "every shard must get rows to test"
    out = tmp_path / "sharded"
    path = executors.run_ray(cfg, out, n_shards=n, echo=_quiet)
    files = sorted(p.name for p in out.glob("*.jsonl"))
    assert files == [
        f"{t}.shard-{i}-of-{n}.jsonl" for t in ("generations", "scores") for i in range(n)
    ]
    gen = _table(out, "generations")
    assert gen == _table(reference, "generations")  # keys, messages, outcomes, everything
    assert _same_scores(_table(out, "scores"), _table(reference, "scores"))
    assert (out / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    # the report covers every row: every eval unit of every row is a record, every row scored
    store = RunStore(out, writable=False, warn=_quiet)
    records = analysis.prediction_records(cfg, store)
    assert {r.key for r in records} == {k[0] for k, g in gen.items() if g["split"] == "eval"}
    assert Path(path).is_file() and "incomplete" not in (out / "report.md").read_text()
    events = [e["event"] for e in json.loads((out / "manifest.json").read_text())["events"]]
    assert events.count("shard_start") == 2 * n and events[-1] == "run_end"
    _report_names_the_incomplete_shard(out, tmp_path, n)


def _report_names_the_incomplete_shard(run: Path, tmp_path: Path, n: int) -> None:
    """A copy of the finished run without one shard's rows: the report says which shard."""
    part = tmp_path / "partial"
    shutil.copytree(run, part, ignore=shutil.ignore_patterns("*.lock", "*.info"))
    lost = part / f"generations.shard-1-of-{n}.jsonl"
    n_lost = len(lost.read_bytes().splitlines())
    lost.unlink()
    res = runner.invoke(app, ["report", "--run", str(part)])
    assert res.exit_code == 0, res.output
    text = (part / "report.md").read_text()
    assert f"Sharded run ({n} shards): 1 of {n} shards are incomplete" in text
    assert f"shard 1/{n}: {n_lost} of {n_lost} rows not generated" in text
    assert f"shard 0/{n}:" not in text and f"--shard I/{n}" in text


@pytest.mark.slow
def test_a_shard_through_the_cli_resumes_and_writes_no_report(reference, tmp_path):
    """`charshift run --shard` (a SLURM array task) on a run whose rows all exist: nothing is
    generated or scored again, the message names the next step, and no report is written."""
    cfg = _write_cfg(tmp_path / "c.yaml")
    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("report", "*.md", "*.csv"))
    res = runner.invoke(app, ["run", str(cfg), "--out", str(run), "--shard", "0/2"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if '{"shard"' in x)  # after a progress bar
    done = json.loads(line[line.index('{"shard"') :])
    assert done["shard"] == "0/2" and done["generated"]["generated"] == 0
    assert (
        done["generated"]["done_before"]
        == planning.shard_sizes(planning.build_plan(parse_config(SMALL)).rows, 2)[0]
    )
    assert done["scored"]["scored"] == 0 and done["scored"]["already"] > 0
    assert "shard 0/2 done" in res.output and f"charshift report --run {run}" in res.output
    assert not (run / "report.md").exists() and not list(run.glob("*.shard-*.jsonl"))


@pytest.mark.slow
def test_failed_shards_are_named_once_the_others_finish(local_ray, tmp_path):
    """Every shard with rows fails to load its backend (a CUDA device on a CPU machine); the
    shards without rows finish. The error names exactly the failed shards."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where a cuda backend cannot load")
    bad = dict(SMALL, stages=["base", "prompted"], slices=["id_chat"])
    bad["backend"] = {**SMALL["backend"], "device": "cuda"}
    cfg = parse_config(bad)
    sizes = planning.shard_sizes(planning.build_plan(cfg).rows, 6)
    failing = [i for i, n in enumerate(sizes) if n]
    assert 0 < len(failing) < 6, sizes
    with pytest.raises(executors.ExecutorError) as err:
        executors.run_ray(cfg, tmp_path / "run", n_shards=6, echo=_quiet)
    msg = str(err.value)
    assert f"{len(failing)} of 6 Ray task(s) failed" in msg
    assert {f"shard {i}/6:" in msg for i in range(6)} == {True, False}
    assert all((f"shard {i}/6:" in msg) == (i in failing) for i in range(6))
    assert "run the same command again" in msg


def test_a_shard_never_trains_the_run_classifier(tmp_path):
    """Training needs every shard's rows: `score --shard` refuses, naming the unsharded step."""
    from charshift.config import config_to_dict

    data = dict(SMALL, classifier_training={"encoder": "tiny:modernbert"})
    data["bases"] = [{k: v for k, v in SMALL["bases"][0].items() if k != "classifier"}]
    run = tmp_path / "run"
    with RunStore(run, warn=_quiet) as store:
        store.write_config(config_to_dict(parse_config(data)))
    res = runner.invoke(app, ["score", "--run", str(run), "--shard", "0/2"])
    assert res.exit_code == 2, res.output
    assert "train their classifier in the run" in res.output
    assert f"charshift score --run {run}` without --shard" in res.output
