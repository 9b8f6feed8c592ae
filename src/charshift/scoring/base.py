"""The scorer seam: what every scorer of persona expression offers the pipeline.

A `Scorer` has `labels` (the personas it can name, in its own order), `identity` (a short stable
id recorded with every score it gives, `ScoreRow.classifier`), `provenance` (what the run
manifest records about it: source, revision, weight hashes), `check_personas` and
`score(inputs) -> list[Prediction]`. An input is a text, or a `ScoreInput` that also carries the
generation row and scoring unit it came from, for scorers that read more than the text.

`open_scorer` opens a registry entry (`registry.SCORERS`) for one base of a run. The errors a
scorer raises for a problem of the user's making are `ScorerError`s (the CLI prints them as one
line).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from charshift.config import BaseSpec, RunConfig
from charshift.schema import GenerationRow
from charshift.scoring.registry import SCORERS

# a progress report: True for a tqdm bar, a callable receiving (done, total), or None/False
Progress = bool | Callable[[int, int], None] | None


class ScorerError(RuntimeError):
    """A scorer cannot be opened or used as asked."""


class ClassifierError(ScorerError):
    """A classifier cannot be loaded or used as asked (missing, gated, unnamed labels, ...)."""


class ClassifierLabelError(ClassifierError):
    """The run's personas are not all labels of the classifier."""


class Prediction(NamedTuple):
    """One scored text: the predicted label and the probability of every label of the scorer."""

    label: str
    probs: dict[str, float]


@dataclass(frozen=True)
class ScoreInput:
    """A text to score, with the generation row and scoring unit it was taken from."""

    text: str
    row: GenerationRow | None = None
    unit: str | None = None


def input_texts(inputs: Sequence[str | ScoreInput]) -> list[str]:
    """The text of each input, in order."""
    return [x if isinstance(x, str) else x.text for x in inputs]


@runtime_checkable
class Scorer(Protocol):
    """What the pipeline needs of a scorer (see the module doc)."""

    @property
    def labels(self) -> list[str]: ...

    @property
    def identity(self) -> str: ...

    @property
    def provenance(self) -> dict[str, Any]: ...

    def check_personas(self, personas: Sequence[str]) -> None: ...

    def score(
        self, inputs: Sequence[str | ScoreInput], *, progress: Progress = None
    ) -> list[Prediction]: ...


@dataclass(frozen=True)
class ScorerContext:
    """What opening a scorer for one base of a run needs."""

    cfg: RunConfig
    base: BaseSpec
    run_dir: Path | None  # the run directory (scorers trained in the run live there)
    cache_dir: Path | None = None  # built and converted models


def open_scorer(name: str, context: ScorerContext) -> Scorer:
    """Open the registry's scorer `name` for `context.base` (its `module:function` opener)."""
    kind = SCORERS.get(name)
    if kind is None or kind.opener is None:
        ready = [k.name for k in SCORERS.values() if k.available]
        raise ScorerError(f"scorer {name!r} is not available; available: {ready}")
    module, _, function = kind.opener.partition(":")
    opener: Callable[[ScorerContext], Scorer] = getattr(importlib.import_module(module), function)
    return opener(context)
