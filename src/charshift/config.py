"""The run config: one YAML file, validated on load, before any model is touched.

A bad field raises ConfigError naming the field (e.g. `sampling.top_p: Input should be less
than or equal to 1`). Presets are YAML files shipped in charshift/data/presets/.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from charshift.schema import BASE_STAGE, PROMPTED_EXPLICIT_STAGE, PROMPTED_STAGE, Sampling
from charshift.scoring.registry import DEFAULT_SCORERS, check_scorer_names
from charshift.scoring.settings import JudgeSettings, PersonaVectorSettings, TrainSettings

ALL_PERSONAS = (
    "sarcasm",
    "humor",
    "remorse",
    "goodness",
    "loving",
    "misalignment",
    "nonchalance",
    "impulsiveness",
    "sycophancy",
    "mathematical",
    "poeticism",
)

# Slices rendered from the ID prompt bank (item id `prompt:ID`).
ID_SLICES = ("id_chat", "id_chat_break", "id_chat_prefill")
# Email slices written in a chat reply (scored on the extracted body; `.whole`/`.head` variants).
CHAT_EMAIL_SLICES = ("chat_email", "chat_email_multiturn", "email_syscontext")
# Email slices sent with the send_email tool.
TOOL_SLICES = ("tool_email_oneshot", "agentic_email")
EMAIL_SLICES = CHAT_EMAIL_SLICES + TOOL_SLICES
# Slices rendered from the scenario bank (item id `scenario:ID`, so they pair by scenario):
# scenario_chat asks for a chat answer about the scenario, the email slices for the email.
SCENARIO_SLICES = ("scenario_chat",) + EMAIL_SLICES
ALL_SLICES = ID_SLICES + SCENARIO_SLICES
# The chains, their rungs and contrasts live in `charshift.ladder`.


class ConfigError(ValueError):
    """A config problem, with the offending field named."""


# A name that becomes a folder or file name (the run's, a base's, a stage's): letters, digits, '_',
# '-', '.', '+', starting with a letter, digit or '_', no '..'. So no absolute path, no separator,
# no control character, no '.' or '..' can reach the file system through a name.
_SAFE_NAME = re.compile(r"\w[\w.+-]*\Z")
SAFE_NAME_MAX = 64
# The published figure sets a run can be set beside (`published:`).
PUBLISHED_SETS = ("paper",)
# A run config is a few KB; a file larger than this is refused before it is parsed.
_MAX_YAML_BYTES = 1 << 20
SEED_MAX = 2**32 - 1


def check_safe_name(value: str, what: str = "name") -> str:
    """`value` if it is a safe file name component (see `_SAFE_NAME`); a ValueError naming `what`."""
    if not _SAFE_NAME.match(value) or ".." in value or len(value) > SAFE_NAME_MAX:
        raise ValueError(
            f"{what} {value!r} is not a safe name (it becomes a folder name): use letters, "
            f"digits, '_', '-', '.', '+', start with a letter, digit or '_', no '..', "
            f"at most {SAFE_NAME_MAX} characters"
        )
    return value


def _no_duplicates(values: list[str], what: str) -> list[str]:
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ValueError(f"duplicate {what} {dup}: each may appear once")
    return values


_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)\Z")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_device(v: str) -> str:
    if not _DEVICE.match(v):
        raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
    return v


def _check_dtype(v: str) -> str:
    if v not in DTYPES:
        raise ValueError(f"unknown dtype {v!r}; use one of {list(DTYPES)}")
    return v


def _check_model_spec(v: str) -> str:
    if not v.strip() or re.search(r"[\x00-\x1f\x7f]", v):
        raise ValueError(f"{v!r} is not a model spec (empty, or holds control characters)")
    return v


Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterStage(_Strict):
    """Where a stage's per-persona adapters live. `{persona}` in any field is filled in."""

    repo: str | None = None
    subfolder: str | None = "{persona}"
    path: str | None = None  # local folder, e.g. /adapters/full/{persona}
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> AdapterStage:
        if bool(self.repo) == bool(self.path):
            raise ValueError("give exactly one of `repo` (HF id) or `path` (local folder)")
        return self


class BaseSpec(_Strict):
    name: str
    # HF id, local folder, "packaged:smollm2", or "tiny:llama|qwen2|gemma3"
    model: Annotated[str, AfterValidator(_check_model_spec)]
    revision: str | None = None
    classifier: str | None = None  # HF id, local folder, "tiny:modernbert"; None = train in run
    adapters: dict[str, AdapterStage] = Field(default_factory=dict)  # stage -> source

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_safe_name(v, "base name")

    @field_validator("adapters")
    @classmethod
    def _adapter_stages_ok(cls, v: dict[str, AdapterStage]) -> dict[str, AdapterStage]:
        for stage in v:
            check_safe_name(stage, "adapter stage")
        return v


class SamplingConfig(_Strict):
    temperature: float = Field(0.7, ge=0.0, le=10.0, allow_inf_nan=False)
    top_p: float = Field(0.95, gt=0.0, le=1.0, allow_inf_nan=False)
    max_tokens: int = Field(1024, ge=1, le=1 << 20)
    repetition_penalty: float = Field(1.1, gt=0.0, le=10.0, allow_inf_nan=False)
    n_samples: int = Field(1, ge=1, le=10_000)
    seed: Seed = 0
    # Per-slice generation budgets (tokens per model turn), overriding `max_tokens` for a slice:
    # an email needs room to reach its sign-off. Every slice named must be one the run generates.
    max_tokens_by_slice: dict[str, int] = Field(default_factory=dict)

    @field_validator("max_tokens_by_slice")
    @classmethod
    def _budgets_ok(cls, v: dict[str, int]) -> dict[str, int]:
        unknown = [s for s in v if s not in ALL_SLICES]
        if unknown:
            raise ValueError(f"unknown slice(s) {unknown}; known: {list(ALL_SLICES)}")
        bad = {s: n for s, n in v.items() if isinstance(n, bool) or n < 1 or n > 1 << 20}
        if bad:
            raise ValueError(f"token budgets must be >= 1 and <= {1 << 20}, got {bad}")
        return v

    def max_tokens_for(self, slice_: str | None) -> int:
        """The token budget of one model turn in `slice_` (the slice's override, or max_tokens)."""
        return self.max_tokens_by_slice.get(slice_ or "", self.max_tokens)

    def to_sampling(self, slice_: str | None = None) -> Sampling:
        """The sampling settings of a row of `slice_` (None: the run-wide `max_tokens`)."""
        return Sampling(
            self.temperature, self.top_p, self.max_tokens_for(slice_), self.repetition_penalty
        )


# Placeholders a `backend.command` template may use (see backends/server.py).
SERVER_PLACEHOLDERS = (
    "model",
    "host",
    "port",
    "adapters",
    "seed",
    "max_lora_rank",
    "max_loras",
    "max_cpu_loras",
)


class BackendConfig(_Strict):
    kind: Literal["hf", "vllm", "openai", "server"] = "hf"
    batch_size: int = Field(16, ge=1)
    max_batch_tokens: int = Field(16384, ge=64)  # hf: padded prompt tokens per prefill
    kv_cache_mb: float = Field(1024, ge=0)  # hf: keys/values kept between an episode's steps; 0=off
    device: Annotated[str, AfterValidator(_check_device)] = "auto"  # auto|cpu|cuda|cuda:N|mps
    dtype: Annotated[str, AfterValidator(_check_dtype)] = "auto"  # auto|float32|bfloat16|float16
    base_url: str | None = None  # openai backend
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(8, ge=1)  # openai/server: requests in flight per batch call
    max_model_len: int | None = None  # vllm
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vllm
    # vllm (offline and served), sglang: LoRA slots. max_lora_rank must be one of vLLM's ranks;
    # None = the smallest allowed rank that holds every adapter of the run. max_loras: adapters
    # in one batch; max_cpu_loras: adapters held at once (None = every adapter of the run, so
    # none is evicted and reloaded inside an engine step).
    max_lora_rank: int | None = None
    max_loras: int = Field(8, ge=1)
    max_cpu_loras: int | None = Field(None, ge=1)
    # openai/server: how a request selects an adapter ("auto": SGLang's "base:adapter" when the
    # server says it is SGLang, else the adapter's own model name, as vLLM serves it).
    adapter_syntax: Literal["auto", "model", "base:adapter"] = "auto"
    # openai/server: requests in flight at once in the streaming rollout (no step barrier).
    max_in_flight: int = Field(256, ge=1)
    # server: the serving engine charshift starts and stops itself (backends/server.py).
    engine: Literal["vllm", "sglang", "command"] | None = None
    command: str | None = None  # engine=command: a template, placeholders SERVER_PLACEHOLDERS
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0 = a free port
    startup_timeout: float = Field(900.0, gt=0)  # seconds to wait for the server's health
    extra_args: list[str] = Field(default_factory=list)  # appended to the engine's command line
    # server: batch-invariant engines, so a seeded row's text does not depend on what it was
    # batched with (vLLM: VLLM_BATCH_INVARIANT=1; SGLang: --enable-deterministic-inference).
    deterministic: bool = True

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_allowed(cls, v: int | None) -> int | None:
        from charshift.backends.vllm import VLLM_LORA_RANKS

        if v is not None and v not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of vLLM's LoRA ranks {list(VLLM_LORA_RANKS)}, not {v}")
        return v

    @field_validator("command")
    @classmethod
    def _command_placeholders(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import shlex
        import string

        try:
            parts = shlex.split(v)
            names = {
                f for p in parts for _, f, _, _ in string.Formatter().parse(p) if f is not None
            }
        except ValueError as err:
            raise ValueError(f"not a valid command template: {err}") from None
        unknown = sorted(n for n in names if n not in SERVER_PLACEHOLDERS)
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {unknown}; known: {list(SERVER_PLACEHOLDERS)}"
            )
        if not parts:
            raise ValueError("is empty")
        return v

    @model_validator(mode="after")
    def _server_fields(self) -> BackendConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )
        if self.kind == "server":
            if self.engine is None:
                raise ValueError("engine: required for kind: server (vllm | sglang | command)")
            if (self.engine == "command") != (self.command is not None):
                raise ValueError(
                    "command: required for engine: command, and only used with it"
                    f" (engine is {self.engine!r})"
                )
            if self.base_url is not None:
                raise ValueError("base_url: not used with kind: server (it starts its own server)")
        elif self.engine is not None or self.command is not None or self.extra_args:
            raise ValueError(
                f"engine/command/extra_args: only used with kind: server (kind is {self.kind!r})"
            )
        return self


class IdPromptsConfig(_Strict):
    source: Literal["bundled", "pure_dove", "file"] = "bundled"
    path: str | None = None  # JSONL for source=file ({"id","prompt"[,"split"]})
    n_eval: int = Field(100, ge=1)
    n_train: int = Field(0, ge=0)  # prompts for classifier training (generated for one stage)
    exclude_first: int = Field(500, ge=0)  # PURE-DOVE conversations OCT's classifiers trained on
    seed: Seed = 0
    break_suffixes: list[int] = Field(default_factory=lambda: list(range(8)))


class ScenariosConfig(_Strict):
    ids: list[str] | None = None  # explicit scenario ids; None = all (or the first n)
    n: int | None = Field(None, ge=1)
    seed: Seed = 0


class RolloutConfig(_Strict):
    """Tool episodes. The step budget of each episode is sized from its scenario: the calls a
    perfect agent needs (`formats.needed_calls`: one search per fact record, one look-up per
    recipient, the send) plus `step_margin`, so that a persona that searches more is not cut off
    by a budget a neutral agent just fits. `max_steps` is a floor of the agentic budget (an older
    config never gets fewer steps) and the budget of an episode rendered without one."""

    max_steps: int = Field(8, ge=1)
    step_margin: int = Field(4, ge=0)
    max_malformed: int = Field(3, ge=1)
    stop_on_send: bool = True
    # json: the tools and the JSON call format are described in the system prompt; the model's text
    # is parsed leniently. native: tool schemas go through the chat template (`tools`).
    # constrained: the json protocol's prompt, and each tool turn is decoded under a grammar of
    # the call envelope (`constrain.tool_call_schema`); string arguments stay free text.
    tool_protocol: Literal["json", "native", "constrained"] = "json"


class ScoringConfig(_Strict):
    text: Literal["extracted", "raw"] = "extracted"
    batch_size: int = Field(16, ge=1)
    # tokens per scored text; a classifier needs 2 for its special tokens, so fewer is refused
    max_length: int = Field(8192, ge=2, le=1 << 20)


class StatsConfig(_Strict):
    n_boot: int = Field(1000, ge=10)
    ci: float = Field(0.95, gt=0, lt=1)
    method: Literal["percentile", "bca"] = "percentile"
    seed: Seed = 0


class PersonaPromptsConfig(_Strict):
    source: Literal["bundled", "constitutions"] = "bundled"
    path: str | None = None  # folder of OCT constitutions (one file per persona)


class RunConfig(_Strict):
    name: str = "run"  # the default output folder is runs/<name>: a safe name
    description: str = ""
    meaningless: bool = False  # smoke preset: the report says its numbers mean nothing
    bases: list[BaseSpec] = Field(min_length=1)
    stages: list[str] = Field(default_factory=lambda: [BASE_STAGE, PROMPTED_STAGE], min_length=1)
    personas: list[str]
    slices: list[str] = Field(default_factory=lambda: ["id_chat"], min_length=1)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    id_prompts: IdPromptsConfig = Field(default_factory=IdPromptsConfig)
    scenarios: ScenariosConfig = Field(default_factory=ScenariosConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    # what reads persona from the outputs (`scoring.registry.SCORERS`); each scorer's settings
    # are its own section: the classifier's is `classifier_training` (how a classifier trained
    # in the run is trained; a base's `classifier` needs none)
    scorers: list[str] = Field(default_factory=lambda: list(DEFAULT_SCORERS), min_length=1)
    classifier_training: TrainSettings | None = None
    judge: JudgeSettings | None = None  # the `judge` scorer's model, backend and questions
    persona_vector: PersonaVectorSettings | None = None  # None: the defaults, where it is used
    stats: StatsConfig = Field(default_factory=StatsConfig)
    persona_prompts: PersonaPromptsConfig = Field(default_factory=PersonaPromptsConfig)
    published: str | None = None  # "paper": set figures beside the published ones

    @field_validator("name")
    @classmethod
    def _run_name_ok(cls, v: str) -> str:
        return check_safe_name(v, "run name")

    @field_validator("stages")
    @classmethod
    def _stages_ok(cls, v: list[str]) -> list[str]:
        for st in v:
            check_safe_name(st, "stage")
        return _no_duplicates(v, "stage(s)")

    @field_validator("scorers")
    @classmethod
    def _scorers_known(cls, v: list[str]) -> list[str]:
        return check_scorer_names(v)

    @field_validator("published")
    @classmethod
    def _published_known(cls, v: str | None) -> str | None:
        if v is not None and v not in PUBLISHED_SETS:
            raise ValueError(f"unknown published set {v!r}; known: {list(PUBLISHED_SETS)}")
        return v

    @field_validator("personas")
    @classmethod
    def _personas_known(cls, v: list[str]) -> list[str]:
        unknown = [p for p in v if p not in ALL_PERSONAS]
        if unknown:
            raise ValueError(f"unknown persona(s) {unknown}; known: {list(ALL_PERSONAS)}")
        if len(set(v)) != len(v) or len(v) < 2:
            raise ValueError("personas must be at least two distinct names")
        return v

    @field_validator("slices")
    @classmethod
    def _slices_known(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in ALL_SLICES]
        if unknown:
            raise ValueError(f"unknown slice(s) {unknown}; known: {list(ALL_SLICES)}")
        return _no_duplicates(v, "slice(s)")

    @model_validator(mode="after")
    def _stages_resolvable(self) -> RunConfig:
        names = [b.name for b in self.bases]
        if len(set(names)) != len(names):
            raise ValueError(f"bases: duplicate base names {names}")
        for i, b in enumerate(self.bases):
            for st in self.stages:
                if st in (BASE_STAGE, PROMPTED_STAGE, PROMPTED_EXPLICIT_STAGE):
                    continue
                if st not in b.adapters:
                    raise ValueError(
                        f"bases[{i}] ({b.name}): stage {st!r} needs an entry in `adapters` "
                        f"(have {sorted(b.adapters)})"
                    )
            if b.classifier is None and self.classifier_training is None:
                raise ValueError(
                    f"bases[{i}] ({b.name}): no `classifier` and no `classifier_training` section"
                )
        extra = sorted(set(self.sampling.max_tokens_by_slice) - set(self.slices))
        if extra:
            raise ValueError(
                f"sampling.max_tokens_by_slice: slice(s) {extra} are not in the run's slices "
                f"{self.slices}"
            )
        if self.classifier_training is not None:
            st = self.classifier_training.stage
            if st == BASE_STAGE or st not in self.stages:
                raise ValueError(
                    f"classifier_training.stage: {st!r} must be one of the run's non-base stages"
                )
        return self

    @model_validator(mode="after")
    def _scorer_sections(self) -> RunConfig:
        """The judge's section and backend, and what persona vectors are fitted on."""
        if "judge" in self.scorers and self.judge is None:
            raise ValueError("judge: `scorers` names judge, so the config needs a `judge` section")
        if self.judge is not None:
            judge_backend(self.judge)
        if "persona_vector" in self.scorers:
            _check_persona_vector(self)
        return self

    @property
    def persona_vector_settings(self) -> PersonaVectorSettings:
        """The `persona_vector` section, or its defaults."""
        return self.persona_vector or PersonaVectorSettings()

    def train_stages(self) -> list[str]:
        """The stages whose ID training rows are generated: the classifier's training stage, and
        the two stages persona vectors are fitted on."""
        out = [self.classifier_training.stage] if self.classifier_training else []
        if "persona_vector" in self.scorers:
            out += [BASE_STAGE, self.persona_vector_settings.stage]
        return list(dict.fromkeys(out))


def _check_persona_vector(cfg: RunConfig) -> None:
    """Persona vectors are fitted on the ID training rows of the base stage and
    `persona_vector.stage`: a ValueError saying what the config lacks for that."""
    pv = cfg.persona_vector_settings
    missing = []
    if "id_chat" not in cfg.slices:
        missing.append(f"id_chat in `slices` (have {cfg.slices})")
    if cfg.id_prompts.n_train < 2:
        missing.append(f"id_prompts.n_train >= 2 (have {cfg.id_prompts.n_train})")
    if pv.stage == BASE_STAGE:
        missing.append(f"persona_vector.stage other than {BASE_STAGE!r}")
    elif BASE_STAGE not in cfg.stages or pv.stage not in cfg.stages:
        missing.append(f"stages {BASE_STAGE!r} and {pv.stage!r} (have {cfg.stages})")
    if missing:
        raise ValueError(
            "persona_vector: its directions are fitted on the ID training rows of the base "
            f"stage and persona_vector.stage; the config needs {'; '.join(missing)}"
        )
    for field, check in (("device", _check_device), ("dtype", _check_dtype)):
        value = getattr(pv, field)
        if value is not None:
            try:
                check(value)
            except ValueError as err:
                raise ValueError(f"persona_vector.{field}: {err}") from None


def judge_backend(judge: JudgeSettings) -> BackendConfig:
    """The judge's backend settings (`judge.backend`) checked as a run's `backend:` section; a
    ValueError naming `judge.backend.FIELD`."""
    try:
        b = BackendConfig.model_validate(judge.backend)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in ("judge", "backend", *e["loc"]))
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "extra_forbidden" and "key" in str(e["loc"][-1]).lower():
            msg += " (give `api_key_env`, the NAME of the environment variable with the key)"
        raise ValueError(f"{loc}: {msg.removeprefix('Value error, ')}") from None
    if b.kind == "openai" and not b.base_url:
        raise ValueError("judge.backend.base_url: required for a judge on kind: openai")
    return b


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid run config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        if not loc:  # a whole-config check: its message names the field itself
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid run config ({source}): top level must be a mapping, got {type(data).__name__}"
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def read_config_text(path: str | Path) -> str:
    """The text of a config file, or a ConfigError saying why it cannot be read."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        if p.stat().st_size > _MAX_YAML_BYTES:
            raise ConfigError(f"config file {p} is larger than {_MAX_YAML_BYTES} bytes")
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file {p} cannot be read: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line})"
        ) from None


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> data, with a ConfigError for invalid, duplicate-key or absurdly nested YAML."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {source} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"config file {source}: YAML nested too deeply") from None


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    data = parse_yaml(read_config_text(p), str(p))
    if data is None:
        raise ConfigError(f"config file {p} is empty")
    return parse_config(data, str(p))


def check_local_paths(cfg: RunConfig) -> None:
    """Before a run starts: every model or classifier given as a local path is a model folder of
    the right kind (reads config.json only; nothing is hashed), and an ID prompts file is JSONL
    that can be read. A ConfigError names the field.

    Not part of validation, because a finished run's stored config is read again (`report --run`)
    after its model folders may be gone."""
    from charshift.inputs import InputError, check_model_source, read_jsonl_objects

    try:
        if cfg.id_prompts.source == "file" and cfg.id_prompts.path:
            read_jsonl_objects(cfg.id_prompts.path, "id_prompts.path: file")
        for i, b in enumerate(cfg.bases):
            check_model_source(b.model, f"bases.{i}.model", classifier=False)
            if b.classifier is not None:
                check_model_source(b.classifier, f"bases.{i}.classifier", classifier=True)
        if cfg.judge is not None and judge_backend(cfg.judge).kind != "openai":
            check_model_source(cfg.judge.model, "judge.model", classifier=False)
    except InputError as err:
        raise ConfigError(f"invalid run config: {err}") from None


def preset_names() -> list[str]:
    folder = resources.files("charshift") / "data" / "presets"
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    f = resources.files("charshift") / "data" / "presets" / f"{name}.yaml"
    if not f.is_file():
        raise ConfigError(f"unknown preset {name!r}; known: {preset_names()}")
    return f.read_text()


def load_preset(name: str) -> RunConfig:
    return parse_config(yaml.safe_load(preset_text(name)), f"preset {name}")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
