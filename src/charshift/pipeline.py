"""The steps of a run over one run directory: generate -> (train classifier) -> score -> report.

Each step does only what the store does not hold yet, so re-running a command resumes it.
What to generate comes from `planning.build_plan` (pure); the analysis tail (records -> statistics
-> tables, plots, report) is `analysis`, shared with `charshift report --predictions`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from charshift import banks, progress, prompts, tools, units
from charshift.adapter_probe import not_applied, probe_adapters, require_applied
from charshift.backends.base import Backend, SteppedBackend
from charshift.backends.build import backend_for, cache_dir, materialise_tiny_adapters
from charshift.backends.settings import DEFAULT_MAX_IN_FLIGHT
from charshift.completion import record_completion
from charshift.config import (
    BaseSpec,
    RunConfig,
    check_backend_available,
    check_local_paths,
    config_to_dict,
    parse_config,
)
from charshift.inputs import check_name_lengths, surrogate_problem
from charshift.planning import (
    Plan,
    PlannedRow,
    Shard,
    build_plan,
    in_shard,
    row_problems,
    select_shard,
)
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import EpisodeSpec, GenerationRow, ScoreRow
from charshift.scoring.base import (
    ScoreInput,
    Scorer,
    ScorerContext,
    UnitSource,
    open_scorers,
    scorer_name,
    verdicts_of,
)
from charshift.store import RunStore, StoreError, StudyError, retryable, shard_suffix
from charshift.store import warn as store_warn

# -- backends ------------------------------------------------------------------------------------


def make_backend(
    cfg: RunConfig, base: BaseSpec, run_dir: Path | None = None, shard: Shard | None = None
) -> Backend:
    """The run's backend (`cfg.backend`) for `base`; a shard's managed server writes a log of
    its own."""
    return backend_for(
        cfg.backend, base, run_dir, seed=cfg.sampling.seed, log_suffix=shard_suffix(shard)
    )


# -- steps ---------------------------------------------------------------------------------------


# Bytes the run adds to a base's name in a file name: `classifier/NAME.tmpXXXXXXXX` while a
# classifier is trained, `server-NAME.log` for a managed server.
BASE_NAME_EXTRA = len(".tmp") + 8


def check_file_names(cfg: RunConfig, out: Path) -> None:
    """Every name the run makes a file or folder name of fits the file system of `out`: checked
    before anything is written, so a long name never fails after rows were generated."""
    names = [
        ("name (the run folder)" if k == 0 and part == cfg.name else "--out", part, 0)
        for k, part in enumerate(_new_parts(Path(out)))
    ]
    names += [(f"bases.{i}.name", b.name, BASE_NAME_EXTRA) for i, b in enumerate(cfg.bases)]
    check_name_lengths(names, out)


def _new_parts(path: Path) -> list[str]:
    """The components of `path` that do not exist yet (the folders a run would create), the
    last first."""
    parts = []
    while not path.exists() and path != path.parent:
        parts.append(path.name)
        path = path.parent
    return parts


def prepare_run(cfg: RunConfig, out: Path, shard: Shard | None = None) -> RunStore:
    """Open `out` for writing (takes the run's writer lock, or `shard`'s; close the store, or
    use it as a context manager, to release it) and record the config."""
    check_file_names(cfg, out)
    store = RunStore(out, shard=shard)
    try:
        store.write_config(
            config_to_dict(cfg),
            planned_keys=lambda: {r.key for r in build_plan(cfg).rows},
            normalise=_normalise,
        )
        personas = check_persona_texts(store, prompts.persona_hashes(cfg))
        check_rows(cfg, store)
        store.update_manifest(
            seeds={"sampling": cfg.sampling.seed, "stats": cfg.stats.seed},
            banks=banks.provenance(cfg),  # kind -> source, sha256 and size of each item bank
            personas=personas,  # persona -> sha256 of the text that describes it
        )
    except BaseException:
        store.close()
        raise
    return store


def check_persona_texts(store: RunStore, hashes: dict[str, str]) -> dict[str, str]:
    """`hashes` (persona -> sha256 of its description, `prompts.persona_hashes`), after checking
    them against the ones the run's manifest recorded: a description, constitution file or
    bundled text that changed since the run's rows were generated is a StoreError naming the
    persona, never a run that mixes rows of the old and the new persona."""
    recorded = store.recorded("personas")
    changed = sorted(p for p, h in hashes.items() if p in recorded and recorded[p] != h)
    if changed:
        raise StoreError(
            f"{store.root}: the description of persona(s) {changed} differs from the one this "
            "run's rows were generated with (manifest.json `personas` records its sha256); "
            "use another --out, or restore the description (its constitution file, or the "
            "charshift version whose bundled text it was)"
        )
    return hashes


def _normalise(d: dict[str, Any]) -> dict[str, Any]:
    """A stored config resolved under this version (fields added since take their defaults)."""
    return config_to_dict(parse_config(d))


def study_folder(cfg: RunConfig, out: Path) -> Path:
    """Where `cfg` runs when asked for a new run folder if `out` holds another study
    (`--new-folder`): `out` itself when it holds no run or this study, else `OUT-H` beside it,
    H the first 8 hex digits of the config's identity hash (said on stderr)."""
    from charshift.store import study

    try:
        with RunStore(out, create=False, writable=False, warn=lambda _m: None) as held:
            held.check_study(
                config_to_dict(cfg),
                planned_keys=lambda: {r.key for r in build_plan(cfg).rows},
                normalise=_normalise,
            )
    except StudyError as err:
        h = study.identity_hash(study.flatten(config_to_dict(cfg)))[:8]
        new = out.with_name(f"{out.name}-{h}")
        store_warn(f"{out} holds another study ({str(err).split(': ', 1)[-1][:300]}); "
                   f"--new-folder: this config runs into {new}")  # fmt: skip
        return new
    except StoreError:  # no run there (yet), or one prepare_run names the trouble of
        return out
    return out


def load_run_config(store: RunStore) -> RunConfig:
    """The run's config; refused, naming the fields, when config.yaml was edited by hand into
    another study than the one the manifest records (store/study.py)."""
    return parse_config(store.run_config(normalise=_normalise), str(store.config_path))


def open_run_config(store: RunStore) -> RunConfig:
    """`load_run_config`, with the stored rows verified against the run's plan (`check_rows`)."""
    cfg = load_run_config(store)
    check_rows(cfg, store)
    return cfg


def check_rows(cfg: RunConfig, store: RunStore) -> None:
    """Set aside (a writer: into the quarantine files) every stored row that is not one of the
    plan of `cfg`, or whose key does not recompute from its own fields, and its scores: such a
    row is never counted, and each is named (store.set_aside_rows)."""
    if not len(store.generations):
        return
    try:
        plan = build_plan(cfg)
    except (ValueError, OSError) as err:  # e.g. an id_prompts file that has since moved
        store.say(f"Could not rebuild the run's plan to verify its stored rows: {err}")
        return
    problems = row_problems(plan, store.generations)
    if problems:
        store.set_aside_rows(problems)


def rollout_settings(cfg: RunConfig) -> RolloutSettings:
    return RolloutSettings(
        max_steps=cfg.rollout.max_steps,
        step_margin=cfg.rollout.step_margin,
        max_malformed=cfg.rollout.max_malformed,
        stop_on_send=cfg.rollout.stop_on_send,
        native_tools=cfg.rollout.tool_protocol == "native",
        constrained=cfg.rollout.tool_protocol == "constrained",
    )


def generate(
    cfg: RunConfig, store: RunStore, wave_size: int | None = None, retry_errors: bool = False
) -> dict[str, Any]:
    """Generate every planned row (of the store's shard, if it has one) the store does not hold
    yet; with `retry_errors`, also every row that ended in an error (a server error, a timeout,
    an engine's `error` finish): its new row replaces it, and the replaced line goes to the
    table's quarantine file. Returns counts."""
    plan = build_plan(cfg)
    wave = wave_size or max(cfg.backend.batch_size * 8, 64)
    mine = select_shard(plan.rows, store.shard)
    summary: dict[str, Any] = {"planned": len(mine), "done_before": 0, "generated": 0}
    if retry_errors:
        summary["retried"] = 0
    for base in cfg.bases:
        rows = [r for r in mine if r.condition.base == base.name]
        todo = [r for r in rows if _to_generate(store, r.key, retry_errors)]
        summary["done_before"] += len(rows) - len(todo)
        if retry_errors:
            summary["retried"] += sum(r.key in store.generations for r in todo)
        if todo:
            summary["generated"] += _generate_base(cfg, store, plan, base, todo, wave)
    if retry_errors:
        store.compact()
    return summary


def _to_generate(store: RunStore, key: str, retry_errors: bool) -> bool:
    row = store.generations.get(key)
    return row is None or (retry_errors and retryable(row))


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
    backend = make_backend(cfg, base, store.root, store.shard)
    try:
        failed = _load_adapters(cfg, store, plan, base, backend, todo)
        todo = [r for r in todo if not (r.adapter and r.adapter.name in failed)]
        engine = RolloutEngine(backend, rollout_settings(cfg), tools.required_args())
        written = 0
        bar = progress.bar(len(todo), f"generate {base.name}", "row")
        calls = progress.bar(None, "  model calls", "call", nested=True)
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
    lazily), by engine steps on vLLM offline (the same, without threads), else lockstep in waves
    of `wave` rows (`calls` counts the model calls as they finish)."""
    if isinstance(engine.backend, SteppedBackend):
        in_flight = getattr(cfg.backend, "max_in_flight", DEFAULT_MAX_IN_FLIGHT)
        episodes = _episodes(cfg, plan, todo)
        yield from engine.run_stepped(episodes, max_in_flight=in_flight, progress=calls)
        return
    if engine.backend.async_capable:
        in_flight = getattr(cfg.backend, "max_in_flight", DEFAULT_MAX_IN_FLIGHT)
        yield from engine.run_streaming(_episodes(cfg, plan, todo), max_in_flight=in_flight)
        return
    for start in range(0, len(todo), wave):
        yield from engine.run(
            list(_episodes(cfg, plan, todo[start : start + wave])), progress=calls
        )


def _load_adapters(
    cfg: RunConfig,
    store: RunStore,
    plan: Plan,
    base: BaseSpec,
    backend: Backend,
    todo: list[PlannedRow],
) -> dict[str, str]:
    """Load the adapters `todo` needs and probe them (`cfg.adapter_probe`); record provenance,
    the probe and the skipped adapters (those that failed to load, and under `warn` those the
    probe found not applied) in the manifest. Returns the skipped ones, with why."""
    needed = sorted({r.adapter.name for r in todo if r.adapter}, key=str)
    sources = materialise_tiny_adapters(base, [plan.adapters[base.name][n] for n in needed])
    failed = backend.load_adapters(sources)
    loaded = [n for n in needed if n not in failed]
    if cfg.adapter_probe == "off":
        probe: dict[str, Any] = {"backend": backend.kind, "adapters": {}}
    else:
        probe = probe_adapters(backend, loaded)
    probe["mode"] = cfg.adapter_probe
    if cfg.adapter_probe == "warn":
        failed = {**failed, **not_applied(probe)}
    for name, msg in failed.items():
        tqdm.write(f"[charshift] skipping adapter {base.name}/{name}: {msg}")
    store.update_manifest(
        backends={base.name: backend.info().__dict__},
        adapter_probe={base.name: probe},
        reproducibility={base.name: backend.reproducibility()},
    )
    store.modify_manifest(functools.partial(_note_skipped, base.name, needed, failed))
    if cfg.adapter_probe == "strict":
        require_applied(probe)  # an adapter that changes nothing stops the run, naming it
    return failed


def _note_skipped(
    base: str, needed: list[str], failed: dict[str, str], manifest: dict[str, Any]
) -> None:
    """The manifest's `skipped_adapters` (base/adapter -> why) after loading `needed`: the ones
    that failed now are in it, the ones that loaded now are not (a skip a rerun repaired)."""
    skipped = manifest.get("skipped_adapters")
    skipped = skipped if isinstance(skipped, dict) else {}
    for name in needed:
        skipped.pop(f"{base}/{name}", None)
    skipped.update({f"{base}/{name}": msg for name, msg in failed.items()})
    manifest["skipped_adapters"] = skipped


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
    rows = _readable(rows, lambda r: (r, r.text or ""), store, "used for training")
    if not rows:
        why = (
            "its config asks for none (id_prompts.n_train: 0); set id_prompts.n_train and run "
            "`charshift run CONFIG --out DIR` to generate them"
            if cfg.id_prompts.n_train == 0
            else "run `charshift generate CONFIG --out DIR` first"
        )
        raise ValueError(
            f"no ID training generations for base {base.name} stage {tc.stage} in "
            f"{store.root}: {why}"
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
        label_names=cfg.persona_names,
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


T = TypeVar("T")


def _readable(
    items: list[T], parts: Callable[[T], tuple[GenerationRow, str]], store: RunStore, use: str
) -> list[T]:
    """The items (`parts(item)`: its row and text) whose text a tokenizer can take. A stored
    text holding a lone surrogate (a damaged or hand-edited line: nothing charshift writes holds
    one) made the tokenizer raise and every resume die; its row is left out, with one warning
    naming it."""
    ok: list[T] = []
    bad: dict[str, tuple[GenerationRow, str]] = {}
    for it in items:
        row, text = parts(it)
        problem = surrogate_problem(text)
        if problem is None:
            ok.append(it)
        else:
            bad.setdefault(row.key, (row, problem))
    if bad:
        row, problem = next(iter(bad.values()))
        store.warn(
            f"{store.root}: {len(bad)} generation row(s) hold a text no tokenizer can read "
            f"(e.g. row {row.key}, {row.base}/{row.stage}/{row.slice}/{row.item_id}: its text "
            f"{problem}); they are not {use}, and the report counts them as missing"
        )
    return ok


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
    scorer.check_personas(cfg.persona_names)
    sid = scorer.identity
    _record_scorer(store, base, kind, scorer)
    # before the length counter tokenizes anything: a stored text no tokenizer can take
    rows = _readable(rows, lambda r: (r, (r.text or "") + (r.final_reply or "")), store, "scored")
    items = _units_to_score(cfg, store, base, rows, scorer, sid, shards)
    if isinstance(scorer, UnitSource):
        own = scorer.extra_units([r for r in rows if in_shard(r.item_id, store.shard, shards)])
        items += [u for u in own if u.text]
    items = _readable(items, lambda u: (u.row, u.text or ""), store, "scored")
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
    bar = progress.bar(len(todo), f"score {base}", "unit")
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

    if store.writable:  # what the run left undone, for its exit status (charshift.completion)
        record_completion(cfg, store, scored=True)
    path = analysis.report_run(cfg, store, out_dir)
    if store.writable:  # a report of a run opened read-only changes nothing in it
        store.log_event("report", path=str(path))
    return path


def preflight(cfg: RunConfig) -> None:
    """Cheap checks before any generation, in this order: every local path the config names is
    there (`config.check_local_paths`, all of them named at once), the plan builds (scenario,
    prompt and persona files are read), every given classifier knows every persona."""
    from charshift.scoring.classifier import load_classifier

    check_local_paths(cfg)
    build_plan(cfg)
    for base in cfg.bases:
        if base.classifier:
            load_classifier(base.classifier, cache_dir=cache_dir()).check_personas(
                cfg.persona_names
            )


def run_all(cfg: RunConfig, out: Path, retry_errors: bool = False) -> Path:
    t0 = time.time()
    check_file_names(cfg, out)
    check_backend_available(cfg.backend)
    preflight(
        cfg
    )  # every path, file, the plan and classifier the run needs, before any model loads
    with prepare_run(cfg, out) as store:
        store.log_event("run_start")
        generate(cfg, store, retry_errors=retry_errors)
        ensure_scorers(cfg, store)
        score(cfg, store)
        path = report(cfg, store)
        store.log_event("run_end", seconds=round(time.time() - t0, 1))
    return path
