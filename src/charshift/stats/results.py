"""The typed results of the statistics (`MetricsResult` and its parts) and the ordering helpers.

Pure data: every figure here is computed elsewhere in `charshift.stats`; tables, plots, the
headline and the report read these records and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from charshift.config import ALL_PERSONAS, ALL_SLICES
from charshift.ladder import CHAINS, VARIANTS, split_unit
from charshift.schema import (
    BASE_STAGE,
    NULL_PERSONA_MARKERS,
    PROMPTED_EXPLICIT_STAGE,
    PROMPTED_STAGE,
    PredictionRecord,
)

STAGE_ORDER = (BASE_STAGE, PROMPTED_STAGE, "distillation", "full")
OTHER = "other"  # confusion column: a prediction outside the base's label set
NONE = "none"  # confusion column: no output
NULL_ROW = "(base: no persona)"  # the one confusion row of a base-null cell
OWN_NULL = "(own null)"  # stage_b of a family row "a cell's excess over its own null"
HOME = "id_chat"  # the home-ground unit of the primary family
PRIMARY = "primary"  # `Difference.family` of a member of the declared primary family
DEFAULT_SCORER = "classifier"  # `PredictionRecord` has no scorer field yet: every row is this
DEFAULT_CONTROL = PROMPTED_EXPLICIT_STAGE
MIN_CLUSTERS = 10  # fewer clusters than this behind an interval: flagged (package docstring)
FIXED_TEXT = (
    "fixed by construction: the base null pairs each output with every persona, so accuracy is "
    "1/K times the share of outputs predicted inside the label set; no interval"
)
FIXED_NULL_TEXT = (
    "fixed by construction: the base null pairs each output with every persona, so its "
    "predictions are independent of the persona and its excess over its own null (and its "
    "kappa) is 0; no interval"
)
BLIND_TEXT = "the scorer cannot see persona here, so its loss is not evidence of persona loss"

Method = Literal["percentile", "bca"]
METRICS = ("macro_f1", "accuracy", "macro_f1_excess")  # the metrics of every difference


class Cell(NamedTuple):
    base: str
    stage: str
    slice: str  # the unit: a slice or SLICE.VARIANT

    def label(self) -> str:
        return f"{self.base}/{self.stage}/{self.slice}"


@dataclass(frozen=True)
class Interval:
    """An estimate and its interval. `n_clusters`: the clusters that carry the estimate (for a
    conditional figure, those with a scored output). `flag` says why the interval is not to be
    trusted ("" when it is); `fixed_by_construction` figures have NaN ends."""

    estimate: float
    lo: float
    hi: float
    n_clusters: int = 0
    n_empty_resamples: int = 0
    fixed_by_construction: bool = False
    flag: str = ""

    @property
    def reliable(self) -> bool:
        return not self.flag

    @property
    def above_zero(self) -> bool:
        """The interval lies above 0 (False when it is undefined)."""
        return math.isfinite(self.lo) and self.lo > 0


@dataclass
class PersonaMetrics:
    persona: str
    n: int  # rows attempted with this true persona (a base output counts once per persona)
    n_scored: int  # of which with an output
    yield_: float
    precision: float
    recall: float
    f1: Interval  # NaN when this persona has no scored output in the cell (not averaged)
    f1_itt: Interval  # NaN when this persona has no row in the cell (not averaged)
    recall_itt: float
    f1_null: float = math.nan  # F1 expected with predictions independent of the persona


@dataclass
class CellMetrics:
    cell: Cell
    n_rows: int  # outputs attempted (a base output counted once; backend failures left out)
    n_scored: int  # outputs scored
    n_clusters: int
    yield_: Interval
    macro_f1: Interval  # raw: not chance-corrected (see macro_f1_excess)
    accuracy: Interval
    macro_f1_itt: Interval
    accuracy_itt: Interval
    n_personas_scored: int  # personas with a scored output: the conditional macro-F1's average
    n_personas: int  # K: the base's label set
    per_persona: list[PersonaMetrics]
    confusion: np.ndarray  # (rows, K + 2): rows `confusion_rows`, cols personas + other + none
    confusion_rows: list[str]  # the label set, or [NULL_ROW] for a base-null cell
    confusion_cols: list[str]
    pred_distribution: dict[str, int]  # predicted label -> outputs, scored outputs only
    n_none: int  # outputs missing
    mean_p_true: float | None  # mean probability of the true persona (None for the base null)
    null: bool = False  # a base-null cell
    macro_f1_null: Interval = field(default_factory=lambda: _NAN)
    macro_f1_excess: Interval = field(default_factory=lambda: _NAN)
    macro_f1_null_itt: Interval = field(default_factory=lambda: _NAN)
    macro_f1_excess_itt: Interval = field(default_factory=lambda: _NAN)
    kappa: Interval = field(default_factory=lambda: _NAN)
    kappa_itt: Interval = field(default_factory=lambda: _NAN)
    p_null: float = math.nan  # one-sided permutation p of the excess (labels within items)
    p_null_itt: float = math.nan
    n_perm: int = 0
    n_personas_attempted: int = 0  # personas with a row here: the ITT macro-F1's average
    n_failed: int = 0  # backend error / context_overflow rows: not persona misses, left out
    scorer: str = DEFAULT_SCORER
    scorer_blind: bool | None = None  # the positive control cannot be told from chance here

    @property
    def top_label(self) -> tuple[str, float] | None:
        """The most-predicted label and its share of the scored outputs (None: nothing scored)."""
        if not self.n_scored or not self.pred_distribution:
            return None
        lab, n = max(self.pred_distribution.items(), key=lambda kv: kv[1])
        return lab, n / self.n_scored


_NAN = Interval(math.nan, math.nan, math.nan)


@dataclass
class Difference:
    """metric(a) - metric(b) with its bootstrap interval.

    Rungs, totals and contrasts: a = the unit closer to home, so a positive value is persona
    lost; `changes` names what differs (from `charshift.ladder`). Stage differences: a = the
    later stage, so a positive value is persona gained. Kind "excess": a cell's
    macro_f1_excess against its own null (b's stage is `OWN_NULL`), a member of the primary
    family. `n_clusters`: clusters resampled (the shared ones when paired, the smaller side's
    when unpaired). `k` of `n_personas`: the personas both sides average over (conditional:
    scored on both sides; ITT: with rows on both sides). `p`: two-sided bootstrap p-value of
    "no difference"; `family`, `p_holm`, `lo_simul`, `hi_simul`: see `charshift.stats.family`.
    """

    kind: str  # "rung" | "total" | "contrast" | "stage" | "pair" | "excess"
    a: Cell
    b: Cell
    metric: str
    itt: bool
    estimate: float
    lo: float
    hi: float
    n_clusters: int
    paired: bool
    note: str = ""
    changes: str = ""
    chain: str = ""
    n_empty_resamples: int = 0
    fixed_by_construction: bool = False
    flag: str = ""
    k: int = 0
    n_personas: int = 0
    p: float = math.nan
    family: str = ""
    p_holm: float = math.nan
    lo_simul: float = math.nan
    hi_simul: float = math.nan
    blind: tuple[str, ...] = ()  # the units of a and b where the scorer is blind

    @property
    def reliable(self) -> bool:
        return not self.flag


@dataclass
class ChainDecomposition:
    """One chain of `charshift.ladder.CHAINS` for one (base, stage), metric and view.

    `units`: the chain's units present here, in chain order; `estimates[i]`: units[i]'s metric
    on the common items and, for persona-averaged metrics, over the personas defined in every
    unit (`k` of `n_personas`): not the cell's own figure when items or personas were dropped.
    The rungs sum exactly to the total. `common`: item kind -> size of the common item set;
    `dropped`: unit -> its items outside the common set; `missing`: chain units without records
    here (a rung over a missing unit bundles the changes of the rungs it spans, and says so).
    """

    base: str
    stage: str
    chain: str
    title: str
    metric: str
    itt: bool
    units: list[str]
    kinds: dict[str, str]
    estimates: list[Interval]
    rungs: list[Difference]
    total: Difference
    common: dict[str, int]
    dropped: dict[str, int]
    missing: list[str]
    k: int = 0
    n_personas: int = 0
    blind: tuple[str, ...] = ()

    @property
    def note(self) -> str:
        sets = ", ".join(f"{n} {kind} items" for kind, n in self.common.items())
        out = f"estimated on the items common to every unit of the chain ({sets})"
        if self.n_personas and self.metric.startswith("macro_f1"):
            out += f" and the {self.k} of {self.n_personas} personas defined in every unit"
        left = [f"{u} {n}" for u, n in self.dropped.items() if n]
        if left:
            out += "; items outside that set, left out: " + ", ".join(left)
        if self.missing:
            out += "; units without records here: " + ", ".join(self.missing)
        return out


@dataclass(frozen=True)
class LabelNote:
    """A persona that left a base's label set, and why."""

    base: str
    persona: str
    stages: tuple[str, ...]  # the non-base stages of the base where it has no rows at all
    n_rows_set_aside: int  # its rows in the base's other stages, left out of every figure
    k: int  # the base's label set size after the drop

    def text(self) -> str:
        return (
            f"{self.base}: {self.persona} has no rows at all in stage(s) "
            f"{', '.join(self.stages)} (a skipped adapter?), so it leaves {self.base}'s label "
            f"set in every cell of {self.base} (K = {self.k}); its {self.n_rows_set_aside} rows "
            f"in other stages are set aside, and a prediction of {self.persona} counts as wrong."
        )


@dataclass(frozen=True)
class ScorerCheck:
    """Can the scorer see persona in this unit? The positive control's excess (`sensitivity`)
    and the scorer's bias on neutral base text (`null_top_label`, `null_top_share`)."""

    base: str
    scorer: str
    unit: str
    control: str | None
    sensitivity: Interval
    null_top_label: str | None
    null_top_share: float
    null_distribution: dict[str, float]  # label -> share of the scored base outputs
    scorer_blind: bool | None  # None: not checked here (no control, or it has no output)
    note: str = ""

    @property
    def flag(self) -> str:
        if self.scorer_blind:
            return "SCORER BLIND: " + BLIND_TEXT
        return self.note or self.sensitivity.flag


@dataclass(frozen=True)
class Retention:
    """A stage's excess relative to the positive control's in one unit (paired, one draw)."""

    base: str
    stage: str
    unit: str
    control: str
    itt: bool
    estimate: float
    lo: float
    hi: float
    n_clusters: int
    k: int
    n_personas: int
    n_empty_resamples: int = 0
    flag: str = ""
    scorer_blind: bool | None = None

    @property
    def reliable(self) -> bool:
        return not self.flag


@dataclass
class MetricsResult:
    personas: list[str]  # the run's personas
    labels: dict[str, list[str]]  # base -> its label set
    label_notes: list[LabelNote]
    cells: dict[Cell, CellMetrics]
    n_boot: int
    ci: float
    method: str
    seed: int
    min_clusters: int = MIN_CLUSTERS
    differences: list[Difference] = field(default_factory=list)
    chains: list[ChainDecomposition] = field(default_factory=list)
    n_perm: int = 0
    small_sample: bool = True
    control: str | None = DEFAULT_CONTROL  # the positive-control stage asked for
    scorer_checks: list[ScorerCheck] = field(default_factory=list)
    retention: list[Retention] = field(default_factory=list)
    failed_only: list[Cell] = field(default_factory=list)  # cells whose every row failed

    @property
    def bases(self) -> list[str]:
        return list(dict.fromkeys(c.base for c in self.cells))

    @property
    def stages(self) -> list[str]:
        return order_stages({c.stage for c in self.cells})

    @property
    def slices(self) -> list[str]:
        return order_slices({c.slice for c in self.cells})

    def get(self, base: str, stage: str, slice_: str) -> CellMetrics | None:
        return self.cells.get(Cell(base, stage, slice_))

    def has_control(self, base: str) -> bool:
        """The positive-control stage has cells in `base`."""
        return self.control is not None and any(
            c.base == base and c.stage == self.control for c in self.cells
        )

    def trained_stages(self, base: str | None = None) -> list[str]:
        """Stages that carry a persona and are not the positive control."""
        stages = (
            self.stages
            if base is None
            else order_stages(c.stage for c in self.cells if c.base == base)
        )
        return [s for s in stages if s not in (BASE_STAGE, self.control)]

    def scorer_check(self, base: str, unit: str) -> ScorerCheck | None:
        return next((s for s in self.scorer_checks if (s.base, s.unit) == (base, unit)), None)

    def blind(self, base: str, unit: str) -> bool:
        check = self.scorer_check(base, unit)
        return bool(check and check.scorer_blind)

    @property
    def family(self) -> list[Difference]:
        """The declared primary family's rows (see `charshift.stats.family`)."""
        return [d for d in self.differences if d.family == PRIMARY]


# --------------------------------------------------------------------------- ordering helpers


def order_stages(stages: Iterable[str]) -> list[str]:
    """Canonical stage order: base, prompted, distillation, full, then any others sorted."""
    s = set(stages)
    return [x for x in STAGE_ORDER if x in s] + sorted(s - set(STAGE_ORDER))


def _unit_rank() -> list[str]:
    known = list(ALL_SLICES)
    for chain in CHAINS:
        for u in chain.units:
            s, _ = split_unit(u)
            if s not in known:
                known.append(s)
    return known


def order_slices(slices: Iterable[str]) -> list[str]:
    """Units in the config's slice order (home ground outward), each slice's scoring variants
    right after it, then the chains' other slices, unknown ones last (sorted)."""
    rank = _unit_rank()

    def key(u: str) -> tuple[int, int, str]:
        s, v = split_unit(u)
        vpos = 0 if v is None else 1 + (VARIANTS.index(v) if v in VARIANTS else len(VARIANTS))
        return (rank.index(s) if s in rank else len(rank), vpos, u)

    return sorted(set(slices), key=key)


def infer_personas(records: Iterable[PredictionRecord]) -> list[str]:
    """The true labels present (null markers excluded): known personas in the OCT order first."""
    seen = list(dict.fromkeys(r.persona for r in records if r.persona not in NULL_PERSONA_MARKERS))
    return [p for p in ALL_PERSONAS if p in seen] + [p for p in seen if p not in ALL_PERSONAS]
