"""The depth of each persona per (base, trained stage): the mean over units of its F1 excess over
its own null (pure; `results.Depth` says what it means).

Trained minus base in excess is the trained stage's excess itself: the base stage's excess is 0
by construction (each base output is paired with every persona), so nothing is subtracted.
"""

from __future__ import annotations

import math

from charshift.ladder import split_unit
from charshift.stats.results import Depth, MetricsResult


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def depth_rows(result: MetricsResult) -> list[Depth]:
    """One `Depth` per (base, trained stage, persona of the base's label set), in report order.
    A unit counts for a persona where the persona has a scored output there."""
    out = []
    for base in result.bases:
        units = [u for u in result.slices if split_unit(u)[1] is None]
        for stage in result.trained_stages(base):
            for persona in result.labels.get(base, result.personas):
                out.append(_depth(result, base, stage, persona, units))
    return out


def _depth(result: MetricsResult, base: str, stage: str, persona: str, units: list[str]) -> Depth:
    seen: list[tuple[str, float, bool, bool]] = []  # unit, excess, blind, detected
    for unit in units:
        cell = result.get(base, stage, unit)
        pm = next((p for p in cell.per_persona if p.persona == persona), None) if cell else None
        if pm is None or not math.isfinite(pm.f1_excess.estimate):
            continue
        iv = pm.f1_excess
        seen.append((unit, iv.estimate, result.blind(base, unit), iv.above_zero))
    clear = [v for _, v, blind, _ in seen if not blind]
    return Depth(
        base=base,
        stage=stage,
        persona=persona,
        depth=_mean([v for _, v, _, _ in seen]),
        n_units=len(seen),
        depth_not_blind=_mean(clear),
        n_units_not_blind=len(clear),
        n_detected=sum(d for *_, d in seen),
        units=tuple(u for u, *_ in seen),
    )
