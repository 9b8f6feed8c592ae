"""Shared fixtures: tiny random models of the real architectures and LoRA adapters for them.

Everything is built on first use, once per test session, under pytest's temporary folder, so
tests run offline and never touch the user's model cache. Ask for a model with
`tiny_model_dir("llama")` and an adapter with `tiny_lora_dir("llama", seed=1)`; the `tiny_*`
fixtures below are shortcuts for the common cases.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from charshift.tiny import build_tiny_causal_lm, build_tiny_lora

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
