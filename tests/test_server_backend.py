"""The managed server backend: command lines, startup, health, logs and stopping.

vLLM and SGLang cannot run here, so `engine: vllm` runs a fake `vllm` executable and
`engine: sglang` a fake `sglang.launch_server` module, both the fake LoRA server of
fake_lora_server.py, which parses the engines' real flags and reproduces their adapter handling.
`engine: command` starts a REAL `transformers serve` on a tiny model (the slow tests).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from charshift.adapter_probe import AdapterNotApplied, probe_adapters, require_applied
from charshift.backends.base import AdapterSource
from charshift.backends.server import (
    LaunchSpec,
    ServedAdapter,
    ServerBackend,
    ServerDied,
    ServerStartError,
    sglang_command,
    template_command,
    vllm_command,
)
from charshift.schema import GenRequest, Sampling

TESTS = Path(__file__).resolve().parent
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=6, repetition_penalty=1.0)


def req(text: str, adapter: str | None = None, **kw: Any) -> GenRequest:
    kw.setdefault("sampling", GREEDY)
    return GenRequest([{"role": "user", "content": text}], adapter, **kw)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def make_adapter(folder: Path, r: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


# ----- command lines --------------------------------------------------------------------------


def spec(**kw: Any) -> LaunchSpec:
    adapters = [
        ServedAdapter("full/sarcasm", Path("/ad/sarcasm"), 8),
        ServedAdapter("full/humor", Path("/ad/humor"), 24),
    ]
    return LaunchSpec(
        **{"model": "/m", "host": "127.0.0.1", "port": 8123, "adapters": adapters} | kw
    )


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_vllm_command_line():
    argv, env = vllm_command(spec(seed=5, max_loras=4, max_model_len=2048, dtype="bfloat16"))
    assert argv[:3] == ["vllm", "serve", "/m"]
    assert "--lora-modules" not in argv  # loaded at runtime, one by one
    assert flag(argv, "--max-lora-rank") == "32"  # the smallest allowed rank >= 24
    assert (flag(argv, "--max-loras"), flag(argv, "--max-cpu-loras")) == ("4", "4")
    assert flag(argv, "--generation-config") == "vllm" and flag(argv, "--seed") == "5"
    assert "--enable-lora" in argv and "--enable-prefix-caching" in argv
    assert (flag(argv, "--max-model-len"), flag(argv, "--dtype")) == ("2048", "bfloat16")
    assert env == {"VLLM_BATCH_INVARIANT": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    many = [ServedAdapter(f"a{i}", Path(f"/a{i}"), 8) for i in range(11)]
    argv, env = vllm_command(spec(adapters=many, max_loras=8, deterministic=False))
    assert flag(argv, "--max-cpu-loras") == "11"  # every adapter of the run held
    assert env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    argv, env = vllm_command(spec(adapters=[]))
    assert "--enable-lora" not in argv and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env


def test_sglang_command_line():
    argv, env = sglang_command(spec(seed=3, max_loras=4, max_lora_rank=64))
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert flag(argv, "--model-path") == "/m" and flag(argv, "--random-seed") == "3"
    # loaded at runtime: the pool is sized from the rank and the target modules (unknown: all)
    assert "--lora-paths" not in argv and "--enable-lora" in argv
    assert flag(argv, "--lora-target-modules") == "all"
    assert flag(argv, "--max-lora-rank") == "64"
    assert flag(argv, "--max-loras-per-batch") == "5"  # counts the base model
    assert flag(argv, "--max-loaded-loras") == "5"
    assert "--enable-deterministic-inference" in argv
    assert flag(argv, "--sampling-defaults") == "openai" and env == {}
    known = [ServedAdapter("a", Path("/a"), 8, ("q_proj", "v_proj")),
             ServedAdapter("b", Path("/b"), 16, ("o_proj", "q_proj"))]  # fmt: skip
    argv, _ = sglang_command(spec(adapters=known))
    i = argv.index("--lora-target-modules")
    assert argv[i + 1 : i + 4] == ["o_proj", "q_proj", "v_proj"]  # their union
    assert flag(argv, "--max-lora-rank") == "16"
    unranked = [ServedAdapter("a", Path("/a"), None)]  # no rank to size a pool: named at start
    argv, _ = sglang_command(spec(adapters=unranked))
    assert flag(argv, "--lora-paths") == "a=/a" and "--enable-lora" not in argv


def test_command_template():
    argv = template_command(
        "serve-it {model} --port={port} --host {host} --lora {adapters} --r {max_lora_rank}",
        spec(),
    )
    assert argv == [
        "serve-it",
        "/m",
        "--port=8123",
        "--host",
        "127.0.0.1",
        "--lora",
        "full/sarcasm=/ad/sarcasm",
        "full/humor=/ad/humor",
        "--r",
        "32",
    ]


# ----- the managed lifecycle against the fake engines -----------------------------------------


@pytest.fixture
def fake_engines(tmp_path, monkeypatch):
    """A fake `vllm` on PATH and a fake `sglang` package on PYTHONPATH; returns the record file."""
    bin_dir, pkg_dir = tmp_path / "bin", tmp_path / "pkgs" / "sglang"
    bin_dir.mkdir()
    pkg_dir.mkdir(parents=True)
    script = TESTS / "fake_lora_server.py"
    vllm = bin_dir / "vllm"
    vllm.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" vllm "$@"\n')
    vllm.chmod(0o755)
    (pkg_dir / "__init__.py").write_text("")
    (pkg_dir / "launch_server.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport fake_lora_server\n"
        "fake_lora_server.main(['sglang', *sys.argv[1:]])\n"
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "pkgs"))
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("FAKE_LORA_SERVER_RECORD", str(record))
    return record


def events(record: Path, kind: str) -> list[dict[str, Any]]:
    lines = record.read_text().splitlines() if record.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_managed_engine_serves_every_adapter_and_stops(fake_engines, tmp_path, engine):
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"top_k": 20, "min_p": 0.1}))
    sources = [
        AdapterSource(name="full/sarcasm", path=str(make_adapter(tmp_path / "sarcasm"))),
        AdapterSource(name="full/humor", path=str(make_adapter(tmp_path / "humor", r=16))),
        AdapterSource(name="full/missing", path=str(tmp_path / "nope")),
    ]
    log_path = tmp_path / "run" / "server-base.log"
    b = ServerBackend(str(model), engine=engine, log_path=log_path, seed=9, startup_timeout=60)
    try:
        errors = b.load_adapters(sources)
        assert list(errors) == ["full/missing"] and "adapter_config.json" in errors["full/missing"]
        pid = b.server.pid
        assert pid_alive(pid)
        results = b.generate(
            [req("a", "full/sarcasm"), req("b"), req("c", "full/humor"), req("d", "full/missing")]
        )
        assert [r.text.split()[0] for r in results[:3]] == [
            "[full/sarcasm]",
            "[base]",
            "[full/humor]",
        ]
        assert results[3].finish_reason == "error"
        record = probe_adapters(b, ["full/sarcasm", "full/humor"])
        require_applied(record)  # both really applied
        [start] = events(fake_engines, "start")
        ran = events(fake_engines, "request")
        assert all(e["params"]["top_k"] == -1 and e["params"]["min_p"] == 0.0 for e in ran)
        info = b.info()
        assert info.extra["server"]["pid"] == pid and info.adapters["full/humor"]["sha256"]
    finally:
        b.close()
    assert not pid_alive(pid)
    assert b.server is None and "charshift" in log_path.read_text()
    argv = start["argv"]
    if engine == "vllm":
        assert (
            "--generation-config" in argv and argv[argv.index("--generation-config") + 1] == "vllm"
        )
        assert start["env"].get("VLLM_BATCH_INVARIANT") == "1"
        assert argv[argv.index("--max-lora-rank") + 1] == "16"
    else:
        assert "--enable-deterministic-inference" in argv
        # BASE:ADAPTER for every adapter row, never a bare adapter name (requests arrive in any
        # order: the server handles them concurrently)
        sent = {e["model"] for e in ran}
        assert all(m == str(model) or m.startswith(f"{model}:") for m in sent)
        assert {f"{model}:full/sarcasm", f"{model}:full/humor"} <= sent


def test_whole_process_group_is_stopped(fake_engines, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LORA_SERVER_CHILD", "1")
    b = ServerBackend(str(tmp_path), engine="vllm", log_path=tmp_path / "s.log")
    b.start()
    [child] = events(fake_engines, "child")
    pid = b.server.pid
    assert pid_alive(child["pid"]) and pid_alive(pid)
    b.close()
    deadline = time.monotonic() + 10
    while pid_alive(child["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid) and not pid_alive(child["pid"])


def test_a_server_that_dies_mid_run_stops_the_run_instead_of_storing_error_rows(
    fake_engines, tmp_path
):
    from test_async_rollout import engine_for, make_episodes

    b = ServerBackend(str(tmp_path), engine="vllm", log_path=tmp_path / "s.log", backoff=0.01)
    try:
        assert b.generate([req("before")])[0].finish_reason == "stop"
        os.killpg(b.server.pid, signal.SIGKILL)  # e.g. the engine ran out of GPU memory
        b.server.proc.wait(timeout=10)
        with pytest.raises(ServerDied, match="exited with code -9"):
            b.generate([req("after")])
        with pytest.raises(ServerDied):
            list(engine_for(b).run_streaming(make_episodes(1)))
    finally:
        b.close()


def test_ctrl_c_during_a_cli_run_stops_the_server(fake_engines, tmp_path):
    """`charshift generate` with kind: server, interrupted by SIGINT mid-generation (what Ctrl-C
    in a terminal sends): the CLI exits and the server it started is gone."""
    adapters = tmp_path / "adapters"
    for persona in ("sarcasm", "humor"):
        make_adapter(adapters / persona)
    model = tmp_path / "model"
    model.mkdir()
    # a served model folder is checked before the run starts, as any local model folder is
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    config = {
        "name": "ctrlc",
        "bases": [
            {
                "name": "fb",
                "model": str(model),
                "classifier": "tiny:modernbert:sarcasm,humor",
                "adapters": {"full": {"path": f"{adapters}/{{persona}}"}},
            }
        ],
        "stages": ["full"],
        "personas": ["sarcasm", "humor"],
        "slices": ["id_chat"],
        "id_prompts": {"n_eval": 6},
        "backend": {"kind": "server", "engine": "vllm", "max_in_flight": 2},
    }
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(config))
    env = dict(
        os.environ,
        PYTHONPATH=f"{TESTS.parent / 'src'}{os.pathsep}{os.environ['PYTHONPATH']}",
        CHARSHIFT_CACHE=str(tmp_path / "cache"),
        FAKE_LORA_SERVER_LATENCY="0.3",
    )
    cmd = [sys.executable, "-m", "charshift.cli", "generate", str(cfg_path)]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "run")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        probe_requests = 3 * 4  # base + 2 adapters, 4 probe prompts each
        while len(events(fake_engines, "request")) <= probe_requests + 1:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.1)
        [start] = events(fake_engines, "start")
        assert pid_alive(start["pid"])
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out  # interrupted (typer exits 130 on KeyboardInterrupt)
    assert not pid_alive(start["pid"])
    assert (tmp_path / "run" / "server-fb.log").read_text().startswith("=== charshift")


def test_a_server_that_exits_at_once_fails_fast_with_its_log_tail(tmp_path):
    cmd = f"{sys.executable} -c \"print('CUDA error: no kernel image'); raise SystemExit(3)\""
    b = ServerBackend("m", engine="command", command=cmd, log_path=tmp_path / "s.log")
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="exited with code 3") as err:
        b.load_adapters([])
    assert "CUDA error: no kernel image" in str(err.value)
    assert time.monotonic() - t0 < 30  # not the startup timeout
    assert b.server is None


def test_a_server_that_never_comes_up_is_stopped_after_the_timeout(tmp_path):
    cmd = f"{sys.executable} -c \"print('loading weights', flush=True); import time; time.sleep(600)\""
    b = ServerBackend(
        "m", engine="command", command=cmd, log_path=tmp_path / "s.log", startup_timeout=2
    )
    with pytest.raises(ServerStartError, match="did not come up within 2s") as err:
        b.start()
    assert "loading weights" in str(err.value)
    started = (tmp_path / "s.log").read_text()
    assert started.startswith("=== charshift")
    assert b.server is None


def test_sglang_loads_adapters_at_runtime_so_a_bad_one_is_named_and_the_rest_run(
    fake_engines, tmp_path
):
    """SGLang takes each adapter by POST /load_lora_adapter once it is up: one whose rank
    exceeds --max-lora-rank (a user-set rank) is an error naming it, the base and the others
    run (before, it was on the command line and stopped the whole server)."""
    sources = [
        AdapterSource(name="good", path=str(make_adapter(tmp_path / "good"))),
        AdapterSource(name="wide", path=str(make_adapter(tmp_path / "wide", r=64))),
    ]
    b = ServerBackend(str(tmp_path), engine="sglang", log_path=tmp_path / "s.log", max_lora_rank=8)
    try:
        errors = b.load_adapters(sources)
        assert list(errors) == ["wide"] and "HTTP 400" in errors["wide"]
        assert "incompatible with the current LoRA memory pool" in errors["wide"]
        results = b.generate([req("a", "good"), req("b")])
        assert [r.text.split()[0] for r in results] == ["[good]", "[base]"]
        [start] = events(fake_engines, "start")
        assert "--lora-paths" not in start["argv"] and "--enable-lora" in start["argv"]
        assert [e["name"] for e in events(fake_engines, "load_lora_adapter")] == ["good"]
    finally:
        b.close()


def test_vllm_loads_adapters_at_runtime_so_a_bad_one_is_named_and_the_rest_run(
    fake_engines, tmp_path
):
    broken = make_adapter(tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"broken header")
    sources = [
        AdapterSource(name="good", path=str(make_adapter(tmp_path / "good"))),
        AdapterSource(name="wide", path=str(make_adapter(tmp_path / "wide", r=64))),
        AdapterSource(name="broken", path=str(broken)),
    ]
    b = ServerBackend(str(tmp_path), engine="vllm", log_path=tmp_path / "s.log", max_lora_rank=8)
    try:
        errors = b.load_adapters(sources)  # the server started, then took them one by one
        assert sorted(errors) == ["broken", "wide"]
        assert "HTTP 500" in errors["wide"] and "greater than max_lora_rank 8" in errors["wide"]
        assert "'broken'" in errors["broken"] and "HTTP 500" in errors["broken"]
        results = b.generate([req("a", "good"), req("b"), req("c", "broken")])
        assert [r.text.split()[0] for r in results[:2]] == ["[good]", "[base]"]
        assert results[2].finish_reason == "error" and "not loaded" in results[2].error
        [start] = events(fake_engines, "start")
        assert "--lora-modules" not in start["argv"]
        assert start["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert [e["name"] for e in events(fake_engines, "load_lora_adapter")] == ["good"]
    finally:
        b.close()


def test_server_backend_config_is_validated():
    from charshift.config import ConfigError, load_preset, parse_config

    data = load_preset("smoke").model_dump(mode="json")
    data["backend"] = {"kind": "server", "engine": "command", "command": "x {port} {bogus}"}
    with pytest.raises(ConfigError, match=r"backend.command: .*unknown placeholder.*bogus"):
        parse_config(data)
    data["backend"] = {"kind": "server"}
    with pytest.raises(ConfigError, match="engine: required"):
        parse_config(data)
    data["backend"] = {"kind": "vllm", "max_lora_rank": 100}
    with pytest.raises(ConfigError, match=r"backend.max_lora_rank: .*320"):
        parse_config(data)
    data["backend"] = {"kind": "server", "engine": "vllm", "port": 70000}
    with pytest.raises(ConfigError, match="backend.port"):
        parse_config(data)


# ----- a REAL `transformers serve` through the command engine -----------------------------------


def transformers_cli() -> str:
    pytest.importorskip("fastapi", reason="transformers serve needs `transformers[serving]`")
    pytest.importorskip("uvicorn", reason="transformers serve needs `transformers[serving]`")
    cli = Path(sys.executable).parent / "transformers"
    if not cli.exists():
        cli = Path(shutil.which("transformers") or "")
    if not cli.is_file():
        pytest.skip("the `transformers` command is not installed")
    return str(cli)


def serve_command() -> str:
    return f"{transformers_cli()} serve {{model}} --host {{host}} --port {{port}} --device cpu"


@pytest.fixture(scope="module")
def real_server(tiny_llama, tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log_path = tmp_path_factory.mktemp("serve") / "server-tiny.log"
    b = ServerBackend(
        str(tiny_llama),
        engine="command",
        command=serve_command(),
        log_path=log_path,
        startup_timeout=300,
        extra_sampling=False,  # transformers serve refuses non-OpenAI fields (422)
        max_concurrency=4,
    )
    b.start()
    yield b
    pid = b.server.pid if b.server else None
    b.close()
    assert pid is None or not pid_alive(pid)


@pytest.mark.slow
def test_real_transformers_serve_generates_and_is_stopped(real_server):
    results = real_server.generate([req("Hello there"), req("What is 2+2?")])
    assert all(r.finish_reason in ("stop", "length") and r.text for r in results)
    assert results[0].completion_tokens > 0
    assert real_server.generate([req("Hello there")])[0].text == results[0].text  # greedy
    assert real_server.log_path.read_text().startswith("=== charshift")


@pytest.mark.slow
def test_probe_catches_a_real_server_that_ignores_the_adapter(real_server):
    # transformers serve cannot apply LoRA. Told that the adapter is served under the base's
    # name (what a mis-started server amounts to), every "adapter" row runs the base model.
    from charshift.backends.openai import OpenAIBackend

    b = OpenAIBackend(
        real_server.base_url,
        real_server.model,
        served_names={"full/sarcasm": real_server.model},
        extra_sampling=False,
    )
    assert b.load_adapters([AdapterSource(name="full/sarcasm")]) == {}
    record = probe_adapters(b, ["full/sarcasm"])
    assert record["adapters"]["full/sarcasm"]["applied"] is False
    with pytest.raises(AdapterNotApplied, match="full/sarcasm"):
        require_applied(record)
    b.close()


@pytest.mark.slow
def test_streaming_equals_lockstep_on_the_real_server(real_server):
    from test_async_rollout import engine_for, make_episodes, rows_by_key

    def episodes():
        eps = make_episodes(3)
        for ep in eps:
            ep.condition = ep.condition.__class__("b", "prompted", "humor", None, "Be brief.")
            ep.sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=8, repetition_penalty=1.0)
        return eps

    lockstep = rows_by_key(engine_for(real_server).run(episodes()))
    streamed = rows_by_key(engine_for(real_server).run_streaming(episodes(), max_in_flight=6))
    assert streamed == lockstep and len(lockstep) == 15
    assert len({r["n_steps"] for r in lockstep.values()}) >= 2


@pytest.mark.slow
def test_server_is_stopped_when_generation_raises(tiny_llama, tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    b = ServerBackend(
        str(tiny_llama),
        engine="command",
        command=serve_command(),
        log_path=tmp_path / "server.log",
        startup_timeout=300,
        extra_sampling=False,
    )

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with b:
            b.start()
            pid = b.server.pid
            b.generate([req("hi")])
            raise Boom("generation failed")
    assert not pid_alive(pid)


@pytest.mark.slow
def test_pipeline_run_on_a_managed_real_server(tiny_llama, tmp_path, monkeypatch):
    """kind: server end to end: the server is started for the base, rows stream in, the log is in
    the run directory, and the server is gone after the run, also when generation raises."""
    from charshift import pipeline
    from charshift.config import parse_config
    from charshift.rollout import RolloutEngine
    from charshift.store import RunStore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CHARSHIFT_CACHE", str(tmp_path / "cache"))
    data = {
        "bases": [
            {"name": "tl", "model": str(tiny_llama), "classifier": "tiny:modernbert:sarcasm,humor"}
        ],
        "stages": ["base", "prompted"],
        "personas": ["sarcasm", "humor"],
        "slices": ["id_chat", "agentic_email"],
        "sampling": {"temperature": 0.0, "max_tokens": 6},
        "scenarios": {"n": 1},
        "id_prompts": {"n_eval": 2},
        "rollout": {"max_steps": 2, "max_malformed": 2},
        "backend": {
            "kind": "server",
            "engine": "command",
            "command": serve_command(),
            "adapter_syntax": "model",
            "max_in_flight": 4,
            "startup_timeout": 300,
        },
    }
    cfg = parse_config(data)
    store = pipeline.prepare_run(cfg, tmp_path / "run")

    calls = {"n": 0}
    real = RolloutEngine.run_streaming

    def failing(self, eps, **kw):
        for batch in real(self, eps, **kw):
            calls["n"] += 1
            yield batch
            raise RuntimeError("disk full")

    monkeypatch.setattr(RolloutEngine, "run_streaming", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.generate(cfg, store)
    pid = RunStore(tmp_path / "run", writable=False).manifest()["backends"]["tl"]["extra"][
        "server"
    ]["pid"]
    assert not pid_alive(pid)
    monkeypatch.setattr(RolloutEngine, "run_streaming", real)
    summary = pipeline.generate(cfg, store)  # resumes, on a fresh server
    assert summary["generated"] + summary["done_before"] == summary["planned"]
    rows = list(RunStore(tmp_path / "run", writable=False).generations)
    assert len(rows) == summary["planned"] and {r.outcome for r in rows} - {"error"}
    pid2 = RunStore(tmp_path / "run", writable=False).manifest()["backends"]["tl"]["extra"][
        "server"
    ]["pid"]
    assert pid2 != pid and not pid_alive(pid2)
    log_text = (tmp_path / "run" / "server-tl.log").read_text()
    assert log_text.count("=== charshift") == 2  # one header per start, appended


def test_each_shard_writes_its_own_server_log(tmp_path):
    from charshift import pipeline
    from charshift.config import load_preset, parse_config

    data = load_preset("smoke").model_dump(mode="json")
    data["backend"] = {"kind": "server", "engine": "command", "command": "serve {model} {port}"}
    cfg = parse_config(data)
    (tmp_path / "config.json").write_text("{}")  # a model folder
    base = cfg.bases[0].model_copy(update={"model": str(tmp_path)})
    names = [
        pipeline.make_backend(cfg, base, tmp_path / "run", shard).log_path.name  # type: ignore[attr-defined]
        for shard in (None, (0, 3), (2, 3))
    ]
    b = cfg.bases[0].name
    assert names == [
        f"server-{b}.log",
        f"server-{b}.shard-0-of-3.log",
        f"server-{b}.shard-2-of-3.log",
    ]
