"""vLLM offline backend: vLLM's engine in this process, driven step by step, each row with its own
LoRA, sampling and seed.

Install with the `vllm` extra (`pip install "charshift[vllm]"`) on a CUDA machine. vLLM pins its
own torch and an older transformers, so it is an optional extra and is imported lazily here.

VERIFIED ONLY AGAINST A FAKE: this machine has no GPU and vLLM cannot be installed next to the
project's torch, so this module is tested (tests/test_backend_vllm.py) against a fake `vllm`
module that reproduces the engine behaviour listed below, read from the vLLM 0.33.0 wheel (the
extra pins `vllm>=0.33,<0.34`). Run the paper preset once on a GPU box before trusting numbers
from this path.

The driver (`SteppedBackend`): each request is rendered with the tokenizer's chat template once,
tokenised once, and queued as token ids with `llm.llm_engine.add_request(id, tokens_input(ids),
SamplingParams, lora_request=LoRARequest | None)` (`vllm/v1/engine/llm_engine.py`
`LLMEngine.add_request`; the request id must be a str; `output_kind=FINAL_ONLY`, as
`LLM._add_request` sets it, so `step()` reports a request once, when it has finished). `step()`
runs one engine step and returns the `RequestOutput`s that finished (`LLM._run_engine` loops the
same way). `RolloutEngine.run_stepped` queues an episode's next request as soon as its reply
comes out of a step, so no episode waits for the slowest of a wave; `generate` (the adapter
probe, tests) is the same loop over one batch. Neither `LLM.chat` (which renders and tokenises
again and waits for the whole batch) nor `LLM.enqueue_chat` (results only through
`wait_for_completion`, which also waits for all) streams.

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
  - a request the input processor refuses (a prompt longer than `max_model_len`, a token id out
    of the vocabulary) raises in `add_request`: only that row becomes an error;
  - finish reasons are stop, length, abort, error and repetition: recorded as they are;
  - if the engine dies anyway, `step` raises `VLLMEngineDead` (the run stops; rows already
    written stay, a rerun resumes) instead of writing an error row for every remaining request;
  - `SamplingParams(logprobs=k)` returns the `k` most likely tokens of each generated position
    (at most `max_logprobs`, 20 by default), as raw log-probabilities: the adapter probe's
    `next_token_logprobs`;
  - batch invariance (a row's text independent of what it was batched with) needs
    `VLLM_BATCH_INVARIANT=1` in the engine's environment (`vllm/envs.py`; some attention
    kernels read it when their module is imported, and the engine core freezes vLLM's
    environment once it runs); with `deterministic` (the default) it is set before vLLM is
    first imported and restored on `close`. A later engine in the same process may keep the
    first one's setting, so give every base of a run the same `deterministic`;
  - `close` shuts the engine core down (`llm_engine.engine_core.shutdown()`, which stops the
    engine core process of `MPClient`) and frees the cached CUDA memory, so the next base's
    engine can start in the same process.

Gemma-3 (`google/gemma-3-4b-it`, Gemma3ForConditionalGeneration): vLLM applies LoRA to the
language-model part only; adapter weights for the vision tower are not applied. For text-only
prompts (all of charshift's) the vision tower never runs, so this matches the HF backend.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charshift.backends.base import (
    AdapterSource,
    BackendDead,
    BackendInfo,
    SteppedBackend,
    first_token_request,
)
from charshift.backends.settings import VLLM_LORA_RANKS
from charshift.backends.settings import VLLMSettings as Settings
from charshift.schema import GenRequest, GenResult

if TYPE_CHECKING:
    from charshift.backends.registry import BackendContext

log = logging.getLogger(__name__)

_FINISH = {"stop", "length", "abort", "error", "repetition"}
BATCH_INVARIANT_ENV = "VLLM_BATCH_INVARIANT"


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


class VLLMBackend(SteppedBackend):
    """Generate with vLLM's offline engine, step by step, base and LoRA rows mixed.

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
        deterministic: bool = True,
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
        self.deterministic = deterministic
        self._llm: Any = None
        self._tokenizer: Any = None
        self._ids = itertools.count()
        self._pending: set[str] = set()  # ids queued in the engine and not finished
        self._env_saved: dict[str, str | None] = {}  # what the engine's start changed
        self._env_applied: dict[str, str | None] = {}  # what the engine started with
        self._classes: tuple[Any, Any, Any] | None = None
        self._lora: dict[str, Any] = {}  # adapter name -> LoRARequest (added to the engine)
        self._adapter_info: dict[str, dict[str, Any]] = {}
        self._dead: str | None = None  # why the engine died, once it has

    # ----- engine ----------------------------------------------------------------------------

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self._apply_env()  # before vLLM's modules are imported: some read it at import
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

    def _apply_env(self) -> None:
        """`VLLM_BATCH_INVARIANT=1` for the engine about to start, when `deterministic`."""
        if self.deterministic:
            self._env_saved.setdefault(BATCH_INVARIANT_ENV, os.environ.get(BATCH_INVARIANT_ENV))
            os.environ[BATCH_INVARIANT_ENV] = "1"
        self._env_applied = {BATCH_INVARIANT_ENV: os.environ.get(BATCH_INVARIANT_ENV)}

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

    # ----- generation: engine steps ---------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.llm.get_tokenizer()
        return self._tokenizer

    def prompt_ids(self, req: GenRequest) -> list[int]:
        """The prompt's token ids: the chat template rendered once (with the request's tools and
        the generation prompt, as vLLM's chat path renders it) and tokenised once, without
        special tokens (the template writes them)."""
        text = self.tokenizer.apply_chat_template(
            req.messages, tools=req.tools, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def add(self, request: GenRequest) -> str | GenResult:
        """Queue one request as token ids, with its own LoRARequest, sampling and seed; a row
        whose prompt does not fit `max_model_len`, whose adapter is not loaded or that the engine
        refuses gets its result at once."""
        if self._dead is not None:
            raise VLLMEngineDead(self._dead)
        if request.adapter is not None and request.adapter not in self._lora:
            return GenResult("", "error", error=f"adapter {request.adapter!r} is not loaded")
        ids = self.prompt_ids(request)
        limit = self.context_length()
        if len(ids) >= limit:
            return GenResult(
                text="",
                finish_reason="context_overflow",
                prompt_tokens=len(ids),
                error=f"prompt of {len(ids)} tokens does not fit max_model_len={limit}",
            )
        lora = self._lora[request.adapter] if request.adapter is not None else None
        return self._queue(ids, self._params(request), lora)

    def _queue(self, ids: list[int], params: Any, lora: Any) -> str | GenResult:
        from vllm.inputs import tokens_input

        rid = f"cs-{next(self._ids)}"
        try:
            self.llm.llm_engine.add_request(rid, tokens_input(ids), params, lora_request=lora)
        except Exception as exc:  # validation of one request: only this row fails
            self._raise_if_died(exc)
            return GenResult(
                "", "error", prompt_tokens=len(ids), error=f"vLLM refused the request: {exc}"
            )
        self._pending.add(rid)
        return rid

    def step(self) -> list[tuple[str, GenResult]]:
        return [(rid, self._to_result(out, rid)) for rid, out in self._finished()]

    def _finished(self) -> list[tuple[str, Any]]:
        """One engine step: (id, RequestOutput) of each of our requests that finished in it;
        (id, None) for requests the engine no longer holds without having returned them."""
        if not self._pending:
            return []
        engine = self.llm.llm_engine
        try:
            outputs = engine.step()
        except Exception as exc:
            self._raise_if_died(exc)
            raise
        done = [(o.request_id, o) for o in outputs if o.finished and o.request_id in self._pending]
        self._pending.difference_update(rid for rid, _ in done)
        if not done and self._pending and not engine.has_unfinished_requests():
            done, self._pending = [(rid, None) for rid in sorted(self._pending)], set()
        return done

    def abort(self, request_ids: list[str]) -> None:
        mine = [rid for rid in request_ids if rid in self._pending]
        self._pending.difference_update(mine)
        if mine and self._llm is not None and self._dead is None:
            self._llm.llm_engine.abort_request(mine)

    def _raise_if_died(self, exc: BaseException) -> None:
        if _engine_died(exc):
            self._dead = (
                f"the vLLM engine died ({type(exc).__name__}: {exc}); rows written so far are "
                "kept, rerun the same command to resume"
            )
            raise VLLMEngineDead(self._dead) from exc

    def _params(self, req: GenRequest, **extra: Any) -> Any:
        """The request's SamplingParams; only its final output is reported (as `LLM` sets it)."""
        _, SamplingParams, _ = self._vllm()
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=req.sampling.temperature,
            top_p=req.sampling.top_p,
            max_tokens=req.sampling.max_tokens,
            repetition_penalty=req.sampling.repetition_penalty,
            seed=req.seed,
            **self._structured(req),
            **extra,
        )
        params.output_kind = RequestOutputKind.FINAL_ONLY
        return params

    @staticmethod
    def _structured(req: GenRequest) -> dict[str, Any]:
        """`GenRequest.json_schema` as vLLM's structured outputs (the engine's grammar backend)."""
        if req.json_schema is None:
            return {}
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(json=req.json_schema)}

    @staticmethod
    def _to_result(output: Any, rid: str = "") -> GenResult:
        if output is None:
            return GenResult("", "error", error=f"vLLM dropped request {rid} without a result")
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

    def next_token_logprobs(self, requests: list[GenRequest], k: int) -> list[Any] | None:
        """The `k` (at most vLLM's default `max_logprobs`, 20) most likely first tokens of each
        request, greedy, one token each: `{token_id: logprob}` (the raw log-probabilities,
        vLLM's default `logprobs_mode`). A request that fails gives None in its place."""
        queued: dict[str, int] = {}
        out: list[Any] = [None] * len(requests)
        for i, req in enumerate(requests):
            one = first_token_request(req)
            if one.adapter is not None and one.adapter not in self._lora:
                continue
            lora = self._lora[one.adapter] if one.adapter is not None else None
            added = self._queue(self.prompt_ids(one), self._params(one, logprobs=min(k, 20)), lora)
            if not isinstance(added, GenResult):
                queued[added] = i
        while queued:
            for rid, res in self._finished():
                i = queued.pop(rid, None)
                if i is not None and res is not None and res.outputs[0].logprobs:
                    first = res.outputs[0].logprobs[0]
                    out[i] = {int(t): float(lp.logprob) for t, lp in first.items()}
        return out

    # ----- reproducibility and provenance ----------------------------------------------------

    def reproducibility(self) -> dict[str, Any]:
        if BATCH_INVARIANT_ENV in self._env_applied:  # the engine has started: what it saw
            env = self._env_applied[BATCH_INVARIANT_ENV]
        else:
            env = "1" if self.deterministic else os.environ.get(BATCH_INVARIANT_ENV)
        invariant = env not in (None, "", "0")
        return {
            "guarantee": "batch_invariant" if invariant else "seeded",
            "detail": f"vLLM offline, per-request seeds, {BATCH_INVARIANT_ENV}={env or 'unset'}"
            + ("" if invariant else " (set backend.deterministic: true for batch invariance)"),
        }

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
                "deterministic": self.deterministic,
                "reproducibility": self.reproducibility(),
                "driver": "engine steps (add_request / step), prompts as token ids",
                "verified": "against a fake vllm module only (tests/test_backend_vllm.py)",
            },
        )

    def close(self) -> None:
        """Shut the engine down and free its GPU memory (the engine core process, then the
        cached allocations), so the next base's engine starts in the same process."""
        llm, self._llm, self._tokenizer = self._llm, None, None
        self._pending.clear()
        self._lora = {}  # a new engine holds none of them: never load one inside a step
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as exc:  # noqa: BLE001 - a dead engine has nothing left to stop
                log.warning("vLLM engine shutdown: %s", exc)
            del llm
            free_accelerator_memory()
        self._restore_env()

    def _restore_env(self) -> None:
        for name, old in self._env_saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        self._env_saved.clear()


def free_accelerator_memory() -> None:
    """Collect garbage and return cached CUDA memory to the device (where torch and CUDA are)."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
        deterministic=settings.deterministic,
    )


def _engine_died(exc: BaseException) -> bool:
    """True for vLLM's EngineDeadError (matched by name: the class lives in vLLM's v1 package)."""
    return any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__)
