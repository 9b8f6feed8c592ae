"""The scorer seam: what every scorer of persona expression offers the pipeline.

A `Scorer` has `labels` (the personas it can name, in its own order), `identity` (a short stable
id recorded with every score it gives, `ScoreRow.classifier`), `provenance` (what the run
manifest records about it: source, revision, weight hashes), `check_personas` and
`score(inputs) -> list[Prediction]`. An input is a text, or a `ScoreInput` that also carries the
generation row and scoring unit it came from, for scorers that read more than the text.

A scorer that gives more than a label (the LLM judge, persona vectors) also offers
`verdicts(inputs) -> list[Verdict]`: the label and probabilities plus its numbers (`scores`:
persona -> number) and the judge's record, which the pipeline writes into the optional fields of
`ScoreRow` (`verdicts_of` reads any scorer that way). Such a scorer has a `name`, the scorer
column it fills (`judge_likert`, `persona_vector_text`, ...). A scorer may also judge units of its
own that no other scorer reads (`extra_units`: the judge's `SLICE.behaviour`).

`open_scorers` opens a registry entry (`registry.SCORERS`) for one base of a run: one scorer, or
several readings of one kind (persona vectors: text and state; the judge: one per mode). The
errors a scorer raises for a problem of the user's making are `ScorerError`s (the CLI prints them
as one line).
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
from charshift.units import UnitText

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


@dataclass(frozen=True)
class JudgeRecord:
    """What a judge said about one input: per target (a persona for a Likert judgement,
    "identify" for the question which persona wrote it) every sample's verdict in order (None: a
    sample unparseable after its retries) and the rationale of the verdict kept; `score` is the
    median for the row's own persona (Likert, persona rows only); `outcome` is "ok",
    "unparseable" (some target got no verdict) or "error" (the backend failed every attempt)."""

    samples: dict[str, list[Any]]
    rationale: dict[str, str | None]
    outcome: str
    score: float | None = None

    def row_fields(self) -> dict[str, Any]:
        """The `ScoreRow` / predictions-file fields it fills."""
        return {
            "judge_score": self.score,
            "judge_scores": self.samples,
            "judge_rationale": self.rationale,
            "judge_outcome": self.outcome,
        }


@dataclass(frozen=True)
class Verdict:
    """A scorer's whole verdict on one input: its label and probabilities (`Prediction`), and
    for scorers that give numbers `scores` (persona -> number) and the judge's record."""

    label: str
    probs: dict[str, float]
    scores: dict[str, float] | None = None
    judge: JudgeRecord | None = None

    @property
    def prediction(self) -> Prediction:
        return Prediction(self.label, self.probs)

    def row_fields(self) -> dict[str, Any]:
        """The optional `ScoreRow` fields it fills (nothing for a plain prediction)."""
        out: dict[str, Any] = {} if self.scores is None else {"scores": self.scores}
        if self.judge is not None:
            out.update(self.judge.row_fields())
        return out


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


@runtime_checkable
class VerdictScorer(Protocol):
    """A scorer that gives numbers besides its label (see the module doc)."""

    @property
    def name(self) -> str: ...

    def verdicts(
        self, inputs: Sequence[str | ScoreInput], *, progress: Progress = None
    ) -> list[Verdict]: ...


@runtime_checkable
class UnitSource(Protocol):
    """A scorer that also judges units of its own (the judge's `SLICE.behaviour`)."""

    def extra_units(self, rows: Sequence[GenerationRow]) -> list[UnitText]: ...


def verdicts_of(
    scorer: Scorer, inputs: Sequence[str | ScoreInput], *, progress: Progress = None
) -> list[Verdict]:
    """Every scorer's verdicts: a `VerdictScorer`'s own, a plain scorer's predictions as such."""
    if isinstance(scorer, VerdictScorer):
        return scorer.verdicts(inputs, progress=progress)
    return [Verdict(p.label, p.probs) for p in scorer.score(inputs, progress=progress)]


def scorer_name(scorer: Scorer, kind: str) -> str:
    """The scorer column a scorer of registry kind `kind` fills: its `name`, else the kind."""
    name = getattr(scorer, "name", None)
    return name if isinstance(name, str) and name else kind


@dataclass(frozen=True)
class ScorerContext:
    """What opening a scorer for one base of a run needs."""

    cfg: RunConfig
    base: BaseSpec
    run_dir: Path | None  # the run directory (scorers trained in the run live there)
    cache_dir: Path | None = None  # built and converted models


Opened = Scorer | Sequence[Scorer]


def open_scorers(name: str, context: ScorerContext) -> list[Scorer]:
    """Open the registry's scorer `name` for `context.base` (its `module:function` opener): the
    scorers it gives, one per reading or mode."""
    kind = SCORERS.get(name)
    if kind is None or kind.opener is None:
        ready = [k.name for k in SCORERS.values() if k.available]
        raise ScorerError(f"scorer {name!r} is not available; available: {ready}")
    module, _, function = kind.opener.partition(":")
    opener: Callable[[ScorerContext], Opened] = getattr(importlib.import_module(module), function)
    opened = opener(context)
    return [opened] if isinstance(opened, Scorer) else list(opened)


def open_scorer(name: str, context: ScorerContext) -> Scorer:
    """Open the registry's scorer `name`, a kind that gives one scorer (the classifier)."""
    opened = open_scorers(name, context)
    if len(opened) != 1:
        raise ScorerError(f"scorer {name!r} gives {len(opened)} scorers; use open_scorers")
    return opened[0]
