"""Executors: where the steps of a run execute.

local (the default): this process. Without a shard, the whole run (`pipeline.run_all`). With
  `shard=(i, n)` (`--shard I/N`, e.g. one task of a SLURM array), the rows of the items of shard i
  (`planning.select_shard`): generate them, then score them unless a base's classifier is trained
  in the run (that needs every shard's training rows). A shard writes table files of its own in the
  one run directory and writes no report; `charshift report --run DIR` reads the union of every
  shard's files and names the shards that are incomplete.
ray: the run's n shards as Ray tasks, one backend per task and one GPU per task where the cluster
  has GPUs (one CPU each otherwise), on a local Ray started for the run or an existing cluster
  (`address`). Every task runs with `ray_runtime_env` (HF_TOKEN, HF_HOME, CHARSHIFT_CACHE and
  the other variables a worker on another node would lack, and VLLM_WORKER_MULTIPROC_METHOD=spawn);
  each shard's managed server writes its own log. Generation runs as one wave of n tasks; then the classifier is trained if the run
  trains one (one task), the scores as a second wave of n tasks (scoring units read rows across
  shards, so it waits for all generation), and the report once, here.

Every step resumes: a shard or task that failed is redone by running the same command again, and
only rows no file of the run holds are generated (whichever shard or writer wrote them).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charshift import pipeline
from charshift.completion import record_completion
from charshift.config import RunConfig, check_backend_available, config_to_dict, parse_config
from charshift.planning import Shard
from charshift.store import RunStore

EXECUTORS = ("local", "ray")
STEPS = ("generate", "score")


class ExecutorError(RuntimeError):
    """A sharded run that could not finish; the message names each failed shard and the fix."""


@dataclass
class ShardResult:
    """What one shard's steps did."""

    shard: Shard
    generated: dict[str, Any] | None = None  # pipeline.generate's counts, if it generated
    scored: dict[str, int] | None = None  # pipeline.score's counts, if it scored
    note: str | None = None  # why it did not score, if it did not

    @property
    def label(self) -> str:
        return f"{self.shard[0]}/{self.shard[1]}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shard": self.label}


def untrained_classifiers(cfg: RunConfig, store: RunStore) -> list[str]:
    """Bases whose classifier the run trains and has not trained yet."""
    return [
        b.name
        for b in cfg.bases
        if not b.classifier
        and not (pipeline.classifier_dir(store, b.name) / "train_report.json").exists()
    ]


def run_shard(
    cfg: RunConfig,
    out: Path,
    shard: Shard,
    steps: Sequence[str] = STEPS,
    retry_errors: bool = False,
) -> ShardResult:
    """Run `steps` ("generate", "score") for the rows of `shard` in run directory `out`
    (`retry_errors`: redo its rows that ended in an error). What the shard left undone is
    recorded in the manifest (`completion`, scope `shard I/N`)."""
    result = ShardResult(shard)
    with pipeline.prepare_run(cfg, out, shard) as store:
        store.log_event("shard_start", shard=result.label, steps=list(steps))
        if "generate" in steps:
            result.generated = pipeline.generate(cfg, store, retry_errors=retry_errors)
        if "score" in steps:
            untrained = untrained_classifiers(cfg, store)
            if untrained:
                result.note = (
                    f"not scored: base(s) {', '.join(untrained)} train their classifier on "
                    f"every shard's rows; when all shards are done, run `charshift run CONFIG "
                    f"--out {out}` (unsharded) to train, score and report"
                )
            else:
                result.scored = pipeline.score(cfg, store)
        record_completion(cfg, store, scored=False)
        store.log_event("shard_end", **result.to_dict())
    return result


def run_local(
    cfg: RunConfig, out: Path, shard: Shard | None = None, retry_errors: bool = False
) -> Path | ShardResult:
    """The whole run here (returns the report's path), or one shard of it (returns what the
    shard did; no report). `retry_errors`: redo the rows that ended in an error."""
    if shard is None:
        return pipeline.run_all(cfg, out, retry_errors=retry_errors)
    check_backend_available(cfg.backend)  # here, where this shard generates
    pipeline.preflight(cfg)  # paths, files, the plan and classifiers, before any model loads
    return run_shard(cfg, out, shard, retry_errors=retry_errors)


# -- Ray ------------------------------------------------------------------------------------------


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            "--executor ray needs Ray: pip install 'charshift[ray]' (ray==2.60.0)"
        ) from None
    return ray


def _shard_task(
    cfg_dict: dict[str, Any],
    out: str,
    shard: Shard,
    steps: list[str],
    cwd: str,
    retry_errors: bool = False,
) -> ShardResult:
    """One shard's steps in a Ray worker (the config travels as its resolved dict)."""
    if Path(cwd).is_dir():  # relative paths in the config mean what they meant to the driver
        os.chdir(cwd)
    cfg = parse_config(cfg_dict, "run config")
    return run_shard(cfg, Path(out), shard, steps, retry_errors)


def _train_task(cfg_dict: dict[str, Any], out: str, cwd: str) -> list[str]:
    """Train the run's classifiers and fit its persona vectors (on every shard's rows) in a Ray
    worker."""
    if Path(cwd).is_dir():
        os.chdir(cwd)
    cfg = parse_config(cfg_dict, "run config")
    with pipeline.prepare_run(cfg, Path(out)) as store:
        todo = untrained_classifiers(cfg, store)
        pipeline.ensure_scorers(cfg, store)
    return todo


def task_resources(cluster: dict[str, Any]) -> dict[str, float]:
    """One GPU per task where the cluster has GPUs, else one CPU."""
    return {"num_gpus": 1} if cluster.get("GPU", 0) >= 1 else {"num_cpus": 1}


def default_shards(cluster: dict[str, Any]) -> int:
    gpus = int(cluster.get("GPU", 0))
    if gpus < 1:
        raise ExecutorError(
            "--shards: the Ray cluster has no GPUs; give the number of shards (one CPU each)"
        )
    return gpus


# What a Ray worker needs from the driver's environment: hub access and caches, offline mode,
# the import path; on a cluster a worker does not inherit the driver's environment.
RAY_FORWARDED_ENV = (
    "HF_TOKEN",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "CHARSHIFT_CACHE",
    "PYTHONPATH",
)
# vLLM in a Ray worker: its own worker processes spawned, not forked (CUDA cannot start again in
# a forked child of a process that has used it).
RAY_FIXED_ENV = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


def ray_runtime_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `runtime_env` every charshift Ray task runs with: RAY_FORWARDED_ENV as the driver has
    them (those it has), and RAY_FIXED_ENV."""
    environ = os.environ if environ is None else environ
    forwarded = {k: environ[k] for k in RAY_FORWARDED_ENV if environ.get(k)}
    return {"env_vars": {**forwarded, **RAY_FIXED_ENV}}


def _wave(ray: Any, fn: Any, resources: dict[str, float], calls: list[tuple]) -> list[Any]:
    """Run `fn(*args)` for each of `calls` as Ray tasks (with `ray_runtime_env`, on a cluster
    started here or elsewhere); wait for all of them. Returns results; ExecutorError naming
    every failed call once all have ended."""
    remote = ray.remote(**resources, runtime_env=ray_runtime_env())(fn)
    refs = [remote.remote(*args) for args in calls]
    results, failed = [], []
    try:
        for args, ref in zip(calls, refs, strict=True):
            try:
                results.append(ray.get(ref))
            except Exception as err:  # a task's exception (RayTaskError) or a lost worker
                failed.append(f"{_label(args)}: {_first_line(err)}")
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    if failed:
        raise ExecutorError(
            f"{len(failed)} of {len(calls)} Ray task(s) failed: " + "; ".join(failed) + ". What "
            "the others wrote is kept; run the same command again to redo only what is missing."
        )
    return results


def _label(args: tuple) -> str:
    shard = next((a for a in args if isinstance(a, tuple)), None)
    return f"shard {shard[0]}/{shard[1]}" if shard else "classifier training"


def _first_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None)  # RayTaskError carries the task's own exception
    text = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else type(err).__name__


def _start_ray(ray: Any, address: str | None) -> bool:
    """Connect to `address`, or start a local Ray; use one already started in this process.
    Returns whether this call started (so must shut down) the connection."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, runtime_env=ray_runtime_env())
    else:
        ray.init(include_dashboard=False, runtime_env=ray_runtime_env())
    return True


def run_ray(
    cfg: RunConfig,
    out: Path,
    n_shards: int | None = None,
    address: str | None = None,
    echo: Any = print,
    retry_errors: bool = False,
) -> Path:
    """The whole run as Ray tasks over `n_shards` shards (default: one per GPU of the cluster);
    returns the report's path. The run directory must be on a file system every node sees.
    `retry_errors`: the shards redo their rows that ended in an error."""
    ray = _ray()
    out = Path(out).resolve()
    pipeline.preflight(cfg)
    with pipeline.prepare_run(cfg, out) as store:  # the config is written once, before any task
        store.log_event("run_start", executor="ray", address=address)
    started = _start_ray(ray, address)
    try:
        cluster = dict(ray.cluster_resources())
        n = n_shards or default_shards(cluster)
        return _ray_steps(ray, cfg, out, n, task_resources(cluster), echo, retry_errors)
    finally:
        if started:
            ray.shutdown()


def _ray_steps(
    ray: Any,
    cfg: RunConfig,
    out: Path,
    n: int,
    resources: dict[str, float],
    echo: Any,
    retry_errors: bool = False,
) -> Path:
    cfg_dict, cwd = config_to_dict(cfg), os.getcwd()
    echo(f"[charshift] {n} shard(s) as Ray tasks, each with {resources}")
    shards = [(cfg_dict, str(out), (i, n), ["generate"], cwd, retry_errors) for i in range(n)]
    for res in _wave(ray, _shard_task, resources, shards):
        echo(f"[charshift] shard {res.label} generated: {res.generated}")
    with RunStore(out, writable=False, create=False, warn=lambda _m: None) as store:
        untrained = untrained_classifiers(cfg, store)
    if untrained or "persona_vector" in cfg.scorers:  # persona vectors: fitted if not yet
        _wave(ray, _train_task, resources, [(cfg_dict, str(out), cwd)])
        echo(f"[charshift] trained the classifier(s) of {', '.join(untrained) or '(none)'}")
    shards = [(cfg_dict, str(out), (i, n), ["score"], cwd) for i in range(n)]
    for res in _wave(ray, _shard_task, resources, shards):
        echo(f"[charshift] shard {res.label} scored: {res.scored}")
    with pipeline.prepare_run(cfg, out) as store:
        path = pipeline.report(cfg, store)
        store.log_event("run_end", executor="ray", shards=n)
    return path
