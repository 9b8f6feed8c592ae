"""The scorers' settings: how a classifier is trained (`TrainSettings`, the run config's
`classifier_training` section) and `TrainData` (the labelled texts), in place of long argument
lists; the judge's (`JudgeSettings`, the `judge` section) and the persona vectors'
(`PersonaVectorSettings`, the `persona_vector` section).

Pure (pydantic and the record types only): the run config imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from charshift.backends.settings import Device, Dtype
from charshift.schema import MAX_N_BOOT, PROMPTED_STAGE

DEFAULT_ENCODER = "answerdotai/ModernBERT-base"
# The C values tried by prompt-grouped cross-validation (probe and lexical baseline).
DEFAULT_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
RESERVED_LABELS = ("-", "__null__")  # stats reads these as the base stage's null persona


class TrainSettings(BaseModel):
    """Train the run's persona classifier on its ID generations.

    `mode: finetune` (the default) fine-tunes `encoder` with OCT's hyperparameters (epochs, lr,
    batch_size, grad_accum, warmup_ratio, weight_decay), plus early stopping on an inner split of
    the training prompts (`early_stopping_fraction`, 0 = OCT's plain loop; `eval_every` steps,
    None = about ten evaluations; `early_stopping_patience` evaluations without improvement).
    `mode: probe` keeps the encoder frozen and fits a multinomial logistic regression on its
    mean-pooled embeddings, choosing C from `probe_c_grid` by prompt-grouped `probe_cv_folds`-fold
    cross-validation (lowest out-of-fold log-loss, ties to the smaller C; `auto` features compare
    the out-of-fold macro-F1): the recipe for hundreds of examples. The fine-tune-only fields are
    ignored by the probe and the probe_* fields by the fine-tune; the train report records what
    was used.
    Both modes hold out `heldout_fraction` of the prompts and report macro-F1 on them with a
    cluster-bootstrap interval (`n_boot` resamples, level `ci`) beside a TF-IDF baseline.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["probe", "finetune"] = "finetune"
    encoder: str = DEFAULT_ENCODER
    stage: str = PROMPTED_STAGE  # which stage's ID-train rows are the training data
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(5e-4, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(2, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(1e-6, ge=0)
    max_length: int = Field(8192, ge=2)
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    early_stopping_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    eval_every: int | None = Field(None, ge=1)
    early_stopping_patience: int = Field(3, ge=1)
    probe_c_grid: list[float] = Field(default_factory=lambda: list(DEFAULT_C_GRID))
    probe_cv_folds: int = Field(5, ge=2)
    # what the probe reads: a frozen encoder's sentence embeddings, TF-IDF word features, or
    # (auto) whichever cross-validates better on the training rows (scoring.lexical)
    probe_features: Literal["embedding", "lexical", "auto"] = "embedding"
    n_boot: int = Field(1000, ge=10, le=MAX_N_BOOT)
    ci: float = Field(0.95, gt=0, lt=1)
    seed: int = 0

    @field_validator("probe_c_grid")
    @classmethod
    def _c_grid_ok(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one value of C")
        bad = [c for c in v if not (c > 0 and c < float("inf"))]
        if bad:
            raise ValueError(f"every C must be a finite number > 0; got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate values of C: {v}")
        return sorted(v)


@dataclass(frozen=True)
class TrainData:
    """A training set, checked when made (before any model loads): `texts[i]` is labelled
    `labels[i]` (one of `label_names`, whose order is the classifier's label order) and comes
    from prompt `groups[i]`. The held-out split, the cross-validation folds and the bootstrap
    intervals all keep a prompt's rows together."""

    texts: Sequence[str]
    labels: Sequence[str]
    groups: Sequence[str]
    label_names: Sequence[str]

    def __post_init__(self) -> None:
        for name in ("texts", "labels", "groups", "label_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        texts, labels, groups, names = self.texts, self.labels, self.groups, self.names
        if not (len(texts) == len(labels) == len(groups)):
            raise ValueError(
                f"texts, labels, groups differ in length: {len(texts)}, {len(labels)}, "
                f"{len(groups)}"
            )
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"label_names must be at least two distinct names; got {names}")
        reserved = [n for n in names if not n.strip() or n in RESERVED_LABELS]
        if reserved:
            raise ValueError(f"label_names {reserved} are empty or reserved (null-persona markers)")
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise ValueError(f"labels {unknown} are not in label_names {names}")
        if not texts:
            raise ValueError("no training examples")

    @property
    def names(self) -> list[str]:
        """The label names, as a list in label order."""
        return list(self.label_names)


JUDGE_MODES = ("likert", "identify")


class JudgeSettings(BaseModel):
    """The `judge` scorer: an LLM asked about persona expression (the run config's `judge`
    section; `charshift score --generations --scorer judge` builds one from its flags).

    `model`: the judge model, in the form its backend takes: an HF id, a local folder or
    `packaged:smollm2` for `hf`, `vllm` and `server`; the served model name for `openai`.
    `backend`: the judge's own backend, in the fields of the run's `backend:` section (`kind`,
    `base_url`, `api_key_env` (the NAME of the environment variable that holds the API key; the
    key itself is never written anywhere), `device`, `engine`, ...); checked as one when the
    config loads. `modes`: `likert` (how strongly the text expresses its persona, 1-5) and/or
    `identify` (which persona wrote it, or none); each mode is a scorer of its own. `samples`
    answers per question at `temperature` / `top_p` / `max_tokens`; an unparseable answer is
    asked again up to `retries` times. `behaviour`: tool slices also get a judged unit
    `SLICE.behaviour` (the agent's actions, not its text). `context_chars`: each message of the
    conversation shown is shortened to this many characters (the judged text never is).
    `constrained`: ask the backend to enforce the answer's JSON shape (a grammar on `hf`,
    structured outputs on servers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    revision: str | None = None
    backend: dict[str, Any] = Field(default_factory=lambda: {"kind": "hf"})
    modes: list[Literal["likert", "identify"]] = Field(
        default_factory=lambda: list(JUDGE_MODES), min_length=1
    )
    samples: int = Field(3, ge=1, le=99)
    temperature: float = Field(0.1, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(256, ge=8)
    retries: int = Field(2, ge=0, le=10)
    behaviour: bool = True
    context_chars: int = Field(4000, ge=200)
    constrained: bool = False
    seed: int = Field(0, ge=0)

    @field_validator("modes")
    @classmethod
    def _modes_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each mode may appear once: {v}")
        return v


class PersonaVectorSettings(BaseModel):
    """The `persona_vector` scorer (the run config's `persona_vector` section).

    Each persona's direction is the mean residual-stream activation over the response tokens of
    `stage`'s ID training rows of that persona minus that of the base stage's (the base model,
    each row read in its own context); `heldout_fraction` of the training prompts are held out
    and the layer whose directions separate their texts best is kept (`layers`: the candidate
    layers, 1 = the first block's output; None = every layer). Activations are read with the HF
    backend on `device` / `dtype` (None: the run's `backend` where it is `hf`, else auto),
    `batch_size` texts at a time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str = PROMPTED_STAGE
    heldout_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    layers: list[int] | None = None
    device: Device | None = None
    dtype: Dtype | None = None
    batch_size: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)

    @field_validator("layers")
    @classmethod
    def _layers_ok(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1 or len(set(v)) != len(v)):
            raise ValueError(f"give distinct layer numbers >= 1 (1 = the first block), got {v}")
        return None if v is None else sorted(v)
