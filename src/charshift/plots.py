"""Figures for a MetricsResult, each saved as PNG (embedded in the HTML report) and SVG.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`, Agg canvas), never
pyplot, so nothing depends on a display or on global pyplot state.

- ladder_<base>: macro-F1 excess over each cell's own null per unit (bars per stage, interval
  error bars, a line at 0: no persona), conditional and intention-to-treat side by side
- stages: macro-F1 excess per stage, one panel per unit, one line per base
- persona_f1_<unit>: per-persona F1 heatmap, rows base/stage, columns personas
- confusion_<base>_<unit>: row-normalised confusion matrices, one panel per stage
- yield_<base>: share of rows with an output, per persona, rows stage/unit
- chain_<base>_<chain>: one chain of `ladder.CHAINS` for every trained stage of a base: each
  unit's macro-F1 excess on the chain's common items (top) and the excess lost per rung
  (bottom), conditional and ITT, every bar with its interval
- pred_dist_<base>: the classifier's predicted-label shares per stage/unit
- trajectory_<persona>: the persona's F1 excess over its own null across stages (base, then the
  trained stages; the control left out), one line per unit with its interval band, one panel per
  base
- persona_unit_<base>: persona x unit heatmaps of trained minus base in F1 excess, one per trained
  stage (the base's excess is 0 by construction, so each shows the stage's own excess)
- depth: the cross-base summary, base/stage x persona, of `MetricsResult.depth`

A flagged interval (too few clusters, resamples with nothing scored: `stats.Interval.flag`) is
drawn hatched and faded, with a dagger; a figure fixed by construction has no error bar; an
undefined one (nothing scored) is marked n/a. A unit where the scorer is blind (the positive
control's excess interval reaches 0) is marked with a double dagger in its tick label.

File names: a readable slug of the names a figure is about, then a short hash of the exact
names, so distinct names (`b c` and `b_c`) never share a file. Names from the data reach the
figures as plain text (a `$` is escaped, so matplotlib never reads it as mathtext).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from charshift.headline import chain_heading
from charshift.ladder import split_unit
from charshift.schema import BASE_STAGE, stable_hash
from charshift.stats import CellMetrics, ChainDecomposition, Difference, Interval, MetricsResult

_PALETTE = [
    "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3",
    "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD",
]  # fmt: skip
_SVG_META = {"Date": None}
_NAN_IV = Interval(float("nan"), float("nan"), float("nan"))
DAGGER = "\u2020"
BLIND = "\u2021"  # a unit where the scorer is blind
_SLUG_MAX = 48


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "x"


def figure_stem(prefix: str, *names: str) -> str:
    """A file stem for a figure about `names`: a readable slug, then 8 hex digits of the exact
    names' hash, so two distinct name tuples never share a file (`b c` vs `b_c`)."""
    if not names:
        return prefix
    slug = "_".join(_safe(n) for n in names)[:_SLUG_MAX]
    return f"{prefix}_{slug}-{stable_hash([prefix, *names], 8)}"


def _t(text: str) -> str:
    """Text from the data as matplotlib shows it literally (no mathtext)."""
    return str(text).replace("$", r"\$")


def _yerr(ivs: Sequence[Interval]) -> np.ndarray:
    """Error bar lengths; NaN (matplotlib draws nothing, not even a cap) for a figure without
    an interval (fewer than two clusters, `Interval.has_interval`; fixed by construction;
    undefined), never a zero-width bar that reads as certainty."""
    est = np.array([i.estimate for i in ivs], dtype=float)
    lo = np.array([i.lo if i.has_interval else np.nan for i in ivs], dtype=float)
    hi = np.array([i.hi if i.has_interval else np.nan for i in ivs], dtype=float)
    return np.clip(np.vstack([est - lo, hi - est]), 0, None)


def _flagged(iv: Interval) -> bool:
    return bool(iv.flag) and not iv.fixed_by_construction and bool(np.isfinite(iv.estimate))


def _daggers(ax: Axes, xs: np.ndarray, ivs: Sequence[Interval]) -> None:
    """A dagger above each flagged interval (not for figures fixed by construction)."""
    for x, iv in zip(xs, ivs, strict=True):
        if _flagged(iv):
            top = iv.hi if iv.has_interval else iv.estimate
            ax.text(x, min(max(top, iv.estimate, 0.0) + 0.02, 1.0), DAGGER, ha="center",
                    va="bottom", fontsize=8)  # fmt: skip


def _bars(
    ax: Axes, xs: np.ndarray, ivs: Sequence[Interval], width: float, color: str, label: str
) -> None:
    """Bars with interval error bars; flagged ones hatched, faded and marked with a dagger."""
    est = [i.estimate for i in ivs]
    flagged = [_flagged(i) for i in ivs]
    bars = ax.bar(xs, est, width, yerr=_yerr(ivs), capsize=2, label=_t(label), color=color)
    for bar, flag in zip(bars, flagged, strict=True):
        if flag:
            bar.set_alpha(0.45)
            bar.set_hatch("///")
            bar.set_edgecolor("black")
    _daggers(ax, xs, ivs)
    for x, iv in zip(xs, ivs, strict=True):
        if not np.isfinite(iv.estimate):  # undefined: say so rather than show an empty slot
            ax.text(x, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=8,
                    color="dimgrey", clip_on=True)  # fmt: skip


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


def _offsets(n: int, width: float) -> np.ndarray:
    return (np.arange(n) - (n - 1) / 2) * width


def _tick(result: MetricsResult, base: str, unit: str) -> str:
    """A unit's tick label, with a double dagger where the scorer is blind."""
    return _t(unit) + (f" {BLIND}" if result.blind(base, unit) else "")


def _excess_limits(ax: Axes, ivs: Sequence[Interval]) -> None:
    ends = [0.0, 0.1] + [v for i in ivs for v in (i.estimate, i.lo, i.hi) if np.isfinite(v)]
    pad = 0.05 * (max(ends) - min(ends))
    ax.set_ylim(min(ends) - pad, max(ends) + pad)
    ax.axhline(0, color="black", lw=0.8)


def _ladder_fig(result: MetricsResult, base: str) -> Figure:
    slices = [s for s in result.slices if any(result.get(base, st, s) for st in result.stages)]
    stages = [st for st in result.stages if any(result.get(base, st, s) for s in slices)]
    width = min(18.0, max(7.0, 0.35 * len(slices) * max(2, len(stages)) + 2))
    fig = Figure(figsize=(width, 7.4), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    bar = 0.8 / max(1, len(stages))
    x = np.arange(len(slices))
    for ax, itt in zip(axes, (False, True), strict=True):
        shown: list[Interval] = []
        for j, (st, off) in enumerate(zip(stages, _offsets(len(stages), bar), strict=True)):
            cells = [result.get(base, st, s) for s in slices]
            ivs = [(c.macro_f1_excess_itt if itt else c.macro_f1_excess) if c else _NAN_IV
                   for c in cells]  # fmt: skip
            _bars(ax, x + off, ivs, bar, _PALETTE[j % len(_PALETTE)], st)
            shown += ivs
        _excess_limits(ax, shown)
        ax.set_title("intention-to-treat" if itt else "conditional (outputs only)", fontsize=10)
        ax.set_ylabel("macro-F1 excess over own null")
    axes[1].set_xticks(x, [_tick(result, base, s) for s in slices], rotation=30, ha="right",
                       fontsize=8)  # fmt: skip
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        f"{_t(base)}: macro-F1 excess per unit ({result.ci:.0%} CI; hatched, {DAGGER}: interval "
        f"flagged; {BLIND}: scorer blind in that unit)",
        fontsize=11,
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
            ivs = [c.macro_f1_excess if c else _NAN_IV for c in cells]
            color, xs = _PALETTE[j % len(_PALETTE)], x + 0.05 * j
            ax.errorbar(xs, [i.estimate for i in ivs], yerr=_yerr(ivs), marker="o", capsize=2,
                        label=_t(b), color=color)  # fmt: skip
            faded = [k for k, iv in enumerate(ivs) if _flagged(iv)]
            ax.scatter(xs[faded], [ivs[k].estimate for k in faded], s=40, color="white",
                       edgecolors=color, zorder=3)  # fmt: skip
            _daggers(ax, xs, ivs)
        if not any(np.isfinite(c.macro_f1.estimate) for b in result.bases for st in stages
                   if (c := result.get(b, st, sl)) is not None):  # fmt: skip
            ax.text(0.5, 0.5, "no scored output", transform=ax.transAxes, ha="center",
                    color="grey")  # fmt: skip
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [_t(s) for s in stages], rotation=20, fontsize=8)
        ax.set_ylim(-0.3, 1.0)
        blind = [b for b in result.bases if result.blind(b, sl)]
        ax.set_title(_t(sl) + (f" ({BLIND} scorer blind)" if blind else ""), fontsize=9)
    for ax in axes[len(slices) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("macro-F1 excess (conditional)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Stage progression per unit (open marker, {DAGGER}: flagged)", fontsize=11)
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
    colorbar: bool = True,
) -> AxesImage:
    im = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(np.arange(len(cols)), [_t(c) for c in cols], rotation=45, ha="right",
                  fontsize=7)  # fmt: skip
    ax.set_yticks(np.arange(len(rows)), [_t(r) for r in rows], fontsize=7)
    if data.size <= 400:
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                low = v < 0.6 * vmax
                color = "white" if low == dark_low else "black"
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color=color)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return im


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
    blind = [b for b in result.bases if result.blind(b, slice_)]
    mark = f" {BLIND} scorer blind for {', '.join(map(_t, blind))}" if blind else ""
    ax.set_title(f"Per-persona F1 (conditional): {_t(slice_)}{mark}", fontsize=10)
    return fig


def _confusion_fig(result: MetricsResult, base: str, slice_: str) -> Figure:
    cells = [c for st in result.stages if (c := result.get(base, st, slice_)) is not None]
    k = max(len(c.confusion_cols) - 2 for c in cells)
    fig = Figure(figsize=(max(4.5, 0.45 * (k + 2)) * len(cells), 0.4 * k + 2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(cells), squeeze=False)).ravel()
    for ax, c in zip(axes, cells, strict=True):
        tot = c.confusion.sum(axis=1, keepdims=True)
        norm = np.divide(c.confusion, tot, out=np.zeros(c.confusion.shape), where=tot > 0)
        im = _heatmap(ax, norm, c.confusion_rows, c.confusion_cols, cmap="Blues",
                      dark_low=False, colorbar=False)  # fmt: skip
        ax.set_title(f"{_t(c.cell.stage)} (n={c.n_rows})", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0].set_ylabel("true persona", fontsize=8)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="row share")  # one scale for every panel
    mark = f" ({BLIND} scorer blind here)" if result.blind(base, slice_) else ""
    fig.suptitle(f"{_t(base)} / {_t(slice_)}: confusion (row share){mark}", fontsize=10)
    return fig


def _yield_fig(result: MetricsResult, base: str) -> Figure:
    cells = [
        c
        for st in result.stages
        for sl in result.slices
        if (c := result.get(base, st, sl)) is not None
    ]
    rows = [  # _heatmap escapes them
        f"{c.cell.stage}/{c.cell.slice}" + (f" {BLIND}" if result.blind(base, c.cell.slice) else "")
        for c in cells
    ]
    data = np.array([_persona_values(c, result.personas, "yield_") for c in cells])
    fig = Figure(
        figsize=(max(5.0, 2.5 + 0.55 * len(result.personas)), 1.8 + 0.3 * len(rows)),
        layout="constrained",
    )
    ax = fig.subplots()
    _heatmap(ax, data, rows, result.personas, cmap="magma")
    ax.set_title(f"{_t(base)}: yield per persona\n(rows with an output / attempted)", fontsize=10)
    return fig


def _chain_units(decs: Sequence[ChainDecomposition]) -> list[str]:
    """The units of a chain present in any stage, in chain order."""
    units: list[str] = []
    for d in decs:
        for u in d.units:
            if u not in units:
                units.append(u)
    order = {u: i for d in decs for i, u in enumerate(d.units + d.missing)}
    return sorted(units, key=lambda u: order.get(u, 0))


def _rung_labels(decs: Sequence[ChainDecomposition]) -> list[str]:
    labels: list[str] = []
    for d in decs:
        for r in d.rungs:
            lab = f"{r.a.slice} -> {r.b.slice}"
            if lab not in labels:
                labels.append(lab)
    return labels


def _chain_levels(ax: Axes, decs: list[ChainDecomposition], units: list[str]) -> None:
    """Each stage's units on the chain's common items, grouped by unit."""
    width = 0.8 / max(1, len(decs))
    x = np.arange(len(units))
    shown: list[Interval] = []
    for j, (d, off) in enumerate(zip(decs, _offsets(len(decs), width), strict=True)):
        by = dict(zip(d.units, d.estimates, strict=True))
        ivs = [by.get(u, _NAN_IV) for u in units]
        _bars(ax, x + off, ivs, width, _PALETTE[j % len(_PALETTE)], d.stage)
        shown += ivs
    _excess_limits(ax, shown)
    blind = {u for d in decs for u in d.blind}
    ticks = [_t(u) + (f" {BLIND}" if u in blind else "") for u in units]
    ax.set_xticks(x, ticks, rotation=25, ha="right", fontsize=7)


def _chain_rungs(ax: Axes, decs: list[ChainDecomposition], labels: list[str]) -> None:
    """Each stage's rung losses (closer to home minus further: positive = persona lost)."""
    width = 0.8 / max(1, len(decs))
    x = np.arange(len(labels))
    unpaired: set[str] = set()
    ends = [0.0]
    for j, (d, off) in enumerate(zip(decs, _offsets(len(decs), width), strict=True)):
        by = {f"{r.a.slice} -> {r.b.slice}": r for r in d.rungs}
        unpaired |= {lab for lab, r in by.items() if not r.paired}
        ivs = [_diff_iv(by[lab]) if lab in by else _NAN_IV for lab in labels]
        _bars(ax, x + off, ivs, width, _PALETTE[j % len(_PALETTE)], d.stage)
        ends += [v for i in ivs for v in (i.estimate, i.lo, i.hi) if np.isfinite(v)]
    lo, hi = min(ends), max(ends)
    pad = max(0.05, 0.1 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)  # explicit: an all-undefined panel has no data limits
    if len(ends) == 1:
        ax.text(0.5, 0.5, "undefined: nothing scored", transform=ax.transAxes, ha="center")
    ax.axhline(0, color="black", lw=0.8)
    ticks = [_t(lab) + (" (unpaired)" if lab in unpaired else "") for lab in labels]
    ax.set_xticks(x, ticks, rotation=25, ha="right", fontsize=7)


def _diff_iv(d: Difference) -> Interval:
    return Interval(
        d.estimate, d.lo, d.hi, d.n_clusters, d.n_empty_resamples, d.fixed_by_construction, d.flag
    )


def _chain_fig(result: MetricsResult, base: str, decs: list[ChainDecomposition]) -> Figure:
    """decs: the chain's excess decompositions of every trained stage of `base`, both views."""
    units, labels = _chain_units(decs), _rung_labels(decs)
    fig = Figure(figsize=(max(7.0, 1.1 * len(units)) * 2, 7.6), layout="constrained")
    axes = fig.subplots(2, 2)
    for col, itt in enumerate((False, True)):
        view = [d for d in decs if d.itt == itt]
        if not view:
            continue
        _chain_levels(axes[0, col], view, units)
        _chain_rungs(axes[1, col], view, labels)
        name = "intention-to-treat" if itt else "conditional (outputs only)"
        axes[0, col].set_title(f"{name}: excess on the chain's common items", fontsize=9)
        axes[1, col].set_title(f"{name}: excess lost per rung (positive = lost)", fontsize=9)
    axes[0, 0].set_ylabel("macro-F1 excess")
    axes[1, 0].set_ylabel("macro-F1 excess lost")
    axes[0, 1].legend(fontsize=7, loc="upper right")
    heading = chain_heading(decs[0])
    fig.suptitle(
        f"{_t(base)}: {_t(heading[0].upper() + heading[1:])} ({result.ci:.0%} CI; hatched, "
        f"{DAGGER}: flagged; {BLIND}: scorer blind)",
        fontsize=10,
    )
    return fig


def _pred_dist_shares(cells: list[CellMetrics], labels: list[str]) -> list[list[float]]:
    out = []
    for lab in [*labels, "(other labels)", "(no output)"]:
        vals = []
        for c in cells:
            if lab == "(no output)":
                n = c.n_none
            elif lab == "(other labels)":
                n = sum(v for k2, v in c.pred_distribution.items() if k2 not in labels)
            else:
                n = c.pred_distribution.get(lab, 0)
            vals.append(n / c.n_rows if c.n_rows else 0.0)
        out.append(vals)
    return out


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
    names = [*labels, "(other labels)", "(no output)"]
    for j, (lab, vals) in enumerate(zip(names, _pred_dist_shares(cells, labels), strict=True)):
        color = "#DDDDDD" if lab == "(no output)" else _PALETTE[j % len(_PALETTE)]
        ax.barh(y, vals, left=left, label=_t(lab), color=color)
        left += np.array(vals)
    ax.set_yticks(y, [f"{_t(c.cell.stage)}/{_tick(result, base, c.cell.slice)}" for c in cells],
                  fontsize=7)  # fmt: skip
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of attempted rows")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(f"{_t(base)}: predicted-label distribution", fontsize=10)
    return fig


# -- per persona: trajectories, the persona x unit difference, depth ---------------------------

TRAINED_MINUS_BASE = (
    "trained minus base in F1 excess over its own null: the base stage's excess is 0 by "
    "construction (each base output is paired with every persona), so this is the stage's own "
    "per-persona excess"
)


def _plain_units(result: MetricsResult, base: str) -> list[str]:
    """The base's units, each slice once (scoring variants and length controls left out)."""
    return [u for u in result.slices if split_unit(u)[1] is None
            and any(result.get(base, st, u) for st in result.stages)]  # fmt: skip


def _persona_iv(result: MetricsResult, base: str, stage: str, unit: str, persona: str) -> Interval:
    """The persona's F1 excess in a cell, from the stats result (NaN where it has none)."""
    cell = result.get(base, stage, unit)
    pm = next((p for p in cell.per_persona if p.persona == persona), None) if cell else None
    return pm.f1_excess if pm is not None else _NAN_IV


def _trajectory_panel(ax: Axes, result: MetricsResult, base: str, persona: str) -> None:
    """One line per unit across the base's stages (the control left out), with its band."""
    stages = [BASE_STAGE, *result.trained_stages(base)]
    x = np.arange(len(stages))
    for j, unit in enumerate(_plain_units(result, base)):
        ivs = [_persona_iv(result, base, st, unit, persona) for st in stages]
        est = np.array([i.estimate for i in ivs], dtype=float)
        lo = np.array([i.lo if np.isfinite(i.lo) else i.estimate for i in ivs], dtype=float)
        hi = np.array([i.hi if np.isfinite(i.hi) else i.estimate for i in ivs], dtype=float)
        color, blind = _PALETTE[j % len(_PALETTE)], result.blind(base, unit)
        ax.plot(x, est, marker="o", ms=3, color=color, ls="--" if blind else "-",
                label=_tick(result, base, unit))  # fmt: skip
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [_t(s) for s in stages], rotation=20, fontsize=8)
    ax.set_title(_t(base), fontsize=9)


def _persona_bases(result: MetricsResult, persona: str) -> list[str]:
    """The bases whose label set holds `persona` (a base may drop one: `LabelNote`)."""
    return [b for b in result.bases if persona in result.labels.get(b, result.personas)]


def _trajectory_fig(result: MetricsResult, persona: str) -> Figure:
    bases = _persona_bases(result, persona)
    fig = Figure(figsize=(4.2 * len(bases) + 2.0, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(bases), sharey=True, squeeze=False)).ravel()
    for ax, b in zip(axes, bases, strict=True):
        _trajectory_panel(ax, result, b, persona)
    axes[0].set_ylabel("F1 excess over own null")
    axes[-1].legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.suptitle(
        f"{_t(persona)}: F1 excess per unit across stages ({result.ci:.0%} CI bands; dashed, "
        f"{BLIND}: scorer blind)",
        fontsize=10,
    )
    return fig


def _diverging(ax: Axes, data: np.ndarray, rows: list[str], cols: list[str],
               marks: np.ndarray | None = None) -> None:  # fmt: skip
    """A heatmap centred on 0 (no persona beyond chance); `marks`: cells to star."""
    top = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 0.0
    v = max(0.1, top)
    im = ax.imshow(np.ma.masked_invalid(data), vmin=-v, vmax=v, cmap="PuOr_r", aspect="auto")
    ax.set_xticks(np.arange(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=7)
    if data.size <= 400:
        for (i, j), val in np.ndenumerate(data):
            if np.isfinite(val):
                star = "*" if marks is not None and marks[i, j] else ""
                ax.text(j, i, f"{val:.2f}{star}", ha="center", va="center", fontsize=6)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)


def persona_unit_matrix(
    result: MetricsResult, base: str, stage: str
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(personas, units, excess, above 0) of one (base, stage): the persona x unit figure's data,
    read from the stats result."""
    personas = list(result.labels.get(base, result.personas))
    units = _plain_units(result, base)
    ivs = [[_persona_iv(result, base, stage, u, p) for u in units] for p in personas]
    data = np.array([[i.estimate for i in row] for row in ivs], dtype=float).reshape(
        len(personas), len(units)
    )
    above = np.array([[i.above_zero for i in row] for row in ivs], dtype=bool).reshape(data.shape)
    return personas, units, data, above


def _persona_unit_fig(result: MetricsResult, base: str) -> Figure:
    stages = result.trained_stages(base)
    units = _plain_units(result, base)
    k = len(result.labels.get(base, result.personas))
    fig = Figure(figsize=(2.5 + 0.6 * len(units), (0.9 + 0.3 * k) * len(stages) + 0.8),
                 layout="constrained")  # fmt: skip
    axes = np.atleast_1d(fig.subplots(len(stages), 1, squeeze=False)).ravel()
    for ax, st in zip(axes, stages, strict=True):
        personas, units, data, above = persona_unit_matrix(result, base, st)
        _diverging(ax, data, [_t(p) for p in personas],
                   [_tick(result, base, u) for u in units], above)  # fmt: skip
        ax.set_title(f"{_t(st)} minus {BASE_STAGE}", fontsize=9)
    fig.suptitle(
        f"{_t(base)}: per-persona F1 excess over own null (= trained minus base; *: interval "
        f"above 0; {BLIND}: scorer blind)",
        fontsize=10,
    )
    return fig


def depth_matrix(result: MetricsResult) -> tuple[list[str], list[str], np.ndarray]:
    """(rows base/stage, personas, depth): the cross-base summary's data, from `result.depth`."""
    rows = list(dict.fromkeys(f"{d.base}/{d.stage}" for d in result.depth))
    by = {(f"{d.base}/{d.stage}", d.persona): d.depth for d in result.depth}
    data = np.array([[by.get((r, p), np.nan) for p in result.personas] for r in rows], dtype=float)
    return rows, list(result.personas), data.reshape(len(rows), len(result.personas))


def _depth_fig(result: MetricsResult) -> Figure:
    rows, personas, data = depth_matrix(result)
    fig = Figure(figsize=(2.5 + 0.6 * len(personas), 1.6 + 0.35 * len(rows)), layout="constrained")
    ax = fig.subplots()
    _diverging(ax, data, [_t(r) for r in rows], [_t(p) for p in personas])
    ax.set_title("Depth: mean over units of the per-persona F1 excess (trained minus base)",
                 fontsize=10)  # fmt: skip
    return fig


def _persona_specs(result: MetricsResult) -> Iterator[FigureSpec]:
    for p in [p for p in result.personas if _persona_bases(result, p)]:
        yield (
            figure_stem("trajectory", p),
            f"{p}: F1 excess over its own null per unit across stages, one panel per base "
            "(bands: intervals; the positive control is left out; the base stage is 0 by "
            "construction)",
            lambda p=p: _trajectory_fig(result, p),
        )
    for b in result.bases:
        if result.trained_stages(b):
            yield (
                figure_stem("persona_unit", b),
                f"{b}: persona x unit, {TRAINED_MINUS_BASE}",
                lambda b=b: _persona_unit_fig(result, b),
            )
    if result.depth:
        yield (
            "depth",
            "Depth per base, stage and persona (depth.csv): the mean over units (each slice "
            f"once) of the {TRAINED_MINUS_BASE}",
            lambda: _depth_fig(result),
        )


FigureSpec = tuple[str, str, Callable[[], Figure]]


def _chain_specs(result: MetricsResult) -> Iterator[FigureSpec]:
    groups: dict[tuple[str, str], list[ChainDecomposition]] = {}
    for dec in result.chains:
        if dec.metric == "macro_f1_excess" and dec.stage != BASE_STAGE:
            groups.setdefault((dec.base, dec.chain), []).append(dec)
    for (b, ch), decs in groups.items():
        yield (
            figure_stem("chain", b, ch),
            f"{b}: {chain_heading(decs[0])} (macro-F1 excess on the common items, and the "
            "excess lost per rung)",
            lambda b=b, decs=decs: _chain_fig(result, b, decs),
        )


def _per_base_specs(result: MetricsResult) -> Iterator[FigureSpec]:
    for b in result.bases:
        for sl in result.slices:
            if any(result.get(b, st, sl) for st in result.stages):
                yield (
                    figure_stem("confusion", b, sl),
                    f"Confusion matrices: {b} / {sl}",
                    lambda b=b, sl=sl: _confusion_fig(result, b, sl),
                )
    for b in result.bases:
        yield figure_stem("yield", b), f"{b}: yield per persona", lambda b=b: _yield_fig(result, b)
    yield from _chain_specs(result)
    for b in result.bases:
        yield (
            figure_stem("pred_dist", b),
            f"{b}: predicted-label distribution",
            lambda b=b: _pred_dist_fig(result, b),
        )


def figure_specs(result: MetricsResult) -> Iterator[FigureSpec]:
    """(file stem, caption, builder) for every figure the result supports, in report order."""
    if not result.cells:
        return
    for b in result.bases:
        yield (
            figure_stem("ladder", b),
            f"{b}: macro-F1 excess over each cell's own null, per unit and stage",
            lambda b=b: _ladder_fig(result, b),
        )
    yield "stages", "Stage progression per unit", lambda: _stages_fig(result)
    for sl in result.slices:
        yield (
            figure_stem("persona_f1", sl),
            f"Per-persona F1: {sl}",
            lambda sl=sl: _persona_f1_fig(result, sl),
        )
    yield from _per_base_specs(result)
    yield from _persona_specs(result)


SavedFigure = tuple[str, Path, Path | None]  # caption, PNG, SVG (None: not asked for)
# figures below this many are drawn in this process: starting workers would cost more
PARALLEL_FROM = 12
_WORKER_SPECS: list[FigureSpec] = []


def _save(fig: Figure, out: Path, stem: str, svg: bool) -> tuple[Path, Path | None]:
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=110, metadata={"Software": None})
    svg_path = out / f"{stem}.svg" if svg else None
    if svg_path is not None:
        fig.savefig(svg_path, metadata=_SVG_META)
    return png, svg_path


def _worker_init(result: MetricsResult) -> None:
    global _WORKER_SPECS
    _WORKER_SPECS = list(figure_specs(result))


def _worker_draw(job: tuple[int, Path, bool]) -> int:
    index, out, svg = job
    stem, _caption, build = _WORKER_SPECS[index]
    _save(build(), out, stem, svg)
    return index


def figure_workers(n_figures: int, workers: int | None = None) -> int:
    """How many processes draw `n_figures` figures: `workers` if given, else
    `CHARSHIFT_FIGURE_WORKERS`, else one per CPU core (at most 8) once there are
    `PARALLEL_FROM` figures or more."""
    import os

    if workers is None:
        env = os.environ.get("CHARSHIFT_FIGURE_WORKERS", "").strip()
        workers = int(env) if env.isdigit() else None
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n_figures >= PARALLEL_FROM else 1
    return max(1, min(workers, n_figures))


def make_figures(
    result: MetricsResult, out_dir: str | Path, *, svg: bool = False, workers: int | None = None
) -> list[SavedFigure]:
    """Save every figure as PNG (and SVG with `svg`); returns (caption, png, svg or None) in
    report order. With several workers (`figure_workers`) the figures are drawn in fresh
    processes (spawned: never a fork of a process that holds a model's threads), each
    file written whole by one of them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = list(figure_specs(result))
    stems = [stem for stem, _, _ in specs]
    if len(set(stems)) != len(stems):  # distinct names hash apart; this guards the invariant
        raise RuntimeError(f"two figures would share a file stem: {stems}")
    n = figure_workers(len(specs), workers)
    if n > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        jobs = [(i, out, svg) for i in range(len(specs))]
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init,
                                 initargs=(result,)) as pool:  # fmt: skip
            list(pool.map(_worker_draw, jobs))
    else:
        for stem, _caption, build in specs:
            _save(build(), out, stem, svg)
    return [(cap, out / f"{stem}.png", out / f"{stem}.svg" if svg else None)
            for stem, cap, _ in specs]  # fmt: skip


def make_plots(result: MetricsResult, out_dir: str | Path, *, svg: bool = True) -> list[Path]:
    """Save every figure as PNG (and SVG) into `out_dir`; returns every path written."""
    return [p for _, png, sv in make_figures(result, out_dir, svg=svg) for p in (png, sv) if p]
