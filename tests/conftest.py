"""Shared fixtures: tiny random models of the real architectures and LoRA adapters for them.

Everything is built on first use, once per test session, under pytest's temporary folder, so
tests run offline and never touch the user's model cache. Ask for a model with
`tiny_model_dir("llama")` and an adapter with `tiny_lora_dir("llama", seed=1)`; the `tiny_*`
fixtures below are shortcuts for the common cases. `transformers_server` is a real
`transformers serve` of the packaged tiny Llama (`tiny_llama_dir`), shared by the backend
contract and the judge's tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from charshift.tiny import build_tiny_causal_lm, build_tiny_lora

# Figures are drawn in this process (a monkeypatched figure builder reaches them, and the many
# small reports of the suite pay no worker start-up); tests of the parallel path set it themselves.
os.environ.setdefault("CHARSHIFT_FIGURE_WORKERS", "1")

TinyModelFactory = Callable[[str], Path]
TinyLoraFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """`tiny_model_dir(arch)` -> folder of a tiny random `arch` model (seed 0), built once."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_causal_lm(arch, root / arch, seed=0)  # type: ignore[arg-type]
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_lora_dir(
    tiny_model_dir: TinyModelFactory, tmp_path_factory: pytest.TempPathFactory
) -> TinyLoraFactory:
    """`tiny_lora_dir(arch, seed=1, include_vision=False)` -> a random LoRA adapter folder."""
    root = tmp_path_factory.mktemp("tiny_loras")
    built: dict[tuple[str, int, bool], Path] = {}

    def get(arch: str, seed: int = 1, include_vision: bool = False) -> Path:
        key = (arch, seed, include_vision)
        if key not in built:
            out = root / f"{arch}-s{seed}{'-vision' if include_vision else ''}"
            built[key] = build_tiny_lora(
                tiny_model_dir(arch), out, seed=seed, include_vision=include_vision
            )
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir: TinyModelFactory) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_dir: TinyModelFactory) -> Path:
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_gemma3(tiny_model_dir: TinyModelFactory) -> Path:
    return tiny_model_dir("gemma3")


@pytest.fixture(scope="session")
def tiny_gemma3_mm(tiny_model_dir: TinyModelFactory) -> Path:
    return tiny_model_dir("gemma3_mm")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from charshift.models import resolve_model

    return Path(resolve_model("tiny:llama", cache_dir=tmp_path_factory.mktemp("model-cache")).path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited early:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(
        f"transformers serve not up after {timeout_s}s:\n{log_path.read_text()[-3000:]}"
    )


@pytest.fixture(scope="session")
def transformers_server(tiny_llama_dir, tmp_path_factory):
    """A real `transformers serve` on a free loopback port, serving a sampling copy of the tiny model."""
    pytest.importorskip("fastapi", reason="transformers serve needs `transformers[serving]`")
    pytest.importorskip("uvicorn", reason="transformers serve needs `transformers[serving]`")
    cli = Path(sys.executable).parent / "transformers"
    if not cli.exists():
        cli = Path(shutil.which("transformers") or "")
    if not cli.is_file():
        pytest.skip("the `transformers` command is not installed")
    work = tmp_path_factory.mktemp("serve")
    folder = work / "tiny_llama"
    shutil.copytree(tiny_llama_dir, folder)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["do_sample"] = True  # see the module docstring: a temperature alone does not sample
    gen_path.write_text(json.dumps(gen))
    port = _free_port()
    log_path = work / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [
        str(cli),
        "serve",
        str(folder),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(proc, url, log_path, timeout_s=180)
        yield f"{url}/v1", str(folder)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
