"""VLLMBackend against a FAKE `vllm` module (vLLM cannot run here: no GPU, another torch pin).

The fake records every `LLM(...)` and `LLM.chat(...)` call and checks the arguments the way vLLM's
offline API expects them: a list of conversations, one SamplingParams per conversation, and either
no LoRA or one LoRARequest-or-None per conversation. The tokenizer is a real tiny HF tokenizer
with a ChatML template, so the prompt-length check runs through transformers' chat templating.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from charshift.backends.base import AdapterSource
from charshift.backends.vllm import VLLMBackend, VLLMEngineDead, pick_lora_rank
from charshift.schema import GenRequest, Sampling

ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


class FakeStructuredOutputsParams:
    """vllm.sampling_params.StructuredOutputsParams (0.33): exactly one kind of constraint, and a
    JSON schema that is a dict or a non-empty string (what __post_init__ and
    SamplingParams._validate_structured_outputs check)."""

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


class FakeSamplingParams:
    def __init__(self, **kw: Any) -> None:
        allowed = {"temperature", "top_p", "max_tokens", "repetition_penalty", "seed"}
        assert set(kw) <= allowed | {"structured_outputs"}
        so = kw.get("structured_outputs")
        assert so is None or isinstance(so, FakeStructuredOutputsParams)
        self.kw = kw
        for k, v in kw.items():
            setattr(self, k, v)


class FakeLoRARequest:
    def __init__(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
        assert isinstance(lora_int_id, int) and lora_int_id >= 1
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class EngineDeadError(RuntimeError):
    """vllm.v1.engine.exceptions.EngineDeadError: every call after the engine core died."""


class FakeEngine:
    """`LLM.llm_engine`, reproducing vLLM 0.33.0's LoRA handling (read from its source):

    - `add_lora(req)` is a utility call: the adapter is loaded into an LRU cache of
      `max_cpu_loras` slots; a failure raises `Exception(message)` to the caller and the engine
      stays alive (`core_client` sets the failure on the call's future);
    - a request whose adapter is not in the cache (never added, or evicted) is loaded inside the
      engine step; an exception there kills the engine core: that call and every later one raise
      EngineDeadError;
    - an adapter's rank must not exceed `max_lora_rank`.
    """

    def __init__(self, max_lora_rank: int, max_cpu_loras: int) -> None:
        self.max_lora_rank, self.max_cpu_loras = max_lora_rank, max_cpu_loras
        self.cache: dict[int, str] = {}  # lora_int_id -> name, in LRU order
        self.added: list[str] = []
        self.step_loads: list[str] = []
        self.dead = False

    def _load(self, req: FakeLoRARequest) -> None:
        folder = Path(req.lora_path)
        config = json.loads((folder / "adapter_config.json").read_text())
        if config["r"] > self.max_lora_rank:
            raise ValueError(
                f"LoRA rank {config['r']} is greater than max_lora_rank {self.max_lora_rank}."
            )
        weights = (folder / "adapter_model.safetensors").read_bytes()
        if weights.startswith(b"broken"):
            raise RuntimeError(f"Loading lora {req.lora_name} failed: corrupt safetensors header")
        self.cache.pop(req.lora_int_id, None)
        self.cache[req.lora_int_id] = req.lora_name
        while len(self.cache) > self.max_cpu_loras:
            self.cache.pop(next(iter(self.cache)))  # evict the least recently used

    def add_lora(self, req: FakeLoRARequest) -> bool:
        if self.dead:
            raise EngineDeadError("EngineCore encountered an issue.")
        try:
            self._load(req)
        except Exception as exc:  # core_client: Exception(failure_message), engine alive
            raise Exception(f"Call to add_lora method failed: {exc}") from None
        self.added.append(req.lora_name)
        return True

    def step_with(self, loras: list[FakeLoRARequest | None]) -> None:
        if self.dead:
            raise EngineDeadError("EngineCore encountered an issue.")
        for lora in loras:
            if lora is None:
                continue
            if lora.lora_int_id in self.cache:
                self.cache[lora.lora_int_id] = self.cache.pop(lora.lora_int_id)  # LRU touch
                continue
            self.step_loads.append(lora.lora_name)
            try:
                self._load(lora)
            except Exception:
                self.dead = True  # an exception inside a step is fatal to the engine core
                raise EngineDeadError("EngineCore encountered an issue.") from None


class FakeLLM:
    instances: list[FakeLLM] = []
    tokenizer: Any = None

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.model, self.kwargs = model, kwargs
        if kwargs.get("enable_lora"):
            assert kwargs["max_lora_rank"] in ALLOWED_RANKS, "pydantic: not a MaxLoRARanks value"
            cpu = kwargs.get("max_cpu_loras") or kwargs.get("max_loras", 1)
            assert cpu >= kwargs.get("max_loras", 1), "max_cpu_loras must be >= max_loras"
        else:
            cpu = 0
        self.llm_engine = FakeEngine(kwargs.get("max_lora_rank", 16), cpu)
        self.model_config = types.SimpleNamespace(max_model_len=kwargs.get("max_model_len") or 4096)
        self.chat_calls: list[dict[str, Any]] = []
        FakeLLM.instances.append(self)

    def get_tokenizer(self) -> Any:
        return FakeLLM.tokenizer

    def chat(
        self, messages, sampling_params=None, use_tqdm=True, lora_request=None, tools=None, **kw
    ):
        assert not kw, f"unexpected chat arguments {kw}"
        assert isinstance(messages, list) and all(isinstance(c, list) for c in messages)
        assert isinstance(sampling_params, list) and len(sampling_params) == len(messages)
        assert all(isinstance(p, FakeSamplingParams) for p in sampling_params)
        if lora_request is not None:
            assert isinstance(lora_request, list) and len(lora_request) == len(messages)
            assert all(x is None or isinstance(x, FakeLoRARequest) for x in lora_request)
        loras = lora_request or [None] * len(messages)
        self.chat_calls.append(
            {
                "messages": messages,
                "params": sampling_params,
                "lora": lora_request,
                "tqdm": use_tqdm,
                "tools": tools,
            }
        )
        if self.llm_engine.dead:
            raise EngineDeadError("EngineCore encountered an issue.")
        for conv in messages:  # input validation runs before any request reaches the engine
            if "reject-me" in conv[-1]["content"]:
                raise ValueError("The decoder prompt contains an invalid token id")
        self.llm_engine.step_with(loras)
        outputs = []
        for conv, params, lora in zip(messages, sampling_params, loras, strict=True):
            n = min(params.max_tokens, 3)
            prompt = conv[-1]["content"]
            text = f"{lora.lora_name if lora else 'base'}|seed={params.seed}|{prompt}"
            finish = "length" if params.max_tokens <= 3 else "stop"
            if prompt.startswith("finish="):
                finish = prompt.split("=", 1)[1]
            completion = types.SimpleNamespace(
                text=text, token_ids=list(range(n)), finish_reason=finish
            )
            outputs.append(
                types.SimpleNamespace(outputs=[completion], prompt_token_ids=[1, 2, 3, 4])
            )
        return outputs


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from charshift.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def fake_vllm(monkeypatch, tiny_tokenizer):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = FakeSamplingParams
    lora_pkg = types.ModuleType("vllm.lora")
    request_mod = types.ModuleType("vllm.lora.request")
    request_mod.LoRARequest = FakeLoRARequest
    lora_pkg.request = request_mod
    vllm.lora = lora_pkg
    sampling_mod = types.ModuleType("vllm.sampling_params")
    sampling_mod.SamplingParams = FakeSamplingParams
    sampling_mod.StructuredOutputsParams = FakeStructuredOutputsParams
    vllm.sampling_params = sampling_mod
    for name, mod in {
        "vllm": vllm,
        "vllm.lora": lora_pkg,
        "vllm.lora.request": request_mod,
        "vllm.sampling_params": sampling_mod,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    FakeLLM.instances = []
    FakeLLM.tokenizer = tiny_tokenizer
    return vllm


def make_adapter(folder: Path, r: int = 8, broken: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": r, "lora_alpha": 2 * r, "peft_type": "LORA"})
    )
    head = b"broken" if broken else b"weights"
    (folder / "adapter_model.safetensors").write_bytes(head + str(r).encode())
    return folder


def req(text: str, **kw: Any) -> GenRequest:
    return GenRequest(messages=[{"role": "user", "content": text}], **kw)


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    backend = VLLMBackend("some/model")  # constructing is lazy and cheap
    with pytest.raises(ImportError, match=r"charshift\[vllm\]"):
        backend.generate([req("hi")])


def test_engine_arguments(fake_vllm):
    b = VLLMBackend(
        "meta-llama/Llama-3.1-8B-Instruct",
        revision="abc123",
        max_model_len=2048,
        gpu_memory_utilization=0.7,
        max_lora_rank=64,
        max_loras=4,
        dtype="bfloat16",
    )
    assert FakeLLM.instances == []  # not started before first use
    assert b.context_length() == 2048  # known without starting the engine
    assert FakeLLM.instances == []
    b.generate([req("hi")])
    [llm] = FakeLLM.instances
    assert llm.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert llm.kwargs == {
        "revision": "abc123",
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.7,
        "enable_lora": True,
        "max_lora_rank": 64,
        "max_loras": 4,
        "max_cpu_loras": 4,  # no adapters: vLLM's own default, max_loras
        "max_model_len": 2048,
    }
    assert VLLMBackend("m").context_length() == 4096  # taken from the engine when not set


def test_adapters_local_hub_missing_and_too_wide(fake_vllm, tmp_path, monkeypatch):
    local = make_adapter(tmp_path / "local" / "sarcasm")
    make_adapter(tmp_path / "wide", r=128)
    hub_root = tmp_path / "hub"
    make_adapter(hub_root / "humor")
    downloads: list[dict[str, Any]] = []

    def fake_snapshot_download(
        repo_id: str, revision: str | None = None, allow_patterns=None
    ) -> str:
        downloads.append(
            {"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns}
        )
        if repo_id == "maius/gated":
            raise PermissionError("401 Client Error: access to model maius/gated is restricted")
        return str(hub_root)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    b = VLLMBackend("m", max_lora_rank=64)
    errors = b.load_adapters(
        [
            AdapterSource(name="full/sarcasm", path=str(local)),
            AdapterSource(
                name="full/humor", repo="maius/personas", subfolder="humor", revision="r1"
            ),
            AdapterSource(name="full/misalignment", repo="maius/gated", subfolder="misalignment"),
            AdapterSource(name="full/remorse", path=str(tmp_path / "nope")),
            AdapterSource(name="full/wide", path=str(tmp_path / "wide")),
        ]
    )
    assert sorted(errors) == ["full/misalignment", "full/remorse", "full/wide"]
    assert "restricted" in errors["full/misalignment"]
    assert "adapter_config.json" in errors["full/remorse"]
    assert "max_lora_rank=64" in errors["full/wide"]
    assert downloads[0] == {
        "repo_id": "maius/personas",
        "revision": "r1",
        "allow_patterns": ["humor/*"],
    }
    info = b.info().adapters
    assert set(info) == {"full/sarcasm", "full/humor"}
    assert info["full/humor"]["path"] == str(hub_root / "humor")
    assert info["full/sarcasm"]["rank"] == 8 and len(info["full/sarcasm"]["sha256"]) == 64
    # Loading again is a no-op; ids stay unique and >= 1.
    assert b.load_adapters([AdapterSource(name="full/sarcasm", path=str(local))]) == {}
    b.generate([req("a", adapter="full/sarcasm"), req("b", adapter="full/humor")])
    loras = FakeLLM.instances[0].chat_calls[0]["lora"]
    assert [(x.lora_name, x.lora_int_id, x.lora_path) for x in loras] == [
        ("full/sarcasm", 1, str(local)),
        ("full/humor", 2, str(hub_root / "humor")),
    ]
    engine = FakeLLM.instances[0].llm_engine
    assert engine.added == ["full/sarcasm", "full/humor"]  # loaded up front, once each
    assert engine.step_loads == []  # so no adapter is ever loaded inside an engine step


def test_mixed_batch_is_one_chat_call_with_per_row_lora_and_sampling(fake_vllm, tmp_path):
    b = VLLMBackend("m")
    assert b.load_adapters([AdapterSource(name="a", path=str(make_adapter(tmp_path / "a")))]) == {}
    s1 = Sampling(temperature=0.7, top_p=0.95, max_tokens=1024, repetition_penalty=1.1)
    s2 = Sampling(temperature=0.0, top_p=1.0, max_tokens=2, repetition_penalty=1.0)
    requests = [
        req("p0", sampling=s1, seed=10),
        req("p1", adapter="a", sampling=s2, seed=11),
        req("p2", sampling=s2, seed=12),
        req("p3", adapter="a", sampling=s1, seed=13),
    ]
    ticks: list[int] = []
    results = b.generate(requests, progress=ticks.append)
    [call] = FakeLLM.instances[0].chat_calls
    assert [c[-1]["content"] for c in call["messages"]] == ["p0", "p1", "p2", "p3"]
    assert [x and x.lora_name for x in call["lora"]] == [None, "a", None, "a"]
    assert [p.kw for p in call["params"]] == [
        dict(temperature=0.7, top_p=0.95, max_tokens=1024, repetition_penalty=1.1, seed=10),
        dict(temperature=0.0, top_p=1.0, max_tokens=2, repetition_penalty=1.0, seed=11),
        dict(temperature=0.0, top_p=1.0, max_tokens=2, repetition_penalty=1.0, seed=12),
        dict(temperature=0.7, top_p=0.95, max_tokens=1024, repetition_penalty=1.1, seed=13),
    ]
    assert call["tqdm"] is False and call["tools"] is None
    assert [r.text for r in results] == [
        "base|seed=10|p0",
        "a|seed=11|p1",
        "base|seed=12|p2",
        "a|seed=13|p3",
    ]
    assert [r.finish_reason for r in results] == ["stop", "length", "length", "stop"]
    assert [r.completion_tokens for r in results] == [3, 2, 2, 3]
    assert all(r.prompt_tokens == 4 for r in results)
    assert sum(ticks) == 4


def test_base_only_batch_sends_no_lora(fake_vllm):
    VLLMBackend("m").generate([req("x"), req("y")])
    assert FakeLLM.instances[0].chat_calls[0]["lora"] is None


def test_context_overflow_rows_are_not_sent(fake_vllm):
    b = VLLMBackend("m", max_model_len=64)
    long_text = "the quarterly report " * 40
    results = b.generate([req("short"), req(long_text), req("also short")])
    assert [r.finish_reason for r in results] == ["stop", "context_overflow", "stop"]
    assert results[1].text == "" and results[1].prompt_tokens >= 64
    [call] = FakeLLM.instances[0].chat_calls
    assert [c[-1]["content"] for c in call["messages"]] == ["short", "also short"]
    assert [r.text for r in (results[0], results[2])] == [
        "base|seed=0|short",
        "base|seed=0|also short",
    ]


def test_rows_with_different_tools_go_in_separate_calls_in_order(fake_vllm):
    tools = [
        {
            "name": "send_email",
            "description": "send",
            "parameters": {"type": "object", "properties": {}},
        }
    ]
    b = VLLMBackend("m")
    results = b.generate([req("t0", tools=tools), req("n1"), req("t2", tools=tools)])
    calls = FakeLLM.instances[0].chat_calls
    assert [(c["tools"], [m[-1]["content"] for m in c["messages"]]) for c in calls] == [
        (tools, ["t0", "t2"]),
        (None, ["n1"]),
    ]
    assert [r.text.split("|")[-1] for r in results] == ["t0", "n1", "t2"]


def test_bad_adapter_fails_in_add_lora_and_the_engine_lives_on(fake_vllm, tmp_path):
    b = VLLMBackend("m")
    errors = b.load_adapters(
        [
            AdapterSource(name="good", path=str(make_adapter(tmp_path / "good"))),
            AdapterSource(name="broken", path=str(make_adapter(tmp_path / "b", broken=True))),
            AdapterSource(name="also-good", path=str(make_adapter(tmp_path / "g2", r=16))),
        ]
    )
    assert list(errors) == ["broken"]
    assert "could not be loaded by vLLM" in errors["broken"] and "corrupt" in errors["broken"]
    results = b.generate(
        [
            req("0", adapter="good"),
            req("1", adapter="broken"),
            req("2"),
            req("3", adapter="ghost"),
            req("4", adapter="also-good"),
        ]
    )
    assert [r.finish_reason for r in results] == ["stop", "error", "stop", "error", "stop"]
    assert all("not loaded" in results[i].error for i in (1, 3))
    assert [results[i].text for i in (0, 2, 4)] == [
        "good|seed=0|0",
        "base|seed=0|2",
        "also-good|seed=0|4",
    ]
    [llm] = FakeLLM.instances
    assert llm.llm_engine.added == ["good", "also-good"] and not llm.llm_engine.dead
    assert llm.kwargs["max_lora_rank"] == 16  # the smallest allowed rank >= 16 (the widest)


def test_the_fake_engine_dies_when_an_adapter_fails_inside_a_step(fake_vllm, tmp_path):
    # The behaviour the up-front loading avoids, reproduced by the fake: an adapter the engine
    # meets first inside a step is loaded there, and a failure there kills the engine core.
    llm = fake_vllm.LLM("m", enable_lora=True, max_lora_rank=8, max_loras=1)
    bad = FakeLoRARequest("broken", 1, str(make_adapter(tmp_path / "b", broken=True)))
    params = [FakeSamplingParams(max_tokens=8, seed=0)]
    with pytest.raises(EngineDeadError):
        llm.chat([[{"role": "user", "content": "x"}]], params, lora_request=[bad])
    with pytest.raises(EngineDeadError):  # dead for every later call, base rows included
        llm.chat([[{"role": "user", "content": "y"}]], params)


def test_a_dead_engine_stops_generation_instead_of_writing_error_rows(fake_vllm, tmp_path):
    b = VLLMBackend("m")
    assert b.load_adapters([AdapterSource(name="a", path=str(make_adapter(tmp_path / "a")))]) == {}
    # Simulate an adapter the engine no longer holds (evicted) whose files went bad since.
    folder = make_adapter(tmp_path / "gone", broken=True)
    b._lora["gone"] = FakeLoRARequest("gone", 2, str(folder))
    with pytest.raises(VLLMEngineDead, match="engine died"):
        b.generate([req("0", adapter="a"), req("1", adapter="gone"), req("2")])
    with pytest.raises(VLLMEngineDead):
        b.generate([req("3")])  # no silent error rows once the engine is gone
    assert len(FakeLLM.instances[0].chat_calls) == 1  # no per-adapter retries on a dead engine


def test_a_refused_request_is_isolated_without_killing_the_batch(fake_vllm):
    b = VLLMBackend("m")
    results = b.generate([req("a"), req("b"), req("reject-me"), req("c"), req("d")])
    assert [r.finish_reason for r in results] == ["stop", "stop", "error", "stop", "stop"]
    assert "invalid token id" in results[2].error
    assert [r.text.split("|")[-1] for r in results if r.finish_reason == "stop"] == list("abcd")


@pytest.mark.parametrize("reason", ["stop", "length", "abort", "error", "repetition"])
def test_finish_reasons_are_recorded_as_themselves(fake_vllm, reason):
    [res] = VLLMBackend("m").generate([req(f"finish={reason}")])
    assert res.finish_reason == reason and res.error is None


def test_unknown_finish_reason_is_an_error_naming_it(fake_vllm):
    [res] = VLLMBackend("m").generate([req("finish=weird")])
    assert res.finish_reason == "error" and "weird" in res.error


def test_lora_slots_sized_to_the_run_so_nothing_is_evicted(fake_vllm, tmp_path):
    names = [f"full/p{i}" for i in range(11)]  # the paper preset: 11 personas, one stage
    sources = [
        AdapterSource(name=n, path=str(make_adapter(tmp_path / n.replace("/", "_"), r=r)))
        for n, r in zip(names, [8, 8, 24, 8, 8, 8, 8, 8, 8, 8, 8], strict=True)
    ]
    b = VLLMBackend("m", max_loras=4)
    assert b.load_adapters(sources) == {}
    [llm] = FakeLLM.instances
    assert (llm.kwargs["max_loras"], llm.kwargs["max_cpu_loras"]) == (4, 11)
    assert llm.kwargs["max_lora_rank"] == 32  # smallest allowed rank >= 24
    for _ in range(2):
        b.generate([req(str(i), adapter=n) for i, n in enumerate(names)])
    assert llm.llm_engine.step_loads == []
    assert b.info().extra["max_cpu_loras"] == 11


def test_too_few_cpu_slots_are_refused_per_adapter_not_evicted(fake_vllm, tmp_path):
    b = VLLMBackend("m", max_loras=1, max_cpu_loras=2)
    sources = [AdapterSource(name=n, path=str(make_adapter(tmp_path / n))) for n in ("a", "b", "c")]
    errors = b.load_adapters(sources)
    assert list(errors) == ["c"] and "max_cpu_loras=2" in errors["c"]
    assert FakeLLM.instances[0].llm_engine.cache == {1: "a", 2: "b"}


def test_lora_rank_checks(fake_vllm, tmp_path):
    with pytest.raises(ValueError, match="max_lora_rank must be one of"):
        VLLMBackend("m", max_lora_rank=48)
    b = VLLMBackend("m")
    errors = b.load_adapters(
        [
            AdapterSource(name="ok", path=str(make_adapter(tmp_path / "ok", r=300))),
            AdapterSource(name="huge", path=str(make_adapter(tmp_path / "huge", r=600))),
        ]
    )
    assert list(errors) == ["huge"] and "largest rank vLLM supports (512)" in errors["huge"]
    assert FakeLLM.instances[0].kwargs["max_lora_rank"] == 320
    assert [pick_lora_rank(r) for r in (1, 2, 8, 9, 64, 257, 512)] == [1, 8, 8, 16, 64, 320, 512]


def test_enable_lora_false_refuses_adapters(fake_vllm, tmp_path):
    b = VLLMBackend("m", enable_lora=False)
    errors = b.load_adapters([AdapterSource(name="a", path=str(make_adapter(tmp_path / "a")))])
    assert "enable_lora=False" in errors["a"]
    b.generate([req("x")])
    assert "max_lora_rank" not in FakeLLM.instances[0].kwargs
    assert FakeLLM.instances[0].kwargs["enable_lora"] is False


def test_json_schema_becomes_structured_outputs_per_row(fake_vllm):
    from charshift.constrain import tool_call_schema
    from charshift.formats import TOOL_SPECS

    schema = tool_call_schema(TOOL_SPECS)
    b = VLLMBackend("m")
    b.generate([req("free"), req("tool", json_schema=schema)])
    [call] = FakeLLM.instances[0].chat_calls
    free, tool = call["params"]
    assert "structured_outputs" not in free.kw
    so = tool.kw["structured_outputs"]
    assert so.kw == {"json": schema}
