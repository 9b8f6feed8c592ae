"""The scorer registry: every name a run config's `scorers:` may use, and what opens it.

Pure data with no charshift imports, so the run config validates `scorers:` against it without
loading any scorer code. An entry names its implementation as `module:function` (a function that
takes a `base.ScorerContext` and returns a `base.Scorer`), resolved by `base.open_scorer` only
when a run scores: the config module then never imports the scorers, which import the config
themselves. Adding a scorer is one entry here and its implementation module (plus, where it has
settings, its section in the run config). An entry without an implementation is a reserved name:
validation refuses it with a message saying it is not available yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ScorerKind:
    """One kind of scorer: its name in `scorers:`, what it reads, and its implementation."""

    name: str
    description: str
    opener: str | None = None  # "module:function"; None: a reserved name, not available yet

    @property
    def available(self) -> bool:
        return self.opener is not None


SCORERS: dict[str, ScorerKind] = {
    kind.name: kind
    for kind in (
        ScorerKind(
            "classifier",
            "a persona classifier: any HF sequence classifier (OCT's ModernBERT ones), or one "
            "trained in the run from `classifier_training` (probe or fine-tune)",
            "charshift.scoring.classifier:open_run_classifier",
        ),
        ScorerKind(
            "judge",
            "an LLM judge of persona expression (Likert and/or identify), settings in `judge`",
            "charshift.scoring.judge:open_run_judge",
        ),
        ScorerKind(
            "persona_vector",
            "persona vectors: residual-stream activations projected on each persona's direction "
            "(a text and a state reading), settings in `persona_vector`",
            "charshift.scoring.persona_vector:open_run_persona_vectors",
        ),
    )
}
DEFAULT_SCORERS = ("classifier",)


def check_scorer_names(names: Sequence[str]) -> list[str]:
    """`names` as a list; a ValueError naming any unknown, unavailable or repeated scorer."""
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer(s) {unknown}; known: {list(SCORERS)}")
    reserved = [n for n in names if not SCORERS[n].available]
    if reserved:
        ready = [k.name for k in SCORERS.values() if k.available]
        what = "; ".join(f"{n}: {SCORERS[n].description}" for n in reserved)
        raise ValueError(
            f"scorer(s) {reserved} are not available yet in this version of charshift ({what}); "
            f"available: {ready}"
        )
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"scorer(s) {repeated} are given twice; each may appear once")
    return list(names)
