"""The adapter probe: real tiny LoRAs on the HF backend (logits), text probes elsewhere, and the
servers that silently ignore an adapter (SGLang given a bare adapter name)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from charshift.adapter_probe import (
    PROBE_PROMPTS,
    AdapterNotApplied,
    probe_adapters,
    require_applied,
)
from charshift.backends.base import AdapterSource
from charshift.backends.scripted import ScriptedBackend
from charshift.schema import GenRequest, GenResult


def scaled_copy(src: Path, dst: Path, scale: float) -> Path:
    """A copy of a LoRA adapter with every lora_B matrix multiplied by `scale` (0: a no-op)."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    path = dst / "adapter_model.safetensors"
    weights = load_file(path)
    save_file({k: v * scale if "lora_B" in k else v for k, v in weights.items()}, path)
    return dst


@pytest.fixture(scope="module")
def adapters(tiny_lora_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe_adapters")
    good = tiny_lora_dir("llama", seed=1)
    return {
        "good": good,
        "zero": scaled_copy(good, root / "zero", 0.0),
        "faint": scaled_copy(good, root / "faint", 1e-3),
    }


@pytest.fixture(scope="module")
def hf(tiny_llama, adapters):
    from charshift.backends.hf import HFBackend

    backend = HFBackend(str(tiny_llama), device="cpu", dtype="float32", batch_size=16)
    sources = [AdapterSource(name=n, path=str(p)) for n, p in adapters.items()]
    assert backend.load_adapters(sources) == {}
    yield backend
    backend.close()


def test_a_real_random_lora_passes(hf):
    record = probe_adapters(hf, ["good"])
    entry = record["adapters"]["good"]
    assert record["method"] == "logits" and record["backend"] == "hf"
    assert entry["applied"] and entry["outputs_differ"]
    assert entry["max_logit_diff"] > 100 * entry["logit_threshold"]
    assert record["prompts"] == list(PROBE_PROMPTS)
    require_applied(record)  # no error
    json.dumps(record)  # goes into the manifest as is


def test_a_zero_weight_lora_is_refused_naming_adapter_and_backend(hf):
    record = probe_adapters(hf, ["good", "zero"])
    entry = record["adapters"]["zero"]
    assert not entry["applied"] and entry["max_logit_diff"] == 0.0
    assert entry["base_outputs"] == entry["adapter_outputs"]
    with pytest.raises(AdapterNotApplied, match=r"by the hf backend") as err:
        require_applied(record)
    assert "zero: its next-token logits equal the base model's" in str(err.value)
    assert "good" not in str(err.value)


def test_logits_catch_an_adapter_the_greedy_text_misses(hf):
    # lora_B scaled by 1e-3: the greedy text of the 4 probe prompts does not change, the
    # next-token logits do. A text-only probe would call this adapter "not applied".
    entry = probe_adapters(hf, ["faint"])["adapters"]["faint"]
    assert entry["outputs_differ"] is False
    assert entry["applied"] and entry["max_logit_diff"] > entry["logit_threshold"]


def test_text_probe_where_no_logits_are_exposed():
    echo = ScriptedBackend(adapters=["a"])  # the echo script names the adapter that ran
    record = probe_adapters(echo, ["a"])
    assert record["method"] == "greedy_text" and record["adapters"]["a"]["applied"]
    assert record["adapters"]["a"]["max_logit_diff"] is None
    deaf = ScriptedBackend(lambda r: f"same reply to {r.messages[-1]['content']}", adapters=["a"])
    record = probe_adapters(deaf, ["a"])
    assert not record["adapters"]["a"]["applied"]
    with pytest.raises(AdapterNotApplied, match="scripted backend") as err:
        require_applied(record)
    assert "greedy outputs equal the base model's on all 4 probe prompts" in str(err.value)


def test_probe_requests_that_fail_count_as_not_applied():
    def script(req: GenRequest) -> str | GenResult:
        if req.adapter:
            return GenResult("", "error", error="HTTP 400: adapter not loaded")
        return "base text"

    record = probe_adapters(ScriptedBackend(script, adapters=["a"]), ["a"])
    entry = record["adapters"]["a"]
    assert not entry["applied"] and "adapter not loaded" in entry["errors"][0]
    with pytest.raises(AdapterNotApplied, match="the probe requests failed"):
        require_applied(record)


def test_no_adapters_no_requests():
    backend = ScriptedBackend()
    assert probe_adapters(backend, [])["adapters"] == {}
    assert backend.requests == []


@pytest.mark.parametrize("syntax,applied", [("model", False), ("auto", True)])
def test_probe_catches_sglang_running_the_base_for_a_bare_adapter_name(tmp_path, syntax, applied):
    from fake_lora_server import FakeLoraServer

    from charshift.backends.openai import OpenAIBackend

    server = FakeLoraServer("sglang", "base", {"full/sarcasm": str(tmp_path)}).start()
    try:
        backend = OpenAIBackend(server.url, "base", adapter_syntax=syntax)
        assert backend.load_adapters([AdapterSource(name="full/sarcasm")]) == {}  # listed fine
        record = probe_adapters(backend, ["full/sarcasm"])
        assert record["adapters"]["full/sarcasm"]["applied"] is applied
        if not applied:
            with pytest.raises(AdapterNotApplied, match="openai backend"):
                require_applied(record)
        backend.close()
    finally:
        server.close()


def test_pipeline_stops_on_an_adapter_that_changes_nothing(tmp_path, monkeypatch, tiny_lora_dir):
    from charshift import pipeline
    from charshift.config import parse_config
    from charshift.store import RunStore

    monkeypatch.setenv("CHARSHIFT_CACHE", str(tmp_path / "cache"))
    good = tiny_lora_dir("llama", seed=1)
    scaled_copy(good, tmp_path / "adapters" / "sarcasm", 1.0)
    scaled_copy(good, tmp_path / "adapters" / "humor", 0.0)  # loads fine, does nothing
    cfg = parse_config(
        yaml.safe_load(
            f"""
            bases:
              - name: tl
                model: tiny:llama
                classifier: "tiny:modernbert:sarcasm,humor"
                adapters: {{full: {{path: "{tmp_path}/adapters/{{persona}}"}}}}
            stages: [full]
            personas: [sarcasm, humor]
            slices: [id_chat]
            sampling: {{max_tokens: 4}}
            backend: {{kind: hf, device: cpu, dtype: float32}}
            id_prompts: {{n_eval: 1}}
            """
        )
    )
    with pipeline.prepare_run(cfg, tmp_path / "run") as store:
        with pytest.raises(AdapterNotApplied, match="full/humor"):
            pipeline.generate(cfg, store)
    reader = RunStore(tmp_path / "run", writable=False)
    probe = reader.manifest()["adapter_probe"]["tl"]
    assert probe["adapters"]["full/sarcasm"]["applied"] is True
    assert probe["adapters"]["full/humor"]["applied"] is False
    assert len(reader.generations) == 0  # stopped before generating


# ----- log-probabilities: vLLM offline (a fake engine, tests/fake_vllm.py) --------------------


def placeholder_adapter(folder: Path, scale: float) -> Path:
    """An adapter the fake engine reads: its effect on the log-probabilities times `scale`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(f"weights scale={scale}".encode())
    return folder


@pytest.fixture
def vllm_probe(monkeypatch, tmp_path):
    """A VLLMBackend on the fake engine with a subtle adapter (scale 0.05) and a no-op one;
    the greedy text never shows an adapter, as with a subtle real LoRA."""
    import fake_vllm

    from charshift.backends.vllm import BATCH_INVARIANT_ENV, VLLMBackend
    from charshift.tiny import train_tiny_tokenizer

    monkeypatch.delenv(BATCH_INVARIANT_ENV, raising=False)
    fake = fake_vllm.install(monkeypatch, train_tiny_tokenizer(tmp_path / "tok"))
    fake.LLM.script = staticmethod(lambda view: f"a reply to {view.last_user}")
    sources = [
        AdapterSource(name=n, path=str(placeholder_adapter(tmp_path / n, s)))
        for n, s in (("subtle", 0.05), ("noop", 0.0))
    ]

    def make(deterministic: bool) -> VLLMBackend:
        backend = VLLMBackend("m", deterministic=deterministic)
        assert backend.load_adapters(sources) == {}
        return backend

    return make


@pytest.mark.parametrize("deterministic", [True, False])
def test_logprobs_pass_a_subtle_adapter_and_fail_an_ignored_one(vllm_probe, deterministic):
    backend = vllm_probe(deterministic)
    record = probe_adapters(backend, ["subtle", "noop"])
    subtle, noop = record["adapters"]["subtle"], record["adapters"]["noop"]
    assert record["method"] == "logprobs"
    assert not subtle["outputs_differ"] and not noop["outputs_differ"]  # text sees neither
    assert subtle["applied"] and not noop["applied"]
    assert subtle["max_logprob_diff"] > 10 * subtle["logprob_threshold"]
    if deterministic:  # batch-invariant: the base asked twice agrees exactly
        assert record["noise_floor"] == 0.0 and noop["max_logprob_diff"] == 0.0
    else:  # batching moves the no-op's log-probabilities above the fixed floor, not the null
        assert noop["max_logprob_diff"] > 1e-4 and record["noise_floor"] > 0
    with pytest.raises(AdapterNotApplied, match=r"noop: its next-token log-probabilities") as e:
        require_applied(record)
    assert "subtle" not in str(e.value)
    json.dumps(record, allow_nan=False)  # goes into the manifest as is
    backend.close()


@pytest.mark.parametrize("mode", ["warn", "off"])
def test_adapter_probe_warn_skips_only_the_ignored_adapter_and_off_probes_nothing(
    tmp_path, monkeypatch, tiny_lora_dir, mode
):
    from charshift import pipeline
    from charshift.completion import completion
    from charshift.config import parse_config
    from charshift.store import RunStore

    monkeypatch.setenv("CHARSHIFT_CACHE", str(tmp_path / "cache"))
    good = tiny_lora_dir("llama", seed=1)
    scaled_copy(good, tmp_path / "adapters" / "sarcasm", 1.0)
    scaled_copy(good, tmp_path / "adapters" / "humor", 0.0)  # loads fine, does nothing
    cfg = parse_config(
        yaml.safe_load(
            f"""
            bases:
              - name: tl
                model: tiny:llama
                classifier: "tiny:modernbert:sarcasm,humor"
                adapters: {{full: {{path: "{tmp_path}/adapters/{{persona}}"}}}}
            stages: [full]
            personas: [sarcasm, humor]
            slices: [id_chat]
            sampling: {{max_tokens: 4}}
            backend: {{kind: hf, device: cpu, dtype: float32}}
            id_prompts: {{n_eval: 1}}
            adapter_probe: {mode}  # YAML reads a bare off as false: that is off too
            """
        )
    )
    with pipeline.prepare_run(cfg, tmp_path / "run") as store:
        pipeline.generate(cfg, store)
    reader = RunStore(tmp_path / "run", writable=False)
    personas = {row.persona for row in reader.generations}
    manifest = reader.manifest()
    probe = manifest["adapter_probe"]["tl"]
    assert probe["mode"] == mode
    if mode == "warn":
        assert personas == {"sarcasm"}  # the ignored adapter's rows only are not generated
        assert probe["adapters"]["full/humor"]["applied"] is False
        assert "not applied" in manifest["skipped_adapters"]["tl/full/humor"]
        assert list(manifest["skipped_adapters"]) == ["tl/full/humor"]
        done = completion(cfg, reader, scored=False)  # what the exit status reads
        assert not done.complete and "not applied" in done.skipped_adapters["tl/full/humor"]
    else:
        assert personas == {"sarcasm", "humor"} and probe["adapters"] == {}
        assert not manifest.get("skipped_adapters")
    assert manifest["reproducibility"]["tl"]["guarantee"]


def test_logprobs_on_a_server_pass_a_subtle_adapter_and_fail_an_ignored_one(tmp_path):
    from fake_lora_server import FakeLoraServer

    from charshift.backends.openai import OpenAIBackend

    loras = {
        n: str(placeholder_adapter(tmp_path / n, s)) for n, s in (("subtle", 0.05), ("noop", 0))
    }
    server = FakeLoraServer("vllm", "base", loras).start()
    try:
        backend = OpenAIBackend(server.url, "base")
        assert backend.load_adapters([AdapterSource(name=n) for n in loras]) == {}
        record = probe_adapters(backend, ["subtle", "noop"])
        subtle, noop = record["adapters"]["subtle"], record["adapters"]["noop"]
        assert record["method"] == "logprobs"
        assert not subtle["outputs_differ"] and not noop["outputs_differ"]  # text sees neither
        assert subtle["applied"] and not noop["applied"]
        asked = [b for b in server.bodies if b.get("logprobs")]
        assert asked and all(b["top_logprobs"] == 20 and b["max_tokens"] == 1 for b in asked)
        assert {b["model"] for b in asked} == {"base", "subtle", "noop"}
        backend.close()
    finally:
        server.close()
