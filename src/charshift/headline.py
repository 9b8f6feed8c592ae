"""The report's headline: a short generated paragraph a person reads first (pure).

`headline_text(result, context)` returns plain-text sentences (escaping is the renderer's job),
in this order:

1. a classifier whose held-out macro-F1 interval reaches chance, first, because downstream
   figures from that classifier cannot be read as persona retention;
2. what was run: bases, stages, personas, units, items, samples and the tool protocol;
3. each trained classifier's held-out quality against chance 1/K, beside its lexical baseline;
4. the scorer check: per base, the units where the positive control cannot be told from chance
   (the scorer is blind there, so a loss there is not evidence of persona loss) and the
   scorer's largest label share on neutral base text;
5. the declared primary family, whose figures are the answer's table above the prose
   (`charshift.summary`, not repeated here); each chain's largest rung, named as exploratory and
   said to be selected; where the run has several scorers, one line naming the rungs where they
   disagree on the sign of the loss, or where one finds a change the other cannot confirm
   (`stats.agreement`); yields below 100%;
6. the caveats that apply: a meaningless (smoke) run, flagged intervals, the constrained tool
   protocol, conditional vs intention-to-treat where yields are low, differential censoring,
   backend failures, classifier training warnings.

Every persona figure comes from the `MetricsResult`; the classifier's quality, the tool protocol
and the number of samples come from the `HeadlineContext` (read from the run's config and
manifest, defensively: an older run lacks some keys). Every number carries its interval, or says
why it has none. "Detected" is never "above the base stage".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from charshift.config import ID_SLICES, TOOL_SLICES
from charshift.ladder import split_unit
from charshift.outcomes import CensoringTest
from charshift.stats import (
    BLIND_TEXT,
    HOME,
    CellMetrics,
    ChainDecomposition,
    Difference,
    Interval,
    MetricsResult,
    no_interval_text,
)
from charshift.stats.agreement import DISAGREE, GAIN, LOSS, Agreement, SignAgreement
from charshift.stats.likert import LIKERT_EXCESS

DAGGER = "\u2020"  # marks an interval flagged as not to be trusted (see the method notes)
BLIND = "\u2021"  # marks a figure in a unit where the scorer cannot see persona
FIXED = "(fixed by construction)"
EXCESS = "macro_f1_excess"
LOW_YIELD = 0.5  # below this, conditional and ITT figures describe different things
CENSORING_ALPHA = 0.05
_LIST_MAX = 6  # at most this many cells named in one caveat sentence

PROTOCOLS = {
    "json": "json (the model writes each tool call as JSON in its reply; parsed leniently)",
    "native": "native (tool calls in the chat template's own tool format)",
    "constrained": (
        "constrained (the tool-call envelope, a tool name and arguments matching its schema, is "
        "enforced by a grammar during decoding; string fields such as the email body are free)"
    ),
}

# --------------------------------------------------------------------------- formatting


def num(x: float | None, digits: int = 3) -> str:
    if x is None or x != x:  # None or NaN
        return "–"
    return f"{x:.{digits}f}"


def fmt_p(p: float) -> str:
    """A p-value: three digits, "< 0.001" below that, "–" when undefined."""
    if p != p:
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_phrase(name: str, p: float) -> str:
    """`name = 0.012`, `name < 0.001`, or `name undefined`."""
    if p != p:
        return f"{name} undefined"
    return f"{name} {fmt_p(p)}" if p < 0.001 else f"{name} = {fmt_p(p)}"


def fmt_iv(i: Interval, digits: int = 3) -> str:
    """`est [lo, hi]`, a dagger when flagged; a fixed figure says so; an undefined one is –."""
    if i.estimate != i.estimate:
        return "–"
    if i.fixed_by_construction:
        return f"{num(i.estimate, digits)} {FIXED}"
    if not i.has_interval:
        return f"{num(i.estimate, digits)}, interval {no_interval_text(i.n_clusters)}"
    dagger = "" if i.reliable else DAGGER
    return f"{num(i.estimate, digits)} [{num(i.lo, digits)}, {num(i.hi, digits)}]{dagger}"


def fmt_diff(d: Difference, digits: int = 3) -> str:
    if d.estimate != d.estimate:
        return "–"
    if d.fixed_by_construction:
        return f"{d.estimate:+.{digits}f} {FIXED}"
    if not d.has_interval:
        return f"{d.estimate:+.{digits}f}, interval {no_interval_text(d.n_clusters)}"
    dagger = "" if d.reliable else DAGGER
    return f"{d.estimate:+.{digits}f} [{d.lo:+.{digits}f}, {d.hi:+.{digits}f}]{dagger}"


def _iv_text(i: Interval) -> str:
    """An interval for a sentence: two digits, or why there is no number."""
    if i.estimate != i.estimate:
        return "undefined (no scored output)"
    return fmt_iv(i, 2)


def _diff_text(d: Difference) -> str:
    if d.estimate != d.estimate:
        return "undefined (a side has no scored output)"
    return fmt_diff(d, 2)


def _pair(v: Any) -> tuple[float, float] | None:
    if isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
        return float(v[0]), float(v[1])
    return None


def _report_iv(value: Any, interval: Any) -> str:
    """A classifier figure from a train report: `est [lo, hi]`, or a note why no interval."""
    if not isinstance(value, int | float) or value != value:
        return "not measured (no held-out split)"
    iv = _pair(interval)
    if iv is None:
        return f"{value:.2f} (no interval recorded)"
    return f"{value:.2f} [{iv[0]:.2f}, {iv[1]:.2f}]"


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _names(items: Sequence[str], limit: int = _LIST_MAX) -> str:
    items = list(items)
    if len(items) > limit:
        return _join([*items[:limit], f"{len(items) - limit} more"])
    return _join(items)


# --------------------------------------------------------------------------- context


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


@dataclass(frozen=True)
class HeadlineContext:
    """Facts about the run the headline needs besides the statistics. Any field may be unknown
    (None or empty), e.g. for predictions made elsewhere."""

    tool_protocol: str | None = None
    n_samples: int | None = None
    classifiers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # base -> report
    classifier_sources: Mapping[str, str] = field(default_factory=dict)  # base -> given classifier
    meaningless: bool = False
    censoring: Sequence[CensoringTest] = ()
    agreement: Agreement | None = None  # whether the run's scorers agree (`stats.agreement`)


def context_from_settings(
    settings: Mapping[str, Any], meaningless: bool = False
) -> HeadlineContext:
    """The context of a run report from its settings ({"config": ..., "manifest": ...})."""
    cfg, man = _dict(settings.get("config")), _dict(settings.get("manifest"))
    protocol = _dict(cfg.get("rollout")).get("tool_protocol")
    samples = _dict(cfg.get("sampling")).get("n_samples")
    trained = {
        str(b): rep for b, rep in _dict(man.get("trained_classifiers")).items() if _dict(rep)
    }
    given = {
        str(b["name"]): str(b["classifier"])
        for b in cfg.get("bases") or []
        if isinstance(b, dict) and b.get("name") is not None and b.get("classifier")
    }
    return HeadlineContext(
        tool_protocol=str(protocol) if protocol else None,
        n_samples=samples if isinstance(samples, int) else None,
        classifiers=trained,
        classifier_sources=given,
        meaningless=meaningless or bool(cfg.get("meaningless")),
    )


# --------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class ClassifierQuality:
    """One trained classifier's held-out quality, read from its train report."""

    base: str
    mode: str
    macro_f1: str  # formatted, with its interval or a note
    baseline: str  # formatted, or "" when the report has none
    chance: float
    k: int
    n_heldout: int | None
    at_chance: bool  # the held-out interval reaches chance (or, without one, the estimate does)
    baseline_as_good: bool
    warnings: tuple[str, ...]
    lexical: bool = False  # a probe on TF-IDF features: the lexical baseline is the same model


def classifier_quality(base: str, rep: Mapping[str, Any], k: int) -> ClassifierQuality:
    """Read a train report defensively (an older run lacks the interval, chance and baseline)."""
    names = rep.get("label_names")
    k = len(names) if isinstance(names, list) and len(names) >= 2 else k
    chance = rep.get("chance")
    chance = float(chance) if isinstance(chance, int | float) and chance > 0 else 1.0 / k
    f1, iv = rep.get("macro_f1"), _pair(rep.get("macro_f1_interval"))
    above = rep.get("above_chance")
    if not isinstance(above, bool):
        above = iv[0] > chance if iv else None
    measured = isinstance(f1, int | float) and f1 == f1
    at_chance = above is False or (above is None and measured and float(f1) <= chance)
    base_rep = _dict(rep.get("baseline"))
    bf1 = base_rep.get("macro_f1")
    baseline = _report_iv(bf1, base_rep.get("macro_f1_interval")) if base_rep else ""
    as_good = measured and isinstance(bf1, int | float) and bf1 >= f1
    warnings = tuple(str(w) for w in rep.get("warnings") or [] if w)
    n = rep.get("n_heldout")
    lexical = _dict(rep.get("probe")).get("features") == "lexical"
    mode = str(rep.get("mode") or "finetune") + (" on TF-IDF features" if lexical else "")
    return ClassifierQuality(
        base, mode, _report_iv(f1, rep.get("macro_f1_interval")),
        baseline, chance, k, n if isinstance(n, int) else None, at_chance,
        bool(as_good) and not lexical, warnings, lexical,
    )  # fmt: skip


def _qualities(result: MetricsResult, ctx: HeadlineContext) -> list[ClassifierQuality]:
    out = []
    for base in result.bases:
        rep = ctx.classifiers.get(base)
        if rep:
            out.append(classifier_quality(base, rep, len(result.labels.get(base, result.personas))))
    return out


def _quality_figures(q: ClassifierQuality) -> str:
    on = f" on {q.n_heldout} held-out texts" if q.n_heldout else ""
    text = f"held-out macro-F1 {q.macro_f1}{on}, against chance 1/{q.k} = {q.chance:.3f}"
    if q.lexical:
        text += "; it is itself a TF-IDF model, so it is its own lexical baseline"
    elif q.baseline:
        text += (
            f"; the lexical baseline (TF-IDF + logistic regression, same split) scores {q.baseline}"
        )
    return text


def _chance_sentence(q: ClassifierQuality) -> str:
    return (
        f"Read this first: the classifier trained for {q.base} is not above chance "
        f"({_quality_figures(q)}), so the figures below from that classifier cannot be read as "
        "persona retention."
    )


def _quality_sentence(q: ClassifierQuality) -> str:
    text = f"The classifier trained for {q.base} ({q.mode}) scores {_quality_figures(q)}"
    if q.baseline_as_good:
        text += ", as high as the classifier: word choice alone carries this signal"
    return text + "."


def _given_sentence(result: MetricsResult, ctx: HeadlineContext, trained: set[str]) -> str:
    rest = [b for b in result.bases if b not in trained]
    if not rest:
        return ""
    given = [f"{b} ({ctx.classifier_sources[b]})" for b in rest if b in ctx.classifier_sources]
    if given and len(given) == len(rest):
        return (
            f"The classifier of {_join(given)} was given, not trained in this run: its "
            "held-out quality is not measured here."
        )
    return (
        f"The classifier's held-out quality for {_join(rest)} is not known to this report (no "
        "train report recorded)."
    )


# --------------------------------------------------------------------------- the run


def _items(result: MetricsResult) -> str:
    prompts = [
        c.n_clusters for c in result.cells.values() if split_unit(c.cell.slice)[0] in ID_SLICES
    ]
    scen = [
        c.n_clusters for c in result.cells.values() if split_unit(c.cell.slice)[0] not in ID_SLICES
    ]
    parts = []
    if prompts:
        parts.append(f"up to {max(prompts)} prompt items")
    if scen:
        parts.append(f"up to {max(scen)} scenario items")
    return _join(parts) + " per cell"


def _protocol_text(result: MetricsResult, ctx: HeadlineContext) -> str:
    uses_tools = any(split_unit(u)[0] in TOOL_SLICES for u in result.slices)
    if ctx.tool_protocol is None:
        return "tool protocol not recorded" if uses_tools else "no tool slice"
    name = PROTOCOLS.get(ctx.tool_protocol, ctx.tool_protocol)
    return f"tool protocol {name}" + ("" if uses_tools else " (unused: no tool slice in this run)")


def run_sentence(result: MetricsResult, ctx: HeadlineContext) -> str:
    k = len(result.personas)
    samples = (
        f"{ctx.n_samples} sample(s) per item and condition"
        if ctx.n_samples
        else "samples per item not recorded"
    )
    return (
        f"This run measured {k} personas ({', '.join(result.personas)}) on "
        f"{len(result.bases)} base model(s) ({', '.join(result.bases)}), in "
        f"{len(result.stages)} stage(s) ({', '.join(result.stages)}) and "
        f"{len(result.slices)} unit(s) ({', '.join(result.slices)}), with {_items(result)}, "
        f"{samples}; {_protocol_text(result, ctx)}."
    )


# --------------------------------------------------------------------------- findings


def scorer_sentence(result: MetricsResult, base: str) -> str:
    """The scorer check of one base: where the positive control cannot be told from chance."""
    checks = [s for s in result.scorer_checks if s.base == base]
    tops = [s for s in checks if s.null_top_share == s.null_top_share]
    bias = ""
    if tops:
        top = max(tops, key=lambda s: s.null_top_share)
        bias = (
            f" On neutral base text the scorer names one label for up to "
            f"{top.null_top_share:.0%} of outputs ({top.null_top_label} in {top.unit}): its "
            "format bias, shown beside every rung."
        )
    if not result.has_control(base):
        return (
            f"{base}: no positive control (stage {result.control or 'none'} has no rows), so a "
            "fall in a format cannot be told from a scorer that cannot see persona there." + bias
        )
    checked = [s for s in checks if s.scorer_blind is not None]
    blind = [s for s in checked if s.scorer_blind]
    text = (
        f"Scorer check for {base} (positive control {result.control}: the persona told to "
        f"show in every format): the scorer sees persona in {len(checked) - len(blind)} of "
        f"{len(checked)} checked units"
    )
    if blind:
        named = [f"{s.unit} (control excess {_iv_text(s.sensitivity)})" for s in blind]
        text += f"; it is blind in {_names(named)}: {BLIND_TEXT} {BLIND}"
    unchecked = [f"{s.unit} ({s.note.removesuffix(': not checked')})" for s in checks
                 if s.scorer_blind is None]  # fmt: skip
    if unchecked:
        text += f"; not checked: {_names(unchecked)}"
    return text + "." + bias


def family_sentence(result: MetricsResult) -> str:
    fam = result.family
    if not fam:
        return (
            "No primary family: no trained stage with a home-ground unit or a chain. Every "
            "figure below is exploratory."
        )
    return (
        "The table above is the primary family, declared before looking: per trained stage, "
        f"the {HOME} macro-F1 excess over its own chance level and each chain's total loss in "
        f"that excess, with simultaneous {result.ci:.0%} bands (Holm-adjusted p-values in the "
        "Primary family section); every other figure in this report is exploratory."
    )


def chain_heading(dec: ChainDecomposition) -> str:
    """How the report names a chain (the email-step chain by what it splits)."""
    if dec.chain == "email_step":
        return "the id_chat -> chat_email loss split into topic, genre, length and scored unit"
    return dec.title[0].lower() + dec.title[1:] if dec.title else dec.chain


def _largest_rung(dec: ChainDecomposition) -> Difference | None:
    rungs = [r for r in dec.rungs if r.estimate == r.estimate]
    return max(rungs, key=lambda r: abs(r.estimate)) if rungs else None


def rung_sentence(dec: ChainDecomposition) -> str:
    """A chain's largest rung, named as exploratory and selected after looking ("" for a chain
    of one rung: its total, in the table, is the rung)."""
    r = _largest_rung(dec)
    if r is None or len(dec.rungs) < 2:
        return ""
    pairing = "paired" if r.paired else "unpaired"
    mark = f" {BLIND}" if r.blind else ""
    return (
        f"Exploratory, {dec.base}/{dec.stage}, {chain_heading(dec)}: the rung largest in size, "
        f"selected after looking (so its interval is not a test), is {r.a.slice} -> "
        f"{r.b.slice}, {_diff_text(r)}{mark} ({pairing}), which changes {_changes(r.changes)}."
    )


def _changes(text: str) -> str:
    """What a rung changes, in plain words (a rung over a missing unit changes several)."""
    if text.startswith("BUNDLE of "):
        n, _, rest = text.removeprefix("BUNDLE of ").partition(" changes")
        return f"{n} things at once, as a unit between is missing: " + rest.split(": ", 1)[-1]
    return "one thing: " + text


def claim_sentences(result: MetricsResult) -> list[str]:
    """Per (base, trained stage) and chain: the largest rung, exploratory (the family's own
    figures are the answer's table, `charshift.summary`)."""
    out = []
    for base in result.bases:
        for stage in result.trained_stages(base):
            out += [
                rung_sentence(dec)
                for dec in result.chains
                if dec.base == base and dec.stage == stage and dec.metric == EXCESS
                and not dec.itt
            ]  # fmt: skip
    return [s for s in out if s]


_SIGN_VERBS = {LOSS: "loses persona", GAIN: "gains persona"}


def _sign_side(scorer: str, verdict: str, d: Difference | None) -> str:
    unit = " Likert points" if d is not None and d.metric == LIKERT_EXCESS else ""
    figure = "" if d is None else f" ({_diff_text(d)}{unit})"
    return f"{scorer} {_SIGN_VERBS.get(verdict, 'cannot tell')}{figure}"


def _sign_place(s: SignAgreement) -> str:
    where = f"{s.base}/{s.stage} {s.frm} -> {s.to}"
    where += " (chain total)" if s.kind == "total" else ""
    a, b = _sign_side(s.scorer_a, s.verdict_a, s.a), _sign_side(s.scorer_b, s.verdict_b, s.b)
    return f"{where}: {a}, {b}"


def agreement_sentence(agreement: Agreement | None) -> str:
    """One line on whether the scorers agree on the sign of the loss ("" with one scorer):
    the rungs where they disagree (opposite signs), then those where one finds a change and the
    other's interval contains 0 (not a disagreement: that interval does not show no change)."""
    if agreement is None or not agreement.compared or not agreement.signs:
        return ""
    dis = [_sign_place(s) for s in agreement.signs if s.agreement == DISAGREE]
    one = [_sign_place(s) for s in agreement.signs if s.one_sided]
    names = _join(agreement.scorers)
    if not dis and not one:
        n_agree = sum(s.agreement == "agree" for s in agreement.signs)
        return (
            f"The scorers ({names}) never disagree on the sign of a loss: {n_agree} of "
            f"{len(agreement.signs)} rung comparisons agree, the others are inconclusive "
            "(both intervals contain 0, or a figure has no interval)."
        )
    parts = [f"The scorers disagree on the sign of the loss at {_names(dis, 3)}"] if dis else []
    if one:
        parts.append(f"one scorer finds a change the other cannot confirm at {_names(one, 3)}")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + " (agreement_signs.csv has every rung)."


def _yield_sentence(base: str, stage: str, cells: list[CellMetrics]) -> str:
    partial = [c for c in cells if c.n_scored > 0]
    zero = [f"{c.cell.slice} (0 of {c.n_rows})" for c in cells if c.n_scored == 0]
    parts = []
    if partial:
        parts.append(
            f"Yield below 100% in {base}/{stage}: "
            + "; ".join(
                f"{c.cell.slice} {_iv_text(c.yield_)} ({c.n_scored} of {c.n_rows})" for c in partial
            )
        )
    if zero:
        parts.append(
            f"No output at all in {base}/{stage}: {_join(zero)}; nothing of "
            f"{'it' if len(zero) == 1 else 'them'} is measured"
        )
    return ". ".join(parts) + "."


def yield_sentences(result: MetricsResult) -> list[str]:
    """Per (base, stage): the units (scoring variants share their slice's rows) below 100%,
    those with no output at all named apart."""
    out = []
    for base in result.bases:
        for stage in result.stages:
            cells = [
                c
                for u in result.slices
                if split_unit(u)[1] is None
                and (c := result.get(base, stage, u)) is not None
                and c.n_scored < c.n_rows
            ]
            if cells:
                out.append(_yield_sentence(base, stage, cells))
    return out


# --------------------------------------------------------------------------- caveats


def _flagged_count(result: MetricsResult) -> tuple[int, int]:
    ivs: list[Interval | Difference] = []
    for c in result.cells.values():
        ivs += [c.macro_f1_excess, c.macro_f1_excess_itt]
    ivs += [d for d in result.differences if d.metric == EXCESS]
    shown = [i for i in ivs if not i.fixed_by_construction]
    return sum(1 for i in shown if not i.reliable), len(shown)


def flag_caveat(result: MetricsResult) -> str:
    n, total = _flagged_count(result)
    if not n:
        return ""
    fewest = min((c.n_clusters for c in result.cells.values()), default=0)
    return (
        f"{n} of {total} macro-F1 excess intervals and differences are flagged {DAGGER}: fewer "
        f"than {result.min_clusters} clusters (items) carry them (the smallest cell has "
        f"{fewest}), or some resamples had nothing scored, or the figure is undefined; read "
        "them as rough."
    )


def low_yield_caveat(result: MetricsResult) -> str:
    cells = [
        c
        for c in result.cells.values()
        if split_unit(c.cell.slice)[1] is None and 0 < c.n_scored and c.yield_.estimate < LOW_YIELD
    ]
    if not cells:
        return ""
    named = [
        f"{c.cell.label()} (excess conditional {num(c.macro_f1_excess.estimate, 2)}, ITT "
        f"{num(c.macro_f1_excess_itt.estimate, 2)})"
        for c in cells
    ]
    return (
        f"Where yield is below {LOW_YIELD:.0%} the conditional figure (outputs only) and the "
        f"intention-to-treat figure (a missing output is a miss) differ: {_names(named)}; a "
        "conditional figure there describes the outputs that exist, not the condition."
    )


def failure_caveat(result: MetricsResult) -> str:
    failed = sum(c.n_failed for c in result.cells.values())
    if not failed and not result.failed_only:
        return ""
    text = (
        f"{failed} scored rows failed in the backend (error or context overflow): not persona "
        "misses, so they are left out of every figure, conditional and ITT, and counted in the "
        "outcomes table"
    )
    if result.failed_only:
        text += f"; every row failed in {_names([c.label() for c in result.failed_only])}"
    return text


def censoring_caveat(tests: Sequence[CensoringTest]) -> str:
    hit = [t for t in tests if t.n_perm and t.p_permutation < CENSORING_ALPHA]
    if not hit:
        return ""
    named = [f"{t.base}/{t.stage}/{t.unit} (p = {t.p_permutation:.3f})" for t in hit]
    return (
        f"Differential censoring in {len(hit)} of {len(tests)} tested cells: whether a row "
        f"produced an output depends on its persona (permutation chi-square, p < "
        f"{CENSORING_ALPHA}, not corrected for multiple tests) in {_names(named)}; conditional "
        "figures there compare personas on different items."
    )


def caveat_sentences(
    result: MetricsResult, ctx: HeadlineContext, quals: Sequence[ClassifierQuality]
) -> list[str]:
    out = []
    if ctx.meaningless:
        out.append(
            "This is a smoke run: the models and the classifier are tiny or untrained, so these "
            "figures mean nothing; the report only shows that the pipeline works."
        )
    out += [flag_caveat(result)]
    if ctx.tool_protocol == "constrained":
        out.append(
            "Tool calls were made under the constrained protocol: the tool-call envelope was "
            "enforced during decoding, so tool-slice yields say what the model writes when it "
            "cannot break the call format, not whether it can make the call unaided."
        )
    out += [low_yield_caveat(result), censoring_caveat(ctx.censoring), failure_caveat(result)]
    for q in quals:
        out += [f"Classifier training for {q.base} warned: {w}" for w in q.warnings]
    return [s if s.endswith((".", "!", "?")) else s + "." for s in out if s]


# --------------------------------------------------------------------------- the headline


def headline_text(result: MetricsResult, context: HeadlineContext | None = None) -> list[str]:
    """The headline's sentences, in reading order (see the module docstring)."""
    ctx = context or HeadlineContext()
    quals = _qualities(result, ctx)
    out = [_chance_sentence(q) for q in quals if q.at_chance]
    out.append(run_sentence(result, ctx))
    out += [_quality_sentence(q) for q in quals if not q.at_chance]
    given = _given_sentence(result, ctx, {q.base for q in quals})
    out += [given] if given else []
    out += [scorer_sentence(result, b) for b in result.bases]
    out.append(family_sentence(result))
    out += claim_sentences(result)
    agree = agreement_sentence(ctx.agreement)
    out += [agree] if agree else []
    out += yield_sentences(result)
    out += caveat_sentences(result, ctx, quals)
    return out
