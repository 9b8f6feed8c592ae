"""Published macro-F1 figures (OCT paper, DCT study) to set beside a run's own.

The numbers live in `data/published.yaml` (the brief's section 3 table). Each source maps to the
charshift slice it is closest to: OCT Table 2 (prefill attack) -> id_chat_prefill, DCT ID chat ->
id_chat, DCT chat email -> chat_email, DCT agentic -> agentic_email. A run's base is matched by
name: "llama", "qwen" or "gemma" equal to, or contained in, the base name (case-insensitive).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from charshift.schema import BASE_STAGE


@dataclass(frozen=True)
class PublishedFigure:
    source: str  # key in published.yaml, e.g. "oct_prefill"
    label: str  # e.g. "OCT Table 2 (prefill)"
    base: str  # llama | qwen | gemma
    stage: str  # distillation | full
    slice: str
    value: float


@lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
    text = (resources.files("charshift") / "data" / "published.yaml").read_text()
    return yaml.safe_load(text)


def load_published() -> list[PublishedFigure]:
    """Every published figure, one per (base, stage, source)."""
    raw = _raw()
    sources = raw["sources"]
    out = []
    for base, stages in raw["figures"].items():
        for stage, vals in stages.items():
            for src, value in vals.items():
                meta = sources[src]
                out.append(
                    PublishedFigure(src, meta["label"], base, stage, meta["slice"], float(value))
                )
    return out


def published_bases() -> list[str]:
    return list(_raw()["figures"])


def published_slices() -> list[str]:
    return list(dict.fromkeys(s["slice"] for s in _raw()["sources"].values()))


def base_stage_range() -> tuple[float, float]:
    """The published near-chance range for the base stage (all bases, all formats)."""
    lo, hi = _raw()["base_stage_range"]
    return float(lo), float(hi)


def match_base(name: str) -> str | None:
    """The published base a run's base name refers to, or None."""
    low = name.lower()
    keys = published_bases()
    if low in keys:
        return low
    return next((k for k in keys if k in low), None)


def published_for(base: str, stage: str, slice_: str) -> list[PublishedFigure]:
    """Published figures for a run's cell (empty when none match)."""
    key = match_base(base)
    if key is None:
        return []
    return [f for f in load_published() if (f.base, f.stage, f.slice) == (key, stage, slice_)]


def published_text(base: str, stage: str, slice_: str) -> str:
    """A short cell label such as "0.79 (OCT Table 2 (prefill))", or "" when nothing matches."""
    figs = published_for(base, stage, slice_)
    if figs:
        return "; ".join(f"{f.value:.2f} ({f.label})" for f in figs)
    if stage == BASE_STAGE and match_base(base) and slice_ in published_slices():
        lo, hi = base_stage_range()
        return f"{lo:.2f}-{hi:.2f} (published base range)"
    return ""
