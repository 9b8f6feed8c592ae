"""The held-out report every trained classifier writes, whatever its recipe (`train_report.json`).

The rows are split by group (prompt id, `split_rows`), so that no prompt is both trained on and
evaluated on. On the held-out rows the report gives macro-F1 and accuracy with cluster-bootstrap
intervals over the prompts (`stats.compute_metrics`, so the definitions are those of every figure
in the run's report), the confusion matrix, the chance line 1/K and whether the interval clears
it, and a TF-IDF + logistic-regression baseline fitted on the same training rows and scored on
the same held-out rows with the same resamples (`lexical_baseline`). `finish_report` writes the
file last: its presence marks a finished classifier folder.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from charshift.scoring.files import write_json_atomic
from charshift.scoring.lexical import TFIDF_PARAMS, tfidf_fit_predict
from charshift.scoring.logreg import select_c
from charshift.scoring.settings import TrainData, TrainSettings

REPORT_FILE = "train_report.json"
# The (base, stage, slice) cell name of every held-out evaluation: a fixed name makes a classifier
# and its lexical baseline resample the same prompts (stats seeds each cell by its name).
_HELDOUT_CELL = ("classifier", "heldout", "heldout")
_FEW_CLUSTERS = 10  # fewer held-out prompts than this: the report warns about its interval
_NO_HELDOUT_NOTE = (
    "no held-out split (heldout_fraction=0, OCT's own setting): the classifier's accuracy on "
    "unseen prompts was not measured"
)

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    """What a training run did and how its classifier scores on the held-out groups (prompts).

    `macro_f1`, `accuracy`, `confusion`, `per_label_f1` and the intervals are None when there was
    no held-out split (heldout_fraction=0, OCT's own setting); `heldout_note` then says so.
    Intervals are cluster-bootstrap intervals over the held-out prompts (`interval` says how);
    `chance` is 1/K and `above_chance` says whether the macro-F1 interval's lower end exceeds it.
    `baseline` is a TF-IDF + logistic regression classifier fitted on the same training rows and
    scored on the same held-out rows, with the same interval. `warnings` lists what a reader must
    know (e.g. a loss that did not fall); `summary` is one sentence to show first.
    """

    out_dir: str
    label_names: list[str]
    n_train: int
    n_heldout: int
    train_groups: list[str]
    heldout_groups: list[str]
    macro_f1: float | None
    accuracy: float | None
    per_label_f1: dict[str, float] | None
    confusion: list[list[int]] | None  # rows: true label, columns: predicted, in confusion_labels
    confusion_labels: list[str]
    heldout_note: str | None
    hyperparameters: dict[str, Any]
    encoder: dict[str, Any]
    n_steps: int
    train_losses: list[float]
    label_counts_train: dict[str, int]
    label_counts_heldout: dict[str, int]
    mode: str = "finetune"
    macro_f1_interval: list[float] | None = None
    accuracy_interval: list[float] | None = None
    interval: dict[str, Any] | None = None
    chance: float | None = None
    above_chance: bool | None = None
    baseline: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    early_stopping: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# the split


def split_by_group(
    groups: Sequence[str], heldout_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split the distinct groups into (train, held-out), deterministically by seed.

    Depends only on the set of groups (sorted before shuffling), not on row order. With a
    positive fraction at least one group is held out and at least one kept for training.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError("heldout_fraction must be in [0, 1)")
    distinct = sorted(set(groups))
    if heldout_fraction == 0.0:
        return distinct, []
    if len(distinct) < 2:
        raise ValueError(
            f"a held-out split by group needs at least two distinct groups; got {distinct}"
        )
    shuffled = distinct[:]
    random.Random(seed).shuffle(shuffled)
    n_held = min(max(1, round(heldout_fraction * len(distinct))), len(distinct) - 1)
    return sorted(shuffled[n_held:]), sorted(shuffled[:n_held])


@dataclass(frozen=True)
class RowSplit:
    """A held-out split by group: the groups on each side and the row indices of each side."""

    train_groups: list[str]
    heldout_groups: list[str]
    train_idx: list[int]
    heldout_idx: list[int]


def split_rows(groups: Sequence[str], heldout_fraction: float, seed: int) -> RowSplit:
    """`split_by_group`, with the row indices of each side."""
    train_groups, held_groups = split_by_group(groups, heldout_fraction, seed)
    held = set(held_groups)
    train_idx = [i for i, g in enumerate(groups) if g not in held]
    held_idx = [i for i, g in enumerate(groups) if g in held]
    return RowSplit(train_groups, held_groups, train_idx, held_idx)


# --------------------------------------------------------------------------------------------
# the figures


def heldout_evaluation(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    groups: Sequence[str],
    label_names: Sequence[str],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Macro-F1 and accuracy of held-out predictions with cluster-bootstrap intervals.

    Computed by `stats.compute_metrics` on one cell whose item ids are `groups` (the prompt ids),
    so the definitions are those of every figure in the report. The cell's name is fixed, so two
    evaluations of the same rows (a classifier and its lexical baseline) resample the same
    prompts in the same way.
    """
    from charshift.schema import PredictionRecord
    from charshift.stats import compute_metrics

    names = list(label_names)
    if not (len(y_true) == len(y_pred) == len(groups)) or not y_true:
        raise ValueError("y_true, y_pred, groups must be non-empty and of one length")
    records = [
        PredictionRecord(*_HELDOUT_CELL, persona=t, item_id=str(g), prediction=p, key=f"h{i}")
        for i, (t, p, g) in enumerate(zip(y_true, y_pred, groups, strict=True))
    ]
    res = compute_metrics(records, names, n_boot=n_boot, ci=ci, seed=seed, differences=False)
    cell = res.get(*_HELDOUT_CELL)
    assert cell is not None
    chance = 1.0 / len(names)
    return {
        "macro_f1": cell.macro_f1.estimate,
        "macro_f1_interval": [cell.macro_f1.lo, cell.macro_f1.hi],
        "accuracy": cell.accuracy.estimate,
        "accuracy_interval": [cell.accuracy.lo, cell.accuracy.hi],
        "per_label_f1": {p.persona: p.f1.estimate for p in cell.per_persona},
        "confusion": cell.confusion[:, : len(names)].tolist(),
        "n": cell.n_rows,
        "n_clusters": cell.n_clusters,
        "chance": chance,
        "above_chance": bool(cell.macro_f1.lo > chance),
    }


def lexical_baseline(data: TrainData, split: RowSplit, settings: TrainSettings) -> dict[str, Any]:
    """TF-IDF + logistic regression on the training rows of `split`, scored on its held-out rows.

    C is chosen as for the probe (grouped CV on the training rows, out-of-fold log-loss; the
    out-of-fold macro-F1 per C is recorded beside it); the held-out figures come from
    `heldout_evaluation` with the same seed, so the interval resamples the same prompts as the
    classifier's.
    """
    from sklearn import __version__ as sklearn_version

    names, labels, groups = data.names, data.labels, data.groups
    train_idx, held_idx = split.train_idx, split.heldout_idx
    if not train_idx or not held_idx:
        raise ValueError("the lexical baseline needs training and held-out rows")
    index = {n: i for i, n in enumerate(names)}
    y_all = np.array([index[lab] for lab in labels], dtype=np.int64)
    fit_predict = tfidf_fit_predict(data.texts, y_all, len(names))
    tr = np.array(train_idx)
    choice = select_c(
        lambda a, b, cc: fit_predict(tr[a], tr[b], cc),
        y_all[tr],
        [groups[i] for i in train_idx],
        settings.probe_c_grid,
        settings.probe_cv_folds,
        names,
    )
    pred = fit_predict(tr, np.array(held_idx), choice.c).argmax(axis=1)
    ev = heldout_evaluation(
        [labels[i] for i in held_idx],
        [names[i] for i in pred],
        [groups[i] for i in held_idx],
        names,
        n_boot=settings.n_boot,
        ci=settings.ci,
        seed=settings.seed,
    )
    return {
        "name": "tfidf_logreg",
        "features": {k: list(v) if isinstance(v, tuple) else v for k, v in TFIDF_PARAMS.items()},
        **choice.record(),
        "cv_folds": choice.folds,
        "n_train": len(train_idx),
        "n_heldout": len(held_idx),
        "heldout_groups": sorted({groups[i] for i in held_idx}),
        "sklearn": sklearn_version,
        **ev,
    }


# --------------------------------------------------------------------------------------------
# the report


def new_report(
    mode: str,
    out_dir: Path,
    data: TrainData,
    split: RowSplit,
    *,
    hyperparameters: dict[str, Any],
    encoder: dict[str, Any],
    losses: list[float],
    warnings: list[str],
    **extra: Any,
) -> TrainReport:
    """A TrainReport with the training side filled in; `finish_report` adds the held-out side."""
    names = data.names
    return TrainReport(
        out_dir=str(out_dir),
        label_names=names,
        n_train=len(split.train_idx),
        n_heldout=len(split.heldout_idx),
        train_groups=split.train_groups,
        heldout_groups=split.heldout_groups,
        macro_f1=None,
        accuracy=None,
        per_label_f1=None,
        confusion=None,
        confusion_labels=names,
        heldout_note=None if split.heldout_idx else _NO_HELDOUT_NOTE,
        hyperparameters=hyperparameters,
        encoder=encoder,
        n_steps=len(losses),
        train_losses=losses,
        label_counts_train=_label_counts(data.labels, split.train_idx, names),
        label_counts_heldout=_label_counts(data.labels, split.heldout_idx, names),
        mode=mode,
        chance=1.0 / len(names),
        warnings=warnings,
        **extra,
    )


def finish_report(
    report: TrainReport,
    predict: Callable[[list[str]], list[str]],
    data: TrainData,
    split: RowSplit,
    settings: TrainSettings,
) -> TrainReport:
    """Score the held-out rows with `predict` and the lexical baseline, log the warnings, write
    train_report.json (atomically, last: its presence marks a finished classifier folder)."""
    held = split.heldout_idx
    if held:
        preds = predict([data.texts[i] for i in held])
        truth, clusters = [data.labels[i] for i in held], [data.groups[i] for i in held]
        kw = {"n_boot": settings.n_boot, "ci": settings.ci, "seed": settings.seed}
        ev = heldout_evaluation(truth, preds, clusters, report.label_names, **kw)
        _set_heldout(report, ev, settings)
        try:
            report.baseline = lexical_baseline(data, split, settings)
        except ValueError as err:
            report.warnings.append(f"lexical baseline not computed: {err}")
    report.summary = _summary(report)
    for w in report.warnings:
        log.warning("classifier %s: %s", report.out_dir, w)
    write_json_atomic(Path(report.out_dir) / REPORT_FILE, report.to_dict())
    return report


def _label_counts(
    labels: Sequence[str], idx: Sequence[int], names: Sequence[str]
) -> dict[str, int]:
    return {n: sum(1 for i in idx if labels[i] == n) for n in names}


def _set_heldout(report: TrainReport, ev: dict[str, Any], settings: TrainSettings) -> None:
    for key in ("macro_f1", "macro_f1_interval", "accuracy", "accuracy_interval"):
        setattr(report, key, ev[key])
    report.per_label_f1, report.confusion = ev["per_label_f1"], ev["confusion"]
    report.above_chance = ev["above_chance"]
    report.interval = {
        "method": "percentile cluster bootstrap (stats.compute_metrics)",
        "clusters": "prompt id",
        "n_clusters": ev["n_clusters"],
        "n_boot": settings.n_boot,
        "ci": settings.ci,
        "seed": settings.seed,
    }
    if ev["n_clusters"] < _FEW_CLUSTERS:
        report.warnings.append(
            f"only {ev['n_clusters']} held-out prompts: a cluster bootstrap over so few clusters "
            "gives intervals that are too narrow and coarse; hold out more prompts (more "
            "training prompts or a larger heldout_fraction) before trusting the chance verdict"
        )


def _fmt_iv(estimate: float, interval: Sequence[float]) -> str:
    return f"{estimate:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _summary(report: TrainReport) -> str:
    """One plain sentence, the chance verdict first."""
    if report.macro_f1 is None or report.macro_f1_interval is None:
        head = "Not measured: " + (report.heldout_note or "no held-out split")
    else:
        iv = report.interval or {}
        fig = (
            f"held-out macro-F1 {_fmt_iv(report.macro_f1, report.macro_f1_interval)} "
            f"({iv.get('ci', 0.95):.0%} cluster-bootstrap over {iv.get('n_clusters')} prompts, "
            f"{report.n_heldout} texts), chance 1/{len(report.label_names)} = {report.chance:.3f}"
        )
        if report.above_chance:
            head = f"Above chance: {fig}."
        else:
            head = (
                f"NOT ABOVE CHANCE: {fig}. The interval reaches chance, so figures from this "
                "classifier cannot be read as persona retention."
            )
    return " ".join([head + _baseline_sentence(report), *report.warnings])


def _baseline_sentence(report: TrainReport) -> str:
    """What the summary says of the lexical baseline (or that the classifier is one)."""
    probe = report.probe or {}
    if probe.get("features") == "lexical":
        cv = probe.get("features_cv") or {}
        why = ""
        if len(cv) > 1 and all(isinstance(v, float) for v in cv.values()):
            why = (
                " (chosen by prompt-grouped CV on the training rows: macro-F1 "
                + ", ".join(f"{k} {v:.3f}" for k, v in cv.items())
                + ")"
            )
        return (
            f" This classifier is a lexical probe (TF-IDF + LR){why}, so the lexical baseline is "
            "the same model and no separate check of it."
        )
    if report.baseline is not None:
        b = report.baseline
        return f" Lexical baseline (TF-IDF + LR): {_fmt_iv(b['macro_f1'], b['macro_f1_interval'])}."
    return ""
