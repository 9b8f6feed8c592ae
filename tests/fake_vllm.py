"""A fake `vllm` package: vLLM 0.33.0's offline engine as charshift drives it (vLLM cannot run here:
no GPU, another torch pin). `install(monkeypatch, tokenizer)` puts it in `sys.modules`.

Behaviour reproduced, read from the vLLM 0.33.0 wheel:
  - `LLM(model, **kwargs)` (vllm/entrypoints/llm.py) builds the engine at once; `LLM.llm_engine`
    is the `LLMEngine`; `get_tokenizer()`; `model_config.max_model_len`. A new engine claims its
    share of GPU memory at startup: while another engine of this process still holds the GPU
    (not shut down), it fails with "Free memory on device ... is less than desired GPU memory
    utilization" (vllm/v1/worker/utils.py, the startup memory check).
  - `LLMEngine.add_request(request_id, prompt, params, lora_request=...)`
    (vllm/v1/engine/llm_engine.py): the id must be a str (TypeError); a prompt built by
    `vllm.inputs.tokens_input(ids)` carries `type: "token"` and is used as it is, anything else
    goes through the deprecated raw-prompt path (input_processor.py `process_inputs`, recorded
    here in `raw_prompts`). The input processor refuses an empty prompt, one longer than
    `max_model_len` or as long as it (`_validate_prompt_len`), and a token id outside the
    vocabulary (renderers/base.py `validate_token_ids`), raising `VLLMValidationError` to the
    caller; `SamplingParams(logprobs=k)` above `max_logprobs` (20) is refused the same way
    (sampling_params.py `_validate_logprobs`). The id in every `RequestOutput` is the one given
    (output_processor.py: the external id).
  - `step()` schedules up to `max_num_seqs` requests first come first served; a request makes its
    prefill in its first step and one token per step after it. With the default
    `output_kind=CUMULATIVE` every running request is reported each step (`finished=False`)
    until it finishes; with `FINAL_ONLY` only when it finishes. `has_unfinished_requests()`,
    `abort_request(ids)`.
  - finish reasons: stop (end of turn), length (`max_tokens`), and, for tests, any of
    `FINISH_REASON_STRINGS` (v1/engine/__init__.py) asked for by a prompt ending "finish=X".
  - `CompletionOutput.logprobs` (outputs.py, logprobs.py): one `{token_id: Logprob}` per
    generated position, the `k` most likely tokens plus the sampled one.
  - LoRA (v1/engine/core.py, core_client.py): `add_lora(req)` is a utility call; a failure raises
    `Exception(message)` to the caller and the engine stays alive; adapters live in an LRU of
    `max_cpu_loras`; an adapter first met inside a step is loaded there, and a failure there
    kills the engine core (`EngineDeadError` on every later call); ranks above `max_lora_rank`
    fail to load; `LoRARequest` ids must be >= 1.
  - `engine_core.shutdown()` (core_client.py `MPClient.shutdown`) stops the engine core and
    frees its memory.
  - `VLLM_BATCH_INVARIANT` is read from the environment when the engine starts (vllm/envs.py);
    without it a row's log-probabilities move slightly with what it is batched with (here:
    noise of 1e-3 per request), with it they do not.

The "model" (shared with fake_lora_server.py): a reply is `script(view)` for the request (by
default `{adapter or 'base'}|seed={seed}|{last user turn}`), encoded with the real tokenizer and
produced one token per step; next-token log-probabilities come from `fake_lora_server.lm_logprobs`.
An adapter's strength is read from its weights file (`adapter_strength`): a weak adapter moves
the log-probabilities without changing the text, the case the log-probability probe exists for.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fake_lora_server import adapter_strength, lm_logprobs

ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
MAX_LOGPROBS = 20  # ModelConfig.max_logprobs default
BATCH_NOISE = 1e-3


class VLLMValidationError(ValueError):
    """vllm.exceptions.VLLMValidationError: a request the input processor refuses."""


class EngineDeadError(RuntimeError):
    """vllm.v1.engine.exceptions.EngineDeadError: every call after the engine core died."""


class RequestOutputKind:
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class StructuredOutputsParams:
    """vllm.sampling_params.StructuredOutputsParams (0.33): exactly one kind of constraint, and a
    JSON schema that is a dict or a non-empty string (__post_init__ and
    SamplingParams._validate_structured_outputs)."""

    KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    def __init__(self, **kw: Any) -> None:
        options = {"disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"}
        assert set(kw) <= set(self.KINDS) | options, f"unknown fields {set(kw)}"
        given = [k for k in self.KINDS if kw.get(k) is not None]
        assert len(given) == 1, f"exactly one structured-outputs constraint, got {given}"
        if "json" in given:
            assert isinstance(kw["json"], dict) or (
                isinstance(kw["json"], str) and kw["json"].strip()
            )
        self.kw = kw


class SamplingParams:
    FIELDS = {"temperature", "top_p", "max_tokens", "repetition_penalty", "seed", "logprobs"}

    def __init__(self, **kw: Any) -> None:
        assert set(kw) <= self.FIELDS | {"structured_outputs"}, set(kw)
        so = kw.get("structured_outputs")
        assert so is None or isinstance(so, StructuredOutputsParams)
        self.kw = kw
        self.output_kind = RequestOutputKind.CUMULATIVE
        self.logprobs = kw.get("logprobs")
        self.seed = kw.get("seed")
        self.max_tokens = kw.get("max_tokens", 16)


class LoRARequest:
    def __init__(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
        assert isinstance(lora_int_id, int) and lora_int_id >= 1
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


def tokens_input(prompt_token_ids: list[int], **kw: Any) -> dict[str, Any]:
    return {"type": "token", "prompt_token_ids": prompt_token_ids, **kw}


@dataclass
class View:
    """What a script sees of one request."""

    prompt: str  # the decoded prompt (chat template included)
    lora: str | None
    seed: int | None
    max_tokens: int

    @property
    def last_user(self) -> str:
        found = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", self.prompt, re.S)
        return found[-1] if found else ""

    @property
    def turns(self) -> int:
        """Assistant turns already in the conversation (the generation prompt not counted)."""
        return self.prompt.count("<|im_start|>assistant") - 1


def echo(view: View) -> str:
    return f"{view.lora or 'base'}|seed={view.seed}|{view.last_user}"


@dataclass
class _Request:
    rid: str
    ids: list[int]
    params: SamplingParams
    lora: LoRARequest | None
    reply: list[int] = field(default_factory=list)
    finish: str = "stop"
    made: int = -1  # tokens made; -1 until the prefill step


class FakeEngine:
    """`LLM.llm_engine` (see the module docstring)."""

    def __init__(self, llm: FakeLLM, max_lora_rank: int, max_cpu_loras: int) -> None:
        self.llm = llm
        self.max_lora_rank, self.max_cpu_loras = max_lora_rank, max_cpu_loras
        self.cache: dict[int, str] = {}  # lora_int_id -> name, in LRU order
        self.added: list[str] = []
        self.step_loads: list[str] = []
        self.dead = False
        self.queue: list[_Request] = []
        self.steps = 0
        self.log: list[tuple[int, str, str]] = []  # (step, "add" | "finish", request id)
        self.raw_prompts = 0
        self.history: list[_Request] = []  # every request added, in order
        self.peak = 0  # the most requests queued at once
        self.engine_core = types.SimpleNamespace(shutdown=self._shutdown)
        self.shut_down = False

    def _shutdown(self, timeout: float | None = None) -> None:
        self.shut_down = True
        FakeLLM.holding_gpu.discard(id(self.llm))

    # ----- LoRA ---------------------------------------------------------------------------------

    def _load(self, req: LoRARequest) -> None:
        folder = Path(req.lora_path)
        config = json.loads((folder / "adapter_config.json").read_text())
        if config["r"] > self.max_lora_rank:
            raise ValueError(
                f"LoRA rank {config['r']} is greater than max_lora_rank {self.max_lora_rank}."
            )
        try:
            adapter_strength(folder)
        except ValueError as exc:
            raise RuntimeError(f"Loading lora {req.lora_name} failed: {exc}") from None
        self.cache.pop(req.lora_int_id, None)
        self.cache[req.lora_int_id] = req.lora_name
        while len(self.cache) > self.max_cpu_loras:
            self.cache.pop(next(iter(self.cache)))  # evict the least recently used

    def add_lora(self, req: LoRARequest) -> bool:
        self._alive()
        try:
            self._load(req)
        except Exception as exc:  # core_client: Exception(failure_message), engine alive
            raise Exception(f"Call to add_lora method failed: {exc}") from None
        self.added.append(req.lora_name)
        return True

    def _in_step(self, lora: LoRARequest | None) -> None:
        if lora is None:
            return
        if lora.lora_int_id in self.cache:
            self.cache[lora.lora_int_id] = self.cache.pop(lora.lora_int_id)  # LRU touch
            return
        self.step_loads.append(lora.lora_name)
        try:
            self._load(lora)
        except Exception:
            self.dead = True  # an exception inside a step is fatal to the engine core
            raise EngineDeadError("EngineCore encountered an issue.") from None

    def _alive(self) -> None:
        if self.dead or self.shut_down:
            raise EngineDeadError("EngineCore encountered an issue.")

    # ----- requests -----------------------------------------------------------------------------

    def add_request(
        self, request_id: Any, prompt: Any, params: Any, lora_request: Any = None, **kw: Any
    ) -> str:
        self._alive()
        assert not set(kw) - {"priority", "arrival_time", "tokenization_kwargs"}, kw
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id)}")
        assert isinstance(params, SamplingParams)
        assert lora_request is None or isinstance(lora_request, LoRARequest)
        if not (isinstance(prompt, dict) and prompt.get("type") == "token"):
            self.raw_prompts += 1
            prompt = {"prompt_token_ids": self.llm.tokenizer.encode(prompt)}
        ids = list(prompt["prompt_token_ids"])
        self._validate(ids, params)
        self.queue.append(_Request(request_id, ids, params, lora_request))
        self.history.append(self.queue[-1])
        self.peak = max(self.peak, len(self.queue))
        self.log.append((self.steps, "add", request_id))
        return f"{request_id}-0000abcd"  # the internal id (assign_request_id); outputs use ours

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        limit = self.llm.model_config.max_model_len
        if not ids:
            raise VLLMValidationError("The decoder prompt cannot be empty")
        if len(ids) >= limit:
            raise VLLMValidationError(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model length "
                f"of {limit}."
            )
        if max(ids) >= len(self.llm.tokenizer) or min(ids) < 0:
            raise VLLMValidationError(f"Token id {max(ids)} is out of vocabulary")
        if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
            raise VLLMValidationError(
                f"Requested sample logprobs of {params.logprobs}, which is greater than max "
                f"allowed: {MAX_LOGPROBS}"
            )

    def abort_request(self, request_ids: list[str], internal: bool = False) -> None:
        gone = set(request_ids)
        self.queue = [r for r in self.queue if r.rid not in gone]

    def has_unfinished_requests(self) -> bool:
        return bool(self.queue)

    def get_num_unfinished_requests(self) -> int:
        return len(self.queue)

    def step(self) -> list[Any]:
        self._alive()
        self.steps += 1
        running = self.queue[: self.llm.max_num_seqs]
        for req in running:
            self._in_step(req.lora)
        outputs = []
        for req in running:
            if req.made < 0:
                self._prefill(req)
            elif req.made < len(req.reply):
                req.made += 1
            done = req.made >= len(req.reply)
            if done or req.params.output_kind != RequestOutputKind.FINAL_ONLY:
                outputs.append(self._output(req, done))
            if done:
                self.queue.remove(req)
                self.log.append((self.steps, "finish", req.rid))
        return outputs

    def _prefill(self, req: _Request) -> None:
        tok = self.llm.tokenizer
        view = View(tok.decode(req.ids), req.lora and req.lora.lora_name, req.params.seed, 0)
        view.max_tokens = req.params.max_tokens
        text = self.llm.script(view)
        match = re.search(r"finish=(\w+)$", view.last_user)
        reply = tok.encode(text, add_special_tokens=False)
        req.finish = "length" if len(reply) > req.params.max_tokens else "stop"
        if match:
            req.finish = match.group(1)
        req.reply = reply[: req.params.max_tokens]
        req.made = min(1, len(req.reply))  # the prefill step makes the first token

    def _output(self, req: _Request, done: bool) -> Any:
        made = req.reply[: req.made]
        logprobs = None
        if req.params.logprobs is not None:
            logprobs = [self._logprobs(req) for _ in made] or None
        completion = types.SimpleNamespace(
            text=self.llm.tokenizer.decode(made),
            token_ids=made,
            finish_reason=req.finish if done else None,
            logprobs=logprobs,
        )
        return types.SimpleNamespace(
            request_id=req.rid, finished=done, outputs=[completion], prompt_token_ids=req.ids
        )

    def _logprobs(self, req: _Request) -> dict[int, Any]:
        strength = adapter_strength(Path(req.lora.lora_path)) if req.lora else 0.0
        noise = 0.0 if self.llm.batch_invariant else BATCH_NOISE
        lps = lm_logprobs(
            req.lora and req.lora.lora_name, strength, str(req.ids), noise, random.random()
        )
        top = sorted(range(len(lps)), key=lambda t: -lps[t])[: req.params.logprobs]
        return {t: types.SimpleNamespace(logprob=lps[t], rank=r + 1) for r, t in enumerate(top)}


class FakeLLM:
    instances: list[FakeLLM] = []
    holding_gpu: set[int] = set()  # engines that hold GPU memory (not shut down)
    tokenizer: Any = None
    script: Callable[[View], str] = staticmethod(echo)
    max_num_seqs = 256

    def __init__(self, model: str, **kwargs: Any) -> None:
        if FakeLLM.holding_gpu:
            raise ValueError(
                "Free memory on device cuda:0 (9.1/79.2 GiB) on startup is less than desired GPU "
                "memory utilization (0.85, 67.3 GiB). Decrease GPU memory utilization or reduce "
                "GPU memory used by other processes."
            )
        self.model, self.kwargs = model, kwargs
        if kwargs.get("enable_lora"):
            assert kwargs["max_lora_rank"] in ALLOWED_RANKS, "pydantic: not a MaxLoRARanks value"
            cpu = kwargs.get("max_cpu_loras") or kwargs.get("max_loras", 1)
            assert cpu >= kwargs.get("max_loras", 1), "max_cpu_loras must be >= max_loras"
        else:
            cpu = 0
        self.env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
        self.batch_invariant = self.env.get("VLLM_BATCH_INVARIANT", "0") not in ("", "0")
        self.llm_engine = FakeEngine(self, kwargs.get("max_lora_rank", 16), cpu)
        self.model_config = types.SimpleNamespace(max_model_len=kwargs.get("max_model_len") or 4096)
        FakeLLM.instances.append(self)
        FakeLLM.holding_gpu.add(id(self))

    def get_tokenizer(self) -> Any:
        return FakeLLM.tokenizer

    def chat(self, *args: Any, **kw: Any) -> Any:
        raise AssertionError("charshift drives the engine by steps; LLM.chat must not be called")


def install(monkeypatch: Any, tokenizer: Any) -> types.ModuleType:
    """Put the fake `vllm` package into sys.modules (undone by monkeypatch)."""
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = SamplingParams
    modules = {"vllm": vllm}
    for name, attrs in {
        "vllm.lora": {},
        "vllm.lora.request": {"LoRARequest": LoRARequest},
        "vllm.inputs": {"tokens_input": tokens_input},
        "vllm.sampling_params": {
            "SamplingParams": SamplingParams,
            "StructuredOutputsParams": StructuredOutputsParams,
            "RequestOutputKind": RequestOutputKind,
        },
    }.items():
        mod = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(mod, k, v)
        modules[name] = mod
    vllm.lora = modules["vllm.lora"]
    modules["vllm.lora"].request = modules["vllm.lora.request"]
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    FakeLLM.instances = []
    FakeLLM.holding_gpu = set()
    FakeLLM.tokenizer = tokenizer
    FakeLLM.script = staticmethod(echo)
    FakeLLM.max_num_seqs = 256
    return vllm
