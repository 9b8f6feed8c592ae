"""The probe folder: a probe classifier saved as plain JSON, and loaded back as a `Classifier`.

A probe folder holds no executable or pickled state:
  - `charshift_probe.json`: format, label order, pooling, max length, chosen C, the features
    (`embedding` or `lexical`), the encoder (source, kind, path or hub revision, weights sha256)
    or the TF-IDF state's file and sha256, and the head file's sha256;
  - `probe_head.json`: `labels`, `coef` (K x D) and `intercept` (K) as plain numbers;
  - `probe_lexical.json` for a lexical probe (`scoring.lexical`);
  - `train_report.json`: as for every trained classifier (`scoring.heldout`).
`load_probe` finds the encoder again, checks its weights against the recorded sha256 and returns
a `Classifier` whose `predict` runs encoder + head (a `LexicalClassifier` for TF-IDF features).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charshift.scoring.base import ClassifierError
from charshift.scoring.embeddings import ProbeModel, load_encoder
from charshift.scoring.files import file_sha256, write_json_atomic
from charshift.scoring.hf_classifier import Classifier
from charshift.scoring.lexical import lexical_classifier
from charshift.scoring.sources import (
    PACKAGED_MINILM,
    hub_kwargs,
    hub_snapshot,
    packaged_minilm_dir,
    weights_sha256,
)
from charshift.scoring.tokens import resolve_device

PROBE_CONFIG = "charshift_probe.json"
PROBE_HEAD = "probe_head.json"
PROBE_FORMAT = "charshift-probe"
PROBE_VERSION = 1
FOLDER_FEATURES = ("embedding", "lexical")  # what a saved probe reads


def is_probe_folder(folder: Path) -> bool:
    return (Path(folder) / PROBE_CONFIG).is_file()


def remove_probe_files(out_dir: Path) -> None:
    """Delete a probe's marker files (a fine-tune writing into a former probe folder)."""
    for name in (PROBE_CONFIG, PROBE_HEAD):
        (Path(out_dir) / name).unlink(missing_ok=True)


def combined_sha(head_sha: str, encoder_sha: str) -> str:
    """The probe's weight hash: changes when the head or the encoder's weights change."""
    return hashlib.sha256(f"{PROBE_HEAD}:{head_sha}\nencoder:{encoder_sha}\n".encode()).hexdigest()


def save_probe(
    out_dir: Path,
    labels: Sequence[str],
    coef: np.ndarray,
    intercept: np.ndarray,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write the head and the config (each atomically); return the config as written."""
    if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
        raise ValueError("probe head has non-finite weights (a label without training rows?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    head = {"labels": list(labels), "coef": coef.tolist(), "intercept": intercept.tolist()}
    write_json_atomic(out_dir / PROBE_HEAD, head)
    config = {
        "format": PROBE_FORMAT,
        "version": PROBE_VERSION,
        "labels": list(labels),
        "head_file": PROBE_HEAD,
        "head_sha256": file_sha256(out_dir / PROBE_HEAD),
        **meta,
    }
    write_json_atomic(out_dir / PROBE_CONFIG, config)
    return config


def probe_classifier(
    model: ProbeModel,
    tokenizer: Any,
    config: dict[str, Any],
    source: str,
    folder: Path,
    dev: torch.device,
) -> Classifier:
    """The `Classifier` of an embedding probe: `model` (encoder + head) under `config`."""
    enc = config["encoder"]
    extra = {
        "mode": "probe",
        "encoder": {k: enc.get(k) for k in ("source", "kind", "revision", "weights_sha256")},
        "head_sha256": config["head_sha256"],
        "max_length": config["max_length"],
    }
    sha = combined_sha(config["head_sha256"], enc["weights_sha256"])
    model.to(dev).eval()
    labels = list(config["labels"])
    return Classifier(model, tokenizer, labels, source, dev, "local", None, folder, extra, sha)


def load_probe(
    folder: Path, *, source: str | None = None, device: str = "auto", cache_dir: Path | None = None
) -> Classifier:
    """Load a probe folder (see the module doc): the encoder must still have the recorded hash."""
    folder = Path(folder).expanduser().resolve()
    config = _check_config(folder)
    coef, intercept = _read_head(folder, config)
    if config.get("features") == "lexical":
        sha = combined_sha(config["head_sha256"], config["lexical_sha256"])
        return lexical_classifier(folder, config, coef, intercept, source or str(folder), sha)
    enc = config["encoder"]
    ref, kw, enc_folder = _find_encoder(enc, cache_dir)
    tokenizer, encoder = load_encoder(ref, kw)
    sha = weights_sha256(enc_folder)
    if sha != enc.get("weights_sha256"):
        raise ClassifierError(
            f"probe {folder}: the encoder {enc.get('source')!r} at {enc_folder} has weights "
            f"sha256 {sha}, not the {enc.get('weights_sha256')} it was trained on"
        )
    if coef.shape[1] != encoder.config.hidden_size:
        raise ClassifierError(
            f"probe {folder}: head width {coef.shape[1]} != encoder hidden size "
            f"{encoder.config.hidden_size}"
        )
    model = ProbeModel(encoder, coef, intercept)
    return probe_classifier(
        model, tokenizer, config, source or str(folder), folder, resolve_device(device)
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ClassifierError(f"cannot read probe file {path}: {err}") from None


def _read_head(folder: Path, config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    path = folder / PROBE_HEAD
    if not path.is_file():
        raise ClassifierError(f"probe folder {folder} has no {PROBE_HEAD}")
    if file_sha256(path) != config.get("head_sha256"):
        raise ClassifierError(f"{path}: sha256 differs from the one recorded in {PROBE_CONFIG}")
    head = _read_json(path)
    labels = config["labels"]
    try:
        coef = np.asarray(head["coef"], dtype=np.float64)
        intercept = np.asarray(head["intercept"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise ClassifierError(f"{path}: malformed head ({err})") from None
    if head.get("labels") != labels:
        raise ClassifierError(f"{path}: labels {head.get('labels')} differ from {labels}")
    if coef.ndim != 2 or coef.shape[0] != len(labels) or intercept.shape != (len(labels),):
        raise ClassifierError(
            f"{path}: coef must be {len(labels)} x D and intercept {len(labels)}; got "
            f"{coef.shape} and {intercept.shape}"
        )
    if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
        raise ClassifierError(f"{path}: non-finite weights")
    return coef, intercept


def _check_config(folder: Path) -> dict[str, Any]:
    config = _read_json(folder / PROBE_CONFIG)
    if not isinstance(config, dict) or config.get("format") != PROBE_FORMAT:
        raise ClassifierError(f"{folder / PROBE_CONFIG}: not a {PROBE_FORMAT} config")
    if config.get("version") != PROBE_VERSION:
        raise ClassifierError(
            f"{folder / PROBE_CONFIG}: version {config.get('version')!r}; this charshift reads "
            f"version {PROBE_VERSION}"
        )
    labels = config.get("labels")
    ok = isinstance(labels, list) and len(labels) >= 2 and len(set(labels)) == len(labels)
    if not ok or not all(isinstance(x, str) for x in labels):
        raise ClassifierError(f"{folder / PROBE_CONFIG}: labels must be >= 2 distinct names")
    if config.get("features", "embedding") not in FOLDER_FEATURES:
        raise ClassifierError(f"{folder / PROBE_CONFIG}: unknown features {config['features']!r}")
    if config.get("features") == "lexical":
        return config
    enc = config.get("encoder")
    if not isinstance(enc, dict) or enc.get("kind") not in ("packaged", "local", "hub"):
        raise ClassifierError(f"{folder / PROBE_CONFIG}: missing or unknown encoder")
    if not isinstance(config.get("max_length"), int):
        raise ClassifierError(f"{folder / PROBE_CONFIG}: max_length must be an integer")
    return config


def _find_encoder(enc: dict[str, Any], cache_dir: Path | None) -> tuple[str, dict[str, Any], Path]:
    """(from_pretrained reference, kwargs, folder to hash) for a recorded encoder."""
    if enc["kind"] == "packaged":
        if enc.get("source") != PACKAGED_MINILM:
            raise ClassifierError(f"unknown packaged encoder {enc.get('source')!r}")
        folder = packaged_minilm_dir()
        return str(folder), {}, folder
    if enc["kind"] == "local":
        folder = Path(str(enc.get("path")))
        if not folder.is_dir():
            raise ClassifierError(f"the probe's encoder folder {folder} does not exist")
        return str(folder), {}, folder
    folder, rev = hub_snapshot(str(enc.get("source")), enc.get("revision"), cache_dir)
    return str(enc["source"]), hub_kwargs(rev, cache_dir), folder
