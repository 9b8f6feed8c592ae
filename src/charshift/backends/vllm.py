"""vLLM offline backend: one `LLM.chat` call per batch, each row with its own LoRA and sampling.

Install with the `vllm` extra (`pip install "charshift[vllm]"`) on a CUDA machine. vLLM pins its
own torch and an older transformers, so it is an optional extra and is imported lazily here.

VERIFIED ONLY AGAINST A FAKE: this machine has no GPU and vLLM cannot be installed next to the
project's torch, so this module is tested (tests/test_backend_vllm.py) against a fake `vllm`
module that records calls and checks their arguments: one LoRARequest and one SamplingParams per
row, order preserved, context-overflow rows never sent. The calls follow the vLLM offline API as
read from the vLLM 0.33.0 wheel (`LLM.chat(conversations, sampling_params=[...],
lora_request=[...], use_tqdm=..., tools=...)`; the extra pins `vllm>=0.33,<0.34`), and the fake
reproduces the engine behaviour listed below. Run the paper preset once on a GPU box before
trusting numbers from this path.

Adapters: each adapter is a `LoRARequest(name, int_id, local_path)`. A hub adapter
(`repo` + `subfolder`) is first downloaded with `huggingface_hub.snapshot_download(...,
allow_patterns=[f"{subfolder}/*"])`, so only that persona's files are fetched. A missing or gated
repo or subfolder, a folder without `adapter_config.json`, or a rank above `max_lora_rank` gives
an error entry from `load_adapters` (the cell is skipped), never an exception.

vLLM facts this module is built on (read from the vLLM 0.33.0 wheel):
  - an adapter first used inside an engine step is loaded there, and an exception in a step is
    fatal to the engine (`EngineDeadError` on every later call): per-batch retries cannot work.
    So `load_adapters` loads every adapter up front through the engine's own
    `llm.llm_engine.add_lora(LoRARequest)`, one call per adapter inside a try: a bad adapter
    raises there (a utility call; the engine stays alive) and only its cells are skipped;
  - adapters live in an LRU cache of `max_cpu_loras` slots (default: `max_loras`); an evicted
    adapter is reloaded inside a step. `max_cpu_loras` therefore defaults to the number of
    adapters of the run (at least `max_loras`), so none is evicted;
  - `max_lora_rank` must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (`VLLM_LORA_RANKS`);
    left unset, the smallest allowed rank that holds every adapter of the run is used;
  - finish reasons are stop, length, abort, error and repetition: recorded as they are;
  - if the engine dies anyway, `generate` raises `VLLMEngineDead` (the run stops; rows already
    written stay, a rerun resumes) instead of writing an error row for every remaining request.

Gemma-3 (`google/gemma-3-4b-it`, Gemma3ForConditionalGeneration): vLLM applies LoRA to the
language-model part only; adapter weights for the vision tower are not applied. For text-only
prompts (all of charshift's) the vision tower never runs, so this matches the HF backend.

Context overflow: each conversation is rendered with the tokenizer's chat template first; a row
whose prompt does not fit `max_model_len` gets `finish_reason="context_overflow"` and is not sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charshift.backends.base import (
    AdapterSource,
    Backend,
    BackendDead,
    BackendInfo,
    report_progress,
)
from charshift.backends.settings import VLLM_LORA_RANKS
from charshift.backends.settings import VLLMSettings as Settings
from charshift.schema import GenRequest, GenResult

if TYPE_CHECKING:
    from charshift.backends.registry import BackendContext

log = logging.getLogger(__name__)

_FINISH = {"stop", "length", "abort", "error", "repetition"}


class VLLMEngineDead(BackendDead):
    """The vLLM engine died (an exception inside an engine step is fatal to it)."""


def pick_lora_rank(adapter_rank: int) -> int:
    """The smallest rank vLLM allows that holds an adapter of rank `adapter_rank`."""
    for rank in VLLM_LORA_RANKS:
        if rank >= adapter_rank:
            return rank
    raise ValueError(
        f"LoRA rank {adapter_rank} exceeds the largest rank vLLM supports ({VLLM_LORA_RANKS[-1]})"
    )


def read_adapter_rank(folder: Path) -> int | None:
    """The LoRA rank `r` from `folder/adapter_config.json` (None if not an int); errors name
    the folder when the file is missing or not JSON."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no adapter_config.json in {folder}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    rank = config.get("r") if isinstance(config, dict) else None
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


_MISSING_VLLM = (
    "the vllm backend needs the optional `vllm` extra: pip install 'charshift[vllm]' "
    "(a CUDA machine; vLLM pins its own torch build)"
)


def _import_vllm() -> tuple[Any, Any, Any]:
    """(LLM, SamplingParams, LoRARequest), or ImportError naming the extra to install."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise ImportError(f"{_MISSING_VLLM} ({exc})") from exc
    return LLM, SamplingParams, LoRARequest


def folder_digest(folder: Path) -> str:
    """sha256 over the relative names and bytes of every file in `folder` (sorted): provenance."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve_adapter_folder(src: AdapterSource) -> Path:
    """The local folder of an adapter, downloading only its subfolder when it lives on the hub."""
    if src.path is not None:
        folder = Path(src.path)
        if src.subfolder:
            folder = folder / src.subfolder
        return folder
    if src.repo is None:
        raise ValueError(f"adapter {src.name!r} has neither a path nor a repo")
    from huggingface_hub import snapshot_download

    patterns = [f"{src.subfolder}/*"] if src.subfolder else None
    root = Path(snapshot_download(repo_id=src.repo, revision=src.revision, allow_patterns=patterns))
    return root / src.subfolder if src.subfolder else root


class VLLMBackend(Backend):
    """Generate with vLLM's offline `LLM`, mixing base and LoRA rows in one `chat` call.

    The engine starts lazily on first use (`load_adapters`, `generate`, `context_length`), so
    constructing the backend is cheap and a config error surfaces before the GPU is claimed; when
    `load_adapters` starts it, the LoRA slots are sized from the adapters (see the module
    docstring). `max_model_len=None` lets vLLM take the model's own limit.
    """

    kind = "vllm"

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        max_lora_rank: int | None = None,
        max_loras: int = 8,
        max_cpu_loras: int | None = None,
        dtype: str = "auto",
        enable_lora: bool = True,
        use_tqdm: bool = False,
    ) -> None:
        if max_lora_rank is not None and max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}, not {max_lora_rank}")
        if max_loras < 1 or (max_cpu_loras is not None and max_cpu_loras < max_loras):
            raise ValueError("need max_loras >= 1 and max_cpu_loras >= max_loras")
        self.model = model
        self.revision = revision
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.enable_lora = enable_lora
        self.use_tqdm = use_tqdm
        self._llm: Any = None
        self._classes: tuple[Any, Any, Any] | None = None
        self._lora: dict[str, Any] = {}  # adapter name -> LoRARequest (added to the engine)
        self._adapter_info: dict[str, dict[str, Any]] = {}
        self._dead: str | None = None  # why the engine died, once it has

    # ----- engine ----------------------------------------------------------------------------

    @property
    def llm(self) -> Any:
        if self._llm is None:
            LLM, _, _ = self._vllm()
            kwargs: dict[str, Any] = {
                "revision": self.revision,
                "dtype": self.dtype,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "enable_lora": self.enable_lora,
            }
            if self.enable_lora:
                self.max_lora_rank = self.max_lora_rank or 16  # vLLM's own default
                self.max_cpu_loras = self.max_cpu_loras or self.max_loras
                kwargs.update(
                    max_lora_rank=self.max_lora_rank,
                    max_loras=self.max_loras,
                    max_cpu_loras=self.max_cpu_loras,
                )
            if self.max_model_len is not None:
                kwargs["max_model_len"] = self.max_model_len
            self._llm = LLM(self.model, **kwargs)
        return self._llm

    def _vllm(self) -> tuple[Any, Any, Any]:
        if self._classes is None:
            self._classes = _import_vllm()
        return self._classes

    def context_length(self) -> int:
        if self.max_model_len is not None:
            return self.max_model_len
        config = getattr(self.llm, "model_config", None) or self.llm.llm_engine.model_config
        return int(config.max_model_len)

    # ----- adapters --------------------------------------------------------------------------

    def load_adapters(self, adapters: list[AdapterSource]) -> dict[str, str]:
        """Check each adapter's folder, size the LoRA slots (if the engine is not up yet), then
        add each adapter to the engine up front, one `add_lora` per adapter inside a try."""
        errors: dict[str, str] = {}
        new = [a for a in adapters if a.name not in self._lora]
        if new and not self.enable_lora:
            return {a.name: "the vllm backend was built with enable_lora=False" for a in new}
        folders: dict[str, tuple[Path, int | None]] = {}
        for src in new:
            try:
                folder = resolve_adapter_folder(src)
                folders[src.name] = (folder, self._check_rank(read_adapter_rank(folder)))
            except Exception as exc:  # missing/gated repo, network, bad folder: skip the cell
                errors[src.name] = f"adapter {src.name!r} could not be loaded: {exc}"
        if not folders:
            return errors
        if self._llm is None:
            self._size_lora_slots([rank for _, rank in folders.values()], len(folders))
        engine = self.llm.llm_engine  # starts the engine: a failure there is not an adapter's
        for src in new:
            if src.name in folders:
                msg = self._add_to_engine(engine, src, *folders[src.name])
                if msg:
                    errors[src.name] = msg
        return errors

    def _check_rank(self, rank: int | None) -> int | None:
        if rank is None:
            return None
        if self.max_lora_rank is not None and rank > self.max_lora_rank:
            raise ValueError(f"LoRA rank {rank} exceeds max_lora_rank={self.max_lora_rank}")
        pick_lora_rank(rank)  # a rank above vLLM's largest is an error here, not in the engine
        return rank

    def _size_lora_slots(self, ranks: list[int | None], n_adapters: int) -> None:
        """Before the engine starts: rank from the adapters, CPU slots for all of them."""
        known = [r for r in ranks if r is not None]
        if self.max_lora_rank is None and known:
            self.max_lora_rank = pick_lora_rank(max(known))
        if self.max_cpu_loras is None:
            self.max_cpu_loras = max(self.max_loras, n_adapters)

    def _add_to_engine(
        self, engine: Any, src: AdapterSource, folder: Path, rank: int | None
    ) -> str | None:
        """Add one adapter to the running engine; an error message instead of an exception."""
        _, _, LoRARequest = self._vllm()
        if len(self._lora) >= (self.max_cpu_loras or 0):
            return (
                f"adapter {src.name!r}: all max_cpu_loras={self.max_cpu_loras} adapter slots are "
                "taken; an evicted adapter would be reloaded inside an engine step, where a failure "
                "kills the engine. Raise backend.max_cpu_loras."
            )
        request = LoRARequest(src.name, len(self._lora) + 1, str(folder))  # ids >= 1, unique
        try:
            added = engine.add_lora(request)
        except Exception as exc:  # raised per adapter by the engine, which stays alive
            return f"adapter {src.name!r} could not be loaded by vLLM: {exc}"
        if added is False:
            return f"adapter {src.name!r}: vLLM's add_lora refused it"
        self._lora[src.name] = request
        self._adapter_info[src.name] = {
            "path": str(folder),
            "repo": src.repo,
            "subfolder": src.subfolder,
            "revision": src.revision,
            "rank": rank,
            "sha256": folder_digest(folder),
            "lora_int_id": request.lora_int_id,
        }
        return None

    # ----- generation ------------------------------------------------------------------------

    def prompt_length(self, req: GenRequest) -> int:
        """Tokens of the rendered prompt, computed the way vLLM's chat path does it."""
        tokenizer = self.llm.get_tokenizer()
        text = tokenizer.apply_chat_template(
            req.messages, tools=req.tools, add_generation_prompt=True, tokenize=False
        )
        return len(tokenizer.encode(text, add_special_tokens=False))

    def generate(self, requests: list[GenRequest], progress: Any = None) -> list[GenResult]:
        """Rows that fit go to vLLM in one `chat` call per distinct tool list; results in order."""
        if self._dead is not None:
            raise VLLMEngineDead(self._dead)
        results: list[GenResult | None] = [None] * len(requests)
        limit = self.context_length()
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            if req.adapter is not None and req.adapter not in self._lora:
                results[i] = GenResult("", "error", error=f"adapter {req.adapter!r} is not loaded")
                continue
            n_prompt = self.prompt_length(req)
            if n_prompt >= limit:
                results[i] = GenResult(
                    text="",
                    finish_reason="context_overflow",
                    prompt_tokens=n_prompt,
                    error=f"prompt of {n_prompt} tokens does not fit max_model_len={limit}",
                )
                continue
            # `tools` is one argument per chat call, so rows are grouped by their tool list.
            groups.setdefault(json.dumps(req.tools, sort_keys=True), []).append(i)
        done = sum(r is not None for r in results)
        if done:
            report_progress(progress, done)
        for rows in groups.values():
            for i, res in zip(rows, self._run_rows([requests[i] for i in rows]), strict=True):
                results[i] = res
            report_progress(progress, len(rows))
        return [r if r is not None else GenResult("", "error", error="no result") for r in results]

    def _run_rows(self, reqs: list[GenRequest]) -> list[GenResult]:
        """One chat call. A dead engine raises VLLMEngineDead; any other failure (a request the
        engine refused before running it) is isolated by halving the rows."""
        try:
            return self._chat(reqs)
        except Exception as exc:
            if _engine_died(exc):
                self._dead = (
                    f"the vLLM engine died ({type(exc).__name__}: {exc}); rows written so far are "
                    "kept, rerun the same command to resume"
                )
                raise VLLMEngineDead(self._dead) from exc
            if len(reqs) > 1:
                half = len(reqs) // 2
                log.warning("vLLM batch failed (%s); halving it to isolate the bad row", exc)
                return self._run_rows(reqs[:half]) + self._run_rows(reqs[half:])
            msg = f"vLLM generation failed: {type(exc).__name__}: {exc}"
            return [GenResult("", "error", error=msg)]

    def _chat(self, reqs: list[GenRequest]) -> list[GenResult]:
        _, SamplingParams, _ = self._vllm()
        params = [
            SamplingParams(
                temperature=r.sampling.temperature,
                top_p=r.sampling.top_p,
                max_tokens=r.sampling.max_tokens,
                repetition_penalty=r.sampling.repetition_penalty,
                seed=r.seed,
                **self._structured(r),
            )
            for r in reqs
        ]
        lora = [self._lora[r.adapter] if r.adapter is not None else None for r in reqs]
        outputs = self.llm.chat(
            [r.messages for r in reqs],
            sampling_params=params,
            lora_request=lora if any(x is not None for x in lora) else None,
            use_tqdm=self.use_tqdm,
            tools=reqs[0].tools,
        )
        if len(outputs) != len(reqs):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(reqs)} prompts")
        return [self._to_result(o) for o in outputs]

    @staticmethod
    def _structured(req: GenRequest) -> dict[str, Any]:
        """`GenRequest.json_schema` as vLLM's structured outputs (the engine's grammar backend)."""
        if req.json_schema is None:
            return {}
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(json=req.json_schema)}

    @staticmethod
    def _to_result(output: Any) -> GenResult:
        completion = output.outputs[0]
        reason = completion.finish_reason
        known = str(reason) in _FINISH
        return GenResult(
            text=completion.text,
            finish_reason=str(reason) if known else "error",  # type: ignore[arg-type]
            prompt_tokens=len(output.prompt_token_ids or []),
            completion_tokens=len(completion.token_ids or []),
            error=None if known else f"unknown vLLM finish_reason {reason!r}",
        )

    # ----- provenance ------------------------------------------------------------------------

    def info(self) -> BackendInfo:
        return BackendInfo(
            kind=self.kind,
            model=self.model,
            model_revision=self.revision,
            adapters=dict(self._adapter_info),
            extra={
                "max_model_len": self.max_model_len,
                "max_lora_rank": self.max_lora_rank,
                "max_loras": self.max_loras,
                "max_cpu_loras": self.max_cpu_loras,
                "dtype": self.dtype,
                "verified": "against a fake vllm module only (tests/test_backend_vllm.py)",
            },
        )

    def close(self) -> None:
        self._llm = None


def from_config(settings: Settings, context: BackendContext) -> VLLMBackend:
    """The backend of `backend: {kind: vllm, ...}` for one base of a run (backends/registry.py)."""
    return VLLMBackend(
        context.model,
        revision=context.revision,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_lora_rank=settings.max_lora_rank,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        dtype=settings.dtype,
    )


def _engine_died(exc: BaseException) -> bool:
    """True for vLLM's EngineDeadError (matched by name: the class lives in vLLM's v1 package)."""
    return any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__)
