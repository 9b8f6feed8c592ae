"""The steps of a run over one run directory: generate -> (train classifier) -> score -> report.

Each step does only what the store does not hold yet, so re-running a command resumes it.
What to generate comes from `planning.build_plan` (pure); the analysis tail (records -> statistics
-> tables, plots, report) is `analysis`, shared with `charshift report --predictions`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from charshift import tools, units
from charshift.adapter_probe import probe_adapters, require_applied
from charshift.backends.base import AdapterSource, Backend
from charshift.config import BackendConfig, BaseSpec, RunConfig, config_to_dict, parse_config
from charshift.planning import Plan, PlannedRow, Shard, build_plan, in_shard, select_shard
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import EpisodeSpec, GenerationRow, ScoreRow, stable_hash
from charshift.scoring.base import (
    ScoreInput,
    Scorer,
    ScorerContext,
    UnitSource,
    open_scorers,
    scorer_name,
    verdicts_of,
)
from charshift.store import RunStore


def cache_dir() -> Path:
    """The cache of built and converted models (`$CHARSHIFT_CACHE`, see models.default_cache_dir)."""
    from charshift.models import default_cache_dir

    return default_cache_dir()


# -- backends ------------------------------------------------------------------------------------


def make_backend(cfg: RunConfig, base: BaseSpec, run_dir: Path | None = None) -> Backend:
    """The run's backend (`cfg.backend`) for `base`."""
    return backend_for(cfg.backend, base, run_dir, seed=cfg.sampling.seed)


def backend_for(
    b: BackendConfig, base: BaseSpec, run_dir: Path | None = None, seed: int = 0
) -> Backend:
    """A backend of settings `b` for the model of `base` (a run's own backend, or a judge's);
    a managed server logs to `server-<base name>.log` in `run_dir` and is seeded with `seed`."""
    if b.kind == "server":
        return _server_backend(b, base, run_dir, seed)
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
            max_in_flight=b.max_in_flight,
            adapter_syntax=b.adapter_syntax,
        )
    from charshift.backends.vllm import VLLMBackend

    return VLLMBackend(
        base.model,
        revision=base.revision,
        max_model_len=b.max_model_len,
        gpu_memory_utilization=b.gpu_memory_utilization,
        max_lora_rank=b.max_lora_rank,
        max_loras=b.max_loras,
        max_cpu_loras=b.max_cpu_loras,
        dtype=b.dtype,
    )


def _server_backend(b: BackendConfig, base: BaseSpec, run_dir: Path | None, seed: int) -> Backend:
    """`kind: server`: the engine charshift starts with the base's adapters (backends/server.py)."""
    from charshift.backends.server import ServerBackend
    from charshift.models import resolve_model

    assert b.engine is not None  # BackendConfig checked it
    return ServerBackend(
        resolve_model(base.model, cache_dir(), revision=base.revision).path,
        engine=b.engine,
        command=b.command,
        host=b.host,
        port=b.port,
        startup_timeout=b.startup_timeout,
        extra_args=b.extra_args,
        log_path=(run_dir or Path.cwd()) / f"server-{base.name}.log",
        seed=seed,
        revision=base.revision,
        max_model_len=b.max_model_len,
        gpu_memory_utilization=b.gpu_memory_utilization,
        dtype=b.dtype,
        max_lora_rank=b.max_lora_rank,
        max_loras=b.max_loras,
        max_cpu_loras=b.max_cpu_loras,
        deterministic=b.deterministic,
        adapter_syntax=b.adapter_syntax,
        api_key=os.environ.get(b.api_key_env),
        max_concurrency=b.max_concurrency,
        max_in_flight=b.max_in_flight,
    )


# -- steps ---------------------------------------------------------------------------------------


def prepare_run(cfg: RunConfig, out: Path, shard: Shard | None = None) -> RunStore:
    """Open `out` for writing (takes the run's writer lock, or `shard`'s; close the store, or
    use it as a context manager, to release it) and record the config."""
    store = RunStore(out, shard=shard)
    try:
        store.write_config(
            config_to_dict(cfg),
            planned_keys=lambda: {r.key for r in build_plan(cfg).rows},
            normalise=lambda d: config_to_dict(parse_config(d)),
        )
        store.update_manifest(seeds={"sampling": cfg.sampling.seed, "stats": cfg.stats.seed})
    except BaseException:
        store.close()
        raise
    return store


def load_run_config(store: RunStore) -> RunConfig:
    return parse_config(store.read_config(), str(store.config_path))


def rollout_settings(cfg: RunConfig) -> RolloutSettings:
    return RolloutSettings(
        max_steps=cfg.rollout.max_steps,
        step_margin=cfg.rollout.step_margin,
        max_malformed=cfg.rollout.max_malformed,
        stop_on_send=cfg.rollout.stop_on_send,
        native_tools=cfg.rollout.tool_protocol == "native",
        constrained=cfg.rollout.tool_protocol == "constrained",
    )


def generate(cfg: RunConfig, store: RunStore, wave_size: int | None = None) -> dict[str, Any]:
    """Generate every planned row (of the store's shard, if it has one) the store does not hold
    yet. Returns counts."""
    plan = build_plan(cfg)
    wave = wave_size or max(cfg.backend.batch_size * 8, 64)
    mine = select_shard(plan.rows, store.shard)
    summary: dict[str, Any] = {"planned": len(mine), "done_before": 0, "generated": 0}
    for base in cfg.bases:
        rows = [r for r in mine if r.condition.base == base.name]
        todo = [r for r in rows if r.key not in store.generations]
        summary["done_before"] += len(rows) - len(todo)
        if todo:
            summary["generated"] += _generate_base(cfg, store, plan, base, todo, wave)
    return summary


def _generate_base(
    cfg: RunConfig,
    store: RunStore,
    plan: Plan,
    base: BaseSpec,
    todo: list[PlannedRow],
    wave: int,
) -> int:
    """Generate `todo` (rows of one base) with one backend; returns the rows written."""
    store.log_event("generate_start", base=base.name, rows=len(todo))
    backend = make_backend(cfg, base, store.root)
    try:
        failed = _load_adapters(store, plan, base, backend, todo)
        todo = [r for r in todo if not (r.adapter and r.adapter.name in failed)]
        engine = RolloutEngine(backend, rollout_settings(cfg), tools.required_args())
        written = 0
        bar = tqdm(total=len(todo), desc=f"generate {base.name}", unit="row", dynamic_ncols=True)
        calls = tqdm(desc="  model calls", unit="call", dynamic_ncols=True, leave=False)
        for finished in _drive(cfg, plan, engine, todo, wave, calls):
            written += store.generations.append(finished)
            bar.update(len(finished))
        calls.close()
        bar.close()
    finally:
        backend.close()
    store.log_event("generate_end", base=base.name)
    return written


def _drive(
    cfg: RunConfig,
    plan: Plan,
    engine: RolloutEngine,
    todo: list[PlannedRow],
    wave: int,
    calls: Any = None,
) -> Iterator[list[GenerationRow]]:
    """Finished rows as they come: streaming on a server (no step barrier, episodes started
    lazily), else lockstep in waves of `wave` rows (`calls` counts the model calls of a step
    as they finish)."""
    if engine.backend.async_capable:
        yield from engine.run_streaming(
            _episodes(cfg, plan, todo), max_in_flight=cfg.backend.max_in_flight
        )
        return
    for start in range(0, len(todo), wave):
        yield from engine.run(
            list(_episodes(cfg, plan, todo[start : start + wave])), progress=calls
        )


def _load_adapters(
    store: RunStore, plan: Plan, base: BaseSpec, backend: Backend, todo: list[PlannedRow]
) -> dict[str, str]:
    """Load the adapters `todo` needs; record provenance and skipped adapters in the manifest."""
    skipped = store.recorded("skipped_adapters")
    needed = sorted({r.adapter.name for r in todo if r.adapter}, key=str)
    sources = materialise_tiny_adapters(base, [plan.adapters[base.name][n] for n in needed])
    failed = backend.load_adapters(sources)
    for name, msg in failed.items():
        skipped[f"{base.name}/{name}"] = msg
        tqdm.write(f"[charshift] skipping adapter {base.name}/{name}: {msg}")
    probe = probe_adapters(backend, [n for n in needed if n not in failed])
    info = backend.info()
    store.update_manifest(
        backends={base.name: info.__dict__},
        skipped_adapters=skipped or {},
        adapter_probe={base.name: probe},
    )
    require_applied(probe)  # an adapter that changes nothing stops the run, naming it
    return failed


def _episodes(cfg: RunConfig, plan: Plan, rows: list[PlannedRow]) -> Iterator[Episode]:
    for r in rows:
        yield Episode(
            key=r.key,
            spec=r.spec,
            condition=r.condition,
            sample_idx=r.sample_idx,
            run_seed=cfg.sampling.seed,
            sampling=r.sampling,
            simulator=_simulator(plan, r.spec),
        )


def materialise_tiny_adapters(base: BaseSpec, sources: list[AdapterSource]) -> list[AdapterSource]:
    """`path: tiny-lora:NAME` (smoke preset) -> a random-init LoRA for the tiny base, built once."""
    out = []
    for src in sources:
        if src.path and src.path.startswith("tiny-lora:"):
            from charshift import models

            tag = src.path.split(":", 1)[1]
            model_dir = Path(models.resolve_model(base.model, cache_dir()).path)
            folder = cache_dir() / "tiny-lora" / stable_hash([base.model, tag], 12)
            if not (folder / "adapter_config.json").exists():  # built once, atomically
                seed = int(stable_hash(tag, 6), 16)
                models.build_cached(folder, functools.partial(_tiny_lora, model_dir, seed))
            src = AdapterSource(name=src.name, path=str(folder))
        out.append(src)
    return out


def _tiny_lora(model_dir: Path, seed: int, out: Path) -> dict[str, Any]:
    from charshift import tiny

    tiny.build_tiny_lora(model_dir, out, seed=seed)
    return {"tiny_lora_seed": seed}


def _simulator(plan: Plan, spec: EpisodeSpec) -> Any:
    if spec.mode == "chat" or spec.scenario_id is None:
        return None
    from charshift.toolsim import ToolSimulator

    return ToolSimulator(plan.scenario_bank[spec.scenario_id])


# -- classifier ----------------------------------------------------------------------------------


def classifier_dir(store: RunStore, base: str) -> Path:
    """Where the run trains the classifier of `base` (a base without a given classifier)."""
    from charshift.scoring.classifier import trained_dir

    return trained_dir(store.root, base)


def training_rows(cfg: RunConfig, store: RunStore, base: BaseSpec) -> list[GenerationRow]:
    """The ID training generations of `base` that a classifier trained in the run learns from."""
    tc = cfg.classifier_training
    if tc is None:
        raise ValueError("the config has no classifier_training section")
    rows = [
        r
        for r in store.generations
        if r.base == base.name
        and r.slice == "id_chat"
        and r.split == "train"
        and r.stage == tc.stage
        and r.text
    ]
    if not rows:
        raise ValueError(
            f"no ID training generations for base {base.name} stage {tc.stage}: run `generate` first"
        )
    return sorted(rows, key=lambda r: r.key)


def train_run_classifier(cfg: RunConfig, store: RunStore, base: BaseSpec, out: Path) -> Any:
    """Train the configured classifier (probe or fine-tune, `classifier_training.mode`) on this
    run's ID training generations for `base`."""
    from charshift.scoring.classifier import train_classifier
    from charshift.scoring.settings import TrainData

    tc = cfg.classifier_training
    assert tc is not None  # training_rows checked it
    rows = training_rows(cfg, store, base)
    data = TrainData(
        texts=[r.text or "" for r in rows],
        labels=[r.persona or "" for r in rows],
        groups=[r.item_id for r in rows],
        label_names=list(cfg.personas),
    )
    return train_classifier(data, tc, out, cache_dir=cache_dir())


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


def ensure_scorers(cfg: RunConfig, store: RunStore) -> None:
    """Train what the run's scorers learn from the run itself, before scoring: the classifier
    (`ensure_classifiers`) and, with `persona_vector` among the scorers, each base's persona
    vectors (fitted again only when their training rows or settings changed)."""
    ensure_classifiers(cfg, store)
    if "persona_vector" not in cfg.scorers:
        return
    from charshift.scoring.persona_vector import ensure_vectors

    for base in cfg.bases:
        t0 = time.time()
        if ensure_vectors(cfg, store, base, cache_dir()):
            store.log_event(
                "fit_persona_vectors", base=base.name, seconds=round(time.time() - t0, 1)
            )


# -- scoring -------------------------------------------------------------------------------------


def score(cfg: RunConfig, store: RunStore) -> dict[str, int]:
    """Score every unit of every eval row (of the store's shard, if it has one) that has an
    output (see `charshift.units`) with each of the run's scorers (`cfg.scorers`; a kind may
    give several, e.g. persona vectors' text and state readings), where that scorer has no score
    of the same text yet, plus the units a scorer judges on its own (the judge's
    `SLICE.behaviour`). The length controls are cut in the tokens of the scorer's own tokenizer
    (`charshift.lengths`). A scorer's resources (a judge's backend, the persona vectors' model)
    are freed when the base is done."""
    counts = {"scored": 0, "already": 0}
    shards: dict[str, int] = {}
    by_base: dict[str, list[GenerationRow]] = {}
    for r in store.generations:
        if r.split == "eval":
            by_base.setdefault(r.base, []).append(r)
    for base in cfg.bases:
        rows = by_base.get(base.name, [])
        if not any(units.has_output(r) and in_shard(r.item_id, store.shard, shards) for r in rows):
            continue
        context = ScorerContext(cfg, base, store.root, cache_dir())
        opened: list[Scorer] = []
        try:
            for kind in cfg.scorers:
                for scorer in open_scorers(kind, context):
                    opened.append(scorer)
                    todo, already = _todo(cfg, store, base.name, rows, kind, scorer, shards)
                    counts["already"] += already
                    if todo:
                        counts["scored"] += _score_items(cfg, store, scorer, todo, base.name)
        finally:
            for scorer in opened:
                close = getattr(scorer, "close", None)
                if callable(close):
                    close()
    return counts


def _todo(
    cfg: RunConfig,
    store: RunStore,
    base: str,
    rows: list[GenerationRow],
    kind: str,
    scorer: Scorer,
    shards: dict[str, int],
) -> tuple[list[units.UnitText], int]:
    """(the units `scorer` has not scored yet, how many it has) of `rows`, its identity
    recorded in the manifest."""
    scorer.check_personas(list(cfg.personas))
    sid = scorer.identity
    _record_scorer(store, base, kind, scorer)
    items = _units_to_score(cfg, store, base, rows, scorer, sid, shards)
    if isinstance(scorer, UnitSource):
        own = scorer.extra_units([r for r in rows if in_shard(r.item_id, store.shard, shards)])
        items += [u for u in own if u.text]
    todo = [
        u
        for u in items
        if (u.row.key, sid, u.unit, units.text_hash(u.text or "")) not in store.scores
    ]
    return todo, len(items) - len(todo)


def _record_scorer(store: RunStore, base: str, kind: str, scorer: Scorer) -> None:
    """The manifest's `scorers`: base -> scorer name -> its id, kind and provenance; and for the
    classifier `classifiers` / `classifier_ids`, which the report reads its scores by."""
    if kind == "classifier":
        store.update_manifest(
            classifiers={base: scorer.provenance}, classifier_ids={base: scorer.identity}
        )
    known = store.manifest().get("scorers")
    mine = known.get(base) if isinstance(known, dict) else None
    entry = {"id": scorer.identity, "kind": kind, "provenance": scorer.provenance}
    merged = {**(mine if isinstance(mine, dict) else {}), scorer_name(scorer, kind): entry}
    store.update_manifest(scorers={base: merged})


def _units_to_score(
    cfg: RunConfig,
    store: RunStore,
    base: str,
    rows: list[GenerationRow],
    clf: Any,
    cid: str,
    shards: dict[str, int],
) -> list[units.UnitText]:
    """The units of `rows` with a text, cut with the classifier's counter (recorded in the run,
    with what the cuts came to: `length_controls` in the manifest, and a line where a reply is
    shorter than the body length matched to it)."""
    from charshift import lengths

    counter, why = lengths.counter_for(clf)
    lengths.record_counter(store, cid, counter, why)
    raw = cfg.scoring.text == "raw"
    items = [
        u
        for u in units.unit_texts(rows, raw, {base: counter})
        if u.text and in_shard(u.row.item_id, store.shard, shards)
    ]
    summary = units.cut_summary(items)
    store.update_manifest(length_controls={base: {"counter": counter.name, **summary}})
    for unit, kinds in summary.items():
        if kinds.get("short"):
            tqdm.write(
                f"[charshift] {unit} ({base}): {kinds['short']} of {sum(kinds.values())} texts "
                "are shorter than the length matched to them and are scored whole"
            )
    return items


def _score_items(
    cfg: RunConfig, store: RunStore, scorer: Scorer, todo: list[units.UnitText], base: str
) -> int:
    """Score `todo` in chunks, appending each chunk's scores as it is done."""
    raw = cfg.scoring.text == "raw"
    chunk = max(cfg.scoring.batch_size * 16, 64)
    bar = tqdm(total=len(todo), desc=f"score {base}", unit="unit", dynamic_ncols=True)
    for i in range(0, len(todo), chunk):
        part = todo[i : i + chunk]
        found = verdicts_of(scorer, [ScoreInput(u.text or "", u.row, u.unit) for u in part])
        store.scores.append(
            ScoreRow(
                u.row.key,
                scorer.identity,
                units.text_field(u.unit, raw),
                v.label,
                v.probs,
                unit=u.unit,
                text_hash=units.text_hash(u.text or ""),
                length=u.length,
                **v.row_fields(),
            )
            for u, v in zip(part, found, strict=True)
        )
        bar.update(len(part))
    bar.close()
    return len(todo)


# -- whole runs ----------------------------------------------------------------------------------


def report(cfg: RunConfig, store: RunStore, out_dir: Path | None = None) -> Path:
    """The analysis tail over a run directory (see `analysis.report_run`)."""
    from charshift import analysis

    path = analysis.report_run(cfg, store, out_dir)
    if store.writable:  # a report of a run opened read-only changes nothing in it
        store.log_event("report", path=str(path))
    return path


def preflight(cfg: RunConfig) -> None:
    """Cheap checks before any generation: every given classifier knows every persona."""
    from charshift.scoring.classifier import load_classifier

    for base in cfg.bases:
        if base.classifier:
            load_classifier(base.classifier, cache_dir=cache_dir()).check_personas(cfg.personas)


def run_all(cfg: RunConfig, out: Path) -> Path:
    t0 = time.time()
    build_plan(cfg)  # scenario, prompt and persona files are validated here
    preflight(cfg)
    with prepare_run(cfg, out) as store:
        store.log_event("run_start")
        generate(cfg, store)
        ensure_scorers(cfg, store)
        score(cfg, store)
        path = report(cfg, store)
        store.log_event("run_end", seconds=round(time.time() - t0, 1))
    return path
