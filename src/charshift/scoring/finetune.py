"""The fine-tune recipe (`classifier_training.mode: finetune`): OCT's, with early stopping.

A plain torch loop with OCT's hyperparameters as `TrainSettings`' defaults (1 epoch, lr 5e-4,
batch 8 x accumulation 2, cosine schedule with 5% warmup, weight decay 1e-6 on matrices only,
max length 8192; gradient clipping at 1.0 as the HF Trainer does), optional early stopping on an
inner split of the training prompts, and a warning when the loss does not fall (`loss_warning`).
The held-out split, figures and `train_report.json` are `scoring.heldout`'s.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from charshift.schema import derive_seed
from charshift.scoring.heldout import (
    REPORT_FILE,
    TrainReport,
    finish_report,
    new_report,
    split_by_group,
    split_rows,
)
from charshift.scoring.hf_classifier import Classifier
from charshift.scoring.probe_folder import remove_probe_files
from charshift.scoring.settings import TrainData, TrainSettings
from charshift.scoring.sources import resolve_encoder, weights_sha256
from charshift.scoring.tokens import (
    ProgressBar,
    collate,
    effective_max_length,
    encode_texts,
    forward_keys,
    pad_id,
    resolve_device,
)

MAX_GRAD_NORM = 1.0  # gradient clipping at the HF Trainer's default
# The no-learning check (`loss_warning`): the mean loss of the last fifth of the steps must be
# at least 5% below that of the first fifth (and beyond the noise), not within 2% of ln K.
_LOSS_WINDOW = 0.2
_MIN_LOSS_DROP = 0.05
_LN_K_BAND = 0.02


class _Fitted(NamedTuple):
    clf: Classifier
    losses: list[float]
    stopper: _EarlyStopping | None
    encoder: dict[str, Any]  # the encoder's identity, for the report


def train_finetune(
    data: TrainData,
    settings: TrainSettings,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> TrainReport:
    """Fine-tune `settings.encoder` as a single-label classifier over `data.label_names`; save
    it to `out_dir` and report on the held-out prompts.

    `heldout_fraction` of the groups (prompt ids) are held out to measure the result;
    heldout_fraction=0 reproduces OCT's no-held-out setting. Early stopping (the config's
    default; 0 is OCT's plain loop): a further `early_stopping_fraction` of the training groups is
    set aside, scored by macro-F1 every `eval_every` steps (None: about ten times in the run) and
    at the last step; training stops after `early_stopping_patience` evaluations without
    improvement and the best state is kept. The saved folder has config.id2label in label order.
    """
    split = split_rows(data.groups, settings.heldout_fraction, settings.seed)
    fit_idx, val_idx, val_groups, es_note = _inner_split(
        data.groups, split.train_idx, settings.early_stopping_fraction, settings.seed
    )
    hyper = _hyperparameters(settings)
    fitted = _finetune(data, fit_idx, val_idx, settings, hyper, cache_dir, device, progress)
    out_dir = Path(out_dir)
    _save_finetuned(fitted.clf, out_dir)
    early = None
    if fitted.stopper is not None:
        early = {**fitted.stopper.info(), "n_fit": len(fit_idx), "n_val": len(val_idx)}
        early["val_groups"] = val_groups
    warnings = [w for w in (es_note, loss_warning(fitted.losses, len(data.names))) if w]
    report = new_report(
        "finetune", out_dir, data, split, hyperparameters=hyper, encoder=fitted.encoder,
        losses=fitted.losses, warnings=warnings, early_stopping=early,
    )  # fmt: skip
    cap, eval_batch = hyper["effective_max_length"], max(settings.batch_size, 16)

    def predict(batch: list[str]) -> list[str]:
        return [p for p, _ in fitted.clf.predict(batch, batch_size=eval_batch, max_length=cap)]

    return finish_report(report, predict, data, split, settings)


def _hyperparameters(settings: TrainSettings) -> dict[str, Any]:
    """What the report records of the recipe (`_finetune` adds what it resolves)."""
    keys = ("epochs", "lr", "batch_size", "grad_accum", "warmup_ratio", "weight_decay")
    keys += ("max_length", "heldout_fraction", "early_stopping_fraction", "eval_every")
    hyper: dict[str, Any] = {"mode": "finetune"}
    hyper.update({k: getattr(settings, k) for k in keys})
    hyper.update(early_stopping_patience=settings.early_stopping_patience, seed=settings.seed)
    hyper.update(max_grad_norm=MAX_GRAD_NORM, scheduler="cosine_with_warmup")
    return hyper


def _finetune(
    data: TrainData,
    fit_idx: list[int],
    val_idx: list[int],
    settings: TrainSettings,
    hyper: dict[str, Any],
    cache_dir: Path | None,
    device: str,
    progress: bool,
) -> _Fitted:
    """Load the encoder with a new head and train it on `fit_idx` (recording in `hyper` the
    effective max length, device and library versions)."""
    ref, ref_kw, enc_folder, enc_identity = resolve_encoder(settings.encoder, cache_dir)
    dev = resolve_device(device)
    names = data.names
    label2id = {n: i for i, n in enumerate(names)}
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(settings.seed)  # seeds the new head's initialisation and dropout
        tokenizer, model = _load_for_finetune(ref, ref_kw, names)
        enc_identity["weights_sha256"] = weights_sha256(enc_folder)
        model.to(dev)
        cap = effective_max_length(model, tokenizer, settings.max_length)
        hyper.update(effective_max_length=cap, device=str(dev), torch=torch.__version__)
        hyper["transformers"] = __import__("transformers").__version__
        ids = encode_texts(tokenizer, [data.texts[i] for i in fit_idx], cap)
        y = [label2id[data.labels[i]] for i in fit_idx]
        clf = Classifier(model, tokenizer, names, "memory", dev, "memory")
        n_micro = max(1, round(settings.epochs * math.ceil(len(ids) / settings.batch_size)))
        n_steps = math.ceil(n_micro / settings.grad_accum)
        stopper = _early_stopping(clf, data, val_idx, cap, settings, hyper, n_steps)
        losses = _run_steps(clf, ids, y, n_micro, n_steps, settings, progress, stopper)
        if stopper is not None:
            stopper.restore()
        model.eval()
    return _Fitted(clf, losses, stopper, enc_identity)


def _early_stopping(
    clf: Classifier,
    data: TrainData,
    val_idx: list[int],
    cap: int,
    settings: TrainSettings,
    hyper: dict[str, Any],
    n_steps: int,
) -> _EarlyStopping | None:
    """The early-stopping check on the inner validation rows (None without them); records the
    evaluation interval it uses in `hyper`."""
    if not val_idx:
        return None
    val_texts = [data.texts[i] for i in val_idx]
    val_labels = [data.labels[i] for i in val_idx]
    eval_batch = max(settings.batch_size, 16)

    def inner_f1() -> float:
        preds = clf.predict(val_texts, batch_size=eval_batch, max_length=cap)
        clf.model.train()
        return _macro_f1(val_labels, [p for p, _ in preds], data.names)

    every = settings.eval_every or max(1, n_steps // 10)
    hyper["eval_every"] = every
    return _EarlyStopping(clf.model, inner_f1, every, settings.early_stopping_patience, n_steps)


def _load_for_finetune(ref: str, ref_kw: dict[str, Any], names: list[str]) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref, **ref_kw)
    model = AutoModelForSequenceClassification.from_pretrained(
        ref,
        **ref_kw,
        dtype=torch.float32,  # fp32 master weights; bf16 only inside autocast on GPU
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        problem_type="single_label_classification",
        ignore_mismatched_sizes=True,  # an encoder that already has a head of another size
    )
    return tokenizer, model


def _save_finetuned(clf: Classifier, out_dir: Path) -> None:
    """Save model and tokenizer with id2label in label order; clear what would shadow them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_FILE).unlink(missing_ok=True)  # written last, when the folder is complete
    remove_probe_files(out_dir)  # a former probe's files would shadow this model on load
    clf.model.config.id2label = dict(enumerate(clf.labels))
    clf.model.config.label2id = {n: i for i, n in enumerate(clf.labels)}
    clf.model.save_pretrained(str(out_dir))
    clf.tokenizer.save_pretrained(str(out_dir))


def _macro_f1(y_true: Sequence[str], y_pred: Sequence[str], names: Sequence[str]) -> float:
    from charshift.stats import score_labels

    return float(score_labels(y_true, y_pred, list(names))["macro_f1"])


# --------------------------------------------------------------------------------------------
# the optimisation loop


def _run_steps(
    clf: Classifier,
    ids: list[list[int]],
    y: list[int],
    n_micro: int,
    n_steps: int,
    settings: TrainSettings,
    progress: bool,
    stop: Callable[[int], bool] | None,
) -> list[float]:
    """AdamW, cosine schedule with warmup, clipping; the loss per step."""
    from transformers import get_cosine_schedule_with_warmup

    model = clf.model
    optim = _optimizer(model, settings.lr, settings.weight_decay)
    warmup = math.ceil(settings.warmup_ratio * n_steps)
    sched = get_cosine_schedule_with_warmup(optim, warmup, n_steps)
    keys, pad = forward_keys(model), pad_id(clf.tokenizer)
    accum = settings.grad_accum
    lengths = [len(x) for x in ids]
    micro = list(_micro_batches(lengths, settings.batch_size, n_micro, settings.seed))
    model.train()
    losses: list[float] = []
    bar = ProgressBar(progress, n_steps, "train classifier")
    try:
        for step in range(n_steps):
            group = micro[step * accum : (step + 1) * accum]
            losses.append(_step(model, group, ids, y, clf.device, keys, pad))
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            bar.update(1, loss=f"{losses[-1]:.3f}")
            if stop is not None and stop(step + 1):
                break
    finally:
        bar.close()
    return losses


def _optimizer(model: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases or norm weights), as HF Trainer."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def _step(
    model: Any,
    group: list[list[int]],
    ids: list[list[int]],
    y: list[int],
    dev: torch.device,
    keys: tuple[str, ...],
    pad: int,
) -> float:
    """Forward and backward over one accumulation group; the mean loss per example."""
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported()
        else torch.autocast("cpu", enabled=False)
    )
    n_examples = sum(len(b) for b in group)
    total = 0.0
    for b in group:
        batch = {k: v.to(dev) for k, v in collate([ids[i] for i in b], pad, keys).items()}
        target = torch.tensor([y[i] for i in b], device=dev)
        with autocast:
            logits = model(**batch).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        (loss / n_examples).backward()
        total += loss.item()
    return total / n_examples


def _batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random, bucket_batches: int = 50
) -> list[list[int]]:
    """One epoch of batches: shuffle, sort by length within buckets, shuffle the batches.

    Sorting within buckets of `bucket_batches` batches keeps padding low without making batch
    composition a fixed function of length.
    """
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    size = batch_size * bucket_batches
    batches = []
    for start in range(0, len(idx), size):
        bucket = sorted(idx[start : start + size], key=lambda i: lengths[i])
        batches += [bucket[j : j + batch_size] for j in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches


def _micro_batches(
    lengths: Sequence[int], batch_size: int, n_micro: int, seed: int
) -> Iterator[list[int]]:
    """`n_micro` micro-batches over as many (possibly fractional) epochs as that takes."""
    rng = random.Random(seed)
    done = 0
    while done < n_micro:
        for b in _batches(lengths, batch_size, rng):
            if done == n_micro:
                return
            yield b
            done += 1


# --------------------------------------------------------------------------------------------
# early stopping and the no-learning check


def _inner_split(
    groups: Sequence[str], train_idx: list[int], fraction: float, seed: int
) -> tuple[list[int], list[int], list[str], str | None]:
    """Split the training rows by group into (fit, early-stopping validation) rows.

    Returns (fit rows, validation rows, validation groups, a note when early stopping is off).
    """
    if fraction == 0.0:
        return train_idx, [], [], None
    distinct = sorted({groups[i] for i in train_idx})
    if len(distinct) < 2:
        note = f"early stopping off: {len(distinct)} training prompt(s), an inner split needs 2"
        return train_idx, [], [], note
    _, val_groups = split_by_group(distinct, fraction, derive_seed("early_stopping", seed))
    val = set(val_groups)
    fit = [i for i in train_idx if groups[i] not in val]
    return fit, [i for i in train_idx if groups[i] in val], val_groups, None


class _EarlyStopping:
    """Evaluate every `every` steps (and at the last), keep the best state, stop after
    `patience` evaluations without improvement; `restore` puts the best state back."""

    def __init__(
        self, model: Any, evaluate: Callable[[], float], every: int, patience: int, n_steps: int
    ) -> None:
        self.model, self.evaluate = model, evaluate
        self.every, self.patience, self.n_steps = every, patience, n_steps
        self.evals: list[list[float]] = []
        self.best: float | None = None
        self.best_step = 0
        self.state: dict[str, torch.Tensor] | None = None
        self.bad = 0
        self.stopped_at: int | None = None

    def __call__(self, step: int) -> bool:
        if step % self.every and step != self.n_steps:
            return False
        score = self.evaluate()
        self.evals.append([step, score])
        if self.best is None or score > self.best:
            self.best, self.best_step, self.bad = score, step, 0
            self.state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
        else:
            self.bad += 1
        if self.bad >= self.patience and step != self.n_steps:
            self.stopped_at = step
            return True
        return False

    def restore(self) -> None:
        last = self.evals[-1][0] if self.evals else None
        if self.state is not None and last != self.best_step:
            self.model.load_state_dict(self.state)

    def info(self) -> dict[str, Any]:
        return {
            "eval_every": self.every,
            "patience": self.patience,
            "evals": self.evals,  # [step, inner macro-F1]
            "best_step": self.best_step,
            "best_inner_macro_f1": self.best,
            "stopped_early_at": self.stopped_at,
            "restored_best": bool(self.evals) and self.evals[-1][0] != self.best_step,
        }


def loss_warning(losses: Sequence[float], n_labels: int) -> str | None:
    """A warning when the training loss did not fall, else None.

    Compares the mean loss of the first and the last fifth of the steps. The fall must exceed
    both 5% of the first mean and twice the standard error of the difference of the two means,
    with the per-step noise estimated robustly from successive differences (1.4826 x their
    median absolute value / sqrt 2, which a steady trend barely moves); and the last fifth must
    not sit within 2% of ln K (the loss of a uniform guess).
    """
    if len(losses) < 2:
        return (
            f"only {len(losses)} optimisation step(s): whether the training loss falls cannot be "
            "judged"
        )
    k = max(1, round(_LOSS_WINDOW * len(losses)))
    first = sum(losses[:k]) / k
    last = sum(losses[-k:]) / k
    sigma = 1.4826 * statistics.median(abs(b - a) for a, b in itertools.pairwise(losses))
    sigma /= math.sqrt(2.0)
    needed = max(_MIN_LOSS_DROP * first, 2.0 * sigma * math.sqrt(2.0 / k))
    ln_k = math.log(n_labels)
    if first - last < needed or abs(last - ln_k) <= _LN_K_BAND * ln_k:
        return (
            f"the training loss did not fall: mean {first:.3f} over the first {k} steps, "
            f"{last:.3f} over the last {k} (a fall of at least {needed:.3f} was needed to stand "
            f"out of the step-to-step noise; ln K = {ln_k:.3f} is a uniform guess). The "
            "classifier probably learned nothing: try mode: probe, or more data or epochs."
        )
    return None
