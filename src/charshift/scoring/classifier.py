"""The `classifier` scorer: load any classifier by its source, open the run's, train one.

`load_classifier` takes an HF hub id, a local folder (a fine-tuned model, or a probe folder with
its own JSON format) or `tiny:modernbert:...`, and returns a `Classifier` (a `base.Scorer`).
`open_run_classifier` is the registry's opener: a base's given classifier, or the one the run
trained into `<run>/classifier/<base>`, scoring with the run's `scoring` settings.
`train_classifier` trains with the recipe that `TrainSettings.mode` names (`TRAINERS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from charshift.scoring.base import ScorerContext, ScorerError
from charshift.scoring.finetune import train_finetune
from charshift.scoring.heldout import TrainReport
from charshift.scoring.hf_classifier import Classifier, load_hf_classifier
from charshift.scoring.probe import train_probe
from charshift.scoring.probe_folder import is_probe_folder, load_probe
from charshift.scoring.settings import TrainData, TrainSettings


class Trainer(Protocol):
    """A training recipe: fit on `data` as `settings` says, save to `out_dir`, report."""

    def __call__(
        self,
        data: TrainData,
        settings: TrainSettings,
        out_dir: Path,
        *,
        cache_dir: Path | None = None,
        device: str = "auto",
        progress: bool = True,
    ) -> TrainReport: ...


# `classifier_training.mode` -> the recipe that trains it
TRAINERS: dict[str, Trainer] = {"finetune": train_finetune, "probe": train_probe}


def load_classifier(
    source: str,
    *,
    device: str = "auto",
    cache_dir: Path | None = None,
    revision: str | None = None,
) -> Classifier:
    """Load a classifier from an HF id, a local folder (model or probe) or `tiny:modernbert:...`."""
    folder = Path(source).expanduser()
    if folder.is_dir() and is_probe_folder(folder):
        return load_probe(folder, source=source, device=device, cache_dir=cache_dir)
    return load_hf_classifier(source, device=device, cache_dir=cache_dir, revision=revision)


def trained_dir(run_dir: Path, base: str) -> Path:
    """Where a run trains the classifier of `base` (a base without a given classifier)."""
    return Path(run_dir) / "classifier" / base


def open_run_classifier(context: ScorerContext) -> Classifier:
    """The registry's opener: the base's classifier, set to score with the run's `scoring`
    settings (batch size, max length)."""
    base = context.base
    if base.classifier:
        source = base.classifier
    elif context.run_dir is not None:
        source = str(trained_dir(context.run_dir, base.name))
    else:
        raise ScorerError(f"base {base.name}: no classifier given and no run to train one in")
    clf = load_classifier(source, cache_dir=context.cache_dir)
    clf.batch_size = context.cfg.scoring.batch_size
    clf.max_length = context.cfg.scoring.max_length
    return clf


def train_classifier(
    data: TrainData,
    settings: TrainSettings,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> TrainReport:
    """Train a classifier on `data` as `settings` says and save it to `out_dir`.

    `settings.mode` picks the recipe: "probe" (frozen features + logistic regression,
    `scoring.probe`) or "finetune" (OCT's recipe with early stopping, `scoring.finetune`). The
    result folder loads with `load_classifier(out_dir)`; its train_report.json is the returned
    report.
    """
    trainer = TRAINERS.get(settings.mode)
    if trainer is None:
        raise ValueError(f"classifier_training.mode: unknown mode {settings.mode!r}")
    return trainer(
        data, settings, Path(out_dir), cache_dir=cache_dir, device=device, progress=progress
    )
