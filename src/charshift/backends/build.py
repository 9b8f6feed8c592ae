"""Building a backend for one model: a run's own (`pipeline.make_backend`), a judge's
(`scoring.judge`), the persona vectors' (`scoring.persona_vector`).

- `backend_for(settings, base, run_dir, seed)`: the backend of `settings` (a run config's
  `backend:` section, or a judge's) for the model of `base`, built by the kind's module
  (`backends/registry.py`) once this machine is known to have the kind's package and device.
- `materialise_tiny_adapters(base, sources)`: `path: tiny-lora:NAME` (the smoke preset) becomes
  a random-init LoRA for the tiny base, built once into the model cache.

Here rather than in the pipeline so that the scorers, which the pipeline runs, build their
backends without importing it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charshift.backends.base import AdapterSource, Backend
from charshift.schema import stable_hash

if TYPE_CHECKING:
    from charshift.config import BackendConfig, BaseSpec


def cache_dir() -> Path:
    """The cache of built and converted models (`$CHARSHIFT_CACHE`, see models.default_cache_dir)."""
    from charshift.models import default_cache_dir

    return default_cache_dir()


def backend_for(
    settings: BackendConfig,
    base: BaseSpec,
    run_dir: Path | None = None,
    seed: int = 0,
    log_suffix: str = "",
) -> Backend:
    """A backend of `settings` for the model of `base` (see the module doc); a managed server
    logs to `server-<base name><log_suffix>.log` in `run_dir` and is seeded with `seed`."""
    from charshift.backends.registry import BackendContext, make_backend
    from charshift.config import check_backend_available

    check_backend_available(settings)
    context = BackendContext(
        model=base.model,
        revision=base.revision,
        name=base.name,
        seed=seed,
        cache_dir=cache_dir(),
        run_dir=run_dir,
        log_suffix=log_suffix,
    )
    return make_backend(settings, context)


def materialise_tiny_adapters(base: BaseSpec, sources: list[AdapterSource]) -> list[AdapterSource]:
    """`path: tiny-lora:NAME` (smoke preset) -> a random-init LoRA for the tiny base, built once."""
    out = []
    for src in sources:
        if src.path and src.path.startswith("tiny-lora:"):
            from charshift import models

            tag = src.path.split(":", 1)[1]
            model_dir = Path(models.resolve_model(base.model, cache_dir()).path)
            folder = cache_dir() / "tiny-lora" / stable_hash([base.model, tag], 12)
            if not (folder / "adapter_config.json").exists():  # built once, atomically
                seed = int(stable_hash(tag, 6), 16)
                models.build_cached(folder, functools.partial(_tiny_lora, model_dir, seed))
            src = AdapterSource(name=src.name, path=str(folder))
        out.append(src)
    return out


def _tiny_lora(model_dir: Path, seed: int, out: Path) -> dict[str, Any]:
    from charshift import tiny

    tiny.build_tiny_lora(model_dir, out, seed=seed)
    return {"tiny_lora_seed": seed}
