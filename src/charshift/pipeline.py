"""generate -> (train classifier) -> score -> report, resumable, over one run directory.

`build_plan` turns a config into the full list of rows (condition x episode x sample) without
loading any model; every step then does only what the store does not hold yet.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from charshift import formats, prompts, scenarios
from charshift.backends.base import AdapterSource, Backend
from charshift.config import (
    EMAIL_SLICES,
    ID_SLICES,
    BaseSpec,
    RunConfig,
    config_to_dict,
    parse_config,
)
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import (
    BASE_STAGE,
    PROMPTED_STAGE,
    Condition,
    EpisodeSpec,
    PredictionRecord,
    ScoreRow,
    stable_hash,
)
from charshift.store import RunStore

NULL_PERSONA = "__null__"


def cache_dir() -> Path:
    """The cache of built and converted models (`$CHARSHIFT_CACHE`, see models.default_cache_dir)."""
    from charshift.models import default_cache_dir

    return default_cache_dir()


@dataclass
class PlannedRow:
    key: str
    condition: Condition
    spec: EpisodeSpec
    sample_idx: int
    adapter: AdapterSource | None


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
            if r.spec.mode == "agentic":
                calls += cfg.rollout.max_steps
            else:
                calls += len(r.spec.user_turns)
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
            if stage == PROMPTED_STAGE:
                sp = prompts.persona_system_prompt(
                    p, cfg.persona_prompts.source, cfg.persona_prompts.path
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
    email_slices = [s for s in cfg.slices if s in EMAIL_SLICES]
    if email_slices:
        chosen = scenarios.select_scenarios(
            scenarios.load_bank(), ids=cfg.scenarios.ids, n=cfg.scenarios.n, seed=cfg.scenarios.seed
        )
        native = cfg.rollout.tool_protocol == "native"
        for sc in chosen:
            bank[sc.id] = sc
            for sl in email_slices:
                specs.append(formats.render_email(sl, sc, native_tools=native))
    return specs, bank


def row_key(
    cfg: RunConfig,
    base: BaseSpec,
    cond: Condition,
    spec: EpisodeSpec,
    sample_idx: int,
    adapter: AdapterSource | None,
) -> str:
    parts: dict[str, Any] = {
        "model": base.model,
        "revision": base.revision,
        "stage": cond.stage,
        "persona": cond.persona,
        "adapter": adapter.__dict__ if adapter else None,
        "system_prompt": cond.system_prompt,
        "episode": spec.to_dict(),
        "sampling": cfg.sampling.to_sampling().to_dict(),
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
                for s in range(cfg.sampling.n_samples if spec.split == "eval" else 1):
                    key = row_key(cfg, base, cond, spec, s, src)
                    rows.append(PlannedRow(key, cond, spec, s, src))
    return Plan(cfg, rows, conditions, adapters, bank)


# -- backends ------------------------------------------------------------------------------------


def make_backend(cfg: RunConfig, base: BaseSpec) -> Backend:
    b = cfg.backend
    if b.kind == "hf":
        from charshift.backends.hf import HFBackend

        return HFBackend(
            base.model,
            revision=base.revision,
            device=b.device,
            dtype=b.dtype,
            batch_size=b.batch_size,
            cache_dir=cache_dir(),
            max_batch_tokens=b.max_batch_tokens,
            kv_cache_mb=b.kv_cache_mb,
        )
    if b.kind == "openai":
        from charshift.backends.openai import OpenAIBackend

        if not b.base_url:
            raise ValueError("backend.base_url: required for the openai backend")
        return OpenAIBackend(
            b.base_url,
            base.model,
            api_key=os.environ.get(b.api_key_env),
            max_concurrency=b.max_concurrency,
        )
    from charshift.backends.vllm import VLLMBackend

    return VLLMBackend(
        base.model,
        revision=base.revision,
        max_model_len=b.max_model_len,
        gpu_memory_utilization=b.gpu_memory_utilization,
        max_lora_rank=b.max_lora_rank,
        dtype=b.dtype,
    )


# -- steps ---------------------------------------------------------------------------------------


def prepare_run(cfg: RunConfig, out: Path) -> RunStore:
    store = RunStore(out)
    store.write_config(config_to_dict(cfg))
    store.update_manifest(seeds={"sampling": cfg.sampling.seed, "stats": cfg.stats.seed})
    return store


def load_run_config(store: RunStore) -> RunConfig:
    return parse_config(store.read_config(), str(store.config_path))


def generate(cfg: RunConfig, store: RunStore, wave_size: int | None = None) -> dict[str, Any]:
    """Generate every planned row the store does not hold yet. Returns counts."""
    plan = build_plan(cfg)
    wave = wave_size or max(cfg.backend.batch_size * 8, 64)
    summary: dict[str, Any] = {"planned": len(plan.rows), "done_before": 0, "generated": 0}
    skipped = dict(store.manifest().get("skipped_adapters", {}))
    settings = RolloutSettings(
        max_steps=cfg.rollout.max_steps,
        max_malformed=cfg.rollout.max_malformed,
        stop_on_send=cfg.rollout.stop_on_send,
        native_tools=cfg.rollout.tool_protocol == "native",
    )
    sampling = cfg.sampling.to_sampling()
    for base in cfg.bases:
        todo = [r for r in plan.rows_for(base.name) if r.key not in store.generations]
        summary["done_before"] += len(plan.rows_for(base.name)) - len(todo)
        if not todo:
            continue
        store.log_event("generate_start", base=base.name, rows=len(todo))
        backend = make_backend(cfg, base)
        needed = sorted({r.adapter.name for r in todo if r.adapter}, key=str)
        sources = _materialise_tiny_adapters(base, [plan.adapters[base.name][n] for n in needed])
        failed = backend.load_adapters(sources)
        for name, msg in failed.items():
            skipped[f"{base.name}/{name}"] = msg
            tqdm.write(f"[charshift] skipping adapter {base.name}/{name}: {msg}")
        info = backend.info()
        store.update_manifest(backends={base.name: info.__dict__}, skipped_adapters=skipped or {})
        todo = [r for r in todo if not (r.adapter and r.adapter.name in failed)]
        engine = RolloutEngine(backend, settings, formats.REQUIRED_ARGS)
        bar = tqdm(total=len(todo), desc=f"generate {base.name}", unit="row", dynamic_ncols=True)
        for start in range(0, len(todo), wave):
            chunk = todo[start : start + wave]
            episodes = [
                Episode(
                    key=r.key,
                    spec=r.spec,
                    condition=r.condition,
                    sample_idx=r.sample_idx,
                    run_seed=cfg.sampling.seed,
                    sampling=sampling,
                    simulator=_simulator(plan, r.spec),
                )
                for r in chunk
            ]
            for finished in engine.run(episodes):
                n = store.generations.append(row.to_dict() for row in finished)
                summary["generated"] += n
                bar.update(len(finished))
        bar.close()
        backend.close()
        store.log_event("generate_end", base=base.name)
    return summary


def _materialise_tiny_adapters(base: BaseSpec, sources: list[AdapterSource]) -> list[AdapterSource]:
    """`path: tiny-lora:NAME` (smoke preset) -> a random-init LoRA for the tiny base, built once."""
    out = []
    for src in sources:
        if src.path and src.path.startswith("tiny-lora:"):
            from charshift import models, tiny

            tag = src.path.split(":", 1)[1]
            model_dir = Path(models.resolve_model(base.model, cache_dir()).path)
            folder = cache_dir() / "tiny-lora" / stable_hash([base.model, tag], 12)
            if not (folder / "adapter_config.json").exists():
                tiny.build_tiny_lora(model_dir, folder, seed=int(stable_hash(tag, 6), 16))
            src = AdapterSource(name=src.name, path=str(folder))
        out.append(src)
    return out


def _simulator(plan: Plan, spec: EpisodeSpec) -> Any:
    if spec.mode == "chat" or spec.scenario_id is None:
        return None
    from charshift.toolsim import ToolSimulator

    return ToolSimulator(plan.scenario_bank[spec.scenario_id])


def classifier_dir(store: RunStore, base: str) -> Path:
    return store.root / "classifier" / base


def train_run_classifier(cfg: RunConfig, store: RunStore, base: BaseSpec, out: Path) -> Any:
    """Fine-tune the configured encoder on this run's ID training generations for `base`."""
    from charshift.classifier import train_classifier

    tc = cfg.classifier_training
    if tc is None:
        raise ValueError("the config has no classifier_training section")
    rows = [
        r
        for r in store.generations
        if r["base"] == base.name
        and r["slice"] == "id_chat"
        and r["split"] == "train"
        and r["stage"] == tc.stage
        and r["text"]
    ]
    if not rows:
        raise ValueError(
            f"no ID training generations for base {base.name} stage {tc.stage}: run `generate` first"
        )
    rows.sort(key=lambda r: r["key"])
    encoder = tc.encoder
    report = train_classifier(
        [r["text"] for r in rows],
        [r["persona"] for r in rows],
        [r["item_id"] for r in rows],
        label_names=list(cfg.personas),
        encoder=encoder,
        out_dir=out,
        epochs=tc.epochs,
        lr=tc.lr,
        batch_size=tc.batch_size,
        grad_accum=tc.grad_accum,
        warmup_ratio=tc.warmup_ratio,
        weight_decay=tc.weight_decay,
        max_length=tc.max_length,
        heldout_fraction=tc.heldout_fraction,
        seed=tc.seed,
    )
    return report


def classifier_source(cfg: RunConfig, store: RunStore, base: BaseSpec) -> str:
    if base.classifier:
        return base.classifier
    return str(classifier_dir(store, base.name))


def ensure_classifiers(cfg: RunConfig, store: RunStore) -> None:
    for base in cfg.bases:
        if base.classifier:
            continue
        out = classifier_dir(store, base.name)
        if (out / "train_report.json").exists():
            continue
        store.log_event("train_classifier_start", base=base.name)
        rep = train_run_classifier(cfg, store, base, out)
        store.update_manifest(trained_classifiers={base.name: rep.to_dict()})
        store.log_event("train_classifier_end", base=base.name)


def score(cfg: RunConfig, store: RunStore) -> dict[str, int]:
    """Classify every eval row that has an output and no score from its base's classifier yet."""
    from charshift.classifier import Classifier

    text_field = "text" if cfg.scoring.text == "extracted" else "final_reply"
    counts = {"scored": 0, "already": 0}
    for base in cfg.bases:
        src = classifier_source(cfg, store, base)
        rows = [
            r
            for r in store.generations
            if r["base"] == base.name and r["split"] == "eval" and r.get(text_field)
        ]
        if not rows:
            continue
        clf = Classifier.load(src, cache_dir=cache_dir())
        clf.check_personas(list(cfg.personas))
        cid = classifier_id(clf)
        store.update_manifest(
            classifiers={base.name: clf.identity}, classifier_ids={base.name: cid}
        )
        todo = [r for r in rows if (r["key"], cid) not in store.scores]
        counts["already"] += len(rows) - len(todo)
        if not todo:
            continue
        chunk = max(cfg.scoring.batch_size * 16, 64)
        bar = tqdm(total=len(todo), desc=f"score {base.name}", unit="row", dynamic_ncols=True)
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            preds = clf.predict(
                [r[text_field] for r in part],
                batch_size=cfg.scoring.batch_size,
                max_length=cfg.scoring.max_length,
            )
            store.scores.append(
                ScoreRow(r["key"], cid, text_field, lab, probs).to_dict()
                for r, (lab, probs) in zip(part, preds, strict=True)
            )
            counts["scored"] += len(part)
            bar.update(len(part))
        bar.close()
    return counts


def classifier_id(clf: Any) -> str:
    return stable_hash(clf.identity, 12)


def prediction_records(cfg: RunConfig, store: RunStore) -> list[PredictionRecord]:
    """Join generations and scores into the records the statistics read (base rows as null)."""
    text_field = "text" if cfg.scoring.text == "extracted" else "final_reply"
    cids: dict[str, str] = store.manifest().get("classifier_ids", {})
    out: list[PredictionRecord] = []
    for r in store.generations:
        if r["split"] != "eval" or r["base"] not in cids:
            continue
        sc = store.scores.get((r["key"], cids[r["base"]])) if r.get(text_field) else None
        if r.get(text_field) and sc is None:
            continue  # not scored yet
        out.append(
            PredictionRecord(
                base=r["base"],
                stage=r["stage"],
                slice=r["slice"],
                persona=r["persona"] or NULL_PERSONA,
                item_id=r["item_id"],
                prediction=sc["prediction"] if sc else None,
                sample_idx=r["sample_idx"],
                probs=sc["probs"] if sc else None,
                outcome=r["outcome"],
                text=r.get(text_field),
                key=r["key"],
            )
        )
    return out


def report(cfg: RunConfig, store: RunStore, out_dir: Path | None = None) -> Path:
    from charshift import report as report_mod
    from charshift import stats

    records = prediction_records(cfg, store)
    if not records:
        raise ValueError(f"{store.root}: nothing scored yet; run `charshift score` first")
    personas = list(cfg.personas)
    expanded = stats.expand_base_null(records, personas)
    result = stats.compute_metrics(
        expanded,
        personas,
        n_boot=cfg.stats.n_boot,
        ci=cfg.stats.ci,
        method=cfg.stats.method,
        seed=cfg.stats.seed,
    )
    out = Path(out_dir) if out_dir else store.root
    stats.write_tables(result, out)
    gens = {r["key"]: r for r in store.generations}
    samples = []
    for rec in records:
        g = gens.get(rec.key or "")
        if g is None:
            continue
        samples.append(
            {
                "key": rec.key,
                "base": rec.base,
                "stage": rec.stage,
                "persona": g["persona"] or "(base: none)",
                "slice": rec.slice,
                "item_id": rec.item_id,
                "sample_idx": rec.sample_idx,
                "outcome": rec.outcome,
                "messages": g["messages"],
                "text": rec.text,
                "email": g.get("email"),
                "prediction": rec.prediction,
                "probs": rec.probs,
                "tool_log": g.get("tool_log", []),
            }
        )
    notes = []
    skipped = store.manifest().get("skipped_adapters") or {}
    for name, msg in skipped.items():
        notes.append(f"Skipped adapter {name}: {msg}")
    path = report_mod.write_report(
        out,
        expanded,
        result,
        settings={"config": config_to_dict(cfg), "manifest": store.manifest()},
        samples=samples,
        title=f"charshift report: {cfg.name}",
        meaningless=cfg.meaningless,
        published=cfg.published,
        notes=notes,
    )
    store.log_event("report", path=str(path))
    return path


def preflight(cfg: RunConfig) -> None:
    """Cheap checks before any generation: every given classifier knows every persona."""
    from charshift.classifier import Classifier

    for base in cfg.bases:
        if base.classifier:
            Classifier.load(base.classifier, cache_dir=cache_dir()).check_personas(cfg.personas)


def run_all(cfg: RunConfig, out: Path) -> Path:
    t0 = time.time()
    build_plan(cfg)  # scenario, prompt and persona files are validated here
    preflight(cfg)
    store = prepare_run(cfg, out)
    store.log_event("run_start")
    generate(cfg, store)
    ensure_classifiers(cfg, store)
    score(cfg, store)
    path = report(cfg, store)
    store.log_event("run_end", seconds=round(time.time() - t0, 1))
    return path
