"""The settings of each backend kind (`backend:` in a run config), one pydantic class per kind,
and `BackendSettings`, their union keyed on `kind`.

Each class belongs to its backend (hf.py, vllm.py, openai.py, server.py expose it as `Settings`
beside their `from_config`); they live here, together, because a config must load without the
backends' heavy imports (torch, httpx, vLLM). Adding a backend: its module with `from_config`, its
settings class here (added to `KINDS`), and its line in `registry.BACKENDS`.

Older runs stored the flat config of every kind's fields (`LEGACY_DEFAULTS`). `migrate` reads
such a dump: a field that does not belong to the kind and holds its old default is dropped; one
that holds anything else stays, so validation names it (`backend.max_lora_rank: not a setting of
kind: hf ...`).
"""

from __future__ import annotations

import re
import shlex
import string
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# vLLM's allowed LoRA ranks (vllm.config.lora.MaxLoRARanks in 0.33.0).
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_IN_FLIGHT = 256
DEFAULT_VLLM_IN_FLIGHT = 1024
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
_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)\Z")


def _check_device(v: str) -> str:
    if not _DEVICE.match(v):
        raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
    return v


def _check_dtype(v: str) -> str:
    if v not in DTYPES:
        raise ValueError(f"unknown dtype {v!r}; use one of {list(DTYPES)}")
    return v


Dtype = Annotated[str, AfterValidator(_check_dtype)]  # auto|float32|bfloat16|float16
Device = Annotated[str, AfterValidator(_check_device)]  # auto|cpu|cuda|cuda:N|mps


class _Settings(BaseModel):
    """What every backend has: its kind, and the rows per lockstep call (a wave is 8 calls)."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    batch_size: int = Field(16, ge=1)


class HFSettings(_Settings):
    """`kind: hf`: transformers + PEFT in this process (backends/hf.py)."""

    kind: Literal["hf"] = "hf"
    max_batch_tokens: int = Field(16384, ge=64)  # padded prompt tokens per prefill
    kv_cache_mb: float = Field(1024, ge=0)  # keys/values kept between an episode's steps; 0=off
    device: Device = "auto"
    dtype: Dtype = "auto"


class _LoraSlots(BaseModel):
    """An engine's model and LoRA slots (vLLM offline and served, SGLang). max_lora_rank must be
    one of vLLM's ranks; None = the smallest allowed rank that holds every adapter of the run.
    max_loras: adapters in one batch; max_cpu_loras: adapters held at once (None = every adapter
    of the run, so none is evicted and reloaded inside an engine step)."""

    dtype: Dtype = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_lora_rank: int | None = None
    max_loras: int = Field(8, ge=1)
    max_cpu_loras: int | None = Field(None, ge=1)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_allowed(cls, v: int | None) -> int | None:
        if v is not None and v not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of vLLM's LoRA ranks {list(VLLM_LORA_RANKS)}, not {v}")
        return v

    @model_validator(mode="after")
    def _cpu_slots(self) -> Any:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )
        return self


class VLLMSettings(_LoraSlots, _Settings):
    """`kind: vllm`: vLLM's offline engine in this process (backends/vllm.py). `max_in_flight`:
    requests queued in the engine at once while episodes stream (its scheduler batches up to its
    own `max_num_seqs` of them; more keep it fed). `deterministic`: batch-invariant kernels
    (VLLM_BATCH_INVARIANT=1), so a seeded row's text does not depend on what it was batched with
    (slower; false trades that for speed, and the manifest says so)."""

    kind: Literal["vllm"] = "vllm"
    max_in_flight: int = Field(DEFAULT_VLLM_IN_FLIGHT, ge=1)
    deterministic: bool = True


class _Client(BaseModel):
    """A client of an OpenAI-compatible server: its key, how many requests are in flight (per
    batch call, and in the streaming rollout), how a request selects an adapter ("auto": SGLang's
    "base:adapter" when the server says it is SGLang, else the adapter's own model name, as vLLM
    serves it), and what a dropped request gets: `retries` more tries (429, 5xx, connection
    errors, timeouts), `backoff_s` before the first (doubled each time), `timeout_s` per request."""

    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(8, ge=1)
    max_in_flight: int = Field(DEFAULT_MAX_IN_FLIGHT, ge=1)
    adapter_syntax: Literal["auto", "model", "base:adapter"] = "auto"
    retries: int = Field(3, ge=0, le=100)
    backoff_s: float = Field(1.0, ge=0, le=3600, allow_inf_nan=False)
    timeout_s: float = Field(120.0, gt=0, le=86400, allow_inf_nan=False)


class OpenAISettings(_Client, _Settings):
    """`kind: openai`: a server you started (backends/openai.py), at `base_url` (with /v1)."""

    kind: Literal["openai"] = "openai"
    base_url: str


class ServerSettings(_LoraSlots, _Client, _Settings):
    """`kind: server`: the engine charshift starts and stops itself (backends/server.py).
    `command`: the template of `engine: command`, placeholders SERVER_PLACEHOLDERS. `deterministic`:
    batch-invariant engines, so a seeded row's text does not depend on what it was batched with
    (vLLM: VLLM_BATCH_INVARIANT=1; SGLang: --enable-deterministic-inference)."""

    kind: Literal["server"] = "server"
    engine: Literal["vllm", "sglang", "command"] | None = None
    command: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0 = a free port
    startup_timeout: float = Field(900.0, gt=0)  # seconds to wait for the server's health
    extra_args: list[str] = Field(default_factory=list)  # appended to the engine's command line
    deterministic: bool = True

    @field_validator("command")
    @classmethod
    def _command_placeholders(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            parts = shlex.split(v)
            fields = [
                (f, spec, conv)
                for p in parts
                for _, f, spec, conv in string.Formatter().parse(p)
                if f is not None
            ]
        except ValueError as err:
            raise ValueError(f"not a valid command template: {err}") from None
        names = {f for f, _, _ in fields}
        # a format spec ({model:99999999999} allocates that many characters) or a conversion
        # is never needed to fill in a name: only plain {name} is accepted
        fancy = sorted({f for f, spec, conv in fields if spec or conv})
        if fancy:
            raise ValueError(
                f"placeholder(s) {fancy} carry a format spec or conversion; write a plain "
                "{name}, e.g. {port}"
            )
        unknown = sorted(n for n in names if n not in SERVER_PLACEHOLDERS)
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {unknown}; known: {list(SERVER_PLACEHOLDERS)}"
            )
        if not parts:
            raise ValueError("is empty")
        return v

    @model_validator(mode="after")
    def _engine_given(self) -> ServerSettings:
        if self.engine is None:
            raise ValueError("engine: required for kind: server (vllm | sglang | command)")
        if (self.engine == "command") != (self.command is not None):
            raise ValueError(
                "command: required for engine: command, and only used with it"
                f" (engine is {self.engine!r})"
            )
        return self


KINDS: dict[str, type[_Settings]] = {
    "hf": HFSettings,
    "vllm": VLLMSettings,
    "openai": OpenAISettings,
    "server": ServerSettings,
}
AnySettings = HFSettings | VLLMSettings | OpenAISettings | ServerSettings

# The flat `BackendConfig` of charshift before the registry: every kind's fields, with their
# defaults then. A stored config of an older run holds all of them.
LEGACY_DEFAULTS: dict[str, Any] = {
    "kind": "hf", "batch_size": 16, "max_batch_tokens": 16384, "kv_cache_mb": 1024,
    "device": "auto", "dtype": "auto", "base_url": None, "api_key_env": "OPENAI_API_KEY",
    "max_concurrency": 8, "max_model_len": None, "gpu_memory_utilization": 0.85,
    "max_lora_rank": None, "max_loras": 8, "max_cpu_loras": None, "adapter_syntax": "auto",
    "max_in_flight": 256, "engine": None, "command": None, "host": "127.0.0.1", "port": 0,
    "startup_timeout": 900.0, "extra_args": [], "deterministic": True,
}  # fmt: skip


# Fields a kind has gained since the flat dump: a flat dump holds them at the old shared default,
# which was another kind's setting (an older vLLM run's `max_in_flight: 256` was the servers').
GAINED_SINCE_FLAT: dict[str, tuple[str, ...]] = {"vllm": ("max_in_flight",)}


def kinds_with(field: str) -> list[str]:
    """The kinds whose settings have `field`."""
    return [k for k, cls in KINDS.items() if field in cls.model_fields]


def migrate(data: Any) -> Any:
    """A `backend:` mapping as this version reads it: `kind` defaults to hf, and a field of an
    older flat dump that does not belong to the kind, or that the kind has gained since
    (GAINED_SINCE_FLAT), is dropped where it holds its old default (anything else is left for
    validation to name)."""
    if not isinstance(data, dict):
        return data
    kind = data.get("kind", "hf")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    out = {"kind": kind, **data}
    if cls is None:
        return out  # validation names the unknown kind
    flat = set(LEGACY_DEFAULTS) <= set(data)  # a whole flat dump: an older run's stored config
    gained = GAINED_SINCE_FLAT.get(kind, ()) if flat else ()
    for name in [k for k in out if (k not in cls.model_fields or k in gained)]:
        if name in LEGACY_DEFAULTS and _is_default(out[name], LEGACY_DEFAULTS[name]):
            del out[name]
    return out


def _is_default(value: Any, default: Any) -> bool:
    """`value == default`, where true/false equal only themselves (not 1 and 0)."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return bool(value == default)


BackendSettings = Annotated[AnySettings, Field(discriminator="kind")]
