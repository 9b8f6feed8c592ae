"""The run config: one YAML file, validated on load, before any model is touched.

A bad field raises ConfigError naming the field (e.g. `sampling.top_p: Input should be less
than or equal to 1`). Presets are YAML files shipped in charshift/data/presets/.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from charshift.schema import BASE_STAGE, PROMPTED_STAGE, Sampling

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

ID_SLICES = ("id_chat", "id_chat_break", "id_chat_prefill")
EMAIL_SLICES = (
    "chat_email",
    "chat_email_multiturn",
    "email_syscontext",
    "tool_email_oneshot",
    "agentic_email",
)
ALL_SLICES = ID_SLICES + EMAIL_SLICES
# The ladder, from home ground outward: each rung adds one element to the one before.
LADDER = ("id_chat",) + EMAIL_SLICES


class ConfigError(ValueError):
    """A config problem, with the offending field named."""


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


class ClassifierTraining(_Strict):
    """Fine-tune an encoder on the run's ID generations (OCT's hyperparameters as defaults)."""

    encoder: str = "answerdotai/ModernBERT-base"
    stage: str = PROMPTED_STAGE  # which stage's ID-train rows are the training data
    epochs: float = 1.0
    lr: float = 5e-4
    batch_size: int = 8
    grad_accum: int = 2
    warmup_ratio: float = 0.05
    weight_decay: float = 1e-6
    max_length: int = 8192
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0


class BaseSpec(_Strict):
    name: str
    model: str  # HF id, local folder, "packaged:smollm2", or "tiny:llama|qwen2|gemma3"
    revision: str | None = None
    classifier: str | None = None  # HF id, local folder, "tiny:modernbert"; None = train in run
    adapters: dict[str, AdapterStage] = Field(default_factory=dict)  # stage -> source

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("base name must be non-empty and contain no '/'")
        return v


class SamplingConfig(_Strict):
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, ge=1)
    repetition_penalty: float = Field(1.1, gt=0.0)
    n_samples: int = Field(1, ge=1)
    seed: int = 0

    def to_sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.max_tokens, self.repetition_penalty)


class BackendConfig(_Strict):
    kind: Literal["hf", "vllm", "openai"] = "hf"
    batch_size: int = Field(16, ge=1)
    max_batch_tokens: int = Field(16384, ge=64)  # hf: padded prompt tokens per prefill
    kv_cache_mb: float = Field(1024, ge=0)  # hf: keys/values kept between an episode's steps; 0=off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    base_url: str | None = None  # openai backend
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(8, ge=1)  # openai backend
    max_model_len: int | None = None  # vllm
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vllm
    max_lora_rank: int = 64  # vllm


class IdPromptsConfig(_Strict):
    source: Literal["bundled", "pure_dove", "file"] = "bundled"
    path: str | None = None  # JSONL for source=file ({"id","prompt"[,"split"]})
    n_eval: int = Field(100, ge=1)
    n_train: int = Field(0, ge=0)  # prompts for classifier training (generated for one stage)
    exclude_first: int = 500  # PURE-DOVE conversations OCT's classifiers trained on
    seed: int = 0
    break_suffixes: list[int] = Field(default_factory=lambda: list(range(8)))


class ScenariosConfig(_Strict):
    ids: list[str] | None = None  # explicit scenario ids; None = all (or the first n)
    n: int | None = Field(None, ge=1)
    seed: int = 0


class RolloutConfig(_Strict):
    max_steps: int = Field(8, ge=1)
    max_malformed: int = Field(3, ge=1)
    stop_on_send: bool = True
    tool_protocol: Literal["json", "native"] = "json"


class ScoringConfig(_Strict):
    text: Literal["extracted", "raw"] = "extracted"
    batch_size: int = Field(16, ge=1)
    max_length: int = 8192


class StatsConfig(_Strict):
    n_boot: int = Field(1000, ge=10)
    ci: float = Field(0.95, gt=0, lt=1)
    method: Literal["percentile", "bca"] = "percentile"
    seed: int = 0


class PersonaPromptsConfig(_Strict):
    source: Literal["bundled", "constitutions"] = "bundled"
    path: str | None = None  # folder of OCT constitutions (one file per persona)


class RunConfig(_Strict):
    name: str = "run"
    description: str = ""
    meaningless: bool = False  # smoke preset: the report says its numbers mean nothing
    bases: list[BaseSpec]
    stages: list[str] = Field(default_factory=lambda: [BASE_STAGE, PROMPTED_STAGE])
    personas: list[str]
    slices: list[str] = Field(default_factory=lambda: ["id_chat"])
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    id_prompts: IdPromptsConfig = Field(default_factory=IdPromptsConfig)
    scenarios: ScenariosConfig = Field(default_factory=ScenariosConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    classifier_training: ClassifierTraining | None = None
    stats: StatsConfig = Field(default_factory=StatsConfig)
    persona_prompts: PersonaPromptsConfig = Field(default_factory=PersonaPromptsConfig)
    published: str | None = None  # "paper": set figures beside the published ones

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
        return v

    @model_validator(mode="after")
    def _stages_resolvable(self) -> RunConfig:
        names = [b.name for b in self.bases]
        if len(set(names)) != len(names):
            raise ValueError(f"bases: duplicate base names {names}")
        for i, b in enumerate(self.bases):
            for st in self.stages:
                if st in (BASE_STAGE, PROMPTED_STAGE):
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
        if self.classifier_training is not None:
            st = self.classifier_training.stage
            if st == BASE_STAGE or st not in self.stages:
                raise ValueError(
                    f"classifier_training.stage: {st!r} must be one of the run's non-base stages"
                )
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid run config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid run config ({source}): top level must be a mapping")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    return parse_config(data, str(p))


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
