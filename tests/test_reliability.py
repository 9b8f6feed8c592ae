"""Reliability suite: a damaged run folder, case by case, through the real CLI in a subprocess.

Each case damages a copy of a finished small run (deleted or damaged manifest and config, corrupt
lines in the middle of a table, truncated scores, deleted generations, a read-only file, a full
disk, a lock held by a live process, a stale lock, a second `run` on the same folder) and checks:
the exit code, a message that names the file, no traceback, no file damaged by a reader, and,
where a command that writes resumes the run, a final store equal to the undamaged run's, row for
row. The outcomes are counted in issue 9's table form (see `test_outcome_table`).
The store fuzzer is tests/test_store_fuzz.py; the SIGKILL fault injection is in test_pipeline.py.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from charshift.store import read_quarantine

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

MINI = """\
name: mini
description: "reliability suite: a small run of the tiny models"
meaningless: true
bases:
  - name: tinyllama
    model: tiny:llama
    classifier: "tiny:modernbert:sarcasm,humor,remorse,goodness"
stages: [base, prompted]
personas: [sarcasm, humor]
slices: [id_chat, chat_email]
sampling: {temperature: 0.7, top_p: 0.95, max_tokens: 16, repetition_penalty: 1.1, n_samples: 1, seed: 0}
backend: {kind: hf, batch_size: 16, device: cpu, dtype: float32}
id_prompts: {source: bundled, n_eval: 4, seed: 0}
scenarios: {n: 2, seed: 0}
scoring: {text: extracted, batch_size: 16, max_length: 128}
stats: {n_boot: 20, ci: 0.95, method: percentile, seed: 0}
"""

OUTCOMES: list[tuple[str, str]] = []  # (case, outcome), in the issue table's terms
BAD = ("traceback", "silent wrong", "data lost")
KEPT = ("config.yaml", "manifest.json", "generations.jsonl", "scores.jsonl")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return dict(os.environ, CHARSHIFT_CACHE=str(cache), PYTHONPATH=str(REPO / "src"))


@pytest.fixture(scope="module")
def mini(env, tmp_path_factory):
    """(config file, finished run folder) of the small run every case damages a copy of."""
    root = tmp_path_factory.mktemp("mini")
    cfg = root / "mini.yaml"
    cfg.write_text(MINI)
    rc, out = _cli(["run", str(cfg), "--out", str(root / "ref")], env)
    assert rc == 0, out
    return cfg, root / "ref"


def _cli(args, env, prefix=(), timeout=900, **kw):
    res = subprocess.run(
        [*prefix, sys.executable, "-m", "charshift.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        **kw,
    )
    return res.returncode, res.stdout


def _copy(ref, dst):
    shutil.copytree(ref, dst, ignore=shutil.ignore_patterns("report", "*.md", "*.csv", "*.lock"))
    return dst


def _kept(run):
    return {n: (run / n).read_bytes() for n in KEPT if (run / n).exists()}


def _table(run, stem):
    rows = {}
    for f in sorted(run.glob(f"{stem}*.jsonl")):
        if ".quarantine." not in f.name:
            for line in f.read_bytes().splitlines():
                r = json.loads(line)
                k = (r["key"], r.get("classifier"))
                assert k not in rows, f"{f}: {k} twice"
                rows[k] = r
    return rows


def _same_scores(a, b):
    """Equal score rows; probabilities to 1e-6: a row rescored in a batch of other rows than in
    the uninterrupted run differs in float32 rounding (about 6e-8), never in its prediction."""
    if a.keys() != b.keys():
        return False
    for k, r in a.items():
        s = b[k]
        if {**r, "probs": None} != {**s, "probs": None} or r["probs"].keys() != s["probs"].keys():
            return False
        if any(abs(r["probs"][p] - s["probs"][p]) > 1e-6 for p in r["probs"]):
            return False
    return True


def _same_store(run, ref):
    return (
        _table(run, "generations") == _table(ref, "generations")
        and _same_scores(_table(run, "scores"), _table(ref, "scores"))
        and (run / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    )


def _judge(case, rc, out, *, rc_ok, names, data_ok=True):
    """Record the case's outcome in the issue's terms, then assert it is a clear one."""
    if "Traceback (most recent call last)" in out:
        outcome = "traceback"
    elif not data_ok:
        outcome = "data lost"
    elif not rc_ok(rc) or not all(n in out for n in names):
        outcome = "silent wrong"
    elif rc:
        outcome = "clear error"
    else:  # a warning naming the file, or (names=[]) a resume that gave the undamaged result
        outcome = "clear warning" if names else "resumed, identical"
    OUTCOMES.append((case, outcome))
    assert outcome not in BAD, f"{case}: {outcome} (exit {rc})\n{out[-3000:]}"


def _zero(rc):
    return rc == 0


def _two(rc):
    return rc == 2


# -- reports (readers) and resumes (writers) on a damaged folder ---------------------------------


def test_deleted_manifest(mini, env, tmp_path):
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    (run / "manifest.json").unlink()
    before = _kept(run)
    rc, out = _cli(["report", "--run", str(run)], env)
    _judge(
        "deleted manifest: report",
        rc,
        out,
        rc_ok=_zero,
        names=["manifest.json records no classifier"],
        data_ok=_kept(run) == before and _same_store(run, ref),
    )


def test_damaged_manifest(mini, env, tmp_path):
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    (run / "manifest.json").write_bytes(b'{"created": "2025", "classifier_')
    before = _kept(run)
    rc, out = _cli(["report", "--run", str(run)], env)
    _judge(
        "damaged manifest: report",
        rc,
        out,
        rc_ok=_zero,
        names=["manifest.json is damaged", "manifest.json records no classifier"],
        data_ok=_kept(run) == before and _same_store(run, ref),
    )
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    (aside,) = run.glob("manifest.damaged-*.json")
    _judge(
        "damaged manifest: run",
        rc,
        out,
        rc_ok=_zero,
        names=["set aside as manifest.damaged-"],
        data_ok=aside.read_bytes() == before["manifest.json"] and _same_store(run, ref),
    )


def test_deleted_config(mini, env, tmp_path):
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    (run / "config.yaml").unlink()
    before = _kept(run)
    rc, out = _cli(["report", "--run", str(run)], env)
    _judge(
        "deleted config: report",
        rc,
        out,
        rc_ok=_zero,
        names=["config.yaml is missing; using the copy"],
        data_ok=_kept(run) == before and _same_store(run, ref),
    )


def test_deleted_config_and_manifest(mini, env, tmp_path):
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    (run / "config.yaml").unlink()
    (run / "manifest.json").unlink()
    before = _kept(run)
    rc, out = _cli(["report", "--run", str(run)], env)
    _judge(
        "deleted config and manifest: report",
        rc,
        out,
        rc_ok=_two,
        names=[f"{run / 'config.yaml'} is missing", "charshift run CONFIG --out"],
        data_ok=_kept(run) == before,
    )
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    _judge(
        "deleted config and manifest: run",
        rc,
        out,
        rc_ok=_zero,
        names=["every stored row is a row of the config given"],
        data_ok=_same_store(run, ref),
    )


def test_damaged_config(mini, env, tmp_path):
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    (run / "config.yaml").write_bytes(b"name: [mini\n\xff")
    before = _kept(run)
    for cmd in (["report", "--run", str(run)], ["run", str(cfg), "--out", str(run)]):
        rc, out = _cli(cmd, env)
        _judge(
            f"damaged config: {cmd[0]}",
            rc,
            out,
            rc_ok=_two,
            names=[f"{run / 'config.yaml'} is damaged"],
            data_ok=_kept(run) == before,
        )


def test_corrupt_lines_in_the_middle_of_generations(mini, env, tmp_path):
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    lines = (run / "generations.jsonl").read_bytes().splitlines(keepends=True)
    bad = {3: b"\x00garbage \xff\n", 8: b"null\n", 12: b'{"text": "no key"}\n'}
    for n in sorted(bad):  # lines 3, 8, 12 of the damaged file
        if n == 3:
            lines.insert(n - 1, bad[n])
        else:
            lines[n - 1] = bad[n]
    (run / "generations.jsonl").write_bytes(b"".join(lines))
    before = _kept(run)
    rc, out = _cli(["report", "--run", str(run)], env)
    _judge(
        "corrupt lines in generations: report",
        rc,
        out,
        rc_ok=_zero,
        names=[
            f"{run / 'generations.jsonl'}: 3 of",
            "line 3: not valid UTF-8",
            "line 8: expected a JSON object, got null",
            "line 12: GenerationRow: missing required field 'key'",
            "This run is incomplete: 2 of",
        ],
        data_ok=_kept(run) == before,
    )
    assert "This run is incomplete" in (run / "report.md").read_text()
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    aside = {d.line: d.raw + b"\n" for d in read_quarantine(run / "generations.quarantine.jsonl")}
    _judge(
        "corrupt lines in generations: run",
        rc,
        out,
        rc_ok=_zero,
        names=["Set aside, verbatim", "generations.quarantine.jsonl"],
        data_ok=aside == bad and _same_store(run, ref),
    )


def test_score_says_who_redoes_damaged_generation_rows(mini, env, tmp_path):
    """Issue 18: `score --run` set damaged generation lines aside and said their rows "are
    redone", which score never does. It names the command that does; the run then does it."""
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    lines = (run / "generations.jsonl").read_bytes().splitlines(keepends=True)
    lines[4] = b"{not json\n"
    (run / "generations.jsonl").write_bytes(b"".join(lines))
    rc, out = _cli(["score", "--run", str(run)], env)
    _judge(
        "damaged generations: score",
        rc,
        out,
        rc_ok=_zero,
        names=["`charshift score` does not generate", f"charshift run CONFIG --out {run}"],
    )
    assert "rows that had no good copy are redone" not in out, out
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    _judge(
        "damaged generations: score, then run",
        rc,
        out,
        rc_ok=_zero,
        names=[],
        data_ok=_same_store(run, ref),
    )


def test_truncated_scores(mini, env, tmp_path):
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    raw = (run / "scores.jsonl").read_bytes()
    mid = raw.index(b"\n", len(raw) // 2) + 1  # the start of a line past the middle
    cut = mid + (raw.index(b"\n", mid) - mid) // 2  # cut that line halfway: never a whole line
    (run / "scores.jsonl").write_bytes(raw[:cut])
    n_left = raw[:cut].count(b"\n")
    before = _kept(run)
    rc, out = _cli(["report", "--run", str(run)], env)
    _judge(
        "truncated scores: report",
        rc,
        out,
        rc_ok=_zero,
        names=[f"line {n_left + 1}: cut off", "outputs are not scored", "This run is incomplete"],
        data_ok=_kept(run) == before,
    )
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    _judge(
        "truncated scores: run",
        rc,
        out,
        rc_ok=_zero,
        names=["scores.quarantine.jsonl"],
        data_ok=_same_store(run, ref),
    )


def test_deleted_generations(mini, env, tmp_path):
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    (run / "generations.jsonl").unlink()
    before = _kept(run)
    rc, out = _cli(["report", "--run", str(run)], env)
    _judge(
        "deleted generations: report",
        rc,
        out,
        rc_ok=_two,
        names=["generations.jsonl is missing or empty", "charshift run CONFIG"],
        data_ok=_kept(run) == before,
    )


def test_lone_surrogate_in_a_stored_text(mini, env, tmp_path):
    """Issue 18: a stored text holding a lone surrogate (legal JSON, "\\ud800") made every resume
    end in the tokenizer's TypeError. The row is left unscored, named, and the run finishes."""
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    lines = (run / "generations.jsonl").read_bytes().splitlines(keepends=True)
    i, row = next(
        (i, r)
        for i, r in enumerate(json.loads(x) for x in lines)
        if r["split"] == "eval" and r["text"]
    )
    row["text"] = row["text"][:3] + "\ud800" + row["text"][3:]
    lines[i] = json.dumps(row).encode() + b"\n"  # ensure_ascii: the escape, valid JSON
    (run / "generations.jsonl").write_bytes(b"".join(lines))
    before = _kept(run)["generations.jsonl"]
    for cmd in (["run", str(cfg), "--out", str(run)], ["score", "--run", str(run)]):
        rc, out = _cli(cmd, env)
        _judge(
            f"lone surrogate in a stored text: {cmd[0]}",
            rc,
            out,
            rc_ok=_zero,
            names=["hold a text no tokenizer can read", row["key"], "\\ud800 at character 4"],
            data_ok=(run / "generations.jsonl").read_bytes() == before,
        )


# -- the OS refuses a write: read-only file, full disk -------------------------------------------


def _can_unshare(*flags):
    try:
        res = subprocess.run(["unshare", *flags, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def _read_only_prefix(path):
    """A command prefix under which `path` cannot be written (root ignores file modes, so it
    gets a read-only bind mount in a mount namespace of its own)."""
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        return ()
    if not _can_unshare("--mount"):
        pytest.skip("running as root without mount namespaces: cannot make a file read-only")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ("unshare", "--mount", "sh", "-c", script, str(path))


def test_read_only_scores_file(mini, env, tmp_path):
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    lines = (run / "scores.jsonl").read_bytes().splitlines(keepends=True)
    (run / "scores.jsonl").write_bytes(b"".join(lines[: len(lines) // 2]))
    before = _kept(run)
    prefix = _read_only_prefix(run / "scores.jsonl")
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env, prefix=prefix)
    _judge(
        "read-only scores file: run",
        rc,
        out,
        rc_ok=_two,
        names=[f"could not write {run / 'scores.jsonl'}"],
        data_ok=_kept(run) == before,
    )
    assert "Read-only file system" in out or "Permission denied" in out
    os.chmod(run / "scores.jsonl", 0o644)
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    _judge(
        "read-only scores file: fixed, run",
        rc,
        out,
        rc_ok=_zero,
        names=[],
        data_ok=_same_store(run, ref),
    )


def _fewer_generations(ref, run, n_drop):
    _copy(ref, run)
    lines = (run / "generations.jsonl").read_bytes().splitlines(keepends=True)
    (run / "generations.jsonl").write_bytes(b"".join(lines[:-n_drop]))
    return lines[-n_drop:]


FULL_DISK = """
set -u
mount -t tmpfs -o size=4m tmpfs "$DISK"
cp -a "$SRC"/. "$DISK"/
dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null
truncate -s -"$FREE" "$DISK/filler"
"$PY" -m charshift.cli run "$CFG" --out "$DISK" > "$LOG1" 2>&1; echo $? > "$RC1"
rm "$DISK/filler"
"$PY" -m charshift.cli run "$CFG" --out "$DISK" > "$LOG2" 2>&1; echo $? > "$RC2"
cp -a "$DISK"/. "$DST"/
"""


def test_full_disk_mid_run(mini, env, tmp_path):
    """A real full disk: a small tmpfs (in a user and mount namespace) filled to 12 KB free."""
    cfg, ref = mini
    flags = ("--user", "--map-root-user", "--mount") if os.geteuid() else ("--mount",)
    if not _can_unshare(*flags):
        pytest.skip("no mount namespace here to mount a small tmpfs in")
    src = tmp_path / "src"
    _fewer_generations(ref, src, 12)
    disk, dst = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    dst.mkdir()
    files = {k: tmp_path / k for k in ("LOG1", "LOG2", "RC1", "RC2")}
    script_env = dict(
        env, DISK=str(disk), SRC=str(src), DST=str(dst), CFG=str(cfg), PY=sys.executable,
        FREE="12K", **{k: str(v) for k, v in files.items()},
    )  # fmt: skip
    subprocess.run(
        ["unshare", *flags, "sh", "-c", FULL_DISK], env=script_env, cwd=REPO, timeout=1800
    )
    rc1, out1 = int(files["RC1"].read_text()), files["LOG1"].read_text()
    _judge(
        "full disk: run",
        rc1,
        out1,
        rc_ok=_two,
        names=["No space left on device", f"could not write {disk}"],
    )
    rc2, out2 = int(files["RC2"].read_text()), files["LOG2"].read_text()
    _judge(
        "full disk: space freed, run",
        rc2,
        out2,
        rc_ok=_zero,
        names=[],
        data_ok=_same_store(dst, ref),
    )


def _file_size_limit(limit):
    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_writes


def test_file_size_limit_mid_generation(mini, env, tmp_path):
    """The OS refuses a write mid-table (RLIMIT_FSIZE: EFBIG): the rows written before are kept,
    no cut-off line is left, and the resumed run equals the undamaged one."""
    cfg, ref = mini
    run = tmp_path / "run"
    dropped = _fewer_generations(ref, run, 4)
    size = (run / "generations.jsonl").stat().st_size
    limit = size + len(dropped[0]) + 10  # room for one more row, not for the whole batch
    # the limit binds every file the run writes: the manifest must fit under it with room for the
    # run's events, or the case trips on the manifest instead of mid-table (it did when 12 of 18
    # rows were dropped)
    assert (run / "manifest.json").stat().st_size + 4096 < limit
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env, preexec_fn=_file_size_limit(limit))
    after = (run / "generations.jsonl").read_bytes()
    _judge(
        "file size limit: run",
        rc,
        out,
        rc_ok=_two,
        names=[f"could not write {run / 'generations.jsonl'}: File too large"],
        data_ok=size <= len(after) <= limit and after.endswith(b"\n"),  # no cut-off line
    )
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    _judge(
        "file size limit: lifted, run",
        rc,
        out,
        rc_ok=_zero,
        names=[],
        data_ok=_same_store(run, ref),
    )


REPORT_FULL_DISK = """
set -u
mount -t tmpfs -o size=8m tmpfs "$DISK"
cp -a "$SRC"/. "$DISK"/
dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null
truncate -s -"$FREE" "$DISK/filler"
"$PY" -m charshift.cli report --run "$DISK" > "$LOG1" 2>&1; echo $? > "$RC1"
"""


def test_full_disk_during_the_report(mini, env, tmp_path):
    """Issue 18: a full disk while the report was written printed a bare `[Errno 28]`, naming
    no path (a write that fails carries none). The error names the run folder now."""
    cfg, ref = mini
    flags = ("--user", "--map-root-user", "--mount") if os.geteuid() else ("--mount",)
    if not _can_unshare(*flags):
        pytest.skip("no mount namespace here to mount a small tmpfs in")
    src = _copy(ref, tmp_path / "src")
    disk = tmp_path / "disk"
    disk.mkdir()
    log, rc_file = tmp_path / "log", tmp_path / "rc"
    script_env = dict(
        env, DISK=str(disk), SRC=str(src), PY=sys.executable, FREE="16K",
        LOG1=str(log), RC1=str(rc_file),
    )  # fmt: skip
    subprocess.run(["unshare", *flags, "sh", "-c", REPORT_FULL_DISK], env=script_env, cwd=REPO)
    rc, out = int(rc_file.read_text()), log.read_text()
    _judge(
        "full disk: report",
        rc,
        out,
        rc_ok=_two,
        names=[f"error: could not write {disk}", "No space left on device"],
    )


def test_file_size_limit_during_the_report(mini, env, tmp_path):
    """The same through RLIMIT_FSIZE (EFBIG): the path is named, the tables and store are kept."""
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    before = _kept(run)
    rc, out = _cli(["report", "--run", str(run)], env, preexec_fn=_file_size_limit(20_000))
    _judge(
        "file size limit: report",
        rc,
        out,
        rc_ok=_two,
        names=[f"error: could not write {run}", "File too large"],
        data_ok=_kept(run) == before and not (run / "report" / "index.html").exists(),
    )


# -- one writer per run -------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from charshift.store import RunStore
    s = RunStore(sys.argv[1], create=False)
    print("locked", flush=True)
    time.sleep(600)
    """
)


def _holder(run, env):
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_held_by_a_live_process(mini, env, tmp_path):
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    p = _holder(run, env)
    try:
        before = _kept(run)
        rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
        _judge(
            "lock held by a live process: run",
            rc,
            out,
            rc_ok=_two,
            names=[f"pid {p.pid} on", str(run / "writer.lock")],
            data_ok=_kept(run) == before,
        )
        rc, out = _cli(["score", "--run", str(run)], env)
        _judge(
            "lock held by a live process: score",
            rc,
            out,
            rc_ok=_two,
            names=[f"pid {p.pid} on"],
            data_ok=_kept(run) == before,
        )
        rc, out = _cli(["report", "--run", str(run)], env)  # readers need no lock
        _judge(
            "lock held by a live process: report",
            rc,
            out,
            rc_ok=_zero,
            names=["report:"],
            data_ok=_kept(run) == before,
        )
    finally:
        p.kill()
        p.wait()


def test_stale_lock_of_a_killed_process(mini, env, tmp_path):
    cfg, ref = mini
    run = tmp_path / "run"
    _fewer_generations(ref, run, 3)
    p = _holder(run, env)
    p.send_signal(signal.SIGKILL)
    p.wait()
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    _judge(
        "stale lock: run",
        rc,
        out,
        rc_ok=_zero,
        names=[f"taking over the lock of run {run} left by pid {p.pid}"],
        data_ok=_same_store(run, ref),
    )


def test_second_run_on_the_same_folder(mini, env, tmp_path):
    """Failure 3: two `run --out same`. The second is refused naming the first's pid; the first
    finishes, and every row is there once."""
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    (run / "generations.jsonl").unlink()  # the first run has all of them to make
    first = subprocess.Popen(
        [sys.executable, "-m", "charshift.cli", "run", str(cfg), "--out", str(run)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (run / "writer.lock.info").exists() and first.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    log, _ = first.communicate(timeout=900)
    assert first.returncode == 0, log
    _judge(
        "second run on the same folder",
        rc,
        out,
        rc_ok=_two,
        names=[f"pid {first.pid} on", "two writers would each redo every row"],
        data_ok=_same_store(run, ref),
    )


# -- issue 18: one study per run folder --------------------------------------------------------


def test_a_second_study_in_one_folder_is_refused(mini, env, tmp_path):
    """Editing the run's config.yaml and the config file to another temperature used to run a
    second study into the folder (every cell's n doubled). Now the run refuses, naming the
    field; `report --run` on the hand-edited config.yaml refuses too; a new folder takes it."""
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    other = tmp_path / "other.yaml"
    other.write_text(cfg.read_text().replace("temperature: 0.7", "temperature: 0.9"))
    edited = (run / "config.yaml").read_text().replace("temperature: 0.7", "temperature: 0.9")
    (run / "config.yaml").write_text(edited)
    before = _kept(run)
    rc, out = _cli(["report", "--run", str(run)], env)
    _judge(
        "hand-edited config.yaml: report",
        rc,
        out,
        rc_ok=lambda rc: rc != 0,
        names=["config.yaml was edited by hand", "sampling.temperature: 0.7 -> 0.9"],
        data_ok=_kept(run) == before,
    )
    rc, out = _cli(["run", str(other), "--out", str(run)], env)
    _judge(
        "second study (config.yaml and config edited alike): run",
        rc,
        out,
        rc_ok=lambda rc: rc != 0,
        names=["sampling.temperature: 0.7 -> 0.9", "a run folder holds one study"],
        data_ok=_kept(run) == before,
    )


def _edit(path, n, change):
    lines = path.read_bytes().splitlines(keepends=True)
    d = json.loads(lines[n])
    change(d)
    lines[n] = json.dumps(d).encode() + b"\n"
    path.write_bytes(b"".join(lines))


def test_rows_of_another_study_are_set_aside(mini, env, tmp_path):
    """A line appended with one hex digit of its key changed, a row whose persona was edited
    (its key encodes the other one) and a row of a persona the config lacks: the report names
    and leaves out each (its figures are the undamaged run's); the run quarantines them and
    ends identical to the undamaged run."""
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    path = run / "generations.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    rows = [json.loads(x) for x in lines]
    a, b = [i for i, r in enumerate(rows) if r["persona"] == "humor"][:2]
    last = rows[-1]
    flipped = last["key"][:-1] + ("0" if last["key"][-1] != "0" else "1")
    with path.open("ab") as f:
        f.write(json.dumps({**last, "key": flipped}).encode() + b"\n")
    _edit(path, a, lambda d: d.update(persona="sarcasm"))
    _edit(path, b, lambda d: d.update(persona="pirate", key="f" * 24))
    rc, out = _cli(["report", "--run", str(run), "--out", str(tmp_path / "rep")], env)
    _judge(
        "rows outside the plan (edited key, persona, unknown persona): report",
        rc,
        out,
        rc_ok=_zero,
        names=[
            "3 row(s) do not belong to this run's study",
            f"line {a + 1}: key",
            "does not recompute from its own fields: persona 'sarcasm'",
            "not a row of the run's plan",
            f"line {len(lines) + 1}: key",
        ],
        data_ok=(tmp_path / "rep" / "metrics.csv").exists(),
    )
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    aside = read_quarantine(run / "generations.quarantine.jsonl")
    _judge(
        "rows outside the plan: run",
        rc,
        out,
        rc_ok=_zero,
        names=["do not belong to this run's study", "Set aside, verbatim"],
        data_ok=sorted(d.line for d in aside) == sorted([a + 1, b + 1, len(lines) + 1])
        and _same_store(run, ref),
    )


def test_stray_shard_files_and_events(mini, env, tmp_path):
    """A stray file naming shard 0 of 300,000,000 (and an event naming it) made the report hang;
    shard count 0 blocked it without naming the file. Both are named and never read."""
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    one = (run / "generations.jsonl").read_bytes().splitlines(keepends=True)[0]
    (run / "generations.shard-0-of-300000000.jsonl").write_bytes(one)
    (run / "scores.shard-0-of-0.jsonl").write_bytes(b"")
    m = json.loads((run / "manifest.json").read_text())
    m.setdefault("events", []).append({"event": "shard_start", "shard": "5/300000000"})
    (run / "manifest.json").write_text(json.dumps(m))
    rc, out = _cli(["report", "--run", str(run)], env, timeout=300)
    _judge(
        "stray shard files and events: report",
        rc,
        out,
        rc_ok=_zero,
        names=[
            "generations.shard-0-of-300000000.jsonl: not read",
            "scores.shard-0-of-0.jsonl: not read",
            "shard count 0",
            "names shard 5/300000000",
        ],  # the stray file is never read: the figures are the run's own
        data_ok=(run / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes(),
    )


@pytest.mark.parametrize("value", ["NaN", "7.5"])
def test_impossible_probability_in_scores(mini, env, tmp_path, value):
    """NaN or 7.5 as a probability in scores.jsonl was scored and counted; the line is named
    as damaged, and the run rescores its row."""
    cfg, ref = mini
    run = _copy(ref, tmp_path / "run")
    path = run / "scores.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    d = json.loads(lines[2])
    label = next(iter(d["probs"]))
    d["probs"][label] = float(value)
    lines[2] = json.dumps(d).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    rc, out = _cli(["run", str(cfg), "--out", str(run)], env)
    _judge(
        f"probability {value} in scores: run",
        rc,
        out,
        rc_ok=_zero,
        names=[f"{path}: 1 of", "line 3:", "probs"],
        data_ok=_same_store(run, ref),
    )


def test_outcome_table():
    """Issue 9's table row for the damaged-run-folder cases run above (printed with -s)."""
    if not OUTCOMES:
        pytest.skip("no case ran")
    n = Counter(o for _, o in OUTCOMES)
    print("\n| area | tried | clear error | clear warning | resumed, identical |", end=" ")
    print("traceback | silent wrong | data lost |\n|---|---|---|---|---|---|---|---|")
    print(
        f"| damaged run folder | {len(OUTCOMES)} | {n['clear error']} | {n['clear warning']} | "
        f"{n['resumed, identical']} | {n['traceback']} | {n['silent wrong']} | {n['data lost']} |"
    )
    for case, outcome in OUTCOMES:
        print(f"  {case}: {outcome}")
    assert not any(n[b] for b in BAD)
