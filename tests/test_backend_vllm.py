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
from charshift.backends.vllm import VLLMBackend
from charshift.schema import GenRequest, Sampling


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


class FakeLLM:
    instances: list[FakeLLM] = []
    tokenizer: Any = None
    fail_for_adapter: str | None = None

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.model, self.kwargs = model, kwargs
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
        if FakeLLM.fail_for_adapter and any(
            x and x.lora_name == FakeLLM.fail_for_adapter for x in loras
        ):
            raise RuntimeError(f"Loading lora {FakeLLM.fail_for_adapter} failed")
        outputs = []
        for conv, params, lora in zip(messages, sampling_params, loras, strict=True):
            n = min(params.max_tokens, 3)
            text = f"{lora.lora_name if lora else 'base'}|seed={params.seed}|{conv[-1]['content']}"
            completion = types.SimpleNamespace(
                text=text,
                token_ids=list(range(n)),
                finish_reason="length" if params.max_tokens <= 3 else "stop",
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
    FakeLLM.fail_for_adapter = None
    return vllm


def make_adapter(folder: Path, r: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": r, "lora_alpha": 2 * r, "peft_type": "LORA"})
    )
    (folder / "adapter_model.safetensors").write_bytes(b"weights" + bytes([r]))
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
    b = VLLMBackend("m")
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


def test_failing_adapter_is_isolated_and_unloaded_adapter_is_an_error(fake_vllm, tmp_path):
    b = VLLMBackend("m")
    b.load_adapters(
        [AdapterSource(name=n, path=str(make_adapter(tmp_path / n))) for n in ("good", "broken")]
    )
    FakeLLM.fail_for_adapter = "broken"
    results = b.generate(
        [req("0", adapter="good"), req("1", adapter="broken"), req("2"), req("3", adapter="ghost")]
    )
    assert [r.finish_reason for r in results] == ["stop", "error", "stop", "error"]
    assert "Loading lora broken failed" in results[1].error
    assert "not loaded" in results[3].error
    assert results[0].text == "good|seed=0|0" and results[2].text == "base|seed=0|2"


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
