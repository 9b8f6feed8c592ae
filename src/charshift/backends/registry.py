"""The backend registry: each kind's module, imported only when a run uses it, and the one way to
build a backend from a run's settings.

Every module named in `BACKENDS` exposes `Settings` (its class in `backends/settings.py`) and
`from_config(settings, context) -> Backend`. `make_backend` replaces an if-chain over kinds: a
new backend is a module, a settings class and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from charshift.backends.base import Backend
from charshift.backends.settings import AnySettings

BACKENDS: dict[str, str] = {
    "hf": "charshift.backends.hf",
    "vllm": "charshift.backends.vllm",
    "openai": "charshift.backends.openai",
    "server": "charshift.backends.server",
}


@dataclass(frozen=True)
class BackendContext:
    """What a backend is built for besides its settings: one base model of a run."""

    model: str  # the base's model spec (hub id, local folder, packaged:, tiny:)
    revision: str | None
    name: str  # the base's name (a managed server's log is server-NAME.log)
    seed: int  # the run's sampling seed (a managed server's --seed)
    cache_dir: Path  # built and converted models (models.default_cache_dir)
    run_dir: Path | None = None  # where a managed server writes its log (None: the cwd)


def make_backend(settings: AnySettings, context: BackendContext) -> Backend:
    """The backend of `settings.kind` for `context` (its module is imported now)."""
    module = importlib.import_module(BACKENDS[settings.kind])
    return module.from_config(settings, context)
