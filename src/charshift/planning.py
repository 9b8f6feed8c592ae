"""Planning: a run config -> every row the run will generate, without loading any model.

Pure (apart from reading the shipped prompt, persona and scenario files): conditions (base, stage,
persona, adapter, persona prompt), rendered episodes (one per item and slice), row keys, and the
plan summary that `--dry-run` prints. Every step of the pipeline starts from `build_plan`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from charshift import formats, prompts, scenarios
from charshift.backends.base import AdapterSource
from charshift.config import ID_SLICES, SCENARIO_SLICES, BaseSpec, RunConfig
from charshift.rollout import step_budget
from charshift.schema import (
    BASE_STAGE,
    PROMPTED_EXPLICIT_STAGE,
    PROMPTED_STAGE,
    Condition,
    EpisodeSpec,
    Sampling,
    stable_hash,
)


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
    scenario_bank: dict[str, Any]

    def rows_for(self, base: str) -> list[PlannedRow]:
        return [r for r in self.rows if r.condition.base == base]

    def summary(self) -> str:
        cfg = self.cfg
        lines = [f"run {cfg.name!r}: {len(cfg.bases)} base(s), stages {cfg.stages}"]
        lines.append(f"personas ({len(cfg.personas)}): {', '.join(cfg.personas)}")
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
        calls = 0
        for (sl, split), n in sorted(per_slice.items()):
            lines.append(f"  {sl:<22} {split:<5} {n:>7}")
        for r in self.rows:
            if r.spec.mode == "chat":
                calls += len(r.spec.user_turns)
            else:
                calls += r.spec.max_steps or cfg.rollout.max_steps
        lines.append(f"generations in all: {len(self.rows)} rows, at most {calls} model calls")
        return "\n".join(lines)


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
        for p in cfg.personas:
            if stage in (PROMPTED_STAGE, PROMPTED_EXPLICIT_STAGE):
                sp = prompts.persona_system_prompt(
                    p,
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
    specs: list[EpisodeSpec] = []
    bank: dict[str, Any] = {}
    id_slices = [s for s in cfg.slices if s in ID_SLICES]
    if id_slices:
        if dry and cfg.id_prompts.source == "pure_dove":
            train, evalp = _placeholder_prompts(cfg)
        else:
            train, evalp = prompts.select_id_prompts(cfg.id_prompts)
        if cfg.classifier_training is not None and "id_chat" in id_slices:
            for i, p in enumerate(train):
                specs.append(formats.render_id("id_chat", p, i))
        for sl in id_slices:
            for i, p in enumerate(evalp):
                specs.append(formats.render_id(sl, p, i, cfg.id_prompts.break_suffixes))
    scenario_slices = [s for s in cfg.slices if s in SCENARIO_SLICES]
    if scenario_slices:
        chosen = scenarios.select_scenarios(
            scenarios.load_bank(), ids=cfg.scenarios.ids, n=cfg.scenarios.n, seed=cfg.scenarios.seed
        )
        native = cfg.rollout.tool_protocol == "native"
        for sc in chosen:
            bank[sc.id] = sc
            for sl in scenario_slices:
                spec = formats.render_scenario(sl, sc, native_tools=native)
                specs.append(with_step_budget(cfg, spec))
    return specs, bank


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
    return stable_hash(parts, 24)


def build_plan(cfg: RunConfig, dry: bool = False) -> Plan:
    """Everything the run will generate, without loading a model.

    `dry`: count PURE-DOVE prompts without downloading the data set (for `--dry-run`).
    """
    specs, bank = build_episodes(cfg, dry)
    rows: list[PlannedRow] = []
    conditions: dict[str, list[Condition]] = {}
    adapters: dict[str, dict[str, AdapterSource]] = {}
    train_stage = cfg.classifier_training.stage if cfg.classifier_training else None
    for base in cfg.bases:
        conds, adp = build_conditions(cfg, base)
        conditions[base.name] = conds
        adapters[base.name] = adp
        for cond in conds:
            src = adp.get(cond.adapter) if cond.adapter else None
            for spec in specs:
                if spec.split == "train" and cond.stage != train_stage:
                    continue
                sampling = cfg.sampling.to_sampling(spec.slice)
                for s in range(cfg.sampling.n_samples if spec.split == "eval" else 1):
                    key = row_key(cfg, base, cond, spec, s, src, sampling)
                    rows.append(PlannedRow(key, cond, spec, s, src, sampling))
    return Plan(cfg, rows, conditions, adapters, bank)
