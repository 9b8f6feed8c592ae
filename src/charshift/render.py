"""Render any item in any slice: the one dispatch from a slice to its renderer.

Every slice of the registry (`charshift.slices`) has exactly one renderer: the ID and scenario
slices' in `charshift.formats`, the scaffolds' (each serving the scaffold and its chat control)
in `charshift.scaffolds`. `RENDERERS` joins the two tables; `render` checks that the item is of
the slice's kind and calls the renderer.
"""

from __future__ import annotations

from typing import Any

from charshift import formats, scaffolds, slices
from charshift.schema import EpisodeSpec
from charshift.slices import RenderContext, Renderer


def _joined(*tables: dict[str, Renderer]) -> dict[str, Renderer]:
    out: dict[str, Renderer] = {}
    for table in tables:
        twice = sorted(set(out) & set(table))
        if twice:
            raise ValueError(f"slice(s) {twice} have two renderers")
        out.update(table)
    return out


RENDERERS: dict[str, Renderer] = _joined(formats.RENDERERS, scaffolds.RENDERERS)


def renderer_for(slice_: str) -> Renderer:
    """The renderer of `slice_` (a KeyError naming a slice without one)."""
    try:
        return RENDERERS[slice_]
    except KeyError:
        raise KeyError(f"slice {slice_!r} has no renderer") from None


def render(slice_: str, item: Any, ctx: RenderContext | None = None) -> EpisodeSpec:
    """`item` (of the slice's item kind) rendered in `slice_`."""
    entry = slices.get(slice_)
    return renderer_for(slice_)(entry, item, ctx or RenderContext())
