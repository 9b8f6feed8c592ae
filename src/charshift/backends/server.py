"""A managed serving engine: charshift starts the server itself, with the run's adapters, and stops it.

`backend: {kind: server, engine: vllm | sglang | command, ...}`. For each base, `load_adapters`
checks the adapter folders, starts the engine as a subprocess in a process group of its own with
its adapters (vLLM: loaded one by one once it is up, see below), waits until it answers, and from then on talks to it through
the OpenAI backend's client (this class is an `OpenAIBackend`). `close` stops it: SIGTERM to the
whole process group, SIGKILL after a grace period. The pipeline calls `close` in a `finally`, so
the server goes on normal exit, on an error and on Ctrl-C (the child runs in its own session, so
a terminal's Ctrl-C reaches only charshift, which then stops it); an `atexit` hook covers an
interpreter that exits without closing. The server's output goes to `server-NAME.log` in the run
directory (appended, one header line per start).

The command lines (flags read from vLLM 0.33.0 and SGLang 0.5.23):
  - vllm:   `vllm serve MODEL --host H --port P --seed S --generation-config vllm
            --enable-prefix-caching [--enable-lora --max-lora-rank R --max-loras N
            --max-cpu-loras M] [--max-model-len L] [--dtype D] [--revision REV]
            [--gpu-memory-utilization G]`, with `VLLM_BATCH_INVARIANT=1` when `deterministic`.
            The adapters are not on the command line (one bad adapter there stops the whole
            server, base included): with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` in its
            environment, each is loaded once the server is up, by POST /v1/load_lora_adapter
            `{lora_name, lora_path}` (vllm/entrypoints/serve/lora); a failure is an error naming
            that adapter (400/404/500 with the engine's reason) and the rest of the run goes on.
            `--generation-config vllm` stops the server from filling unsent sampling fields from
            the model's generation_config (the client also sends every field), so served and
            offline runs sample alike. Requests name an adapter by its NAME.
  - sglang: `python -m sglang.launch_server --model-path MODEL --host H --port P --random-seed S
            --sampling-defaults openai [--enable-lora --lora-target-modules T ... --max-lora-rank R
            --max-loras-per-batch N+1 --max-loaded-loras M] [--enable-deterministic-inference]
            [--context-length L] [--dtype D] [--revision REV] [--mem-fraction-static G]`.
            The adapters are loaded once the server is up, by POST /load_lora_adapter
            `{lora_name, lora_path}` (sglang/srt/entrypoints/http_server.py; 400 with the
            engine's reason on failure), so one bad adapter is an error naming it, as with vLLM.
            Starting without --lora-paths, SGLang needs the pool's shape: the rank (the
            adapters' largest, or `max_lora_rank`) and the target modules (the union of the
            adapters' lists, `all` where one is not a list). With no rank known the adapters are
            given at startup instead (`--lora-paths NAME=PATH ...`, where a bad one stops it).
            `--max-loras-per-batch` counts the base model, hence N+1. Requests select an adapter
            with `model: "MODEL:NAME"` (a bare NAME would silently run the base model).
            SGLang's radix (prefix) cache is on by default.
  - command: any template (`backend.command`), split like a shell line, with the placeholders
            {model} {host} {port} {adapters} {seed} {max_lora_rank} {max_loras} {max_cpu_loras}.
            `{adapters}` as a whole word becomes one NAME=PATH argument per adapter (inside a
            word: the same, joined by spaces). How requests select an adapter follows
            `backend.adapter_syntax`. This is how the tests start a real `transformers serve`.
`extra_args` are appended to the command line in every case.

Health: the server is up when GET /v1/models answers 200 and GET /health does not answer 5xx
(SGLang says 503 while starting; a server without /health answers 404). A server that exits
before that fails at once with the tail of its log; one that is not up after `startup_timeout`
seconds is stopped and reported the same way.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx

from charshift.backends.base import AdapterSource, BackendDead, BackendInfo
from charshift.backends.openai import OpenAIBackend, client_options
from charshift.backends.settings import ServerSettings as Settings
from charshift.backends.vllm import folder_digest, read_adapter_rank, resolve_adapter_folder
from charshift.schema import GenRequest, GenResult

if TYPE_CHECKING:
    from charshift.backends.registry import BackendContext

log = logging.getLogger(__name__)

Engine = Literal["vllm", "sglang", "command"]
ENGINE_SYNTAX = {"vllm": "model", "sglang": "base:adapter"}
# vLLM serves POST /v1/load_lora_adapter only with this set (vllm/envs.py; "1" or "true")
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
_LOG_TAIL = 4000


class ServerStartError(RuntimeError):
    """The serving engine exited during startup or did not come up in time (the log tail says why)."""


class ServerDied(BackendDead):
    """The serving engine exited while the run was using it (the log tail says why)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServedAdapter:
    name: str  # the adapter name requests use, as served
    folder: Path
    rank: int | None
    target_modules: tuple[str, ...] | None = None  # adapter_config.json's list (None: unknown)


@dataclass
class LaunchSpec:
    """Everything an engine's command line is built from."""

    model: str  # what the server loads and names its base model: a folder or a hub id
    host: str
    port: int
    adapters: list[ServedAdapter]
    seed: int = 0
    max_lora_rank: int | None = None
    max_loras: int = 8
    max_cpu_loras: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    dtype: str = "auto"
    revision: str | None = None
    deterministic: bool = True


def read_target_modules(folder: Path) -> tuple[str, ...] | None:
    """adapter_config.json's `target_modules` where it is a list of names (PEFT may also store
    one string, a regex or `all-linear`: None, as for a file without it)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    mods = config.get("target_modules") if isinstance(config, dict) else None
    if isinstance(mods, list) and mods and all(isinstance(m, str) for m in mods):
        return tuple(mods)
    return None


def _lora_rank(spec: LaunchSpec) -> int | None:
    from charshift.backends.vllm import pick_lora_rank

    if spec.max_lora_rank is not None:
        return spec.max_lora_rank
    ranks = [a.rank for a in spec.adapters if a.rank is not None]
    return pick_lora_rank(max(ranks)) if ranks else None


def _cpu_slots(spec: LaunchSpec) -> int:
    return spec.max_cpu_loras or max(spec.max_loras, len(spec.adapters))


def vllm_command(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """`vllm serve` argv and extra environment for `spec` (see the module docstring)."""
    argv = ["vllm", "serve", spec.model, "--host", spec.host, "--port", str(spec.port)]
    argv += ["--seed", str(spec.seed), "--generation-config", "vllm", "--enable-prefix-caching"]
    env = {"VLLM_BATCH_INVARIANT": "1"} if spec.deterministic else {}
    if spec.adapters:  # the adapters themselves are loaded at runtime (RUNTIME_LORA_ENV)
        argv += ["--enable-lora"]
        rank = _lora_rank(spec)
        if rank is not None:
            argv += ["--max-lora-rank", str(rank)]
        argv += ["--max-loras", str(spec.max_loras), "--max-cpu-loras", str(_cpu_slots(spec))]
        env[RUNTIME_LORA_ENV] = "True"
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.dtype != "auto":
        argv += ["--dtype", spec.dtype]
    if spec.revision:
        argv += ["--revision", spec.revision]
    return argv, env


def sglang_runtime_lora(spec: LaunchSpec) -> bool:
    """SGLang takes the adapters at runtime (POST /load_lora_adapter) where it can size its LoRA
    pool without them: a rank is known (SGLang requires --max-lora-rank and
    --lora-target-modules when it starts with no --lora-paths)."""
    return bool(spec.adapters) and _lora_rank(spec) is not None


def _target_modules(spec: LaunchSpec) -> list[str]:
    """The union of the adapters' target modules, or `all` where one is not a plain list."""
    if any(a.target_modules is None for a in spec.adapters):
        return ["all"]
    return sorted({m for a in spec.adapters for m in a.target_modules or ()})


def sglang_command(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """`python -m sglang.launch_server` argv for `spec` (see the module docstring)."""
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", spec.model]
    argv += ["--host", spec.host, "--port", str(spec.port), "--random-seed", str(spec.seed)]
    argv += ["--sampling-defaults", "openai"]
    if spec.adapters:
        rank = _lora_rank(spec)
        if sglang_runtime_lora(spec):
            argv += ["--enable-lora", "--lora-target-modules", *_target_modules(spec)]
        else:  # no rank to size the pool with: the adapters are named at startup
            argv += ["--lora-paths", *(f"{a.name}={a.folder}" for a in spec.adapters)]
        if rank is not None:
            argv += ["--max-lora-rank", str(rank)]
        per_batch = spec.max_loras + 1  # SGLang counts the base model as one of the batch's LoRAs
        argv += ["--max-loras-per-batch", str(per_batch)]
        argv += ["--max-loaded-loras", str(max(_cpu_slots(spec), per_batch))]
    if spec.deterministic:
        argv.append("--enable-deterministic-inference")
    if spec.max_model_len is not None:
        argv += ["--context-length", str(spec.max_model_len)]
    if spec.gpu_memory_utilization is not None:
        argv += ["--mem-fraction-static", str(spec.gpu_memory_utilization)]
    if spec.dtype != "auto":
        argv += ["--dtype", spec.dtype]
    if spec.revision:
        argv += ["--revision", spec.revision]
    return argv, {}


def template_command(template: str, spec: LaunchSpec) -> list[str]:
    """Fill a `backend.command` template (see the module docstring) and split it into argv."""
    adapters = [f"{a.name}={a.folder}" for a in spec.adapters]
    rank = _lora_rank(spec)
    values = {
        "model": spec.model,
        "host": spec.host,
        "port": str(spec.port),
        "adapters": " ".join(adapters),
        "seed": str(spec.seed),
        "max_lora_rank": "" if rank is None else str(rank),
        "max_loras": str(spec.max_loras),
        "max_cpu_loras": str(_cpu_slots(spec)),
    }
    argv: list[str] = []
    for word in shlex.split(template):
        if word == "{adapters}":
            argv += adapters
        else:
            try:
                argv.append(word.format(**values))
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"backend.command: cannot fill {word!r}: {exc}") from None
    return argv


# ----- one server process ------------------------------------------------------------------------


class ManagedServer:
    """One server subprocess: started in its own process group, its output appended to
    `log_path`, healthy once it answers, stopped group-wide (TERM, then KILL after `grace`)."""

    def __init__(
        self,
        argv: list[str],
        root_url: str,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        grace: float = 20.0,
    ) -> None:
        self.argv = list(argv)
        self.root_url = root_url.rstrip("/")
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.grace = grace
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float) -> None:
        """Start the process and wait until it is healthy; on any failure (Ctrl-C included) the
        process is stopped before the exception propagates."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._log.write(f"=== charshift {stamp}: {shlex.join(self.argv)}\n".encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,  # its own process group: stopped as a whole
            )
        except OSError as exc:
            self._log.close()
            raise ServerStartError(f"cannot start {self.argv[0]!r}: {exc}") from None
        atexit.register(self.stop)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while True:
                code = self.proc.poll() if self.proc is not None else None
                if code is not None:
                    raise ServerStartError(
                        f"the server exited with code {code} during startup "
                        f"({shlex.join(self.argv)}); last lines of {self.log_path}:\n"
                        f"{self.log_tail()}"
                    )
                if self._healthy(client):
                    return
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"the server did not come up within {timeout:g}s "
                        f"({shlex.join(self.argv)}); last lines of {self.log_path}:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.5)

    def _healthy(self, client: httpx.Client) -> bool:
        try:
            health = client.get(f"{self.root_url}/health")
            if health.status_code >= 500:
                return False
            return client.get(f"{self.root_url}/v1/models").status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, n_chars: int = _LOG_TAIL) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - n_chars))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def stop(self) -> int | None:
        """Stop the whole process group; returns the exit code (None if it was never started)."""
        proc, self.proc = self.proc, None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if proc is None:
            return None
        code = proc.poll()
        if code is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                code = proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                code = proc.wait(timeout=30)
        _signal_group(proc, signal.SIGKILL)  # children that outlived their parent
        if self._log is not None:
            self._log.close()
        return code


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


# ----- the backend -------------------------------------------------------------------------------


class ServerBackend(OpenAIBackend):
    """An OpenAI backend whose server charshift starts (in `load_adapters`, or at the first
    request when there are no adapters) and stops (`close`). See the module docstring."""

    kind = "server"

    def __init__(
        self,
        model: str,
        *,
        engine: Engine,
        command: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 900.0,
        extra_args: list[str] | None = None,
        log_path: Path | None = None,
        seed: int = 0,
        revision: str | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        dtype: str = "auto",
        max_lora_rank: int | None = None,
        max_loras: int = 8,
        max_cpu_loras: int | None = None,
        deterministic: bool = True,
        adapter_syntax: str = "auto",
        grace: float = 20.0,
        **openai_kwargs: Any,
    ) -> None:
        if engine not in ("vllm", "sglang", "command"):
            raise ValueError(f"engine must be vllm, sglang or command, not {engine!r}")
        if (engine == "command") != (command is not None):
            raise ValueError("a command template is required for engine=command, and only there")
        port = port or free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
        connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        syntax = ENGINE_SYNTAX.get(engine, adapter_syntax)
        url = f"http://{connect}:{port}/v1"
        super().__init__(url, model, adapter_syntax=syntax, **openai_kwargs)  # type: ignore[arg-type]
        self.engine = engine
        self.command = command
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        default_log = Path(tempfile.gettempdir()) / f"charshift-server-{port}.log"
        self.log_path = Path(log_path) if log_path else default_log
        self.grace = grace
        self.spec = LaunchSpec(
            model=model,
            host=host,
            port=port,
            adapters=[],
            seed=seed,
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            revision=revision,
            deterministic=deterministic,
        )
        self.server: ManagedServer | None = None
        self._adapter_hashes: dict[str, str] = {}

    # ----- lifecycle ---------------------------------------------------------------------------

    def command_line(self) -> tuple[list[str], dict[str, str]]:
        """The argv and extra environment the engine is started with, for the current adapters."""
        if self.engine == "vllm":
            argv, env = vllm_command(self.spec)
        elif self.engine == "sglang":
            argv, env = sglang_command(self.spec)
        else:
            assert self.command is not None
            argv, env = template_command(self.command, self.spec), {}
        return argv + self.extra_args, env

    def start(self) -> None:
        """Start the server with the adapters known so far and wait until it is healthy."""
        if self.server is not None:
            return
        argv, env = self.command_line()
        root = self.base_url.removesuffix("/v1")
        server = ManagedServer(argv, root, self.log_path, env=env, grace=self.grace)
        log.info("starting %s server: %s", self.engine, shlex.join(argv))
        server.start(self.startup_timeout)
        self.server = server

    def load_adapters(self, adapters: list[AdapterSource]) -> dict[str, str]:
        """Check each adapter's folder, start the server with the good ones, then confirm the
        server lists each of them. A bad folder is an error entry; adapters cannot be added to a
        server that is already running (an error entry names them)."""
        errors: dict[str, str] = {}
        served: list[ServedAdapter] = []
        for src in adapters:
            if self.server is not None:
                if src.name not in self._adapters:
                    errors[src.name] = f"adapter {src.name!r}: the server is already running"
                continue
            try:
                folder = resolve_adapter_folder(src)
                rank = read_adapter_rank(folder)
                self._adapter_hashes[src.name] = folder_digest(folder)
            except Exception as exc:  # missing/gated repo, bad folder: skip its cells
                errors[src.name] = f"adapter {src.name!r} could not be loaded: {exc}"
                continue
            served.append(ServedAdapter(src.name, folder, rank, read_target_modules(folder)))
        if self.server is None:
            self.spec.adapters = served
            self.start()
        if self.engine == "vllm" or (self.engine == "sglang" and sglang_runtime_lora(self.spec)):
            errors.update(self._load_at_runtime(served))
        self._served_override.update({a.name: a.name for a in served})
        good = [a for a in adapters if a.name not in errors]
        errors.update(super().load_adapters(good))
        return errors

    def _load_at_runtime(self, served: list[ServedAdapter]) -> dict[str, str]:
        """Load each adapter into the running server, one request each (vLLM: POST
        /v1/load_lora_adapter; SGLang: POST /load_lora_adapter, both `{lora_name, lora_path}`):
        an adapter the engine cannot load (corrupt weights, a rank above --max-lora-rank, target
        modules outside --lora-target-modules) is an error naming it and the server's reason, and
        the others and the base run on."""
        errors: dict[str, str] = {}
        root = self.base_url.removesuffix("/v1")
        route = "/v1/load_lora_adapter" if self.engine == "vllm" else "/load_lora_adapter"
        for adapter in served:
            body = {"lora_name": adapter.name, "lora_path": str(adapter.folder)}
            try:
                response = httpx.post(f"{root}{route}", json=body, timeout=600)
            except httpx.HTTPError as exc:
                errors[adapter.name] = f"adapter {adapter.name!r}: loading it failed: {exc}"
                continue
            if response.status_code != 200:
                errors[adapter.name] = (
                    f"adapter {adapter.name!r} could not be loaded by the {self.engine} server "
                    f"(HTTP {response.status_code}): {response.text[:500]}"
                )
        return errors

    def generate(self, requests: list[GenRequest], progress: Any = None) -> list[GenResult]:
        self.start()
        self._raise_if_dead()
        results = super().generate(requests, progress)
        if any(r.finish_reason == "error" for r in results):
            self._raise_if_dead()  # failed because the server is gone: stop, do not store errors
        return results

    def submit(self, request: GenRequest) -> Future[GenResult]:
        """Like OpenAIBackend.submit; a reply that failed because the server exited resolves to
        ServerDied (the streaming rollout then stops) instead of an error result."""
        self.start()
        self._raise_if_dead()
        inner = super().submit(request)
        outer: Future[GenResult] = Future()

        def relay(fut: Future[GenResult]) -> None:
            try:
                res = fut.result()
                if res.finish_reason == "error":
                    self._raise_if_dead()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                with contextlib.suppress(InvalidStateError):  # the caller cancelled it
                    outer.set_exception(exc)
                return
            with contextlib.suppress(InvalidStateError):
                outer.set_result(res)

        inner.add_done_callback(relay)
        outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        return outer

    def _raise_if_dead(self) -> None:
        server = self.server
        code = server.proc.poll() if server is not None and server.proc is not None else None
        if code is not None:
            raise ServerDied(
                f"the {self.engine} server exited with code {code} during the run; rows written "
                f"so far are kept, rerun to resume. Last lines of {self.log_path}:\n"
                f"{server.log_tail()}"
            )

    def context_length(self) -> int:
        self.start()
        return super().context_length()

    def close(self) -> None:
        try:
            super().close()
        finally:
            server, self.server = self.server, None
            if server is not None:
                server.stop()

    def __enter__(self) -> ServerBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reproducibility(self) -> dict[str, Any]:
        """Batch-invariant when `deterministic` starts vLLM or SGLang in that mode; a command
        of the user's own says nothing we can check."""
        if self.engine == "command":
            return {"guarantee": "unknown", "detail": "a server started by backend.command"}
        flag = (
            "VLLM_BATCH_INVARIANT=1"
            if self.engine == "vllm"
            else "--enable-deterministic-inference"
        )
        if self.spec.deterministic:
            return {"guarantee": "batch_invariant", "detail": f"{self.engine} server with {flag}"}
        return {
            "guarantee": "seeded",
            "detail": f"{self.engine} server without {flag} (backend.deterministic: false)",
        }

    def info(self) -> BackendInfo:
        info = super().info()
        argv, env = self.command_line()
        for name, digest in self._adapter_hashes.items():
            if name in info.adapters:
                info.adapters[name]["sha256"] = digest
        info.extra["server"] = {
            "engine": self.engine,
            "argv": argv,
            "env": env,
            "log": str(self.log_path),
            "pid": self.server.pid if self.server else None,
            "deterministic": self.spec.deterministic,
        }
        info.extra["reproducibility"] = self.reproducibility()
        return info


def from_config(settings: Settings, context: BackendContext) -> ServerBackend:
    """The backend of `backend: {kind: server, ...}` for one base of a run: the engine started
    with the base's model folder, its log in the run directory (backends/registry.py)."""
    from charshift.models import resolve_model

    assert settings.engine is not None  # ServerSettings checked it
    return ServerBackend(
        resolve_model(context.model, context.cache_dir, revision=context.revision).path,
        engine=settings.engine,
        command=settings.command,
        host=settings.host,
        port=settings.port,
        startup_timeout=settings.startup_timeout,
        extra_args=settings.extra_args,
        log_path=(context.run_dir or Path.cwd()) / f"server-{context.name}{context.log_suffix}.log",
        seed=context.seed,
        revision=context.revision,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        dtype=settings.dtype,
        max_lora_rank=settings.max_lora_rank,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        deterministic=settings.deterministic,
        adapter_syntax=settings.adapter_syntax,
        **client_options(settings),
    )
