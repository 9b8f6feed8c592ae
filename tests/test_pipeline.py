"""End to end: the smoke preset through the real CLI, resume after SIGKILL, dry runs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from charshift import planning, units
from charshift.cli import app
from charshift.config import ALL_SLICES, CHAT_EMAIL_SLICES, load_preset

REPO = Path(__file__).resolve().parents[1]


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


def _cli(args, cache_dir, **kw):
    env = dict(os.environ, CHARSHIFT_CACHE=str(cache_dir), PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen(
        [sys.executable, "-m", "charshift.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _rows(run_dir):
    lines = (Path(run_dir) / "generations.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


@pytest.fixture(scope="module")
def smoke_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    p = _cli(["run", "--preset", "smoke", "--out", str(out)], cache)
    log, _ = p.communicate(timeout=1200)
    assert p.returncode == 0, log
    return out, log


def test_smoke_writes_every_slice_with_outcomes(smoke_run):
    out, log = smoke_run
    rows = _rows(out)
    assert {r["slice"] for r in rows} == set(ALL_SLICES)
    assert all(r["outcome"] for r in rows)
    plan = planning.build_plan(load_preset("smoke"))
    assert sorted(r["key"] for r in rows) == sorted(r.key for r in plan.rows)
    # the base stage is generated once per item and sample, not once per persona
    base_rows = [r for r in rows if r["stage"] == "base"]
    assert all(r["persona"] is None for r in base_rows)
    per_item = Counter((r["slice"], r["item_id"], r["sample_idx"]) for r in base_rows)
    assert set(per_item.values()) == {1}
    with open(out / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    # one column per unit: every slice, and the whole/head variants of every chat-email slice
    # (id_chat.short exists only where a chat_email row produced an email to take a length from)
    measured = {m["slice"] for m in metrics}
    assert set(ALL_SLICES) <= measured <= set(units.unit_order())
    assert {f"{s}.{v}" for s in CHAT_EMAIL_SLICES for v in ("whole", "head")} <= measured
    assert all(m["yield"] != "" for m in metrics)
    assert (out / "report" / "index.html").exists() and (out / "report.md").exists()
    assert "meaningless" in (out / "report" / "index.html").read_text().lower()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["packages"]["torch"] and manifest["seeds"]["sampling"] == 0
    assert manifest["backends"]["tinyllama"]["adapters"]
    assert "report:" in log


def test_rerun_is_a_no_op(smoke_run, cache):
    out, _ = smoke_run
    before = (out / "generations.jsonl").read_bytes()
    p = _cli(["run", "--preset", "smoke", "--out", str(out)], cache)
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log
    assert (out / "generations.jsonl").read_bytes() == before


def test_sigkill_midway_then_resume_gives_the_same_rows(smoke_run, cache, tmp_path):
    ref = {r["key"]: r for r in _rows(smoke_run[0])}
    out = tmp_path / "killed"
    p = _cli(["run", "--preset", "smoke", "--out", str(out)], cache, start_new_session=True)
    gen = out / "generations.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if gen.exists() and len(gen.read_bytes().splitlines()) >= 20:
            break
        if p.poll() is not None:
            pytest.fail("run finished before it could be killed: " + p.stdout.read())
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    n_before = len(gen.read_bytes().splitlines())
    assert 0 < n_before < len(ref)
    p = _cli(["run", "--preset", "smoke", "--out", str(out)], cache)
    log, _ = p.communicate(timeout=1200)
    assert p.returncode == 0, log
    rows = _rows(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == len(ref)
    assert set(keys) == set(ref)
    for r in rows:  # same outputs as the uninterrupted run, row for row
        assert r["messages"] == ref[r["key"]]["messages"], r["key"]
        assert r["outcome"] == ref[r["key"]]["outcome"]


def test_dry_run_paper_loads_no_model():
    res = CliRunner().invoke(app, ["run", "--preset", "paper", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "generations in all" in res.output
    assert "agentic_email" in res.output and "llama" in res.output


def test_bad_config_named_before_any_model(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(
        "bases: [{name: x, model: tiny:llama, classifier: c}]\npersonas: [sarcasm, humor]\nsampling: {top_p: 7}\n"
    )
    res = CliRunner().invoke(app, ["run", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "sampling.top_p" in res.output
    assert not (tmp_path / "o").exists()


def test_help_lists_commands():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in (
        "run",
        "generate",
        "score",
        "report",
        "train-classifier",
        "demo",
        "presets",
        "scenarios",
    ):
        assert cmd in res.output


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run(
        [sys.executable, "-m", "charshift.cli", "demo", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Report:" in res.stdout
    with open(out / "metrics.csv") as f:
        metrics = {(m["stage"], m["slice"]): m for m in csv.DictReader(f)}
    assert ("prompted", "id_chat") in metrics and ("base", "id_chat") in metrics
    assert ("prompted", "agentic_email") in metrics
    rep = json.loads((out / "classifier" / "smollm2" / "train_report.json").read_text())
    assert rep["n_heldout"] > 0
    assert (out / "report" / "index.html").stat().st_size > 10_000


def test_id_prompts_file_is_used_whole(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(5))
    )
    res = CliRunner().invoke(app, ["run", "--preset", "smoke", "--id-prompts", str(f), "--dry-run"])
    assert res.exit_code == 0, res.output
    # 5 prompts x (1 base + 4 prompted + 4 full) conditions x 2 samples, in each of 3 ID slices
    counts = {
        tuple(line.split()[:2]): int(line.split()[2])
        for line in res.output.splitlines()
        if line.startswith("  id_")
    }
    assert counts[("id_chat", "eval")] == 90 and counts[("id_chat_break", "eval")] == 90
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "b"}\n')
    res = CliRunner().invoke(
        app, ["run", "--preset", "smoke", "--id-prompts", str(bad), "--dry-run"]
    )
    assert res.exit_code == 2 and "line 2" in res.output
