"""The answer first: one compact table per base, read from a `MetricsResult` (pure).

Each row is a trained stage (a stage with a persona that is not the positive control); its
columns are the declared primary family's figures (`stats.family`): the home-ground
(`id_chat`) macro-F1 excess over the cell's own null and each chain's total loss in that
excess, each with its simultaneous band and a verdict, then the scorer check (units where the
positive control cannot be told from chance) and the lowest yield. A figure marked with a
dagger is rough (see its flag), a double dagger marks a unit where the scorer is blind. Nothing
is computed here: every number is a field of the result.

The same tables open report/index.html and report.md and are printed when `charshift run` and
`charshift report` finish (`summary_text`, also written as report/summary.txt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from charshift.headline import BLIND, DAGGER
from charshift.ladder import split_unit
from charshift.stats import (
    HOME,
    ChainDecomposition,
    Difference,
    MetricsResult,
    no_interval_text,
)

EXCESS = "macro_f1_excess"


@dataclass(frozen=True)
class SummaryTable:
    """One base's answer: `head` and `rows` of plain strings, and the lines under it."""

    base: str
    head: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def band_text(d: Difference) -> str:
    """A family member's estimate with its simultaneous band (two digits), or why none."""
    if d.estimate != d.estimate:
        return "undefined (nothing scored)"
    if not d.has_interval:
        return f"{d.estimate:+.2f}, interval {no_interval_text(d.n_clusters)}"
    lo, hi = (d.lo_simul, d.hi_simul) if d.lo_simul == d.lo_simul else (d.lo, d.hi)
    dagger = "" if d.reliable else DAGGER
    return f"{d.estimate:+.2f} [{lo:+.2f}, {hi:+.2f}]{dagger}"


def verdict(d: Difference) -> str:
    """What a family member says, in two or three words."""
    if d.estimate != d.estimate or not d.has_interval:
        return "no claim"
    if d.blind:
        return f"scorer blind {BLIND}"
    lo, hi = (d.lo_simul, d.hi_simul) if d.lo_simul == d.lo_simul else (d.lo, d.hi)
    if d.kind == "excess":
        return "detected" if lo > 0 else "not detected"
    if lo > 0:
        return "lost"
    return "gained" if hi < 0 else "no loss shown"


def _chains(result: MetricsResult, base: str) -> list[ChainDecomposition]:
    """The conditional excess decomposition of every chain of `base`, one per (chain, stage)."""
    return [
        d for d in result.chains if d.base == base and d.metric == EXCESS and not d.itt
    ]  # fmt: skip


def _chain_names(decs: list[ChainDecomposition]) -> list[tuple[str, str]]:
    """(chain, column title) in first-seen order; the title names the total's two ends."""
    out: dict[str, str] = {}
    for d in decs:
        out.setdefault(d.chain, f"{d.chain} loss ({d.total.a.slice} -> {d.total.b.slice})")
    return list(out.items())


def _scorer_cell(result: MetricsResult, base: str, stage: str) -> str:
    """The scorer check over the units this stage has cells in."""
    if not result.has_control(base):
        return "no positive control"
    units = [c.slice for c in result.cells if c.base == base and c.stage == stage]
    checks = [s for u in units if (s := result.scorer_check(base, u)) is not None]
    checked = [s for s in checks if s.scorer_blind is not None]
    blind = [s.unit for s in checked if s.scorer_blind]
    if blind:
        return f"blind in {', '.join(blind)} {BLIND}"
    if not checked:
        return "not checked"
    return f"sees persona in {len(checked)} of {len(checked)} units"


def _yield_cell(result: MetricsResult, base: str, stage: str) -> str:
    """The lowest yield over this stage's slices (a scoring variant shares its slice's rows)."""
    cells = [
        c for c in result.cells.values()
        if c.cell.base == base and c.cell.stage == stage and split_unit(c.cell.slice)[1] is None
        and c.n_rows
    ]  # fmt: skip
    if not cells:
        return "–"
    low = min(cells, key=lambda c: c.n_scored / c.n_rows)
    share = low.n_scored / low.n_rows
    if share >= 1.0:
        return "100% everywhere"
    return f"lowest {share:.0%} ({low.cell.slice}, {low.n_scored} of {low.n_rows})"


def _member(result: MetricsResult, base: str, stage: str, kind: str, chain: str = "") -> str:
    """The family member's `band  verdict`, or "–" where the stage has none."""
    d = next(
        (d for d in result.family if d.a.base == base and d.a.stage == stage and d.kind == kind
         and (not chain or d.chain == chain)),
        None,
    )  # fmt: skip
    return "–" if d is None else f"{band_text(d)} {verdict(d)}"


def legend(result: MetricsResult) -> str:
    """The line under the answer's tables (once, whatever the number of bases)."""
    return (
        f"{result.ci:.0%} simultaneous bands over each base's primary family (declared before "
        "looking); excess = macro-F1 minus the cell's own chance level; loss positive = persona "
        f"lost. {DAGGER} rough, {BLIND} scorer blind."
    )


def _notes(result: MetricsResult, base: str) -> list[str]:
    rough = [
        f"{d.a.stage} {d.chain or HOME}: {d.flag}"
        for d in result.family
        if d.a.base == base and d.flag and d.has_interval
    ]
    return [f"Rough ({DAGGER}): " + "; ".join(rough) + "."] if rough else []


def summary_tables(result: MetricsResult) -> list[SummaryTable]:
    """One table per base with a trained stage; a base with none gets a one-line note."""
    out = []
    for base in result.bases:
        stages = result.trained_stages(base)
        chains = _chain_names(_chains(result, base))
        head = ["stage", f"home ground ({HOME}): excess", *(t for _, t in chains),
                "scorer check", "yield"]  # fmt: skip
        rows = [
            [st, _member(result, base, st, "excess"),
             *(_member(result, base, st, "total", ch) for ch, _ in chains),
             _scorer_cell(result, base, st), _yield_cell(result, base, st)]
            for st in stages
        ]  # fmt: skip
        notes = _notes(result, base) if rows else ["No trained stage: nothing to claim."]
        out.append(SummaryTable(base, head, rows, notes))
    return out


def _text_table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]
    return [line[0], "  ".join("-" * w for w in widths), *line[1:]]


def summary_text(result: MetricsResult) -> str:
    """The summary tables as plain text for a terminal or a log file."""
    lines: list[str] = []
    for t in summary_tables(result):
        lines.append(f"{t.base}")
        if t.rows:
            lines += ["  " + x for x in _text_table(t.head, t.rows)]
        lines += ["  " + n for n in t.notes]
        lines.append("")
    return "\n".join([*lines, legend(result), ""])
