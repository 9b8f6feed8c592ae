"""Figures for a MetricsResult, each saved as PNG (embedded in the HTML report) and SVG.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`, Agg canvas), never
pyplot, so nothing depends on a display or on global pyplot state.

- ladder_<base>: macro-F1 per slice (bars per stage, 95% interval error bars, chance line),
  conditional and intention-to-treat side by side

A flagged interval (too few clusters, resamples with nothing scored: `stats.Interval.flag`) is
marked with a dagger; a figure fixed by construction has no error bar.
- stages: macro-F1 per stage, one panel per slice, one line per base
- persona_f1_<slice>: per-persona F1 heatmap, rows base/stage, columns personas
- confusion_<base>_<slice>: row-normalised confusion matrices, one panel per stage
- yield_<base>: share of rows with an output, per persona, rows stage/slice
- waterfall_<base>_<stage>_<chain>: a chain's additive decomposition (loss per rung, with
  intervals, every unit on the chain's common items)
- pred_dist_<base>: the classifier's predicted-label shares per stage/slice
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from charshift.stats import CellMetrics, ChainDecomposition, Interval, MetricsResult

_PALETTE = [
    "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3",
    "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD",
]  # fmt: skip
_SVG_META = {"Date": None}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _yerr(ivs: list[Interval]) -> np.ndarray:
    est = np.array([i.estimate for i in ivs], dtype=float)
    lo = np.array([i.lo for i in ivs], dtype=float)
    hi = np.array([i.hi for i in ivs], dtype=float)
    return np.nan_to_num(np.clip(np.vstack([est - lo, hi - est]), 0, None))


def _daggers(ax: Axes, xs: np.ndarray, ivs: list[Interval]) -> None:
    """A dagger above each flagged interval (not for figures fixed by construction)."""
    for x, iv in zip(xs, ivs, strict=True):
        if iv.flag and not iv.fixed_by_construction and np.isfinite(iv.estimate):
            top = iv.hi if np.isfinite(iv.hi) else iv.estimate
            ax.text(x, min(top + 0.02, 1.0), "\u2020", ha="center", va="bottom", fontsize=8)


def _persona_values(c: CellMetrics, personas: list[str], attr: str) -> list[float]:
    """Per-persona values in the run's persona order (NaN for a persona outside the base's
    label set)."""
    by = {p.persona: p for p in c.per_persona}
    out = []
    for name in personas:
        p = by.get(name)
        v = getattr(p, attr) if p is not None else float("nan")
        out.append(v.estimate if isinstance(v, Interval) else v)
    return out


def _chance(ax: Axes, k: int) -> None:
    ax.axhline(1.0 / k, color="grey", ls="--", lw=1, label=f"chance (1/{k})")


def _ladder_fig(result: MetricsResult, base: str) -> Figure:
    slices = [s for s in result.slices if any(result.get(base, st, s) for st in result.stages)]
    stages = [st for st in result.stages if any(result.get(base, st, s) for s in slices)]
    fig = Figure(figsize=(max(6.0, 1.3 * len(slices) * 2), 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / max(1, len(stages))
    x = np.arange(len(slices))
    for ax, itt in zip(axes, (False, True), strict=True):
        for j, st in enumerate(stages):
            cells = [result.get(base, st, s) for s in slices]
            ivs = [
                (c.macro_f1_itt if itt else c.macro_f1) if c else Interval(np.nan, np.nan, np.nan)
                for c in cells
            ]
            xs = x + (j - (len(stages) - 1) / 2) * width
            ax.bar(
                xs,
                [i.estimate for i in ivs],
                width,
                yerr=_yerr(ivs),
                capsize=2,
                label=st,
                color=_PALETTE[j % len(_PALETTE)],
            )
            _daggers(ax, xs, ivs)
        _chance(ax, len(result.labels.get(base, result.personas)))
        ax.set_xticks(x, slices, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title("intention-to-treat" if itt else "conditional (outputs only)", fontsize=10)
        ax.set_ylabel("macro-F1")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        f"{base}: macro-F1 per slice ({result.ci:.0%} CI; \u2020 interval flagged)", fontsize=11
    )
    return fig


def _stages_fig(result: MetricsResult) -> Figure:
    slices = result.slices
    ncol = min(4, len(slices))
    nrow = int(np.ceil(len(slices) / ncol))
    fig = Figure(figsize=(3.4 * ncol, 3.0 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, sharey=True, squeeze=False)).ravel()
    stages = result.stages
    x = np.arange(len(stages))
    for ax, sl in zip(axes, slices, strict=False):
        for j, b in enumerate(result.bases):
            cells = [result.get(b, st, sl) for st in stages]
            ivs = [c.macro_f1 if c else Interval(np.nan, np.nan, np.nan) for c in cells]
            ax.errorbar(
                x + 0.05 * j,
                [i.estimate for i in ivs],
                yerr=_yerr(ivs),
                marker="o",
                capsize=2,
                label=b,
                color=_PALETTE[j % len(_PALETTE)],
            )
            _daggers(ax, x + 0.05 * j, ivs)
        _chance(ax, len(result.personas))
        ax.set_xticks(x, stages, rotation=20, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(sl, fontsize=9)
    for ax in axes[len(slices) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("macro-F1 (conditional)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Stage progression per slice", fontsize=11)
    return fig


def _heatmap(
    ax: Axes,
    data: np.ndarray,
    rows: list[str],
    cols: list[str],
    *,
    vmax: float = 1.0,
    fmt: str = "{:.2f}",
    cmap: str = "viridis",
    dark_low: bool = True,
) -> None:
    im = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(np.arange(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=7)
    if data.size <= 400:
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                low = v < 0.6 * vmax
                color = "white" if low == dark_low else "black"
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6, color=color)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)


def _persona_f1_fig(result: MetricsResult, slice_: str) -> Figure:
    cells = [
        c
        for b in result.bases
        for st in result.stages
        if (c := result.get(b, st, slice_)) is not None
    ]
    rows = [f"{c.cell.base}/{c.cell.stage}" for c in cells]
    data = np.array([_persona_values(c, result.personas, "f1") for c in cells])
    fig = Figure(
        figsize=(1.0 + 0.55 * len(result.personas), 1.5 + 0.35 * len(rows)), layout="constrained"
    )
    ax = fig.subplots()
    _heatmap(ax, data, rows, result.personas)
    ax.set_title(f"Per-persona F1 (conditional): {slice_}", fontsize=10)
    return fig


def _confusion_fig(result: MetricsResult, base: str, slice_: str) -> Figure:
    cells = [c for st in result.stages if (c := result.get(base, st, slice_)) is not None]
    k = max(len(c.confusion_cols) - 2 for c in cells)
    fig = Figure(figsize=(max(4.5, 0.45 * (k + 2)) * len(cells), 0.4 * k + 2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(cells), squeeze=False)).ravel()
    for ax, c in zip(axes, cells, strict=True):
        tot = c.confusion.sum(axis=1, keepdims=True)
        norm = np.divide(c.confusion, tot, out=np.zeros(c.confusion.shape), where=tot > 0)
        _heatmap(ax, norm, c.confusion_rows, c.confusion_cols, cmap="Blues", dark_low=False)
        ax.set_title(f"{c.cell.stage} (n={c.n_rows})", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0].set_ylabel("true persona", fontsize=8)
    fig.suptitle(f"{base} / {slice_}: confusion (row share)", fontsize=10)
    return fig


def _yield_fig(result: MetricsResult, base: str) -> Figure:
    cells = [
        c
        for st in result.stages
        for sl in result.slices
        if (c := result.get(base, st, sl)) is not None
    ]
    rows = [f"{c.cell.stage}/{c.cell.slice}" for c in cells]
    data = np.array([_persona_values(c, result.personas, "yield_") for c in cells])
    fig = Figure(
        figsize=(max(5.0, 2.5 + 0.55 * len(result.personas)), 1.8 + 0.3 * len(rows)),
        layout="constrained",
    )
    ax = fig.subplots()
    _heatmap(ax, data, rows, result.personas, cmap="magma")
    ax.set_title(f"{base}: yield per persona\n(rows with an output / attempted)", fontsize=10)
    return fig


def _waterfall_fig(result: MetricsResult, decs: list[ChainDecomposition]) -> Figure:
    fig = Figure(
        figsize=(max(6.0, 1.4 * (len(decs[0].units) + 1)) * 1.6, 4.4), layout="constrained"
    )
    axes = np.atleast_1d(fig.subplots(1, len(decs), sharey=True, squeeze=False)).ravel()
    for ax, dec in zip(axes, decs, strict=True):
        start, end = dec.estimates[0].estimate, dec.estimates[-1].estimate
        labels = [dec.units[0]]
        ax.bar(0, start, color="#4C72B0")
        level = start
        for i, rung in enumerate(dec.rungs, start=1):
            new = level - rung.estimate
            color = "#C44E52" if rung.estimate > 0 else "#55A868"
            ax.bar(i, new - level, bottom=level, color=color)
            err = np.nan_to_num(
                np.clip([[rung.estimate - rung.lo], [rung.hi - rung.estimate]], 0, None)
            )
            ax.errorbar(i, (level + new) / 2, yerr=err, color="black", capsize=3)
            tag = ("" if rung.paired else " (unpaired)") + ("" if rung.reliable else " \u2020")
            labels.append(f"-> {dec.units[i]}{tag}")
            level = new
        ax.bar(len(dec.rungs) + 1, end, color="#4C72B0")
        labels.append(dec.units[-1])
        _chance(ax, len(result.labels.get(dec.base, result.personas)))
        ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        total = dec.total
        what = (
            f"total loss {total.estimate:.2f} [{total.lo:.2f}, {total.hi:.2f}]"
            if np.isfinite(total.estimate)
            else "total loss undefined (a unit has no outputs)"
        )
        sizes = ", ".join(f"{n} {kind}" for kind, n in dec.common.items())
        ax.set_title(
            f"{'ITT' if dec.itt else 'conditional'}: {what}\ncommon items: {sizes}", fontsize=8
        )
    axes[0].set_ylabel("macro-F1 (on the common items)")
    d0 = decs[0]
    fig.suptitle(f"{d0.base}/{d0.stage}: {d0.title}", fontsize=10)
    return fig


def _pred_dist_fig(result: MetricsResult, base: str, top: int = 8) -> Figure:
    cells: list[CellMetrics] = [
        c
        for st in result.stages
        for sl in result.slices
        if (c := result.get(base, st, sl)) is not None
    ]
    totals: dict[str, int] = {}
    for c in cells:
        for lab, n in c.pred_distribution.items():
            totals[lab] = totals.get(lab, 0) + n
    labels = sorted(totals, key=lambda s: -totals[s])[:top]
    fig = Figure(figsize=(8, 1.2 + 0.3 * len(cells)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(cells))
    left = np.zeros(len(cells))
    for j, lab in enumerate([*labels, "(other labels)", "(no output)"]):
        vals = []
        for c in cells:
            if lab == "(no output)":
                n = c.n_none
            elif lab == "(other labels)":
                n = sum(v for k2, v in c.pred_distribution.items() if k2 not in labels)
            else:
                n = c.pred_distribution.get(lab, 0)
            vals.append(n / c.n_rows if c.n_rows else 0.0)
        color = "#DDDDDD" if lab == "(no output)" else _PALETTE[j % len(_PALETTE)]
        ax.barh(y, vals, left=left, label=lab, color=color)
        left += np.array(vals)
    ax.set_yticks(y, [f"{c.cell.stage}/{c.cell.slice}" for c in cells], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of attempted rows")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(f"{base}: predicted-label distribution", fontsize=10)
    return fig


def _figures(result: MetricsResult) -> Iterator[tuple[str, str, Callable[[], Figure]]]:
    """(file stem, caption, builder) for every figure the result supports."""
    if not result.cells:
        return
    for b in result.bases:
        yield (
            f"ladder_{_safe(b)}",
            f"{b}: macro-F1 per slice and stage",
            lambda b=b: _ladder_fig(result, b),
        )
    yield "stages", "Stage progression per slice", lambda: _stages_fig(result)
    for sl in result.slices:
        yield (
            f"persona_f1_{_safe(sl)}",
            f"Per-persona F1: {sl}",
            lambda sl=sl: _persona_f1_fig(result, sl),
        )
    for b in result.bases:
        for sl in result.slices:
            if any(result.get(b, st, sl) for st in result.stages):
                yield (
                    f"confusion_{_safe(b)}_{_safe(sl)}",
                    f"Confusion matrices: {b} / {sl}",
                    lambda b=b, sl=sl: _confusion_fig(result, b, sl),
                )
    for b in result.bases:
        yield f"yield_{_safe(b)}", f"{b}: yield per persona", lambda b=b: _yield_fig(result, b)
    groups: dict[tuple[str, str, str], list[ChainDecomposition]] = {}
    for dec in result.chains:
        if dec.metric == "macro_f1":
            groups.setdefault((dec.base, dec.stage, dec.chain), []).append(dec)
    for (b, st, ch), decs in groups.items():
        decs = sorted(decs, key=lambda d: d.itt)
        yield (
            f"waterfall_{_safe(b)}_{_safe(st)}_{_safe(ch)}",
            f"{b}/{st}: {decs[0].title} (additive decomposition of macro-F1)",
            lambda decs=decs: _waterfall_fig(result, decs),
        )
    for b in result.bases:
        yield (
            f"pred_dist_{_safe(b)}",
            f"{b}: predicted-label distribution",
            lambda b=b: _pred_dist_fig(result, b),
        )


def make_figures(result: MetricsResult, out_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """Save every figure as PNG and SVG; returns (caption, png, svg) in report order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    for stem, caption, build in _figures(result):
        fig = build()
        png, svg = out / f"{stem}.png", out / f"{stem}.svg"
        fig.savefig(png, dpi=110, metadata={"Software": None})
        fig.savefig(svg, metadata=_SVG_META)
        saved.append((caption, png, svg))
    return saved


def make_plots(result: MetricsResult, out_dir: str | Path) -> list[Path]:
    """Save every figure as PNG and SVG into `out_dir`; returns all paths (PNG, SVG pairs)."""
    return [p for _, png, svg in make_figures(result, out_dir) for p in (png, svg)]
