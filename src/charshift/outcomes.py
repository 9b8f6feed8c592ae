"""Outcomes by persona and stage, and a test for differential censoring (pure).

A row's outcome says whether it produced an output (`reply`, `email`) or why not (`no_email`,
`malformed`, `max_steps`, ...). When one persona's rows are censored more than another's (its
verbosity runs out of steps, its style breaks the tool format), conditional metrics compare
different subsets of items: that is a finding to report, not noise to drop. This module counts
outcomes per (base, stage, persona, unit) and tests, within one (base, stage, unit), whether the
outcome depends on the persona. A backend failure (`error`, `context_overflow`) is not the
persona's doing: it is counted on its own and left out of the yield and of the test.

The test: Pearson's chi-square statistic of the outcome x persona table, with a permutation
p-value that permutes the persona labels *within* each item and sample (the rows of one scenario
share its difficulty, so only persona labels are exchangeable under the null, not rows across
items), plus the asymptotic chi-square p-value for reference (unreliable with sparse cells).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from charshift.schema import (
    FAILED_OUTCOMES,
    NULL_PERSONA_MARKERS,
    OUTCOMES,
    SCORED_OUTCOMES,
    PredictionRecord,
)

OUTPUT = "output"
MISSING = "missing"


def outcome_table(records: Iterable[PredictionRecord]) -> list[dict[str, object]]:
    """One row per (base, stage, persona, unit): the count of each outcome (every outcome in
    `schema.OUTCOMES` is a column, plus any unknown one seen), `n`, `failed` (backend failures,
    `schema.FAILED_OUTCOMES`: not persona misses) and `yield` (share of the rows that did not
    fail with an output; NaN when every row failed). Base-stage rows keep their null persona:
    count them before any expansion."""
    counts: dict[tuple[str, str, str, str], Counter[str]] = defaultdict(Counter)
    for r in records:
        counts[(r.base, r.stage, str(r.persona), r.slice)][r.outcome] += 1
    seen = {o for c in counts.values() for o in c}
    columns = list(OUTCOMES) + sorted(seen - set(OUTCOMES))
    rows: list[dict[str, object]] = []
    for (base, stage, persona, unit), c in sorted(counts.items()):
        n = sum(c.values())
        row: dict[str, object] = {"base": base, "stage": stage, "persona": persona, "unit": unit}
        row.update({o: c.get(o, 0) for o in columns})
        failed = sum(c.get(o, 0) for o in FAILED_OUTCOMES)
        row["n"] = n
        row["failed"] = failed
        outputs = sum(c.get(o, 0) for o in SCORED_OUTCOMES)
        row["yield"] = outputs / (n - failed) if n > failed else float("nan")
        rows.append(row)
    return rows


@dataclass(frozen=True)
class CensoringTest:
    """Outcome x persona within one (base, stage, unit)."""

    base: str
    stage: str
    unit: str
    personas: list[str]
    outcomes: list[str]
    table: list[list[int]]  # rows: personas, columns: outcomes
    n_rows: int
    statistic: float  # Pearson's chi-square
    dof: int
    p_asymptotic: float
    p_permutation: float  # personas permuted within (item, sample); (1 + hits) / (1 + n_perm)
    n_perm: int
    note: str = ""


def chi_square(table: np.ndarray) -> tuple[float, int]:
    """Pearson's chi-square statistic and its degrees of freedom, over the rows and columns of
    `table` that are not all zero."""
    t = np.asarray(table, dtype=float)
    t = t[t.sum(1) > 0][:, t.sum(0) > 0]
    if t.shape[0] < 2 or t.shape[1] < 2:
        return 0.0, 0
    expected = t.sum(1, keepdims=True) * t.sum(0, keepdims=True) / t.sum()
    return float(((t - expected) ** 2 / expected).sum()), (t.shape[0] - 1) * (t.shape[1] - 1)


def _tables(persona: np.ndarray, outcome: np.ndarray, k: int, m: int) -> np.ndarray:
    return np.bincount(persona * m + outcome, minlength=k * m).reshape(k, m)


def censoring_test(
    records: Sequence[PredictionRecord],
    base: str,
    stage: str,
    unit: str,
    *,
    collapse: bool = False,
    n_perm: int = 2000,
    seed: int = 0,
) -> CensoringTest | None:
    """Does the outcome depend on the persona in this (base, stage, unit)? `collapse`: compare
    output vs missing instead of every outcome. Backend failures (`schema.FAILED_OUTCOMES`) are
    not the persona's doing: they are left out. None when the cell has no rows or a single
    persona (the base stage's null persona has nothing to compare)."""
    rows = [
        r
        for r in records
        if r.base == base
        and r.stage == stage
        and r.slice == unit
        and r.persona not in NULL_PERSONA_MARKERS
        and r.outcome not in FAILED_OUTCOMES
    ]
    personas = list(dict.fromkeys(r.persona for r in rows))
    if len(personas) < 2:
        return None

    def label(o: str) -> str:
        return (OUTPUT if o in SCORED_OUTCOMES else MISSING) if collapse else o

    outcomes = sorted({label(r.outcome) for r in rows})
    p_idx = np.array([personas.index(r.persona) for r in rows])
    o_idx = np.array([outcomes.index(label(r.outcome)) for r in rows])
    table = _tables(p_idx, o_idx, len(personas), len(outcomes))
    stat, dof = chi_square(table)
    cell = {"base": base, "stage": stage, "unit": unit, "personas": personas}
    cell.update(outcomes=outcomes, table=table.tolist(), n_rows=len(rows))
    if dof == 0:
        return CensoringTest(
            **cell, statistic=0.0, dof=0, p_asymptotic=1.0, p_permutation=1.0, n_perm=0,
            note="one outcome only: nothing to test",
        )  # fmt: skip
    p_perm = _permutation_p(rows, p_idx, o_idx, stat, len(personas), len(outcomes), n_perm, seed)
    return CensoringTest(
        **cell, statistic=stat, dof=dof, p_asymptotic=float(chi2.sf(stat, dof)),
        p_permutation=p_perm, n_perm=n_perm,
    )  # fmt: skip


def _permutation_p(
    rows: Sequence[PredictionRecord],
    p_idx: np.ndarray,
    o_idx: np.ndarray,
    observed: float,
    k: int,
    m: int,
    n_perm: int,
    seed: int,
) -> float:
    """(1 + #{permuted statistic >= observed}) / (1 + n_perm), persona labels shuffled within
    each (item, sample) stratum."""
    keys = {key: i for i, key in enumerate(dict.fromkeys((r.item_id, r.sample_idx) for r in rows))}
    strata = np.array([keys[(r.item_id, r.sample_idx)] for r in rows])
    by_stratum = p_idx[np.argsort(strata, kind="stable")]
    rng = np.random.default_rng(seed)
    hits = 0
    tol = 1e-9 * max(1.0, observed)
    for _ in range(n_perm):
        order = np.lexsort((rng.random(len(rows)), strata))
        shuffled = np.empty_like(p_idx)
        shuffled[order] = by_stratum
        stat, _ = chi_square(_tables(shuffled, o_idx, k, m))
        hits += stat >= observed - tol
    return (1 + hits) / (1 + n_perm)


def censoring_tests(
    records: Sequence[PredictionRecord],
    *,
    collapse: bool = False,
    n_perm: int = 2000,
    seed: int = 0,
) -> list[CensoringTest]:
    """`censoring_test` for every (base, stage, unit) with at least two personas."""
    cells = dict.fromkeys((r.base, r.stage, r.slice) for r in records)
    found = (
        censoring_test(records, b, s, u, collapse=collapse, n_perm=n_perm, seed=seed)
        for b, s, u in cells
    )
    return [t for t in found if t is not None]
