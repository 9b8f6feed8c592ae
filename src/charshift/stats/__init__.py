"""Every metric and interval of charshift, defined once. Pure: records in, results out.

Input: `PredictionRecord`s (one row = one output with its true persona and the scorer's verdict;
`slice` holds the measured *unit*, a slice or a `SLICE.VARIANT` scoring variant, see
`charshift.ladder`). Output: a `MetricsResult` with, per cell (base, stage, unit), raw and
chance-corrected figures (conditional and intention-to-treat), yield, per-persona figures,
confusion counts and the predicted-label distribution; the scorer check per (base, unit); the
additive decomposition of every chain of `ladder.CHAINS`, the contrasts of `ladder.ALL_CONTRASTS`,
the stage differences and the declared primary family, each with a cluster-bootstrap interval
that says when it cannot be trusted; retention relative to the positive control. Reading
prediction files lives in `charshift.external`, writing tables in `charshift.tables`.

Modules: `results` (the records), `counts` (records -> per-cluster counts -> statistics),
`intervals` (draws, intervals, p-values, flags), `nulls` (the permutation null), `cells`,
`differences`, `chains`, `family`, `scorer`, `depth`, `compute` (the entry points), and
`agreement` (whether several scorers agree: kappa and Spearman between their readings, and the
sign of each rung's loss; its own docstring defines them).

Definitions (the only ones in the code base):

* Label set, per base: the run's personas, in the run's order, less any persona with no rows at
  all in some non-base stage of that base (a skipped adapter, e.g. a gated one). Such a persona
  leaves the base's label set in every cell of that base (`MetricsResult.labels`), its rows in
  the other stages are set aside, and the result says so (`MetricsResult.label_notes`). A
  prediction outside the label set (a persona the run did not use or the base dropped) is wrong.
* Backend failures (outcome `error` or `context_overflow`) say nothing about the persona: they
  are left out of every figure (conditional and ITT) and counted on their own (`n_failed`).
* Conditional metrics use only rows with an output (prediction not None). Conditional macro-F1
  is the mean of per-persona F1 over the personas with at least one scored output in the cell
  (`n_personas_scored` of `n_personas`); a persona without one has an undefined (NaN)
  conditional F1 and is left out, in the point estimate and in each bootstrap resample alike. It
  equals scikit-learn's `f1_score(y, p, labels=<those personas>, average="macro",
  zero_division=0)`. Intention-to-treat (ITT) metrics use every attempted row, count a missing
  output as a wrong prediction and average over the personas with at least one row in the cell
  (`n_personas_attempted`; all K in a complete design): a persona absent from a unit by design
  (`id_chat.short` exists only where its condition wrote an email body) is left out, not scored
  0. Yield = rows with an output / rows attempted.
* Raw macro-F1 is not chance-corrected. Each cell's own null: the macro-F1 expected when
  predictions are independent of the true persona, given the cell's own prediction shares and
  true-label counts: per persona, with n_j true rows, m_j rows predicted j and N rows (scored
  rows, or every row for ITT), F1null_j = 2 n_j m_j / (N (n_j + m_j)) (tp_j at its expectation
  n_j m_j / N), averaged like F1 (`macro_f1_null`). For the base null below this is
  (1/K) sum_j 2 q_j / (1 + K q_j), q_j the share of base outputs predicted j, at most 1/K and
  lower the more skewed the scorer is on neutral text. `macro_f1_excess` = macro-F1 - its null,
  per persona then averaged; the null is recomputed in every resample. It is the mean of the
  permutation null (labels permuted within items) exactly for ITT in a design where every item
  holds every persona equally often, and within 0.01 otherwise in the simulations
  (tests/test_stats_simulation.py). `p_null`: one-sided permutation p-value of the excess, the
  true labels permuted within items (`n_perm` permutations; (1 + hits) / (1 + n_perm)).
  Accuracy's chance correction is Cohen's kappa (`kappa`): (accuracy - p_e) / (1 - p_e), p_e =
  sum_j n_j m_j / N^2. Per persona, `PersonaMetrics.f1_excess` = F1_j - F1null_j, with its
  interval from the cell's bootstrap (not floored by the permutation null, unlike the cell's).
  "Persona detected" means an excess interval above 0 (or a small p_null),
  never a difference from the base stage.
* The base stage is an explicit null: it is generated once per item and sample (persona
  "__null__"), and each such output is paired with every persona of the label set as its true
  label for F1 (its per-persona recall is the share of base outputs given that persona). Its
  predictions are therefore independent of the persona by construction: its excess and kappa are
  0 and its accuracy is 1/K times the share of outputs predicted inside the label set, all
  `fixed_by_construction` (NaN ends). Its role is the scorer's format bias: the share of its
  most-predicted label per unit (`ScorerCheck.null_top_share`). Counts are per output.
* Depth (`depth`, per base, trained stage and persona): the mean over the base's units (each
  slice once: scoring variants and length controls left out) of the persona's conditional
  `f1_excess` where it has a scored output, which is the stage minus the base stage in excess
  (the base's is 0 by construction); also over the units where the scorer is not blind only
  (`depth_not_blind`), and the count of units whose persona excess interval lies above 0. A
  point summary: no interval.
* Positive control (`control`, default `prompted_explicit`): its conditional excess in a unit is
  the scorer's `sensitivity` there; where its interval reaches 0 the scorer is blind in that
  unit (`scorer_blind`), and every figure of that unit is marked (`CellMetrics.scorer_blind`,
  `Difference.blind`, `ChainDecomposition.blind`). Retention: a stage's excess / the control's,
  paired, flagged when the control's interval reaches 0.
* Intervals: cluster bootstrap by `item_id` (an ID prompt or an email scenario): all rows of an
  item (every persona and sample) are resampled together. Vectorised: a (n_boot x n_clusters)
  multinomial count matrix W times the per-cluster count matrix gives every resample's counts at
  once. Each cell draws from its own generator seeded by (seed, base, stage, unit). Percentile
  intervals by default; BCa with a jackknife over clusters for the acceleration. With
  `small_sample` (default) the interval is the expanded percentile interval: the tails cut at
  Phi(-sqrt(G/(G-1)) t_{G-1}(1 - alpha/2)) instead of alpha/2, G the clusters behind the figure,
  which corrects the bootstrap's (G-1)/G variance and its normal tails. A resample in which a
  figure is undefined (nothing scored) is counted (`n_empty_resamples`) and left out. `p` of a
  difference: two-sided, from the bootstrap standard error SE (t = |estimate| / (SE
  sqrt(G/(G-1))) on G-1 degrees of freedom; `intervals.p_two_sided`).
* A figure behind fewer than `MIN_INTERVAL_CLUSTERS` (2) clusters has no interval at all
  (`Interval.has_interval`, `Difference.has_interval`): it is shown as "n/a (1 item)", drawn
  without an error bar, written with empty ends, and supports no claim (a positive control
  behind one item leaves its unit not checked).
* An interval is flagged (`flag` non-empty, `reliable` False) when fewer than `MIN_CLUSTERS`
  clusters carry its estimate (for conditional figures: clusters with a scored output; for a
  difference: the fewer of its two sides), when its estimate is undefined, or when some
  resamples had nothing scored. Why 10: `scripts/coverage_min_clusters.py --sims 1000` simulates
  cells with a known truth (K = 4, 2 rows per persona per item, item hit rates ~ Beta(7, 3)) and
  counts how often the nominal 95% interval covers it. Without the small-sample correction,
  accuracy / macro-F1 coverage was 3 clusters 0.75 / 0.75, 5: 0.87 / 0.84, 10: 0.91 / 0.90,
  15: 0.94 / 0.93, 40: 0.94 / 0.93; with it (accuracy / macro-F1 / excess / kappa) see that
  script's docstring: from 10 clusters it is at least 0.93.
* Differences: a conditional persona-averaged difference averages both sides over the personas
  scored on both sides, per resample (ITT: with rows on both sides), `k` of `n_personas`.
  Differences are computed on raw macro-F1, accuracy and macro-F1 excess (`METRICS`).
* Chains (`charshift.ladder.CHAINS`): for each (base, stage) every unit of a chain is estimated
  on the chain's common items (per item kind: the prompt items common to all its prompt units,
  the scenario items common to all its scenario units) and the personas defined in every unit,
  so the rungs (differences of consecutive units, closer to home minus further: positive =
  persona lost) sum exactly to the total (first minus last). One draw per (base, item kind),
  over the base's whole item universe of that kind, is shared by every unit, chain and stage of
  the base (`chains.Universe`), so every resample telescopes too; a rung between a prompt unit
  and a scenario unit is unpaired, the others paired; an unpaired rung reports the smaller
  side's cluster count. The item kind is the `kind:` prefix of the item ids when they carry one,
  else "prompt" for the ID slices and "scenario" for the rest.
* Contrasts (`ladder.ALL_CONTRASTS`) and stage differences (each trained stage minus the one before
  it; neither the base stage nor the control takes part) are paired on the items the two cells
  share, with one draw for both.
* The primary family (`charshift.stats.family`), declared before looking: per base and trained
  stage, the home-ground conditional excess and each chain's total loss in conditional excess;
  Holm-adjusted p-values and a simultaneous max-t band. Everything else is exploratory.
"""

from __future__ import annotations

from charshift.config import ALL_PERSONAS
from charshift.stats.chains import item_kind
from charshift.stats.compute import (
    N_PERM,
    BootstrapDraws,
    ChainDraws,
    bootstrap_draws,
    chain_decomposition,
    chain_draws,
    compute_metrics,
    paired_difference,
    permutation_draws,
)
from charshift.stats.counts import expand_base_null, label_sets, score_labels
from charshift.stats.depth import depth_rows
from charshift.stats.family import holm
from charshift.stats.results import (
    BLIND_TEXT,
    DEFAULT_CONTROL,
    DEFAULT_SCORER,
    FIXED_NULL_TEXT,
    FIXED_TEXT,
    HOME,
    METRICS,
    MIN_CLUSTERS,
    MIN_INTERVAL_CLUSTERS,
    NONE,
    NULL_ROW,
    OTHER,
    OWN_NULL,
    PRIMARY,
    STAGE_ORDER,
    Cell,
    CellMetrics,
    ChainDecomposition,
    Depth,
    Difference,
    Interval,
    LabelNote,
    Method,
    MetricsResult,
    PersonaMetrics,
    Retention,
    ScorerCheck,
    has_interval,
    infer_personas,
    no_interval_text,
    order_slices,
    order_stages,
)

__all__ = [
    "ALL_PERSONAS", "BLIND_TEXT", "DEFAULT_CONTROL", "DEFAULT_SCORER", "FIXED_NULL_TEXT",
    "FIXED_TEXT", "HOME", "METRICS", "MIN_CLUSTERS", "MIN_INTERVAL_CLUSTERS", "NONE", "NULL_ROW", "N_PERM", "OTHER",
    "OWN_NULL", "PRIMARY", "STAGE_ORDER", "BootstrapDraws", "Cell", "CellMetrics",
    "ChainDecomposition", "ChainDraws", "Depth", "Difference", "Interval", "LabelNote", "Method",
    "MetricsResult", "PersonaMetrics", "Retention", "ScorerCheck", "bootstrap_draws",
    "chain_decomposition", "chain_draws", "compute_metrics", "depth_rows", "expand_base_null",
    "has_interval", "holm", "infer_personas", "no_interval_text", "item_kind", "label_sets",
    "order_slices", "order_stages",
    "paired_difference", "permutation_draws", "score_labels",
]  # fmt: skip
