"""End to end: the smoke preset through the real CLI, resume after SIGKILL, dry runs."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from charshift import planning, units
from charshift.cli import app
from charshift.config import ALL_SLICES, CHAT_EMAIL_SLICES, load_preset
from charshift.store import read_quarantine

REPO = Path(__file__).resolve().parents[1]
# Seconds a whole smoke run may take: it runs every slice (the six scaffolds and their controls
# too), about 10 minutes on 2 idle cores and more than 20 on a shared, loaded machine.
SMOKE_TIMEOUT = 2400


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
    log, _ = p.communicate(timeout=SMOKE_TIMEOUT)
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


def test_run_prints_the_answer_and_load_results_reads_it(smoke_run):
    """`charshift run` ends with the answer's table (the report's summary.txt), and a notebook
    reads the run in one call: the CSVs and the generations joined with their predictions."""
    import charshift

    out, log = smoke_run
    summary = (out / "report" / "summary.txt").read_text().rstrip("\n")
    assert summary in log and "home ground (id_chat): excess" in summary
    assert log.index(summary) < log.index("report: ")
    res = charshift.load_results(out)
    assert len(res.metrics) and {"macro_f1_excess", "flag"} <= set(res.metrics.columns)
    rows = res.rows
    assert len(rows) and {"prediction", "text", "messages", "outcome"} <= set(rows.columns)
    keys = {json.loads(x)["key"] for x in (out / "generations.jsonl").read_text().splitlines()}
    assert set(rows["key"]) <= keys  # every row is a generation of the run
    assert rows["messages"].map(lambda m: isinstance(m, list) and len(m) > 0).all()


def test_smoke_runs_every_scaffold_against_its_control(smoke_run):
    """Each scaffold and its chat control end to end: their rows pair by item, every bank's
    hash is in the manifest, each pair is a paired contrast, and the behaviour unit is reported
    as not scored."""
    import hashlib
    from importlib import resources

    from charshift import items, slices

    out, _ = smoke_run
    rows = _rows(out)
    manifest = json.loads((out / "manifest.json").read_text())
    with open(out / "differences.csv") as f:
        contrasts = {
            (d["slice_a"], d["slice_b"]) for d in csv.DictReader(f) if d["kind"] == "contrast"
        }
    for kind in slices.scaffold_kinds():
        pair = (kind + "_chat", kind)
        ids = [{r["item_id"] for r in rows if r["slice"] == sl} for sl in pair]
        assert ids[0] == ids[1] and all(i.startswith(f"{kind}:") for i in ids[0]), kind
        assert pair in contrasts, kind
        bundled = resources.files("charshift") / "data" / "items" / items.KINDS[kind].file
        assert manifest["banks"][kind]["sha256"] == hashlib.sha256(bundled.read_bytes()).hexdigest()
    actions = [r for r in rows if r["slice"] == "agentic_actions"]
    assert all(r["tool_log"] or r["outcome"] == "malformed" for r in actions)
    md = (out / "report.md").read_text()
    assert "Not scored: agentic_actions.behaviour" in md
    # the config's description opens the report's notes (the demo's says why its judge is off)
    assert "About this run: Pipeline check only" in md


def test_rerun_is_a_no_op(smoke_run, cache):
    out, _ = smoke_run
    before = (out / "generations.jsonl").read_bytes()
    p = _cli(["run", "--preset", "smoke", "--out", str(out)], cache)
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log
    assert (out / "generations.jsonl").read_bytes() == before


KILL_SEED = int(os.environ.get("CHARSHIFT_KILL_SEED", "0"))


def _lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _reached(phase, at, out, n_rows, n_scores):
    """Has the run in `out` reached kill point (phase, at)?"""
    if phase == "generate":
        return _lines(out / "generations.jsonl") >= at
    if phase == "score":  # the step records its classifier before it scores anything
        m = out / "manifest.json"
        return m.exists() and b"classifier_ids" in m.read_bytes()
    return _lines(out / "scores.jsonl") >= n_scores  # report: after the last score


def _holds_lock(out, pid):
    """Does process `pid` hold the run's writer lock (writer.lock.info names the holder)?"""
    try:
        return json.loads((out / "writer.lock.info").read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


# One forward per row: the HF backend's batch-invariant setting (`reproducibility`). With
# batches, a row regenerated after a kill shares its batch with other rows than in the
# uninterrupted run, and CPU matmuls round differently for other batch sizes: a sampled row of the
# tiny random model (its nucleus full of nearly tied tokens) then took another token, in one row
# of 864.
# Three slices (a single turn, an email, the agentic tool loop with its per-episode KV reuse)
# keep the runs of one row per forward short.
ONE_ROW = ["--set", "backend.batch_size=1", "--slices", "id_chat,chat_email,agentic_email"]


def _run_until_killed(cache, out, phase, at, n_rows, n_scores):
    """Start `run`, SIGKILL its process group at the point; returns (killed, log). A generate
    point the rows already passed (a kill lands a batch late under load) moves to this run's
    first new row, so the run has taken the lock, and said so, before it is killed."""
    if phase == "generate":
        at = max(at, _lines(out / "generations.jsonl") + 1)
    p = _cli(
        ["run", "--preset", "smoke", *ONE_ROW, "--out", str(out)], cache, start_new_session=True
    )
    deadline = time.time() + SMOKE_TIMEOUT
    # a point counts once this run holds the writer lock (and has said it took it over): a
    # point the store has already passed must not kill a run that is still starting up
    while not (_holds_lock(out, p.pid) and _reached(phase, at, out, n_rows, n_scores)):
        if p.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.02)
    else:
        if phase != "generate":
            time.sleep(at)  # seconds into the step
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    log, _ = p.communicate(timeout=SMOKE_TIMEOUT)
    assert p.returncode in (0, -signal.SIGKILL), log
    return p.returncode == -signal.SIGKILL, log


def _store_files(run_dir, stem):
    rows = {}
    for f in sorted(Path(run_dir).glob(f"{stem}*.jsonl")):
        if ".quarantine." not in f.name:
            for line in f.read_text().splitlines():
                r = json.loads(line)
                k = (r["key"], r.get("classifier"))
                assert k not in rows, f"{f.name}: key {k} twice"
                rows[k] = r
    return rows


def test_sigkill_at_random_points_then_resume_gives_the_same_store(cache, tmp_path):
    """Fault injection: SIGKILL `run` at seeded random points in generate (twice), score and
    report, one after the other in one run directory; the resumed run's store (generations,
    scores, metrics.csv) equals the uninterrupted run's, row for row (both with batch_size 1,
    under which the backend promises a row's text whatever it was batched with)."""
    ref = tmp_path / "ref"
    p = _cli(["run", "--preset", "smoke", *ONE_ROW, "--out", str(ref)], cache)
    log, _ = p.communicate(timeout=SMOKE_TIMEOUT)
    assert p.returncode == 0, log
    manifest = json.loads((ref / "manifest.json").read_text())
    assert "batch_invariant" in json.dumps(manifest), "the run records what its seed guarantees"
    ref_gens, ref_scores = _store_files(ref, "generations"), _store_files(ref, "scores")
    n = len(ref_gens)
    rng = random.Random(KILL_SEED)
    points = [
        ("generate", rng.randint(1, n // 2)),
        ("generate", rng.randint(n // 2 + 1, n - 1)),
        ("score", rng.uniform(0.0, 2.0)),
        ("report", rng.uniform(0.5, 8.0)),
    ]
    out = tmp_path / "killed"
    killed = []
    for phase, at in points:
        was_killed, log = _run_until_killed(cache, out, phase, at, n, len(ref_scores))
        if killed and killed[-1]:  # a killed writer leaves its lock; the next one says so
            assert "taking over the lock" in log, log
        killed.append(phase if was_killed else None)
    print(f"kill seed {KILL_SEED}: points {points}, killed in {killed}")
    assert killed[:2] == ["generate", "generate"], (KILL_SEED, points, killed)
    p = _cli(["run", "--preset", "smoke", *ONE_ROW, "--out", str(out)], cache)
    log, _ = p.communicate(timeout=SMOKE_TIMEOUT)
    assert p.returncode == 0, log
    assert ("taking over the lock" in log) == bool(killed[-1]), log
    gens, scores = _store_files(out, "generations"), _store_files(out, "scores")
    assert gens.keys() == ref_gens.keys() and scores.keys() == ref_scores.keys()
    for k, r in gens.items():  # same outputs as the uninterrupted run, row for row
        assert r == ref_gens[k], k
    for k, r in scores.items():
        assert r == ref_scores[k], k
    assert (out / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    assert not list(out.glob(".*.tmp")) and not (out / "writer.lock.info").exists()
    q = out / "generations.quarantine.jsonl"
    for d in read_quarantine(q) if q.exists() else []:  # only cut-off lines of real rows
        assert d.reason.startswith("cut off"), d
        assert any(
            json.dumps(r, ensure_ascii=False).encode().startswith(d.raw) for r in ref_gens.values()
        )


def test_dry_run_paper_loads_no_model():
    res = CliRunner().invoke(app, ["run", "--preset", "paper", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "generations in all" in res.output
    assert "agentic_email" in res.output and "llama" in res.output
    # the scaffolds are an opt-in block: off, their cost is printed on its own
    main, block = res.output.split("opt-in block 'scaffolds' (off")
    assert "code_review" not in main and "agentic_actions" in block and "total" in block
    on = CliRunner().invoke(app, ["run", "--preset", "paper", "--with", "scaffolds", "--dry-run"])
    assert on.exit_code == 0, on.output
    assert "opt-in block 'scaffolds' (on)" in on.output
    assert "agentic_actions.behaviour: not scored (only the judge's behaviour rubric" in on.output
    bad = CliRunner().invoke(app, ["run", "--preset", "paper", "--with", "nope", "--dry-run"])
    assert bad.exit_code == 2 and "no opt-in block 'nope'" in bad.output


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
    """The embedded default shows what the tool measures (issues 8 and 13): a classifier above
    chance; persona detected on home ground by the prompted stage's chance-corrected figure
    (its macro-F1 excess over its own null, the family's simultaneous band above 0), never by
    "prompted minus base"; the scorer check from the positive control in every unit; the
    declared primary family with Holm p-values and simultaneous bands; an output in every chat
    slice of the prompted stage; and the report opening with those. These are the figures of
    one real run of SmolLM2 + MiniLM, not timings. The tool slices are run and their outcomes
    tabulated, but their yield is not asserted: under the constrained envelope SmolLM2-135M
    still writes invented addresses and bodies that are not emails, so a yield there is luck at
    this size."""
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run(
        [sys.executable, "-m", "charshift.cli", "demo", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=2700,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Report:" in res.stdout
    answer = (out / "report" / "summary.txt").read_text().rstrip("\n")
    assert answer in res.stdout and "home ground (id_chat): excess" in answer  # printed first
    assert res.stdout.index(answer) < res.stdout.index("Report:")
    rep = json.loads((out / "classifier" / "smollm2" / "train_report.json").read_text())
    lo, _hi = rep["macro_f1_interval"]
    assert rep["above_chance"] and lo > rep["chance"], rep["summary"]

    def table(name: str) -> list[dict[str, str]]:
        with open(out / name) as f:
            return list(csv.DictReader(f))

    metrics = {(m["stage"], m["slice"]): m for m in table("metrics.csv")}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["analysis"]["positive_control"] == "prompted_explicit" in cfg["stages"]
    for sl in cfg["slices"]:
        assert int(metrics[("prompted", sl)]["n_rows"]) > 0, f"prompted {sl}: not run"
        assert int(metrics[("prompted_explicit", sl)]["n_rows"]) > 0, f"control {sl}: not run"
        if sl not in ("tool_email_oneshot", "agentic_email"):
            assert int(metrics[("prompted", sl)]["n_scored"]) > 0, f"prompted {sl}: no output"
    home = metrics[("prompted", "id_chat")]
    assert float(home["macro_f1_excess_lo"]) > 0, home  # above its own null
    assert float(home["macro_f1_excess"]) == pytest.approx(
        float(home["macro_f1"]) - float(home["macro_f1_null"]), abs=1e-5
    )
    assert float(home["kappa"]) > 0 and float(home["p_null"]) < 0.05, home
    assert abs(float(metrics[("base", "id_chat")]["macro_f1_excess"])) < 1e-9  # the null itself

    checks = {c["unit"]: c for c in table("scorer_check.csv")}
    assert set(checks) == {m[1] for m in metrics}  # every unit checked
    assert checks["id_chat"]["scorer_blind"] == "False" and checks["id_chat"]["scorer"]
    assert float(checks["id_chat"]["sensitivity_lo"]) > 0
    assert all(0 < float(c["null_top_share"]) <= 1 for c in checks.values() if c["null_top_share"])

    diffs = table("differences.csv")
    # prompted minus base is not evidence: no difference sets a stage against the base stage (the
    # base stage's own ladder, within the base, is the scorer's shift on text with no persona)
    assert not any(d["stage_b"] == "base" != d["stage_a"] for d in diffs)
    family = [d for d in diffs if d["family"] == "primary"]
    assert {(d["kind"], d["chain"]) for d in family} == {
        ("excess", ""),
        ("total", "email_step"),
        ("total", "agentic"),
    }
    assert all(d["stage_a"] == "prompted" and d["metric"] == "macro_f1_excess" for d in family)
    (excess,) = [d for d in family if d["kind"] == "excess"]
    assert float(excess["lo_simul"]) > 0 and float(excess["p_holm"]) < 0.05, excess
    for d in family:  # (undefined where nothing is scored; no interval, band or p on one item)
        if d["lo"]:
            assert float(d["lo_simul"]) <= float(d["lo"]) and float(d["p"]) <= float(d["p_holm"])
        else:
            assert d["lo_simul"] == d["p"] == d["p_holm"] == "", d
    assert any(d["metric"] == "macro_f1_excess" and d["kind"] == "rung" for d in diffs)

    ladder = [c for c in table("chains.csv") if c["stage"] == "prompted"
              and c["chain"] == "agentic" and c["metric"] == "macro_f1_excess"]  # fmt: skip
    assert {c["slice"] for c in ladder} >= {"chat_email", "agentic_email"}
    for c in ladder:  # an interval wherever two items or more carry the unit, none on one
        has = c["lo"] != "" and c["hi"] != ""
        assert has == (c["estimate"] != "" and int(c["common_items"]) >= 2), c

    md = (out / "report.md").read_text()
    # the answer's table first, then the prose, which names the scorer check and the family
    assert md.index("## The answer") < md.index("## Headline") < md.index("## Metrics per cell")
    answer_md = md[md.index("## The answer") : md.index("## Headline")]
    assert "home ground (id_chat): excess" in answer_md and "prompted" in answer_md
    head = md[md.index("## Headline") : md.index("## Metrics per cell")]
    assert "Scorer check for smollm2" in head
    assert "primary family, declared before looking" in head
    assert head.index("Scorer check") < head.index("primary family, declared before looking")
    assert "Outcomes and differential censoring" in md
    html = (out / "report" / "index.html").read_text()
    assert html.index("Headline") < html.index("Metrics per cell")
    assert html.index('id="scorer"') < html.index('id="family"') < html.index('id="ladder"')


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
