"""The `charshift` command line."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core

from charshift import __version__
from charshift import config as cfgmod
from charshift import slices as registry
from charshift.overrides import Overrides, apply_overrides, split_list

INCOMPLETE_EXIT = 3  # a run that left rows out (charshift.completion), unless --allow-skipped

if TYPE_CHECKING:
    from charshift.completion import Completion
    from charshift.executors import ShardResult
    from charshift.planning import Calibration, Throughput
    from charshift.store import RunStore

app = typer.Typer(
    help=(
        "charshift: does a character-trained persona survive a change of format?\n\n"
        "Generates a model's outputs in a ladder of formats (chat replies, emails written in chat, "
        "emails sent from an agentic tool loop), scores persona expression with a classifier, and "
        "reports where the persona is lost, with cluster-bootstrap intervals. A run directory holds "
        "everything (config, manifest, generations, scores, metrics, report); re-running the same "
        "command resumes it."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
scenarios_app = typer.Typer(
    help="Inspect and validate the email scenario bank.", no_args_is_help=True
)
app.add_typer(scenarios_app, name="scenarios")
items_app = typer.Typer(
    help="Inspect and validate the scaffolds' item banks (one per scaffold, shared with its chat "
    "control).",
    no_args_is_help=True,
)
app.add_typer(items_app, name="items")

_option_type = typer.core.TyperOption.display_type_rich


def _no_type_for_flags(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """A flag takes no value: --help shows `--dry-run`, not `--dry-run <bool>`."""
    return None if self.is_flag else _option_type(self, ctx)


typer.core.TyperOption.display_type_rich = _no_type_for_flags  # type: ignore[method-assign]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"charshift {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """charshift: does a character-trained persona survive a change of format?"""
    from charshift.progress import quiet_third_parties

    quiet_third_parties()


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _warn(msg: str) -> None:
    typer.secho(f"warning: {msg}", fg=typer.colors.YELLOW, err=True)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Known input problems end with one clear line (exit 2), not a traceback."""
    from charshift.adapter_probe import AdapterNotApplied
    from charshift.backends.base import BackendDead
    from charshift.backends.server import ServerStartError
    from charshift.executors import ExecutorError
    from charshift.fileio import WriteError
    from charshift.scenarios import ScenarioError
    from charshift.scoring.base import ScorerError
    from charshift.store import StoreError

    known = (
        cfgmod.ConfigError,
        ScorerError,  # a classifier or other scorer that cannot be loaded or used as asked
        ExecutorError,
        ScenarioError,
        StoreError,
        WriteError,  # the OS refused a write (full disk, size limit): the message names the file
        ValueError,
        AdapterNotApplied,  # an adapter the backend does not apply: named, with the backend
        BackendDead,  # an engine or server that died mid-run: the store resumes later
        ServerStartError,  # a managed server that did not come up: the log tail is in the message
    )
    try:
        yield
    except known as err:
        _fail(str(err))
    except OSError as err:  # a read-only file, a full disk, a missing folder: named, no traceback
        _fail(f"{err.filename}: {err.strerror}" if err.filename else str(err))


def _switch_on(cfg: cfgmod.RunConfig, blocks: list[str]) -> cfgmod.RunConfig:
    """`--with NAME`: the config with its opt-in block NAME switched on."""
    data = cfg.model_dump(mode="json")
    for name in blocks:
        if name not in data["opt_in"]:
            _fail(f"--with: the config has no opt-in block {name!r}; it has {list(data['opt_in'])}")
        data["opt_in"][name]["enabled"] = True
    return cfgmod.parse_config(data, "config with --with " + " ".join(blocks))


def _load(
    config: Path | None,
    preset: str | None,
    id_prompts: Path | None,
    opt_in: list[str] | None = None,
    overrides: Overrides | None = None,
) -> cfgmod.RunConfig:
    if (config is None) == (preset is None):
        _fail("give either a CONFIG.yaml or --preset NAME (see `charshift presets`)")
    try:
        cfg = cfgmod.load_config(config) if config else cfgmod.load_preset(preset or "")
        if id_prompts is not None:
            if not id_prompts.is_file():
                _fail(f"--id-prompts: file not found: {id_prompts}")
            from charshift.inputs import read_jsonl_objects
            from charshift.prompts import load_prompts_file

            read_jsonl_objects(id_prompts, "--id-prompts file", cfgmod.ConfigError)
            file_prompts = load_prompts_file(id_prompts)
            n_eval = sum(p.split == "eval" for p in file_prompts)
            n_train = sum(p.split == "train" for p in file_prompts)
            data = cfg.model_dump(mode="json")
            # the file's prompts are used whole: every eval prompt, train prompts up to the config's
            data["id_prompts"].update(
                source="file",
                path=str(id_prompts.resolve()),
                n_eval=max(n_eval, 1),
                n_train=min(n_train, data["id_prompts"]["n_train"]),
            )
            cfg = cfgmod.parse_config(data, "config with --id-prompts")
        if opt_in:
            cfg = _switch_on(cfg, opt_in)
        if overrides:
            cfg = apply_overrides(cfg, overrides)
        cfgmod.check_local_paths(cfg)
    except cfgmod.ConfigError as err:
        _fail(str(err))
    return cfg


def _print_answer(path: Path) -> None:
    """The answer's tables (report/summary.txt, beside the report's page at `path`)."""
    summary = Path(path).parent / "summary.txt"
    if summary.is_file():
        typer.echo(summary.read_text(encoding="utf-8").rstrip("\n") + "\n")


def _finished(path: Path) -> None:
    """The answer's tables, then the report's path."""
    _print_answer(path)
    typer.echo(f"report: {path}")


def _default_out(cfg: cfgmod.RunConfig) -> Path:
    return Path("runs") / cfg.name


def _out_path(value: str | None, what: str = "--out") -> Path | None:
    """An output path given on the command line, or None; an empty one is refused (as a path it
    would be '.', and the outputs would land in the current folder)."""
    if value is None:
        return None
    if not value.strip():
        _fail(f"{what}: the path is empty; give a folder or file name (`.` for this folder)")
    return Path(value)


def _only_with(owner: str, given: dict[str, bool]) -> None:
    """Options given without the option they belong to are refused, never silently ignored."""
    stray = [name for name, on in given.items() if on]
    if stray:
        _fail(f"{', '.join(stray)} only go(es) with {owner}; it would be ignored here")


ConfigArg = Annotated[
    Path | None, typer.Argument(help="Run config YAML (or use --preset).", show_default=False)
]
PresetOpt = Annotated[
    str | None, typer.Option("--preset", "-p", help="Built-in preset (`charshift presets`).")
]
# Paths a command writes to are taken as text: `--out ''` (an unset shell variable) must be
# refused, and as a Path it would already be '.', the current folder.
OutOpt = Annotated[
    str | None, typer.Option("--out", "-o", help="Run directory (default: runs/<config name>).")
]
IdPromptsOpt = Annotated[
    Path | None,
    typer.Option("--id-prompts", help="Local JSONL of ID prompts ({id, prompt[, split]})."),
]
RunOpt = Annotated[Path, typer.Option("--run", "-r", help="An existing run directory.")]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="I/N: only the items of shard I of N (from 0; e.g. $SLURM_ARRAY_TASK_ID/8). Each "
        "shard writes its own table files in the one run directory; see docs/scaling.md.",
    ),
]
ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor", help="local (this process) or ray (the shards as Ray tasks, a GPU each)."
    ),
]
ShardsOpt = Annotated[
    int | None,
    typer.Option(
        "--shards", min=1, help="With --executor ray: how many shards (default: one per GPU)."
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address", help="With --executor ray: an existing cluster (ray://... or auto)."
    ),
]
ThroughputOpt = Annotated[
    float | None,
    typer.Option("--throughput", help="With --dry-run: output tok/s of one GPU's engine.", min=0),
]
ThroughputFromOpt = Annotated[
    Path | None,
    typer.Option(
        "--throughput-from", help="With --dry-run: a benchmark's JSON (bench_gpu.py --json FILE)."
    ),
]
ThroughputPathOpt = Annotated[
    str | None,
    typer.Option(
        "--throughput-path", help="Which measured path of --throughput-from (e.g. hf-mixed)."
    ),
]
CalibrateOpt = Annotated[
    Path | None,
    typer.Option(
        "--calibrate-from",
        help="With --dry-run: an earlier run directory whose mean calls and tokens per call "
        "replace the assumption, for the same model and slice.",
    ),
]
FractionOpt = Annotated[
    float | None,
    typer.Option(
        "--expected-fraction",
        help="With --dry-run: share of each call's budget assumed used (default 0.5).",
    ),
]
RetryErrorsOpt = Annotated[
    bool,
    typer.Option(
        "--retry-errors",
        help="Also redo the rows that ended in an error (a server error, a timeout, an "
        "engine's `error` finish); each new row replaces its error row, which is kept in "
        "generations.quarantine.jsonl.",
    ),
]
NewFolderOpt = Annotated[
    bool,
    typer.Option(
        "--new-folder",
        help="A run folder holds one study: when --out holds a run of another config (the "
        "fields that differ are named), run into OUT-H beside it (H: this config's identity "
        "hash) instead of refusing.",
    ),
]
AllowSkippedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-skipped",
        help="Exit 0 even when the run left rows out (a skipped adapter, e.g. a gated one; rows "
        "not generated, ended in an error or not scored). Without it such a run exits "
        f"{INCOMPLETE_EXIT} with a summary of what is missing.",
    ),
]


SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="KEY=VALUE: change one setting of the config (a dotted key, a YAML value: "
        "--set stats.n_boot=200, --set bases.0.model=ID); repeatable; checked like the file.",
    ),
]
LimitOpt = Annotated[
    int | None,
    typer.Option(
        "--limit", min=1, help="At most N items per bank (ID prompts, scenarios, scaffold items)."
    ),
]
PersonasOpt = Annotated[
    str | None,
    typer.Option(
        "--personas", metavar="A,B,...", help="Comma-separated personas (replaces the config's)."
    ),
]
SlicesOpt = Annotated[
    str | None,
    typer.Option(
        "--slices", help="Comma-separated slices (replaces the config's; `charshift slices`)."
    ),
]


AllowUnknownOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unknown-labels",
        help="With --predictions: keep predictions that are none of the file's personas (e.g. a "
        "classifier that knows more labels) as wrong, with a warning, instead of refusing the file.",
    ),
]


def _overrides(
    sets: list[str] | None, limit: int | None, personas: str | None, slices: str | None
) -> Overrides:
    try:
        return Overrides(
            tuple(sets or ()), limit, split_list(personas, "--personas"),
            split_list(slices, "--slices"),
        )  # fmt: skip
    except cfgmod.ConfigError as err:
        _fail(str(err))
    raise AssertionError("unreachable")


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    from charshift.planning import parse_shard

    try:
        return parse_shard(text)
    except ValueError as err:
        _fail(str(err))
    return None


@app.command()
def presets() -> None:
    """List the built-in presets with their descriptions."""
    for name in cfgmod.preset_names():
        cfg = cfgmod.load_preset(name)
        typer.echo(f"{name:<12} {cfg.description}")


DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the plan and its cost; load no model.")
]
WithOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--with",
        help="Switch on an opt-in block of the config (the paper preset's `scaffolds`); "
        "repeatable. --dry-run prints each block's cost on its own, on or off.",
    ),
]


@app.command()
def run(
    config: ConfigArg = None,
    preset: PresetOpt = None,
    out: OutOpt = None,
    id_prompts: IdPromptsOpt = None,
    dry_run: DryRunOpt = False,
    shard: ShardOpt = None,
    executor: ExecutorOpt = "local",
    shards: ShardsOpt = None,
    ray_address: RayAddressOpt = None,
    throughput: ThroughputOpt = None,
    throughput_from: ThroughputFromOpt = None,
    throughput_path: ThroughputPathOpt = None,
    calibrate_from: CalibrateOpt = None,
    expected_fraction: FractionOpt = None,
    retry_errors: RetryErrorsOpt = False,
    allow_skipped: AllowSkippedOpt = False,
    new_folder: NewFolderOpt = False,
    with_: WithOpt = None,
    set_: SetOpt = None,
    limit: LimitOpt = None,
    personas: PersonasOpt = None,
    slices: SlicesOpt = None,
) -> None:
    """Generate -> (train classifier) -> score -> report. Resumes an interrupted run.

    Exits 0 when every planned row is generated and scored; 3, with a summary of what is
    missing, when an adapter was skipped or rows were left out (unless --allow-skipped); 2 on a
    bad config or input, before any model loads."""
    from charshift import executors, pipeline

    part = _shard(shard)
    cost = _CostArgs(throughput, throughput_from, throughput_path, calibrate_from)
    _check_dry_run_options(dry_run, cost, expected_fraction, retry_errors, allow_skipped)
    _check_executor(executor, part, None if dry_run else shards, ray_address)
    _out_path(out)
    cfg = _load(config, preset, id_prompts, with_, _overrides(set_, limit, personas, slices))
    with _user_errors():
        if dry_run:
            fraction = 0.5 if expected_fraction is None else expected_fraction
            typer.echo(_dry_run(cfg, part, shards, cost, fraction))
            return
        target = _out_path(out) or _default_out(cfg)
        if new_folder:
            target = pipeline.study_folder(cfg, target)
        if executor == "ray":
            path = executors.run_ray(
                cfg, target, shards, ray_address, echo=typer.echo, retry_errors=retry_errors
            )
        else:
            done = executors.run_local(cfg, target, part, retry_errors=retry_errors)
            if isinstance(done, executors.ShardResult):
                typer.echo(_shard_message(done, target))
                _exit_status(target, f"shard {done.label}", allow_skipped)
                return
            path = done
    _finished(path)
    _exit_status(target, "run", allow_skipped)


def _check_dry_run_options(
    dry_run: bool,
    cost: _CostArgs,
    fraction: float | None,
    retry_errors: bool,
    allow_skipped: bool,
) -> None:
    """The cost-estimate options only go with --dry-run, and the options of a real run not."""
    given = {
        "--throughput": cost.throughput is not None,
        "--throughput-from": cost.throughput_from is not None,
        "--throughput-path": cost.throughput_path is not None,
        "--calibrate-from": cost.calibrate_from is not None,
        "--expected-fraction": fraction is not None,
    }
    named = [name for name, on in given.items() if on]
    if named and not dry_run:
        _fail(
            f"{', '.join(named)}: cost-estimate option(s), they go with --dry-run (which runs "
            "nothing); without --dry-run this command would start the run"
        )
    real = [
        n for n, on in (("--retry-errors", retry_errors), ("--allow-skipped", allow_skipped)) if on
    ]
    if real and dry_run:
        _fail(f"{', '.join(real)}: option(s) of a real run; --dry-run runs nothing")


def _exit_status(root: Path, scope: str, allow_skipped: bool) -> None:
    """Exit INCOMPLETE_EXIT, with a summary, when `scope` of the run in `root` recorded gaps
    (charshift.completion); a warning only with --allow-skipped."""
    from charshift.completion import recorded_completion

    _report_gaps(recorded_completion(root, scope), root, allow_skipped)


def _report_gaps(done: Completion | None, root: Path, allow_skipped: bool) -> None:
    if done is None or done.complete:
        return
    for line in done.summary(str(root)):
        typer.secho(line, fg=typer.colors.YELLOW, err=True)
    if not allow_skipped:
        raise typer.Exit(INCOMPLETE_EXIT)


def _check_executor(
    executor: str, shard: tuple[int, int] | None, shards: int | None, address: str | None
) -> None:
    from charshift.executors import EXECUTORS

    if executor not in EXECUTORS:
        _fail(f"--executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
    if executor == "ray" and shard is not None:
        _fail("--shard runs one shard here; --executor ray runs all of them: give one of the two")
    if executor != "ray" and (shards is not None or address is not None):
        _fail("--shards and --ray-address go with --executor ray (or --shards with --dry-run)")


def _shard_message(done: ShardResult, out: Path) -> str:
    lines = [json.dumps(done.to_dict())]
    if done.note:
        lines.append(done.note)
    lines.append(
        f"shard {done.label} done; when every shard is: `charshift run CONFIG --out {out}` "
        f"(unsharded: finishes what the shards left, and reports), or `charshift report --run "
        f"{out}` to see where the run stands"
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class _CostArgs:
    throughput: float | None
    throughput_from: Path | None
    throughput_path: str | None
    calibrate_from: Path | None


def _dry_run(
    cfg: cfgmod.RunConfig,
    shard: tuple[int, int] | None,
    shards: int | None,
    cost: _CostArgs,
    fraction: float,
) -> str:
    """The plan, its shards and its cost (planning.estimate_cost); loads no model."""
    from charshift import planning

    throughput = _throughput(cost, planning.run_engine(cfg))  # bad flags fail before the plan
    calibration = _calibration(cost.calibrate_from) if cost.calibrate_from else None
    plan = planning.build_plan(cfg, dry=True)
    lines = [plan.summary()]
    rows = planning.select_shard(plan.rows, shard)
    n = shard[1] if shard else shards
    if n:
        sizes = planning.shard_sizes(plan.rows, n)
        lines.append(f"rows per shard ({n} shards): {sizes}")
    if shard:
        lines.append(f"this shard ({shard[0]}/{shard[1]}): {len(rows)} rows")
    est = planning.estimate_cost(
        plan,
        rows,
        fraction=fraction,
        calibration=calibration,
        throughput=throughput,
        n_shards=None if shard else shards,
    )
    lines.append(est.text())
    for name in cfg.opt_in:
        lines += _block_cost(cfg, name, shard, fraction, calibration, throughput)
    return "\n".join(lines)


def _block_cost(
    cfg: cfgmod.RunConfig,
    name: str,
    shard: tuple[int, int] | None,
    fraction: float,
    calibration: Calibration | None,
    throughput: Throughput | None,
) -> list[str]:
    """The cost of one opt-in block's slices on their own: within the plan when the block is
    on, else what switching it on (`--with NAME`) would add."""
    from charshift import planning

    block = cfg.opt_in[name]
    on = block.enabled
    plan = planning.build_plan(cfg if on else _switch_on(cfg, [name]), dry=True)
    extra = set(block.slices) if on else set(block.slices) - set(cfg.slices)
    rows = [r for r in planning.select_shard(plan.rows, shard) if r.spec.slice in extra]
    state = "on" if on else f"off; `--with {name}` adds it"
    head = f"opt-in block {name!r} ({state}): {len(rows)} rows. {block.description}".rstrip()
    if not rows:
        return ["", head]
    est = planning.estimate_cost(
        plan, rows, fraction=fraction, calibration=calibration, throughput=throughput
    )
    return ["", head, est.text()]


def _throughput(cost: _CostArgs, engine: str | None) -> Throughput | None:
    """The GPU's tok/s: given, or read from a benchmark's JSON (the run's engine's figure)."""
    from charshift import planning

    if cost.throughput is not None and cost.throughput_from is not None:
        _fail("give --throughput or --throughput-from, not both")
    if cost.throughput is not None:
        if not 0 < cost.throughput < math.inf:
            _fail(
                f"--throughput: must be a positive, finite number of tokens per second, "
                f"got {cost.throughput:g}"
            )
        return planning.Throughput(cost.throughput, "--throughput")
    if cost.throughput_from is None:
        if cost.throughput_path:
            _fail("--throughput-path goes with --throughput-from FILE")
        return None
    try:
        data = json.loads(cost.throughput_from.read_bytes())
    except OSError as err:
        _fail(f"--throughput-from: {cost.throughput_from}: {err.strerror}")
    except ValueError as err:
        _fail(f"--throughput-from: {cost.throughput_from} is not JSON ({err})")
    source = str(cost.throughput_from)
    return planning.throughput_from_json(data, source, cost.throughput_path, engine)


def _calibration(run_dir: Path) -> Calibration:
    """Mean calls per row and completion tokens per call of an earlier run, its replies
    re-tokenized with each base model's own tokenizer."""
    from transformers import AutoTokenizer

    from charshift import models, pipeline, planning

    store = pipeline.RunStore(run_dir, create=False, writable=False)
    cfg = pipeline.load_run_config(store)
    if not len(store.generations):
        raise ValueError(f"--calibrate-from: {run_dir} holds no generations yet")
    tokenizers: dict[str, Any] = {}

    def count(model: str, text: str) -> int:
        if model not in tokenizers:
            resolved = models.resolve_model(model, pipeline.cache_dir())
            tokenizers[model] = AutoTokenizer.from_pretrained(resolved.path, **resolved.load_kwargs)
        return len(tokenizers[model](text, add_special_tokens=False).input_ids)

    return planning.calibrate(
        store.generations,
        {b.name: b.model for b in cfg.bases},
        {s: cfg.sampling.max_tokens_for(s) for s in cfg.slices},
        count,
        str(run_dir),
    )


@app.command()
def generate(
    config: ConfigArg = None,
    preset: PresetOpt = None,
    out: OutOpt = None,
    id_prompts: IdPromptsOpt = None,
    shard: ShardOpt = None,
    retry_errors: RetryErrorsOpt = False,
    allow_skipped: AllowSkippedOpt = False,
    new_folder: NewFolderOpt = False,
    set_: SetOpt = None,
    limit: LimitOpt = None,
    personas: PersonasOpt = None,
    slices: SlicesOpt = None,
) -> None:
    """Generate the rows of a run (or of one shard) that are not in its store yet. Exits 3,
    with a summary, when rows are left out (unless --allow-skipped)."""
    from charshift import pipeline
    from charshift.completion import record_completion

    part = _shard(shard)
    target = _out_path(out)
    cfg = _load(config, preset, id_prompts, None, _overrides(set_, limit, personas, slices))
    target = target or _default_out(cfg)
    with _user_errors():
        pipeline.preflight(cfg)  # the plan and every given classifier's labels, before any row
        target = pipeline.study_folder(cfg, target) if new_folder else target
    with _user_errors(), pipeline.prepare_run(cfg, target, part) as store:
        summary = pipeline.generate(cfg, store, retry_errors=retry_errors)
        done = record_completion(cfg, store, scored=False)
    typer.echo(json.dumps(summary))
    _report_gaps(done, target, allow_skipped)


GenerationsOpt = Annotated[
    Path | None,
    typer.Option("--generations", help="Score an external JSONL of texts instead of a run's rows."),
]
ScoreClassifierOpt = Annotated[
    str | None,
    typer.Option("--classifier", help="Classifier id or folder (with --generations)."),
]
ScoreOutOpt = Annotated[
    str | None, typer.Option("--out", "-o", help="Predictions JSONL (with --generations).")
]
ScorerOpt = Annotated[
    str,
    typer.Option(
        "--scorer",
        help="With --generations: classifier (--classifier) or judge (an LLM judge on an "
        "OpenAI-compatible server: --judge-base-url, --judge-model).",
    ),
]
JudgeBaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--judge-base-url", help="With --scorer judge: the server, e.g. http://host:8000/v1."
    ),
]
JudgeModelOpt = Annotated[
    str | None, typer.Option("--judge-model", help="With --scorer judge: the served model name.")
]
JudgeSamplesOpt = Annotated[
    int, typer.Option("--judge-samples", min=1, max=99, help="Answers per question (median kept).")
]
JudgeModeOpt = Annotated[
    str,
    typer.Option(
        "--judge-mode",
        help="likert (how strongly the text expresses its row's persona, 1-5) or identify "
        "(which persona wrote it, or none).",
    ),
]
JudgeKeyEnvOpt = Annotated[
    str,
    typer.Option(
        "--judge-api-key-env",
        help="The NAME of the environment variable holding the server's API key (the key "
        "is read from it and never written anywhere).",
    ),
]


@app.command()
def score(
    run_dir: Annotated[Path | None, typer.Option("--run", "-r", help="Run directory.")] = None,
    generations: GenerationsOpt = None,
    classifier: ScoreClassifierOpt = None,
    out: ScoreOutOpt = None,
    shard: ShardOpt = None,
    scorer: ScorerOpt = "classifier",
    judge_base_url: JudgeBaseUrlOpt = None,
    judge_model: JudgeModelOpt = None,
    judge_samples: JudgeSamplesOpt = 3,
    judge_mode: JudgeModeOpt = "likert",
    judge_api_key_env: JudgeKeyEnvOpt = "OPENAI_API_KEY",
) -> None:
    """Score a run's outputs, or one shard's (training its classifier and fitting its persona
    vectors first where the config says so; a shard never does: that needs every shard's rows).
    With --generations, score an external JSONL of texts instead: with a classifier, or with an
    LLM judge (each row gets judge_score, the median of --judge-samples answers, judge_scores,
    judge_rationale; answers are cached beside --out, so a rerun asks only what is missing)."""
    from charshift import pipeline

    part = _shard(shard)
    if generations is not None:
        _only_with(
            "a run (not --generations)", {"--run": run_dir is not None, "--shard": part is not None}
        )
        flags = (judge_base_url, judge_model, judge_samples, judge_mode, judge_api_key_env)
        judge = _judge_or_none(scorer, *flags)
        _score_generations(generations, _out_path(out), scorer, classifier, judge)
        return
    _only_with(
        "--generations",
        {
            "--classifier": classifier is not None,
            "--out": out is not None,
            "--scorer": scorer != "classifier",
            **_judge_flags(judge_base_url, judge_model),
        },
    )
    if run_dir is None:
        _fail("give --run DIR (or --generations FILE --classifier C --out FILE)")
    redo = {
        "generations": "`charshift score` does not generate: their rows stay missing until "
        f"`charshift run CONFIG --out {run_dir}` (or `charshift generate`) redoes them"
    }
    with _user_errors(), pipeline.RunStore(run_dir, create=False, shard=part, redo=redo) as store:
        cfg = pipeline.open_run_config(store)
        if part is None:
            pipeline.ensure_scorers(cfg, store)
        else:
            _no_training_in_shard(cfg, store)
        counts = pipeline.score(cfg, store)
    typer.echo(json.dumps(counts))


def _judge_flags(base_url: str | None, model: str | None) -> dict[str, bool]:
    return {"--judge-base-url": base_url is not None, "--judge-model": model is not None}


def _judge_settings(
    base_url: str | None, model: str | None, samples: int, mode: str, key_env: str
) -> Any:
    """The judge of `score --generations --scorer judge`, from its flags."""
    from pydantic import ValidationError

    from charshift.config import judge_backend
    from charshift.scoring.settings import JudgeSettings

    if not base_url or not model:
        _fail("--scorer judge needs --judge-base-url URL and --judge-model NAME")
    if mode not in ("likert", "identify"):
        _fail(f"--judge-mode: {mode!r} is not likert or identify")
    backend = {"kind": "openai", "base_url": base_url, "api_key_env": key_env}
    try:
        settings = JudgeSettings(model=model or "", backend=backend, modes=[mode], samples=samples)
        judge_backend(settings)
    except (ValidationError, ValueError) as err:
        _fail(f"--judge-*: {err}")
    return settings


def _judge_or_none(
    scorer: str, base_url: str | None, model: str | None, samples: int, mode: str, key_env: str
) -> Any:
    """The judge `--scorer judge` asks for, or None (its flags then refused)."""
    if scorer == "judge":
        return _judge_settings(base_url, model, samples, mode, key_env)
    _only_with("--scorer judge", _judge_flags(base_url, model))
    return None


def _score_generations(
    generations: Path, out: Path | None, scorer: str, classifier: str | None, judge: Any
) -> None:
    """`score --generations`: with the classifier or the judge, into `out`."""
    from charshift.external import score_external, score_external_judge

    if scorer not in ("classifier", "judge"):
        _fail(f"--scorer: {scorer!r} scores a run only; with --generations use classifier or judge")
    if not out:
        _fail("--generations needs --out")
    if scorer == "classifier":
        if not classifier:
            _fail("--generations needs --classifier (or --scorer judge)")
        with _user_errors():
            n = score_external(generations, classifier or "", out or Path())
    else:
        with _user_errors():
            n = score_external_judge(generations, judge, out or Path())
    typer.echo(f"scored {n} rows -> {out}")


def _no_training_in_shard(cfg: cfgmod.RunConfig, store: RunStore) -> None:
    from charshift.executors import untrained_classifiers

    untrained = untrained_classifiers(cfg, store)
    if untrained:
        _fail(
            f"--shard: base(s) {', '.join(untrained)} train their classifier in the run, on "
            "every shard's rows, and it is not trained yet: run `charshift score --run "
            f"{store.root}` without --shard once every shard has generated"
        )


ReportNBootOpt = Annotated[
    int | None,
    typer.Option(
        "--n-boot",
        min=10,
        max=cfgmod.MAX_N_BOOT,
        help="Bootstrap resamples (with --predictions; default 1000).",
        show_default=False,
    ),
]
ReportSeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed",
        min=0,
        max=cfgmod.SEED_MAX,
        help="Bootstrap seed (with --predictions; default 0).",
        show_default=False,
    ),
]
AllowDuplicatesOpt = Annotated[
    bool,
    typer.Option(
        "--allow-duplicates",
        help="With --predictions: keep the first of rows that repeat a key (base, stage, "
        "slice, persona, item_id, sample_idx) and warn, instead of refusing the file.",
    ),
]
PositiveControlOpt = Annotated[
    str,
    typer.Option(
        "--positive-control",
        help="With --predictions: the stage whose rows are the positive control of the "
        "scorer check (the persona told to show in every format); 'none' for none.",
    ),
]
SvgOpt = Annotated[
    bool,
    typer.Option("--svg", help="Each figure also as SVG (default: PNG only; `report.svg`)."),
]


@app.command()
def report(
    run_dir: Annotated[Path | None, typer.Option("--run", "-r", help="Run directory.")] = None,
    predictions: Annotated[
        Path | None,
        typer.Option("--predictions", help="JSONL of predictions made elsewhere (README schema)."),
    ] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output folder.")] = None,
    n_boot: ReportNBootOpt = None,
    seed: ReportSeedOpt = None,
    allow_duplicates: AllowDuplicatesOpt = False,
    positive_control: PositiveControlOpt = "prompted_explicit",
    allow_unknown_labels: AllowUnknownOpt = False,
    svg: SvgOpt = False,
) -> None:
    """Compute metrics, intervals, plots and the HTML/markdown report (of a run: its config's
    stats settings; of a predictions file: --n-boot and --seed)."""
    target = _out_path(out)
    if predictions is not None:
        _only_with("a run's report (not --predictions)", {"--run": run_dir is not None})
        control = None if positive_control == "none" else positive_control
        flags = {"duplicates": allow_duplicates, "unknown": allow_unknown_labels, "svg": svg}
        _report_predictions(predictions, target, n_boot, seed, flags, control)
        return
    given = {"--n-boot": n_boot is not None, "--seed": seed is not None}
    _only_with("--predictions (a run's report uses its config's stats)", given)
    _only_with(
        "--predictions",
        {"--allow-duplicates": allow_duplicates, "--allow-unknown-labels": allow_unknown_labels},
    )
    if run_dir is None:
        _fail("give --run DIR or --predictions FILE --out DIR")
    from charshift import pipeline

    with _user_errors():  # a reader: takes no lock and changes nothing in the tables
        store = pipeline.RunStore(run_dir, create=False, writable=False)
        cfg = pipeline.open_run_config(store)
        if svg:
            cfg = cfg.model_copy(update={"report": cfgmod.ReportConfig(svg=True)})
        path = pipeline.report(cfg, store, target)
    _finished(path)


def _report_predictions(
    predictions: Path,
    out: Path | None,
    n_boot: int | None,
    seed: int | None,
    allow: dict[str, bool],
    control: str | None,
) -> None:
    from charshift.external import report_predictions

    if out is None:
        _fail("--predictions needs --out DIR")
    with _user_errors():
        path = report_predictions(
            predictions,
            out or Path(),
            n_boot=1000 if n_boot is None else n_boot,
            seed=seed or 0,
            allow_duplicates=allow["duplicates"],
            warn=_warn,
            positive_control=control,
            allow_unknown_labels=allow["unknown"],
            svg=allow["svg"],
        )
    _finished(path)


@app.command("train-classifier")
def train_classifier_cmd(
    run_dir: RunOpt,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the trained classifier.")],
    encoder: Annotated[
        str | None,
        typer.Option(help="Encoder id or folder (default: the config's, else ModernBERT-base)."),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Which base's generations (default: the first).")
    ] = None,
) -> None:
    """Train the run's classifier again (its config's `classifier_training`, e.g. with another
    --encoder) on its ID training generations, into --out (held-out split by prompt)."""
    from charshift import pipeline

    target = _out_path(out) or Path()
    into_run = target.resolve().is_relative_to(run_dir.resolve())  # it writes the run: locks
    with _user_errors():
        store = pipeline.RunStore(run_dir, create=False, writable=into_run)
        cfg = pipeline.open_run_config(store)
        if cfg.classifier_training is None:  # then no training rows were ever generated
            raise ValueError(
                f"{run_dir} holds no ID training generations: its config has no "
                "`classifier_training` section, so it generated none (they are planned only "
                "with one, and with id_prompts.n_train > 0). Add both to the config and run "
                "`charshift run CONFIG --out DIR`: it generates them and trains the classifier"
            )
        if encoder:
            data = cfg.model_dump(mode="json")
            data["classifier_training"]["encoder"] = encoder
            cfg = cfgmod.parse_config(data, "the run's config with --encoder")
    b = next((x for x in cfg.bases if base in (None, x.name)), None)
    if b is None:
        _fail(f"--base: no base named {base!r} in the run")
    with _user_errors(), store:
        rep = pipeline.train_run_classifier(cfg, store, b, target)
    typer.echo(json.dumps(rep.to_dict(), indent=2))
    typer.echo(f"classifier saved to {target}")


@app.command()
def demo(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="The small demo: id_chat and the email chain on one scenario (about 5.5 min "
            "on 2 CPU cores); without it, every email-family slice on three scenarios and one "
            "scaffold per family against its chat control on three items (about 22 min).",
        ),
    ] = False,
    out: OutOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Chat model instead of the packaged SmolLM2 GGUF, e.g. "
            "HuggingFaceTB/SmolLM2-135M-Instruct from the hub when online."
        ),
    ] = None,
) -> None:
    """Run the offline demo end to end: SmolLM2-135M, the base stage, persona-prompted and the
    positive control (the persona told to show in every format), a probe classifier (MiniLM
    embeddings or TF-IDF, chosen by CV) trained in the run."""
    from charshift import pipeline

    name = "demo_quick" if quick else "demo"
    target = _out_path(out)
    cfg = cfgmod.load_preset(name)
    with _user_errors():
        if model:
            data = cfg.model_dump(mode="json")
            data["bases"][0]["model"] = model
            cfg = cfgmod.parse_config(data, f"preset {name} with --model")
        cfgmod.check_local_paths(cfg)
        target = target or _default_out(cfg)
        path = pipeline.run_all(cfg, target)
    _print_answer(path)
    typer.echo(
        f"\nDemo finished. Report: {path}\n  (markdown: {Path(path).parent.parent / 'report.md'})"
    )
    _exit_status(target, "run", allow_skipped=True)  # a demo says what it left out, exits 0


@scenarios_app.command("list")
def scenarios_list() -> None:
    """One line per scenario: id, domain, recipient, goal."""
    from charshift import scenarios

    for sc in scenarios.load_bank():
        to = ", ".join(r.name for r in sc.recipients)
        typer.echo(f"{sc.id:<36} {sc.domain:<20} to {to}: {sc.goal}")


def _validated(kind: str, path: Path | None, scenarios_path: Path | None = None) -> Any:
    """`banks.load`: the one validator of the run and these commands; a bad bank fails here."""
    from charshift import banks
    from charshift.scenarios import ScenarioError

    try:
        return banks.load(kind, path, scenarios_path=scenarios_path)
    except ScenarioError as err:
        _fail(str(err))


def _ok_line(bank: Any, what: str) -> str:
    sl = ", ".join(registry.names(items=bank.kind))
    return (
        f"ok: {len(bank.items)} {what} across {len(bank.domains)} domains render in every "
        f"slice of their kind ({sl}); {bank.source.source}, sha256 {bank.source.sha256[:16]}"
    )


@scenarios_app.command("validate")
def scenarios_validate(
    path: Annotated[
        Path | None, typer.Argument(help="A scenario bank YAML (default: the bundled one).")
    ] = None,
) -> None:
    """Validate a scenario bank and render every scenario in every slice (the run's validator:
    `scenarios: {path: FILE}` in a config runs the same checks)."""
    bank = _validated("scenario", path)
    typer.echo(_ok_line(bank, "scenarios"))


def _check_persona(persona: str | None, config: Path | None = None) -> Any:
    """The persona to show a prompt under: a bundled name, or one of `config`'s personas (a
    persona of the user's own, `{name, description}`); None without --persona."""
    if persona is None:
        return None
    if config is not None:
        cfg = _load(config, None, None)
        specs = {p.name: p for p in cfg.personas}
        if persona not in specs:
            _fail(f"--persona: {config} has no persona {persona!r}; it has {', '.join(specs)}")
        return specs[persona]
    if persona not in cfgmod.ALL_PERSONAS:
        _fail(f"--persona: unknown persona {persona!r}; known: {', '.join(cfgmod.ALL_PERSONAS)} "
              "(a persona of your own: add --config CONFIG, the run config that describes it)")  # fmt: skip
    return persona


def _print_messages(ep: Any, persona: Any) -> None:
    from charshift import formats, prompts

    pp = prompts.persona_system_prompt(persona) if persona else None
    for m in formats.preview(ep, pp):
        typer.secho(f"--- {m['role']}{' ' + m['note'] if m.get('note') else ''}", bold=True)
        typer.echo(m["content"])
    if ep.tools and ep.mode != "chat":
        typer.secho(f"--- tools: {', '.join(t['function']['name'] for t in ep.tools)}", bold=True)
    if ep.response_schema:
        typer.secho("--- the answer must match the JSON schema shown above", bold=True)


PersonaOpt = Annotated[
    str | None,
    typer.Option(help="Show it under the prompted stage of this persona (bundled, or --config's)."),
]
PersonaConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="A run config whose personas --persona may name (your own)."),
]


@scenarios_app.command("show")
def scenarios_show(
    scenario_id: Annotated[str, typer.Argument(help="Scenario id (`charshift scenarios list`).")],
    slice_: Annotated[
        str, typer.Option("--slice", help="Which scenario slice (scenario_chat or an email slice).")
    ] = "chat_email",
    persona: PersonaOpt = None,
    config: PersonaConfigOpt = None,
) -> None:
    """Print the exact messages a slice sends for one scenario."""
    from charshift import formats, scenarios

    if slice_ not in cfgmod.SCENARIO_SLICES:
        _fail(f"--slice: {slice_!r} is not a scenario slice; one of {list(cfgmod.SCENARIO_SLICES)}")
    bank = {sc.id: sc for sc in scenarios.load_bank()}
    if scenario_id not in bank:
        _fail(f"no scenario {scenario_id!r}; see `charshift scenarios list`")
    spec = _check_persona(persona, config)
    _print_messages(formats.render_scenario(slice_, bank[scenario_id]), spec)


KindArg = Annotated[
    str, typer.Argument(help="The item bank: a scaffold's name (`charshift slices`).")
]
ScenariosPathOpt = Annotated[
    Path | None,
    typer.Option(
        "--scenarios",
        help="The scenario bank the agentic items' worlds come from (default: bundled).",
    ),
]


def _kind(kind: str) -> str:
    from charshift import items

    if kind not in items.KINDS:
        _fail(f"unknown item bank {kind!r}; one of {list(items.KINDS)}")
    return kind


@items_app.command("list")
def items_list(
    kind: Annotated[str | None, typer.Argument(help="A bank; without one, every bank.")] = None,
) -> None:
    """Every scaffold's bank (items, domains, slices), or one line per item of one bank."""
    from charshift import items

    if kind is None:
        for k in items.KINDS:
            bank = _validated(k, None)
            sl = ", ".join(registry.names(items=k))
            typer.echo(f"{k:<22} {len(bank.items):>3} items, {len(bank.domains)} domains ({sl})")
        return
    for it in _validated(_kind(kind), None).items:
        typer.echo(f"{it.id:<28} {it.domain:<22} {_gist(it)}")


def _gist(it: Any) -> str:
    for name in ("title", "form", "motion", "scene", "question", "task"):
        if hasattr(it, name):
            return str(getattr(it, name))
    return ""


@items_app.command("validate")
def items_validate(
    kind: KindArg,
    path: Annotated[
        Path | None, typer.Argument(help="An item bank YAML (default: the bundled one).")
    ] = None,
    scenarios_path: ScenariosPathOpt = None,
) -> None:
    """Validate an item bank and render every item in every slice of its kind (the run's
    validator: `items: {KIND: {path: FILE}}` in a config runs the same checks)."""
    bank = _validated(_kind(kind), path, scenarios_path)
    typer.echo(_ok_line(bank, f"{kind} items"))


@items_app.command("show")
def items_show(
    kind: KindArg,
    item_id: Annotated[str, typer.Argument(help="Item id (`charshift items list KIND`).")],
    slice_: Annotated[
        str | None, typer.Option("--slice", help="The scaffold (default) or its NAME_chat control.")
    ] = None,
    persona: PersonaOpt = None,
    config: PersonaConfigOpt = None,
) -> None:
    """Print the exact messages a scaffold (or its chat control) sends for one item."""
    from charshift import render
    from charshift.slices import RenderContext

    spec = _check_persona(persona, config)
    bank = _validated(_kind(kind), None)
    slice_ = slice_ or kind
    if slice_ not in registry.names(items=kind):
        _fail(f"--slice: {slice_!r} does not render {kind} items; one of "
              f"{list(registry.names(items=kind))}")  # fmt: skip
    found = [it for it in bank.items if it.id == item_id]
    if not found:
        _fail(f"no {kind} item {item_id!r}; see `charshift items list {kind}`")
    _print_messages(render.render(slice_, found[0], RenderContext(worlds=bank.worlds)), spec)


@app.command("export")
def export_cmd(
    path: Annotated[
        Path, typer.Argument(help="A run directory, or the --out folder of `report --predictions`.")
    ],
    parquet: Annotated[
        bool,
        typer.Option(
            "--parquet",
            help="Write rows.parquet (generations joined with predictions) and "
            "predictions.parquet (without conversations); nested cells as JSON text.",
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for the files (default: PATH).")
    ] = None,
) -> None:
    """Export a run's rows for other tools (pandas, polars, DuckDB, Spark)."""
    from charshift import api

    if not parquet:
        _fail("export: say which format, e.g. --parquet")
    with _user_errors():
        written = api.export_parquet(api.load_results(path), out or path)
    for p in written:
        typer.echo(f"wrote {p}")


@app.command("slices")
def slices_cmd() -> None:
    """The slice registry: each slice's family, mode, item bank, scored output, and the one
    thing that changes from its control."""
    for e in registry.SLICES.values():
        rung = f"{e.control} -> {e.name}: {e.changes}" if e.control else e.changes
        typer.echo(f"{e.name:<26} {e.family:<9} {e.mode:<13} {e.items:<21} {e.output:<7} {rung}")


@app.command("personas")
def personas_cmd(
    prompts_: Annotated[
        bool, typer.Option("--prompts", help="Also print each one's full system prompt.")
    ] = False,
) -> None:
    """The bundled personas with their descriptions (in the OCT classifiers' label order).

    A config's `personas:` takes these names, or your own: `{name: pirate, description: "You
    are ..."}` (the prompted stages' system prompt; `constitution: FILE` instead takes OCT's
    trait list), with a name that is a plain label (it is the classifier's label)."""
    from charshift import prompts

    texts = prompts.load_persona_prompts()
    for name, summary in prompts.load_persona_summaries().items():
        typer.echo(f"{name:<15} {summary}")
        if prompts_:
            typer.echo(f"{'':<15} {texts[name]}\n")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
