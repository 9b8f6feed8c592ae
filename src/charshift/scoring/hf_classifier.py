"""`Classifier`: any HF sequence classifier as a scorer, its labels read from its own config.

Why this module is careful about labels: a classifier's output index means nothing until its
config says which persona sits at that index. OCT's classifiers carry named labels in
`config.id2label`; we read them from there, in index order, and refuse a classifier whose labels
are the generic `LABEL_0, LABEL_1, ...` placeholders, because any mapping we guessed would
silently scramble every metric downstream.

`load_hf_classifier` understands an HF hub id (e.g. `maius/qwen-2.5-7b-it-pt-classifier`, a
ModernBERT-base classifier, pinned to one snapshot commit), a local folder (e.g. a fine-tune
written by `scoring.finetune`) and `tiny:modernbert:...` (`scoring.tiny_classifier`). A probe
folder is loaded by `scoring.probe_folder`; `scoring.classifier.load_classifier` picks the loader.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from charshift.schema import stable_hash
from charshift.scoring.base import (
    ClassifierError,
    ClassifierLabelError,
    Prediction,
    Progress,
    ScoreInput,
    input_texts,
)
from charshift.scoring.sources import hub_kwargs, hub_snapshot, weights_sha256
from charshift.scoring.tiny_classifier import TINY_PREFIX, tiny_folder
from charshift.scoring.tokens import (
    ProgressBar,
    collate,
    effective_max_length,
    encode_texts,
    forward_keys,
    pad_id,
    resolve_device,
)

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


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
            "whose config names its labels, or train one (scoring.classifier.train_classifier)."
        )
    if len(set(labels)) != len(labels):
        raise ClassifierError(f"{source}: duplicate label names in config.id2label: {labels}")
    num = getattr(config, "num_labels", len(labels))
    if num != len(labels):
        raise ClassifierError(f"{source}: num_labels={num} but id2label names {len(labels)}")
    return labels


@dataclass
class Classifier:
    """A loaded sequence classifier, its label names (from its config) and where it came from.

    A `scoring.base.Scorer`: `score` classifies with `batch_size` and `max_length` (the run's
    `scoring` settings where the run opened it); `predict` takes them per call."""

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
    batch_size: int = 16
    max_length: int = 8192

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the weight files of the folder it was loaded from (computed once)."""
        if self._sha is None and self.folder is not None:
            self._sha = weights_sha256(self.folder)
        return self._sha

    @property
    def provenance(self) -> dict[str, Any]:
        """What the run manifest records: source, revision, weight hash, labels."""
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
    def identity(self) -> str:
        """The id recorded with every score (`ScoreRow.classifier`): a hash of `provenance`."""
        return stable_hash(self.provenance, 12)

    @property
    def key(self) -> str:
        """A readable name: the source plus revision or weight hash (`identity` keys scores)."""
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

    def score(
        self, inputs: Sequence[str | ScoreInput], *, progress: Progress = None
    ) -> list[Prediction]:
        """A prediction per input, in input order; each distinct text is classified once."""
        texts = input_texts(inputs)
        distinct = list(dict.fromkeys(texts))
        preds = self.predict(
            distinct, batch_size=self.batch_size, max_length=self.max_length, progress=progress
        )
        verdict = dict(zip(distinct, preds, strict=True))
        return [verdict[t] for t in texts]

    @torch.inference_mode()
    def predict(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 16,
        max_length: int = 8192,
        progress: Progress = None,
    ) -> list[Prediction]:
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
        cap = effective_max_length(self.model, self.tokenizer, max_length)
        ids = encode_texts(self.tokenizer, texts, cap)
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
        keys, pad = forward_keys(self.model), pad_id(self.tokenizer)
        out: list[Prediction | None] = [None] * len(ids)
        bar = ProgressBar(progress, len(ids), "classify")
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = collate([ids[i] for i in idx], pad, keys)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits = self.model(**batch).logits.float()
                probs = torch.softmax(logits, dim=-1).cpu().tolist()
                for i, row in zip(idx, probs, strict=True):
                    out[i] = self._prediction(row)
                bar.update(len(idx))
        finally:
            bar.close()
        return [x for x in out if x is not None]

    def _prediction(self, probs: list[float]) -> Prediction:
        best = max(range(len(probs)), key=probs.__getitem__)
        return Prediction(self.labels[best], dict(zip(self.labels, probs, strict=True)))


def load_hf_classifier(
    source: str,
    *,
    device: str = "auto",
    cache_dir: Path | None = None,
    revision: str | None = None,
) -> Classifier:
    """Load from an HF id, a local model folder or `tiny:modernbert:<labels>` (module doc)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, kind, rev, extra = _locate(source, cache_dir, revision)
    # A hub model loads by id at the pinned commit (so its weights are fetched or found in the
    # cache); the snapshot folder is then only where its weight files are hashed.
    ref, kw = (source, hub_kwargs(rev, cache_dir)) if kind == "hub" else (str(folder), {})
    try:
        model = AutoModelForSequenceClassification.from_pretrained(ref, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(ref, **kw)
    except Exception as err:
        raise ClassifierError(
            f"cannot load a sequence classifier from {source!r} ({folder}): {err}"
        ) from None
    labels = labels_from_config(model.config, source)
    dev = resolve_device(device)
    model.to(dev).eval()
    return Classifier(model, tokenizer, labels, source, dev, kind, rev, folder, extra)


def _locate(
    source: str, cache_dir: Path | None, revision: str | None
) -> tuple[Path, str, str | None, dict[str, Any]]:
    """(folder, kind, pinned revision, extra provenance) of a classifier source."""
    if source.startswith(TINY_PREFIX):
        folder, _, seed = tiny_folder(source, cache_dir)
        return folder, "tiny", None, {"seed": seed, "meaningless": True}
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser().resolve(), "local", None, {}
    if source.startswith("packaged:"):
        raise ClassifierError(
            f"{source!r} is an encoder without a trained head; train a classifier on it "
            "(classifier_training, mode probe or finetune) and load the result folder"
        )
    folder, rev = hub_snapshot(source, revision, cache_dir)
    return folder, "hub", rev, {}
