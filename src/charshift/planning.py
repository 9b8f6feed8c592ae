"""Planning: a run config -> every row the run will generate, without loading any model.

Pure (apart from reading the shipped prompt, persona and scenario files): conditions (base, stage,
persona, adapter, persona prompt), rendered episodes (one per item and slice), row keys, the
plan summary and cost estimate that `--dry-run` prints, and the shard a row belongs to. Every step
of the pipeline starts from `build_plan`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from charshift import banks, formats, prompts, slices
from charshift.backends.base import AdapterSource
from charshift.config import BaseSpec, ConfigError, RunConfig
from charshift.render import render
from charshift.rollout import step_budget
from charshift.schema import (
    BASE_STAGE,
    MAX_SHARDS,
    PROMPTED_EXPLICIT_STAGE,
    PROMPTED_STAGE,
    Condition,
    EpisodeSpec,
    GenerationRow,
    Sampling,
    canonical_json,
    stable_hash,
)
from charshift.slices import RenderContext


@dataclass
class PlannedRow:
    key: str
    condition: Condition
    spec: EpisodeSpec
    sample_idx: int
    adapter: AdapterSource | None
    sampling: Sampling  # the row's own (its slice's token budget); part of the key


@dataclass
class Plan:
    cfg: RunConfig
    rows: list[PlannedRow]
    conditions: dict[str, list[Condition]]
    adapters: dict[str, dict[str, AdapterSource]]  # base -> adapter name -> source
    scenario_bank: dict[str, Any]  # the worlds of tool episodes: scenario id -> Scenario

    def rows_for(self, base: str) -> list[PlannedRow]:
        return [r for r in self.rows if r.condition.base == base]

    def summary(self) -> str:
        cfg = self.cfg
        lines = [f"run {cfg.name!r}: {len(cfg.bases)} base(s), stages {cfg.stages}"]
        lines.append(f"personas ({len(cfg.personas)}): {_persona_list(cfg)}")
        for b in cfg.bases:
            conds = self.conditions[b.name]
            by_stage = Counter(c.stage for c in conds)
            lines.append(
                f"  base {b.name}: model {b.model}; conditions "
                + ", ".join(f"{s}={n}" for s, n in by_stage.items())
                + f"; classifier {b.classifier or '(trained in this run)'}"
            )
        per_slice = Counter((r.spec.slice, r.spec.split) for r in self.rows)
        lines.append("rows per slice:")
        for (sl, split), n in sorted(per_slice.items()):
            lines.append(f"  {sl:<26} {split:<5} {n:>7}")
        calls = sum(max_calls(r, cfg.rollout.max_steps) for r in self.rows)
        lines.append(f"generations in all: {len(self.rows)} rows, at most {calls} model calls")
        judged = slices.judge_units(cfg.slices)
        if judged:
            how = (
                "scored by the judge's behaviour rubric"
                if "judge" in cfg.scorers
                else "not scored (only the judge's behaviour rubric reads them; add judge to "
                "`scorers`)"
            )
            lines.append(f"units {', '.join(judged)}: {how}")
        return "\n".join(lines)


def _persona_list(cfg: RunConfig) -> str:
    """The run's personas for the plan, each of the user's own marked as such."""
    return ", ".join(p.name if p.bundled else f"{p.name} (own)" for p in cfg.personas)


def _adapter_source(base: BaseSpec, stage: str, persona: str) -> AdapterSource:
    st = base.adapters[stage]

    def fill(s: str | None) -> str | None:
        return s.replace("{persona}", persona) if s else s

    return AdapterSource(
        name=f"{stage}/{persona}",
        path=fill(st.path),
        repo=fill(st.repo),
        subfolder=fill(st.subfolder) if st.repo else None,
        revision=st.revision,
    )


def build_conditions(
    cfg: RunConfig, base: BaseSpec
) -> tuple[list[Condition], dict[str, AdapterSource]]:
    conds: list[Condition] = []
    adapters: dict[str, AdapterSource] = {}
    for stage in cfg.stages:
        if stage == BASE_STAGE:
            conds.append(Condition(base.name, BASE_STAGE, None))
            continue
        for spec in cfg.personas:
            p = spec.name
            if stage in (PROMPTED_STAGE, PROMPTED_EXPLICIT_STAGE):
                sp = prompts.persona_system_prompt(
                    spec,
                    cfg.persona_prompts.source,
                    cfg.persona_prompts.path,
                    explicit=stage == PROMPTED_EXPLICIT_STAGE,
                )
                conds.append(Condition(base.name, stage, p, system_prompt=sp))
            else:
                src = _adapter_source(base, stage, p)
                adapters[src.name] = src
                conds.append(Condition(base.name, stage, p, adapter=src.name))
    return conds, adapters


def _placeholder_prompts(cfg: RunConfig) -> tuple[list[Any], list[Any]]:
    """For a dry run of a PURE-DOVE config: as many stand-in prompts as the run would draw."""
    n_tr, n_ev = cfg.id_prompts.n_train, cfg.id_prompts.n_eval
    train = [
        prompts.IdPrompt(f"dove-train-{i}", "(PURE-DOVE prompt)", "train") for i in range(n_tr)
    ]
    evalp = [prompts.IdPrompt(f"dove-eval-{i}", "(PURE-DOVE prompt)", "eval") for i in range(n_ev)]
    return train, evalp


def build_episodes(cfg: RunConfig, dry: bool = False) -> tuple[list[EpisodeSpec], dict[str, Any]]:
    """Every item of the run rendered in every slice of its kind, and the worlds (scenarios by
    id) that tool episodes run their simulator over. Banks are validated first (`banks`)."""
    specs = _id_episodes(cfg, dry)
    worlds: dict[str, Any] = {}
    native = cfg.rollout.tool_protocol == "native"
    for kind, bank in banks.for_run(cfg).items():
        ctx = RenderContext(native_tools=native, worlds=bank.worlds)
        kind_slices = [s for s in cfg.slices if s in slices.names(items=kind)]
        for it in banks.select(bank, banks.selection(cfg, kind)):
            for sl in kind_slices:
                spec = render(sl, it, ctx)
                specs.append(with_step_budget(cfg, spec))
                if spec.scenario_id is not None:
                    worlds[spec.scenario_id] = bank.worlds.get(spec.scenario_id, it)
    return specs, worlds


def _id_episodes(cfg: RunConfig, dry: bool) -> list[EpisodeSpec]:
    specs: list[EpisodeSpec] = []
    id_slices = [s for s in cfg.slices if s in slices.names(items="prompt")]
    if not id_slices:
        return specs
    if dry and cfg.id_prompts.source == "pure_dove":
        train, evalp = _placeholder_prompts(cfg)
    else:
        train, evalp = prompts.select_id_prompts(cfg.id_prompts)
    if cfg.train_stages() and "id_chat" in id_slices:
        for i, p in enumerate(train):
            specs.append(formats.render_id("id_chat", p, i))
    for sl in id_slices:
        for i, p in enumerate(evalp):
            specs.append(formats.render_id(sl, p, i, cfg.id_prompts.break_suffixes))
    return specs


def with_step_budget(cfg: RunConfig, spec: EpisodeSpec) -> EpisodeSpec:
    """A tool episode with its step budget (`rollout.step_budget` of its needed calls and the
    config's floor and margin) written into the spec, so the budget is part of the row key and on
    record per episode. Chat episodes are returned as they are."""
    if spec.mode == "chat":
        return spec
    r = cfg.rollout
    return replace(
        spec, max_steps=step_budget(spec.mode, spec.needed_calls, r.max_steps, r.step_margin)
    )


def _key_parts(
    cfg: RunConfig,
    base: BaseSpec,
    cond: Condition,
    spec: EpisodeSpec,
    sample_idx: int,
    adapter: AdapterSource | None,
    sampling: Sampling | None,
) -> dict[str, Any]:
    sampling = sampling or cfg.sampling.to_sampling(spec.slice)
    parts: dict[str, Any] = {
        "model": base.model,
        "revision": base.revision,
        "stage": cond.stage,
        "persona": cond.persona,
        "adapter": adapter.__dict__ if adapter else None,
        "system_prompt": cond.system_prompt,
        "episode": spec.to_dict(),
        "sampling": sampling.to_dict(),
        "seed": cfg.sampling.seed,
        "sample_idx": sample_idx,
    }
    if spec.mode != "chat":
        parts["rollout"] = cfg.rollout.model_dump()
    return parts


def row_key(
    cfg: RunConfig,
    base: BaseSpec,
    cond: Condition,
    spec: EpisodeSpec,
    sample_idx: int,
    adapter: AdapterSource | None,
    sampling: Sampling | None = None,
) -> str:
    """The row's identity: everything that shapes its generation (`sampling`: the row's own,
    by default the run-wide settings for its slice)."""
    return stable_hash(_key_parts(cfg, base, cond, spec, sample_idx, adapter, sampling), 24)


def row_keys(
    cfg: RunConfig,
    base: BaseSpec,
    cond: Condition,
    spec: EpisodeSpec,
    n: int,
    adapter: AdapterSource | None,
    sampling: Sampling | None = None,
) -> list[str]:
    """`row_key` of samples 0..n-1, the same keys at a fraction of the cost: the canonical JSON
    is written once and hashed up to the value of "sample_idx"; each sample hashes only the rest
    (the episode, often kilobytes, is not encoded and hashed n times)."""
    blob = canonical_json(_key_parts(cfg, base, cond, spec, 0, adapter, sampling))
    # keys sort, so the top-level "sample_idx" is the last one (every string escapes its quotes)
    cut = blob.rindex('"sample_idx":0') + len('"sample_idx":')
    head = hashlib.sha256(blob[:cut].encode())
    tail = blob[cut + 1 :].encode()
    keys = []
    for s in range(n):
        h = head.copy()
        h.update(str(s).encode() + tail)
        keys.append(h.hexdigest()[:24])
    return keys


def build_plan(cfg: RunConfig, dry: bool = False) -> Plan:
    """Everything the run will generate, without loading a model.

    `dry`: count PURE-DOVE prompts without downloading the data set (for `--dry-run`).
    """
    specs, bank = build_episodes(cfg, dry)
    rows: list[PlannedRow] = []
    conditions: dict[str, list[Condition]] = {}
    adapters: dict[str, dict[str, AdapterSource]] = {}
    train_stages = cfg.train_stages()
    built = {b.name: build_conditions(cfg, b) for b in cfg.bases}
    _check_size(cfg, specs, [c for conds, _ in built.values() for c in conds], train_stages)
    for base in cfg.bases:
        conds, adp = built[base.name]
        conditions[base.name] = conds
        adapters[base.name] = adp
        for cond in conds:
            src = adp.get(cond.adapter) if cond.adapter else None
            for spec in specs:
                if spec.split == "train" and cond.stage not in train_stages:
                    continue
                sampling = cfg.sampling.to_sampling(spec.slice)
                n = cfg.sampling.n_samples if spec.split == "eval" else 1
                keys = row_keys(cfg, base, cond, spec, n, src, sampling)
                rows.extend(PlannedRow(k, cond, spec, s, src, sampling) for s, k in enumerate(keys))
    return Plan(cfg, rows, conditions, adapters, bank)


# A plan holds every row in memory (a few hundred bytes each, more for long episodes), and a run
# this size takes weeks of GPU time: a config beyond it is a slip (n_samples: 10000), not a study.
MAX_PLAN_ROWS = 2_000_000


def _check_size(
    cfg: RunConfig, specs: list[EpisodeSpec], conds: list[Condition], train_stages: list[str]
) -> None:
    """Count the plan's rows before building them; past MAX_PLAN_ROWS, a ConfigError naming the
    factors (every base's conditions x episodes x samples)."""
    n_eval = sum(s.split == "eval" for s in specs)
    n_train = len(specs) - n_eval
    total = len(conds) * n_eval * cfg.sampling.n_samples
    total += sum(c.stage in train_stages for c in conds) * n_train
    if total > MAX_PLAN_ROWS:
        raise ConfigError(
            f"the plan has {total:,} rows ({len(conds)} conditions over {len(cfg.bases)} "
            f"base(s) x {n_eval} episodes (items x slices) x sampling.n_samples "
            f"{cfg.sampling.n_samples}), more than the {MAX_PLAN_ROWS:,} a run may hold; "
            "lower sampling.n_samples, the personas, the stages or the number of items"
        )


# -- verifying stored rows -------------------------------------------------------------------


def _row_fields(
    base: str, stage: str, persona: str | None, slc: str, item: str, sample: int
) -> dict[str, Any]:
    return {
        "base": base,
        "stage": stage,
        "persona": persona,
        "slice": slc,
        "item_id": item,
        "sample_idx": sample,
    }


def _planned_fields(r: PlannedRow) -> dict[str, Any]:
    c, s = r.condition, r.spec
    return _row_fields(c.base, c.stage, c.persona, s.slice, s.item_id, r.sample_idx)


def row_problems(plan: Plan, rows: Iterable[GenerationRow]) -> dict[str, str]:
    """Key -> why, for each stored row that is not one of `plan`'s: its key is not planned (a
    row of another config, or a key edited), or its key is planned but its own fields (base,
    stage, persona, slice, item, sample) are not the ones its key encodes (a field edited)."""
    planned = {r.key: r for r in plan.rows}
    by_fields = {canonical_json(_planned_fields(r)): r.key for r in plan.rows}
    out: dict[str, str] = {}
    for g in rows:
        own = _row_fields(g.base, g.stage, g.persona, g.slice, g.item_id, g.sample_idx)
        p = planned.get(g.key)
        if p is None:
            twin = by_fields.get(canonical_json(own))
            out[g.key] = (
                f"key {g.key!r:.40} does not recompute from its own fields (the plan's row with "
                f"them has key {twin})"
                if twin
                else f"not a row of the run's plan (key {g.key!r:.40}, {_fields_text(own)})"
            )
            continue
        want = _planned_fields(p)
        diff = [
            f"{k} {own[k]!r:.40} (its key's row: {want[k]!r:.40})" for k in own if own[k] != want[k]
        ]
        if diff:
            out[g.key] = f"key {g.key} does not recompute from its own fields: " + ", ".join(diff)
    return out


def _fields_text(fields: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v!r:.40}" for k, v in fields.items())


# -- shards --------------------------------------------------------------------------------------

Shard = tuple[int, int]  # (index, count), index from 0: the store's convention (RunStore(shard=))


def parse_shard(text: str, what: str = "--shard") -> Shard:
    """`I/N` (shard I of N, counted from 0, as SLURM's `--array=0-7` counts) -> (I, N)."""
    parts = text.strip().split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{what}: expected I/N (shard I of N, 0 <= I < N), got {text!r}")
    i, n = (int(p) for p in parts)
    if not 1 <= n <= MAX_SHARDS:
        raise ValueError(f"{what}: the shard count must be 1..{MAX_SHARDS}, got {n}")
    if i >= n:
        raise ValueError(
            f"{what}: shard index {i} is not in 0..{n - 1} (shards are counted from 0: "
            f"`--array=0-{n - 1}` with `--shard $SLURM_ARRAY_TASK_ID/{n}`)"
        )
    return i, n


def shard_of(item_id: str, n: int) -> int:
    """The shard (0..n-1) of an item, by rendezvous hashing: each shard draws a weight
    sha256(index, item id) and the item goes to the heaviest. It depends on the item id and `n`
    only (never on the other items, the row order or the machine), so all rows of an item (every
    condition, slice and sample) share a shard and bootstrap clusters never span shards. Going
    from n to n + 1 shards moves only the items the new shard wins (about 1 in n + 1)."""
    if n < 1:
        raise ValueError(f"shard count must be >= 1, got {n}")
    best, best_weight = 0, b""
    for i in range(n):
        weight = hashlib.sha256(f"{i}\0{item_id}".encode()).digest()
        if weight > best_weight:
            best, best_weight = i, weight
    return best


def in_shard(item_id: str, shard: Shard | None, cache: dict[str, int] | None = None) -> bool:
    """Whether `item_id` belongs to `shard` (None: the whole run). `cache`: item -> shard."""
    if shard is None:
        return True
    if cache is None:
        return shard_of(item_id, shard[1]) == shard[0]
    if item_id not in cache:
        cache[item_id] = shard_of(item_id, shard[1])
    return cache[item_id] == shard[0]


def select_shard(rows: Iterable[PlannedRow], shard: Shard | None) -> list[PlannedRow]:
    """The rows of `shard`, in plan order (all rows when `shard` is None)."""
    cache: dict[str, int] = {}
    return [r for r in rows if in_shard(r.spec.item_id, shard, cache)]


def shard_sizes(rows: Iterable[PlannedRow], n: int) -> list[int]:
    """Rows per shard when the plan is split `n` ways."""
    cache: dict[str, int] = {}
    sizes = [0] * n
    for r in rows:
        item = r.spec.item_id
        if item not in cache:
            cache[item] = shard_of(item, n)
        sizes[cache[item]] += 1
    return sizes


# -- cost ----------------------------------------------------------------------------------------

# Without a calibration run, a model call is assumed to generate this share of its token budget.
DEFAULT_EXPECTED_FRACTION = 0.5


def max_calls(row: PlannedRow, default_steps: int) -> int:
    """The most model calls a row can make: every chat turn, or a tool episode's step budget."""
    if row.spec.mode == "chat":
        return len(row.spec.user_turns)
    return row.spec.max_steps or default_steps


def assumed_calls(row: PlannedRow, default_steps: int) -> int:
    """A row's model calls without a calibration run: every chat turn; a tool episode makes the
    calls a perfect agent needs (`needed_calls`), within its budget."""
    top = max_calls(row, default_steps)
    if row.spec.mode == "chat":
        return top
    return min(row.spec.needed_calls or top, top)


@dataclass(frozen=True)
class CalibrationCell:
    rows: int
    calls_per_row: float  # mean model calls per row (GenerationRow.n_steps)
    tokens_per_call: float  # mean completion tokens per model call
    budget: int  # the calibration run's token budget per call in this slice


@dataclass(frozen=True)
class Calibration:
    """Measured in an earlier run, per (model, slice)."""

    source: str
    cells: dict[tuple[str, str], CalibrationCell]


def calibrate(
    rows: Iterable[GenerationRow],
    model_of: Mapping[str, str],
    budget_of: Mapping[str, int],
    count_tokens: Callable[[str, str], int],
    source: str,
) -> Calibration:
    """Mean model calls per row and completion tokens per call, per (model, slice), from a run's
    rows. A row's model calls are its last `n_steps` assistant messages; `count_tokens(model,
    text)` counts one reply's tokens (the tokenizer of `model`). `model_of`: base name -> model;
    `budget_of`: slice -> the run's token budget per call."""
    calls: dict[tuple[str, str], list[int]] = {}
    tokens: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.base not in model_of:
            continue
        cell = (model_of[r.base], r.slice)
        replies = [m for m in r.messages if m.get("role") == "assistant"]
        made = replies[len(replies) - r.n_steps :] if r.n_steps else []
        calls.setdefault(cell, []).append(len(made))
        tokens[cell] = tokens.get(cell, 0) + sum(
            count_tokens(cell[0], str(m.get("content") or "")) for m in made
        )
    cells = {}
    for cell, per_row in calls.items():
        n_calls = sum(per_row)
        cells[cell] = CalibrationCell(
            rows=len(per_row),
            calls_per_row=n_calls / len(per_row),
            tokens_per_call=tokens[cell] / n_calls if n_calls else 0.0,
            budget=budget_of.get(cell[1], 0),
        )
    return Calibration(source, cells)


@dataclass(frozen=True)
class CellCost:
    """Generated tokens of one (base, slice) of a plan: an upper bound and an expected value."""

    base: str
    slice: str
    rows: int
    budget: int  # tokens per model call (the slice's max_tokens)
    max_calls: int  # every chat turn; every step of each tool episode's budget
    expected_calls: float
    tokens_per_call: float  # expected completion tokens per call
    basis: str  # "assumed" or "measured"
    # expected prompt tokens sent over the expected calls (`prompt_tokens`: ~4 characters a token)
    prompt_tokens: float = 0.0

    @property
    def max_tokens(self) -> int:
        return self.max_calls * self.budget

    @property
    def expected_tokens(self) -> float:
        return self.expected_calls * self.tokens_per_call


@dataclass(frozen=True)
class Throughput:
    """Generated (output) tokens per second of one engine on one GPU, and where it comes from."""

    tok_per_s: float
    source: str


@dataclass(frozen=True)
class CostEstimate:
    cells: list[CellCost]
    fraction: float
    calibration: str | None = None
    throughput: Throughput | None = None
    shard_share: float | None = None  # the largest shard's share of expected tokens
    n_shards: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def max_tokens(self) -> int:
        return sum(c.max_tokens for c in self.cells)

    @property
    def expected_tokens(self) -> float:
        return sum(c.expected_tokens for c in self.cells)

    def gpu_hours(self, tokens: float) -> float | None:
        """GPU-hours to generate `tokens` at the throughput (None without one)."""
        return tokens / self.throughput.tok_per_s / 3600 if self.throughput else None

    def text(self) -> str:
        return "\n".join(_cost_lines(self))


def estimate_cost(
    plan: Plan,
    rows: list[PlannedRow] | None = None,
    *,
    fraction: float = DEFAULT_EXPECTED_FRACTION,
    calibration: Calibration | None = None,
    throughput: Throughput | None = None,
    n_shards: int | None = None,
) -> CostEstimate:
    """Generated tokens of `rows` (default: the whole plan) per (base, slice): at most every call
    x its budget; expected: calls and tokens per call measured in `calibration` for the base's
    model and the slice where it has them, else every chat turn and the calls a perfect agent
    needs, each generating `fraction` of its budget. GPU-hours at `throughput`."""
    if not 0 < fraction <= 1 or not math.isfinite(fraction):
        raise ValueError(f"--expected-fraction: must be in (0, 1], got {fraction}")
    rows = plan.rows if rows is None else rows
    model_of = {b.name: b.model for b in plan.cfg.bases}
    steps = plan.cfg.rollout.max_steps
    groups: dict[tuple[str, str], list[PlannedRow]] = {}
    for r in rows:
        groups.setdefault((r.condition.base, r.spec.slice), []).append(r)
    cells, notes = [], []
    for (base, sl), grp in groups.items():
        measured = calibration.cells.get((model_of[base], sl)) if calibration else None
        native = plan.cfg.rollout.tool_protocol == "native"
        cell = _cell_cost(base, sl, grp, steps, fraction, measured, native)
        if measured and measured.budget and measured.budget < cell.budget:
            notes.append(
                f"{base} / {sl}: measured at a budget of {measured.budget} tokens per call, "
                f"below this run's {cell.budget}: its expected tokens are a lower bound"
            )
        cells.append(cell)
    share = _largest_shard_share(cells, rows, steps, n_shards) if n_shards else None
    return CostEstimate(
        cells,
        fraction,
        calibration.source if calibration else None,
        throughput,
        share,
        n_shards,
        notes,
    )


CHARS_PER_TOKEN = 4.0  # the prompt estimate's rule of thumb (no tokenizer is loaded to plan)


def first_prompt_chars(row: PlannedRow, native_tools: bool = False) -> int:
    """Characters of a row's first request: its system message (persona prompt and the slice's
    system, `formats.compose_system`, which holds a tool slice's tool descriptions), pre-written
    context and first user turn; with `native_tools` the tool schemas sent beside them."""
    from charshift.formats import compose_system

    system = compose_system(row.condition.system_prompt, row.spec.system) or ""
    context = sum(len(str(m.get("content") or "")) for m in row.spec.context)
    tools = len(json.dumps(row.spec.tools)) if native_tools and row.spec.tools else 0
    return len(system) + context + len(row.spec.user_turns[0]) + tools


def prompt_tokens(
    row: PlannedRow, calls: float, reply_tokens: float, native_tools: bool = False
) -> float:
    """Prompt tokens a row sends over `calls` calls: each call resends the first request and
    everything since (the replies at `reply_tokens` each, the later user turns of a chat);
    characters / `CHARS_PER_TOKEN`. A tool loop's tool results are not counted (a lower bound
    there), and prefix caching or KV reuse computes fewer than are sent."""
    first = first_prompt_chars(row, native_tools) / CHARS_PER_TOKEN
    later = [len(t) / CHARS_PER_TOKEN for t in row.spec.user_turns[1:]]
    grown = reply_tokens + (sum(later) / len(later) if later else 0.0)
    return calls * first + calls * (calls - 1) / 2 * grown


def _cell_cost(
    base: str,
    slice_: str,
    rows: list[PlannedRow],
    steps: int,
    fraction: float,
    measured: CalibrationCell | None,
    native: bool = False,
) -> CellCost:
    budget = max(r.sampling.max_tokens for r in rows)
    top = sum(max_calls(r, steps) for r in rows)
    if measured is None:
        calls = [float(assumed_calls(r, steps)) for r in rows]
        per_call, basis = fraction * budget, "assumed"
    else:
        calls = [min(measured.calls_per_row, float(max_calls(r, steps))) for r in rows]
        per_call, basis = min(measured.tokens_per_call, float(budget)), "measured"
    prompt = sum(prompt_tokens(r, c, per_call, native) for r, c in zip(rows, calls, strict=True))
    per_row = measured.calls_per_row * len(rows) if measured else sum(calls)
    expected_calls = min(per_row, float(top))
    return CellCost(base, slice_, len(rows), budget, top, expected_calls, per_call, basis, prompt)


def _largest_shard_share(
    cells: list[CellCost], rows: list[PlannedRow], steps: int, n: int
) -> float:
    """The largest shard's share of the expected tokens (each row weighted by its cell's
    expected tokens per row)."""
    per_row = {(c.base, c.slice): c.expected_tokens / c.rows for c in cells if c.rows}
    load = [0.0] * n
    cache: dict[str, int] = {}
    for r in rows:
        item = r.spec.item_id
        if item not in cache:
            cache[item] = shard_of(item, n)
        load[cache[item]] += per_row.get((r.condition.base, r.spec.slice), 0.0)
    total = sum(load)
    return max(load) / total if total else 1.0 / n


def _tokens(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _hours(h: float | None) -> str:
    if h is None:
        return "?"
    return f"{h:.0f}" if h >= 100 else f"{h:.1f}" if h >= 1 else f"{h:.2g}"


def _cost_lines(est: CostEstimate) -> list[str]:
    head = f"  {'base':<10} {'slice':<26} {'rows':>7} {'budget':>6} {'calls<=':>8} {'tokens<=':>9}"
    head += f" {'calls~':>9} {'tok/call~':>9} {'tokens~':>9} {'prompt~':>9}  basis"
    lines = ["cost estimate: generated tokens, and prompt tokens sent (scoring not counted)", head]
    for c in est.cells:
        lines.append(
            f"  {c.base:<10} {c.slice:<26} {c.rows:>7} {c.budget:>6} {c.max_calls:>8} "
            f"{_tokens(c.max_tokens):>9} {c.expected_calls:>9.0f} {c.tokens_per_call:>9.1f} "
            f"{_tokens(c.expected_tokens):>9} {_tokens(c.prompt_tokens):>9}  {c.basis}"
        )
    rows = sum(c.rows for c in est.cells)
    calls = sum(c.max_calls for c in est.cells)
    lines.append(
        f"  {'total':<37} {rows:>7} {'':>6} {calls:>8} {_tokens(est.max_tokens):>9} "
        f"{sum(c.expected_calls for c in est.cells):>9.0f} {'':>9} "
        f"{_tokens(est.expected_tokens):>9} "
        f"{_tokens(sum(c.prompt_tokens for c in est.cells)):>9}"
    )
    lines += _cost_basis_lines(est)
    lines += [f"note: {n}" for n in est.notes]
    return lines + _gpu_hour_lines(est)


def _cost_basis_lines(est: CostEstimate) -> list[str]:
    out = [
        "<= upper bound: every chat turn and every step of each tool episode's budget, each "
        "call generating its whole budget (sampling.max_tokens / max_tokens_by_slice)."
    ]
    if any(c.basis == "assumed" for c in est.cells):
        out.append(
            f"~ assumed (basis 'assumed'): every chat turn, the calls a perfect agent needs per "
            f"tool episode, each call generating {est.fraction:g} of its budget "
            "(--expected-fraction; or measure with --calibrate-from RUN_DIR)."
        )
    out.append(
        "prompt~: prompt tokens sent over the expected calls, each call resending the first "
        "request (system, persona prompt, context, tool descriptions) and every turn since, at "
        f"~{CHARS_PER_TOKEN:g} characters a token; a tool loop's tool results are not counted "
        "(a lower bound there), and prefix caching or KV reuse computes fewer than are sent."
    )
    if est.calibration:
        out.append(
            f"~ measured (basis 'measured'): mean calls per row and completion tokens per call "
            f"of the same model and slice in {est.calibration} (replies re-tokenized with the "
            "model's tokenizer), capped at this run's budgets."
        )
    return out


def _gpu_hour_lines(est: CostEstimate) -> list[str]:
    if est.throughput is None:
        return [
            "GPU-hours: give --throughput TOK_PER_S, or --throughput-from FILE (the JSON "
            "scripts/bench_gpu.py or scripts/bench_hf.py write with --json FILE)."
        ]
    t = est.throughput
    hi, mid = est.gpu_hours(est.max_tokens), est.gpu_hours(est.expected_tokens)
    out = [
        f"GPU-hours at {t.tok_per_s:g} output tok/s ({t.source}): at most {_hours(hi)}, "
        f"expected {_hours(mid)} (one engine per GPU; long agentic prompts make real throughput "
        "lower than a benchmark's short prompts)."
    ]
    if est.n_shards and est.shard_share is not None and mid is not None:
        out.append(
            f"over {est.n_shards} shards, one GPU each: the largest shard holds "
            f"{est.shard_share:.1%} of the expected tokens, so about "
            f"{_hours(mid * est.shard_share)} h of wall time (expected)."
        )
    return out


def run_engine(cfg: RunConfig) -> str | None:
    """The engine a run generates with, as benchmark files name it (`hf`, `vllm`, `sglang`);
    None for a server of the user's own (`openai`, `engine: command`)."""
    backend = cfg.backend
    if backend.kind in ("hf", "vllm"):
        return backend.kind
    engine = getattr(backend, "engine", None)
    return engine if backend.kind == "server" and engine in ("vllm", "sglang") else None


def throughput_from_json(
    data: Any, source: str, path: str | None = None, engine: str | None = None
) -> Throughput:
    """The throughput in a benchmark's JSON: `{"tok_per_s": X}`, or `{"paths": {NAME: X or
    {"tok_per_s": X, ...}, ...}, "engines": {ENGINE: PATH, ...}}` (what scripts/bench_gpu.py and
    bench_hf.py write with --json: one entry per measured path such as `hf-mixed` or
    `vllm-mixed`, and per engine the path a run of that engine is planned with). `path`
    (`--throughput-path`) picks a path; else the run's `engine` picks its own figure."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if "tok_per_s" in data and path is None:
        return Throughput(_rate(data["tok_per_s"], f"{source}: tok_per_s"), source)
    paths = data.get("paths")
    if not isinstance(paths, dict) or not paths:
        raise ValueError(f'{source}: no "tok_per_s" and no "paths" object of measured paths')
    engines = data.get("engines") if isinstance(data.get("engines"), dict) else {}
    if path is None and engine in engines:
        path = str(engines[engine])
    if path is None:
        if len(paths) > 1:
            measured = f" (figures for {', '.join(map(str, engines))})" if engines else ""
            raise ValueError(
                f"{source} measured several paths ({', '.join(map(str, paths))}) and none for "
                f"this run's engine ({engine or 'a server of your own'}){measured}: name the "
                "path that matches it with --throughput-path NAME"
            )
        path = next(iter(paths))
    if path not in paths:
        raise ValueError(
            f"--throughput-path: {path!r} is not in {source} (has {', '.join(map(str, paths))})"
        )
    entry = paths[path]
    value = entry.get("tok_per_s") if isinstance(entry, dict) else entry
    where = f"{source}: paths.{path}.tok_per_s"
    device = data.get("device")
    return Throughput(
        _rate(value, where), f"{source}, path {path}" + (f", {device}" if device else "")
    )


def _rate(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: expected a number of tokens per second, got {value!r:.40}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: must be a positive number, got {value}")
    return float(value)
