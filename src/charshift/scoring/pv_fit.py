"""Persona vectors: the directions, the choice of layer, and the file they are kept in.

After Chen et al. 2025 ("Persona vectors"): persona P's direction at layer l is the mean
residual-stream activation over the response tokens of P's rows of the persona stage (the
persona-prompted stage by default) minus that of the base stage's rows, each row read by the
base model in its own context (the persona prompt included, as it was written). Only the ID
training rows are used, split by prompt: the directions come from the fit prompts, and the layer
kept is the one whose directions best separate the held-out prompts' texts, read as the text
scorer reads them (the base model, no persona prompt): the mean over personas of the AUC
between P's held-out texts and the base stage's, projected on P's direction. The same figure
with the texts read in their own context (as the state reading reads them) is recorded beside
it.

A projection is `(a - m_base) . d / |d|`: the activation less the base stage's mean, on the unit
direction, so a base-stage text projects near 0 and a persona's text above it when the direction
carries the persona. `VectorSet` holds the kept layer's directions and base mean with the figures
and provenance, and is written as JSON (atomically).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from charshift.schema import stable_hash

FORMAT_VERSION = 1


@dataclass(frozen=True)
class VectorSet:
    """The fitted directions of one base (see the module doc)."""

    base: str
    model: str
    layer: int
    personas: list[str]
    directions: dict[str, list[float]]
    base_mean: list[float]
    separation: dict[str, dict[str, float]]  # layer -> {"text": AUC, "state": AUC}
    rows: dict[str, Any]  # rows per persona and side (fit, held out)
    provenance: dict[str, Any]
    format_version: int = FORMAT_VERSION

    @property
    def digest(self) -> str:
        """A hash of the directions and everything they came from."""
        return stable_hash(asdict(self), 16)

    def unit_directions(self) -> np.ndarray:
        """(K, d): each persona's direction scaled to length 1, in `personas` order."""
        d = np.array([self.directions[p] for p in self.personas], dtype=np.float64)
        norms = np.linalg.norm(d, axis=1, keepdims=True)
        return d / np.where(norms > 0, norms, 1.0)

    def project(self, means: np.ndarray) -> np.ndarray:
        """(n, K) projections of (n, d) activations at `layer` (see the module doc)."""
        centred = np.asarray(means, dtype=np.float64) - np.array(self.base_mean)
        return centred @ self.unit_directions().T

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VectorSet:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format_version {data.get('format_version')!r} is not {FORMAT_VERSION}"
            )
        return cls(**data)


def save_vectors(vs: VectorSet, path: Path) -> None:
    """Write `vs` as JSON, atomically (a reader sees the old file or the whole new one)."""
    from charshift.scoring.files import write_json_atomic

    write_json_atomic(Path(path), vs.to_dict())


def load_vectors(path: Path) -> VectorSet:
    return VectorSet.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney AUC)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def mean_directions(
    acts: np.ndarray, labels: Sequence[str | None], personas: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """From (n, L, d) activations of fit rows labelled by persona (None: base stage): the
    (K, L, d) differences of means and the (L, d) base mean."""
    lab = np.array([x if x is not None else "" for x in labels], dtype=object)
    base = acts[lab == ""].mean(axis=0)
    dirs = np.stack([acts[lab == p].mean(axis=0) - base for p in personas])
    return dirs, base


def separation(
    acts: np.ndarray,
    labels: Sequence[str | None],
    personas: Sequence[str],
    dirs: np.ndarray,
    base: np.ndarray,
) -> np.ndarray:
    """Per layer, the mean over personas of the AUC between persona P's held-out rows and the
    base stage's, projected on P's direction at that layer: an array (L,)."""
    lab = np.array([x if x is not None else "" for x in labels], dtype=object)
    out = np.zeros(acts.shape[1])
    for li in range(acts.shape[1]):
        units = dirs[:, li] / np.maximum(np.linalg.norm(dirs[:, li], axis=1, keepdims=True), 1e-12)
        proj = (acts[:, li] - base[li]) @ units.T  # (n, K)
        aucs = [auc(proj[lab == p, k], proj[lab == "", k]) for k, p in enumerate(personas)]
        out[li] = float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")
    return out


def choose_layer(layers: Sequence[int], text_sep: np.ndarray) -> int:
    """The layer whose held-out text separation is highest (ties: the earlier layer)."""
    scores = np.where(np.isnan(text_sep), -np.inf, text_sep)
    return int(layers[int(np.argmax(scores))])
