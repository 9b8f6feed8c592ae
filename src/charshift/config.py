"""The run config: one YAML file, validated on load, before any model is touched.

A bad field raises ConfigError naming the field (e.g. `sampling.top_p: Input should be less
than or equal to 1`). Presets are YAML files shipped in charshift/data/presets/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from charshift import slices as _slices
from charshift.backends.settings import KINDS as BACKEND_KINDS
from charshift.backends.settings import BackendSettings, HFSettings, kinds_with
from charshift.backends.settings import migrate as migrate_backend
from charshift.schema import (
    BASE_STAGE,
    MAX_N_BOOT,
    PROMPTED_EXPLICIT_STAGE,
    PROMPTED_STAGE,
    Sampling,
)
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

# Name tuples derived from the slice registry (`charshift.slices`), for the modules that import
# them; code that must see a slice registered at run time calls `slices.names(...)`.
# Slices rendered from the ID prompt bank (item id `prompt:ID`).
ID_SLICES = _slices.names(items="prompt")
# Email slices written in a chat reply (scored on the extracted body; `.whole`/`.head` variants).
CHAT_EMAIL_SLICES = _slices.names(family="email", output="email", mode="chat")
# Slices whose prompt describes tools (the tool protocol applies): the email tool slices and
# the agentic scaffolds.
TOOL_SLICES = _slices.names(tools=True)
EMAIL_SLICES = _slices.names(family="email", output="email")
# Slices rendered from the scenario bank (item id `scenario:ID`, so they pair by scenario):
# scenario_chat asks for a chat answer about the scenario, the email slices for the email.
SCENARIO_SLICES = _slices.names(items="scenario")
# Every slice: home ground outward, then each scaffold's chat control and the scaffold.
ALL_SLICES = _slices.names()
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
# What the samplers can handle: a temperature below MIN_TEMPERATURE (but 0, greedy) or a
# repetition penalty below MIN_REPETITION_PENALTY scales logits past float32's range (inf, then
# NaN probabilities); a top_p below MIN_TOP_P rounds to 0 in float32 and keeps no token.
MIN_TEMPERATURE = 0.01
MIN_REPETITION_PENALTY = 0.01
MIN_TOP_P = 1e-6


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
    top_p: float = Field(0.95, ge=MIN_TOP_P, le=1.0, allow_inf_nan=False)
    max_tokens: int = Field(1024, ge=1, le=1 << 20)
    repetition_penalty: float = Field(1.1, ge=MIN_REPETITION_PENALTY, le=10.0, allow_inf_nan=False)
    n_samples: int = Field(1, ge=1, le=10_000)
    seed: Seed = 0
    # Per-slice generation budgets (tokens per model turn), overriding `max_tokens` for a slice:
    # an email needs room to reach its sign-off. Every slice named must be one the run generates.
    max_tokens_by_slice: dict[str, int] = Field(default_factory=dict)

    @field_validator("max_tokens_by_slice")
    @classmethod
    def _budgets_ok(cls, v: dict[str, int]) -> dict[str, int]:
        known = _slices.names()
        unknown = [s for s in v if s not in known]
        if unknown:
            raise ValueError(f"unknown slice(s) {unknown}; known: {list(known)}")
        bad = {s: n for s, n in v.items() if isinstance(n, bool) or n < 1 or n > 1 << 20}
        if bad:
            raise ValueError(f"token budgets must be >= 1 and <= {1 << 20}, got {bad}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature_ok(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(
                f"{v:g} is too small for the sampler (logits divided by it leave float32's "
                f"range): use 0 for greedy decoding, or at least {MIN_TEMPERATURE}"
            )
        return v

    def max_tokens_for(self, slice_: str | None) -> int:
        """The token budget of one model turn in `slice_` (the slice's override, or max_tokens)."""
        return self.max_tokens_by_slice.get(slice_ or "", self.max_tokens)

    def to_sampling(self, slice_: str | None = None) -> Sampling:
        """The sampling settings of a row of `slice_` (None: the run-wide `max_tokens`)."""
        return Sampling(
            self.temperature, self.top_p, self.max_tokens_for(slice_), self.repetition_penalty
        )


# `backend:` is one of the backend kinds' settings (backends/settings.py), keyed on `kind`; a
# stored config of an older version (a flat dump of every kind's fields) is migrated on the way in.
BackendConfig = Annotated[BackendSettings, BeforeValidator(migrate_backend)]
_BACKEND_ADAPTER: TypeAdapter[BackendSettings] = TypeAdapter(BackendConfig)


class IdPromptsConfig(_Strict):
    source: Literal["bundled", "pure_dove", "file"] = "bundled"
    path: str | None = None  # JSONL for source=file ({"id","prompt"[,"split"]})
    n_eval: int = Field(100, ge=1)
    n_train: int = Field(0, ge=0)  # prompts for classifier training (generated for one stage)
    exclude_first: int = Field(500, ge=0)  # PURE-DOVE conversations OCT's classifiers trained on
    seed: Seed = 0
    break_suffixes: list[int] = Field(default_factory=lambda: list(range(8)))


class BankConfig(_Strict):
    """Which items of a bank a run uses: the bundled bank, or a validated bank of the user's
    (`path`, a YAML file checked by the same validator as `charshift items validate`); `ids`
    picks items, `n` a seeded sample of them (`seed`)."""

    path: str | None = None
    # explicit item ids; None = all (or a sample of n); an empty list would drop every slice of
    # the bank without a word, so it is refused
    ids: list[str] | None = Field(None, min_length=1)
    n: int | None = Field(None, ge=1)
    seed: Seed = 0


ScenariosConfig = BankConfig  # `scenarios:`: the scenario bank's selection


class OptInBlock(_Strict):
    """Slices a config offers but runs only when the block is switched on (`enabled: true`, or
    `charshift run --with NAME`); `--dry-run` prints the block's cost on its own either way."""

    enabled: bool = False
    description: str = ""
    slices: list[str] = Field(min_length=1)

    @field_validator("slices")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        known = _slices.names()
        unknown = [s for s in v if s not in known]
        if unknown:
            raise ValueError(f"unknown slice(s) {unknown}; known: {list(known)}")
        return _no_duplicates(v, "slice(s)")


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
    n_boot: int = Field(1000, ge=10, le=MAX_N_BOOT)
    ci: float = Field(0.95, gt=0, lt=1)
    method: Literal["percentile", "bca"] = "percentile"
    seed: Seed = 0
    # permutations behind each cell's p_null (labels permuted within items); 0: no p_null
    n_perm: int = Field(1000, ge=0)
    # the expanded percentile interval (t on G-1 degrees of freedom, see charshift.stats)
    small_sample: bool = True


class AnalysisConfig(_Strict):
    # the stage scored in every unit to check that the scorer can see persona there (the
    # persona told to show in every format); None: no scorer check
    positive_control: str | None = PROMPTED_EXPLICIT_STAGE

    @field_validator("positive_control")
    @classmethod
    def _control_ok(cls, v: str | None) -> str | None:
        if v is None:
            return v
        check_safe_name(v, "positive_control")
        if v == BASE_STAGE:
            raise ValueError("the base stage carries no persona: it cannot be a positive control")
        return v


class ReportConfig(_Strict):
    # each figure also as an SVG file beside its PNG (off by default: at paper scale the SVGs
    # run to tens of MB, and the report embeds the PNGs)
    svg: bool = False


# A persona's name is a plain label: it is the classifier's label, fills `{persona}` in adapter
# paths (a folder name), and heads a column of every table and plot. Letters, digits, '_' and '-',
# starting with a letter (so never one of the null persona's markers, `__null__` or `-`).
_PERSONA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
PERSONA_NAME_MAX = 40
PERSONA_DESCRIPTION_MAX = 8000


def _persona_entry(v: Any) -> Any:
    """A `personas:` entry as written: a bundled name (a string) is `{name: NAME}`."""
    return {"name": v} if isinstance(v, str) else v


class PersonaSpec(_Strict):
    """One persona of a run: a bundled name, or the user's own `{name, description}`, with an
    optional `constitution` file (OCT's trait list, or free text). The prompted stages' system
    prompt is the constitution where one is given, else the description, else (a bundled name)
    the run-wide `persona_prompts` source; adapters fill `{persona}` with the name; a probe
    trained in the run, and a given classifier, use the names as the label set."""

    name: str
    description: str | None = None
    constitution: str | None = None  # a file: .json / .jsonl trait list, or .txt / .md text

    @field_validator("name")
    @classmethod
    def _plain_label(cls, v: str) -> str:
        if not _PERSONA_NAME.match(v) or len(v) > PERSONA_NAME_MAX:
            raise ValueError(
                f"persona name {v!r} is not a plain label: use letters, digits, '_' and '-', "
                f"starting with a letter, at most {PERSONA_NAME_MAX} characters (it is the "
                "classifier's label and fills `{persona}` in adapter paths)"
            )
        return v

    @field_validator("description", "constitution")
    @classmethod
    def _text_ok(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("must not be empty (leave the field out instead)")
        if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", v) or len(v) > PERSONA_DESCRIPTION_MAX:
            raise ValueError(
                f"must be text of at most {PERSONA_DESCRIPTION_MAX} characters, without "
                "control characters"
            )
        return v

    @property
    def bundled(self) -> bool:
        """A bundled name with nothing of the user's: its text comes from `persona_prompts`."""
        return self.description is None and self.constitution is None

    @model_serializer(mode="wrap")
    def _as_written(self, handler: Any) -> Any:
        """A bundled name is stored as the plain name it was written as (so a run's resolved
        config stays what it was before personas could be the user's own)."""
        if self.bundled:
            return self.name
        return {k: v for k, v in handler(self).items() if v is not None}


PersonaEntry = Annotated[PersonaSpec, BeforeValidator(_persona_entry)]


class PersonaPromptsConfig(_Strict):
    source: Literal["bundled", "constitutions"] = "bundled"
    path: str | None = None  # folder of OCT constitutions (one file per persona)


class RunConfig(_Strict):
    name: str = "run"  # the default output folder is runs/<name>: a safe name
    description: str = ""
    meaningless: bool = False  # smoke preset: the report says its numbers mean nothing
    bases: list[BaseSpec] = Field(min_length=1)
    stages: list[str] = Field(default_factory=lambda: [BASE_STAGE, PROMPTED_STAGE], min_length=1)
    # a bundled name, or `{name, description}` (plus an optional `constitution` file)
    personas: list[PersonaEntry]
    slices: list[str] = Field(default_factory=lambda: ["id_chat"], min_length=1)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    backend: BackendConfig = Field(default_factory=HFSettings)
    id_prompts: IdPromptsConfig = Field(default_factory=IdPromptsConfig)
    scenarios: BankConfig = Field(default_factory=BankConfig)
    # each scaffold's item bank (kind -> selection; a kind not named: its whole bundled bank)
    items: dict[str, BankConfig] = Field(default_factory=dict)
    opt_in: dict[str, OptInBlock] = Field(default_factory=dict)
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
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    # how the report is written (not what it says)
    report: ReportConfig = Field(default_factory=ReportConfig)
    persona_prompts: PersonaPromptsConfig = Field(default_factory=PersonaPromptsConfig)
    published: str | None = None  # "paper": set figures beside the published ones
    # what an adapter that changes nothing does (adapter_probe.py): stop the run, skip only its
    # rows (named as skipped), or no probe
    adapter_probe: Literal["strict", "warn", "off"] = "strict"

    @field_validator("name")
    @classmethod
    def _run_name_ok(cls, v: str) -> str:
        return check_safe_name(v, "run name")

    @field_validator("adapter_probe", mode="before")
    @classmethod
    def _probe_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

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
    def _personas_known(cls, v: list[PersonaSpec]) -> list[PersonaSpec]:
        unknown = [p.name for p in v if p.name not in ALL_PERSONAS and p.description is None]
        if unknown:
            raise ValueError(
                f"unknown persona(s) {unknown}; bundled: {list(ALL_PERSONAS)} (`charshift "
                "personas`); a persona of your own needs a description: "
                "{name: NAME, description: ...}"
            )
        names = [p.name for p in v]
        _no_duplicates(names, "persona(s)")
        if len(names) < 2:
            raise ValueError("personas must be at least two distinct names")
        return v

    @property
    def persona_names(self) -> list[str]:
        """The run's personas by name, in config order: the label set of its scorers."""
        return [p.name for p in self.personas]

    @field_validator("slices")
    @classmethod
    def _slices_known(cls, v: list[str]) -> list[str]:
        known = _slices.names()
        unknown = [s for s in v if s not in known]
        if unknown:
            raise ValueError(f"unknown slice(s) {unknown}; known: {list(known)}")
        return _no_duplicates(v, "slice(s)")

    @model_validator(mode="after")
    def _opt_in_and_banks(self) -> RunConfig:
        """Switched-on blocks join the run's slices (once); every `items:` kind is a scaffold's
        bank that a slice of the run, or of an opt-in block, renders."""
        for block in self.opt_in.values():
            if block.enabled:
                self.slices += [s for s in block.slices if s not in self.slices]
        for name in self.opt_in:
            check_safe_name(name, "opt_in block")
        offered = set(self.slices).union(*(b.slices for b in self.opt_in.values()))
        kinds = _slices.scaffold_kinds()
        for kind in self.items:
            if kind not in kinds:
                raise ValueError(f"items.{kind}: unknown item bank; known: {list(kinds)}")
            users = [s for s in _slices.names(items=kind) if s in offered]
            if not users:
                raise ValueError(
                    f"items.{kind}: no slice of the run renders it (add one of "
                    f"{list(_slices.names(items=kind))} to `slices`)"
                )
        return self

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
        offered = set(self.slices).union(*(b.slices for b in self.opt_in.values()))
        extra = sorted(set(self.sampling.max_tokens_by_slice) - offered)
        if extra:
            raise ValueError(
                f"sampling.max_tokens_by_slice: slice(s) {extra} are not in the run's slices "
                f"{self.slices}"
            )
        control = self.analysis.positive_control
        # the default may be absent (the report then says there is no scorer check); a stage
        # named on purpose must be one of the run's
        if control not in (None, PROMPTED_EXPLICIT_STAGE):
            if control not in self.stages:
                raise ValueError(
                    f"analysis.positive_control: {control!r} is not one of the run's stages "
                    f"{self.stages}; add it to `stages` or set it to null"
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
        """The classifier, the judge's section and backend, and what persona vectors are fitted
        on. The classifier is required: the report's primary family, figures and headline read
        it, and every other scorer is compared with it."""
        if "classifier" not in self.scorers:
            raise ValueError(
                f"scorers: {self.scorers} leaves out classifier, which every run needs (the "
                "report's primary figures read it; the others are compared with it). Add it, e.g. "
                "scorers: [classifier, " + ", ".join(self.scorers) + "], with a classifier per "
                "base or one trained in the run (classifier_training: {mode: probe})"
            )
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


def judge_backend(judge: JudgeSettings) -> BackendConfig:
    """The judge's backend settings (`judge.backend`) checked as a run's `backend:` section; a
    ValueError naming `judge.backend.FIELD`."""
    try:
        b = _BACKEND_ADAPTER.validate_python(judge.backend)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in ("judge", "backend", *e["loc"]))
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "extra_forbidden" and "key" in str(e["loc"][-1]).lower():
            msg += " (give `api_key_env`, the NAME of the environment variable with the key)"
        raise ValueError(f"{loc}: {msg.removeprefix('Value error, ')}") from None
    if b.kind == "openai" and not getattr(b, "base_url", None):
        raise ValueError("judge.backend.base_url: required for a judge on kind: openai")
    return b


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid run config ({source}):"]
    for e in err.errors():
        loc, msg = _located(e)
        if not loc:  # a whole-config check: its message names the field itself
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _located(e: Any) -> tuple[str, str]:
    """(dotted location, message) of one validation error. A backend field's location loses the
    union's tag (`backend.hf.device` -> `backend.device`); an unknown backend kind, and a field
    that belongs to another kind, say so."""
    parts, msg, kind = list(e["loc"]), e["msg"], None
    if parts[:1] == ["backend"] and e["type"] == "union_tag_invalid":
        ctx = e.get("ctx") or {}
        return "backend.kind", f"unknown kind {ctx.get('tag')!r}; one of {ctx.get('expected_tags')}"
    if parts[:1] == ["backend"] and len(parts) > 1 and parts[1] in BACKEND_KINDS:
        kind = parts.pop(1)
    if e["type"] == "extra_forbidden":
        owners = kinds_with(str(parts[-1])) if kind and len(parts) == 2 else []
        msg = (
            f"not a setting of kind: {kind} (a setting of kind: {', '.join(owners)})"
            if owners
            else "unknown field"
        )
    return ".".join(str(p) for p in parts), msg


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid run config ({source}): top level must be a mapping, got {type(data).__name__}"
        )
    where = _set_in(data)
    if where is not None:
        raise ConfigError(
            f"invalid run config ({source}):\n  {where}: a set has no order (a run could not "
            "resume its own rows); give a list"
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def _set_in(data: Any, path: str = "") -> str | None:
    """The dotted path of the first set (or frozenset) in a config's data, or None."""
    if isinstance(data, set | frozenset):
        return path or "(top level)"
    items = (
        data.items()
        if isinstance(data, dict)
        else enumerate(data)
        if isinstance(data, list | tuple)
        else ()
    )
    for k, v in items:
        found = _set_in(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


class _Unordered(yaml.constructor.ConstructorError):
    """Valid YAML that a run config cannot use: a set, which has no order."""


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

    def construct_unordered_set(self, node: yaml.Node) -> Any:
        """A YAML set (`!!set`, `? a`) has no order: personas, stages or slices given as one
        would come out in the order of Python's string hash, different in every process, so a
        run could not resume its own rows. Refused; a list says the order."""
        raise _Unordered(
            None, None, "a YAML set (!!set) has no order; give a list [a, b, ...]", node.start_mark
        )


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:set", _UniqueKeyLoader.construct_unordered_set)


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


def parse_yaml(
    text: str, source: str, what: str = "config file", error: type[Exception] = ConfigError
) -> Any:
    """YAML text -> data; an `error` naming `what` and `source` for invalid YAML, a key given
    twice, a set (no order) or absurdly deep nesting."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except _Unordered as err:
        line = err.problem_mark.line + 1 if err.problem_mark else "?"
        raise error(f"{what} {source} line {line}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise error(f"{what} {source} is not valid YAML: {err}") from None
    except RecursionError:
        raise error(f"{what} {source}: YAML nested too deeply") from None


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    data = parse_yaml(read_config_text(p), str(p))
    if data is None:
        raise ConfigError(f"config file {p} is empty")
    return parse_config(data, str(p))


def check_local_paths(cfg: RunConfig) -> None:
    """The preflight of every command that runs a config, dry run included, before any model
    loads: every local path the config names exists and is what it should be. Model and
    classifier folders are model folders of the right kind (config.json only is read), each
    adapter folder of a `path:` stage (after `{persona}` is filled in, for every persona of the
    run) holds adapter_config.json, an ID prompts file is JSONL that can be read, a classifier
    encoder and a constitutions folder given as paths exist. One ConfigError names every problem
    with its field.

    Not part of validation, because a finished run's stored config is read again (`report --run`)
    after its model folders may be gone."""
    problems = [p for p in _local_path_problems(cfg) if p]
    if len(problems) == 1:
        raise ConfigError(f"invalid run config: {problems[0]}")
    if problems:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems))


def _local_path_problems(cfg: RunConfig) -> Iterator[str | None]:
    from charshift.inputs import InputError, check_model_source, read_jsonl_objects

    def attempt(check: Any, *args: Any, **kwargs: Any) -> str | None:
        try:
            check(*args, **kwargs)
        except InputError as err:
            return str(err)
        return None

    if cfg.id_prompts.source == "file" and cfg.id_prompts.path:
        yield attempt(read_jsonl_objects, cfg.id_prompts.path, "id_prompts.path: file")
    for i, b in enumerate(cfg.bases):
        yield attempt(check_model_source, b.model, f"bases.{i}.model", classifier=False)
        if b.classifier is not None:
            what = f"bases.{i}.classifier"
            yield attempt(check_model_source, b.classifier, what, classifier=True)
        yield from _adapter_problems(cfg, i, b)
    if cfg.classifier_training is not None:
        yield _folder_problem(cfg.classifier_training.encoder, "classifier_training.encoder")
    if cfg.persona_prompts.source == "constitutions" and cfg.persona_prompts.path:
        yield _folder_problem(cfg.persona_prompts.path, "persona_prompts.path", scheme=False)
    for i, p in enumerate(cfg.personas):
        if p.constitution and not Path(p.constitution).expanduser().is_file():
            yield f"personas.{i}.constitution ({p.name}): file not found: {p.constitution}"
    if cfg.judge is not None and judge_backend(cfg.judge).kind != "openai":
        yield attempt(check_model_source, cfg.judge.model, "judge.model", classifier=False)


def _adapter_problems(cfg: RunConfig, i: int, base: BaseSpec) -> Iterator[str]:
    """Each local adapter folder the run loads: one per persona of each adapter stage it runs."""
    for stage in cfg.stages:
        src = base.adapters.get(stage)
        if src is None or not src.path or src.path.startswith("tiny-lora:"):
            continue  # a hub repo (checked when it downloads), or a tiny adapter built in the run
        for persona in cfg.persona_names:
            folder = Path(src.path.replace("{persona}", persona)).expanduser()
            what = f"bases.{i}.adapters.{stage}.path ({persona})"
            if not folder.is_dir():
                yield f"{what}: adapter folder not found: {folder}"
            elif not (folder / "adapter_config.json").is_file():
                yield f"{what}: {folder} is not an adapter folder (no adapter_config.json)"


def _folder_problem(spec: str, what: str, scheme: bool = True) -> str | None:
    """A spec that names a local folder must be a folder. With `scheme`, the spec may also be a
    hub id or a `packaged:`/`tiny:`/`hub:` spec (the loaders' to check): only one that looks like
    a path (absolute, ./, ../, ~) or names something that exists here is checked."""
    if scheme and ":" in spec and spec.partition(":")[0] in ("tiny", "packaged", "hub"):
        return None
    p = Path(spec).expanduser()
    local = not scheme or spec.startswith(("/", "./", "../", "~")) or p.exists()
    if local and not p.is_dir():
        return f"{what}: folder not found: {spec}"
    return None


def check_backend_available(backend: BackendConfig) -> None:
    """Before any model loads, on the machine that generates: the backend's package is
    installed and its device exists. A ConfigError naming the field and the fix. Not part of
    validation: a dry run or a report may run where the GPU is not."""
    if backend.kind == "vllm" and not _installed("vllm"):
        raise ConfigError(
            "backend.kind: vllm needs the vllm package, which is not installed here: "
            "pip install -e '.[vllm]' on a machine with a GPU (or kind: server with "
            "engine: vllm, or kind: hf)"
        )
    if backend.kind == "hf" and backend.device not in ("auto", "cpu"):
        _check_torch_device(backend.device)


def _installed(package: str) -> bool:
    import importlib.util
    import sys

    if package in sys.modules:
        return True
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _check_torch_device(device: str) -> None:
    import torch

    where = f"torch {torch.__version__} here"
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"backend.device: 'mps', but {where} has no MPS device; use cpu")
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":")[1]) if ":" in device else 0
    if n == 0:
        raise ConfigError(
            f"backend.device: {device!r}, but {where} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda or 'none'}); use cpu or auto"
        )
    if index >= n:
        raise ConfigError(
            f"backend.device: {device!r}, but {where} sees {n} CUDA device(s): cuda:0..cuda:{n - 1}"
        )


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
