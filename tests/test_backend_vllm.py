"""VLLMBackend against a FAKE vLLM engine (tests/fake_vllm.py: vLLM cannot run here: no GPU,
another torch pin). The fake reproduces vLLM 0.33.0's offline engine as read from its wheel:
`LLMEngine.add_request` with token-id prompts, `step()` one token per request per step under a
`max_num_seqs` scheduler, input validation that raises to the caller, LoRA loading up front or
(fatally) inside a step, `engine_core.shutdown()`, `VLLM_BATCH_INVARIANT`. The tokenizer is a
real tiny HF tokenizer with a ChatML template, so prompts are rendered and tokenised by
transformers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import fake_vllm
import pytest
from fake_vllm import EngineDeadError, FakeLLM, LoRARequest, SamplingParams, View

from charshift import formats, scenarios
from charshift.backends.base import AdapterSource
from charshift.backends.vllm import BATCH_INVARIANT_ENV, VLLMBackend, VLLMEngineDead, pick_lora_rank
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import Condition, GenRequest, Sampling, stable_hash
from charshift.toolsim import ToolSimulator


class CountingTokenizer:
    """The real tokenizer, counting chat-template renders and the tools each was given."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.renders: list[Any] = []

    def apply_chat_template(self, messages: Any, **kw: Any) -> Any:
        self.renders.append(kw.get("tools"))
        return self.tok.apply_chat_template(messages, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)

    def __len__(self) -> int:
        return len(self.tok)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from charshift.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def fake(monkeypatch, tiny_tokenizer):
    monkeypatch.delenv(BATCH_INVARIANT_ENV, raising=False)
    return fake_vllm.install(monkeypatch, CountingTokenizer(tiny_tokenizer))


def engine_of(i: int = 0) -> Any:
    return FakeLLM.instances[i].llm_engine


def make_adapter(
    folder: Path, r: int = 8, broken: bool = False, scale: float | None = None
) -> Path:
    """A placeholder adapter the fake engine reads (`fake_lora_server.adapter_strength`):
    full strength, `scale` times it, or a file that does not load."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": r, "lora_alpha": 2 * r, "peft_type": "LORA"})
    )
    head = b"broken" if broken else b"weights"
    tail = f" r={r}" + (f" scale={scale}" if scale is not None else "")
    (folder / "adapter_model.safetensors").write_bytes(head + tail.encode())
    return folder


def req(text: str, **kw: Any) -> GenRequest:
    return GenRequest(messages=[{"role": "user", "content": text}], **kw)


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    backend = VLLMBackend("some/model")  # constructing is lazy and cheap
    with pytest.raises(ImportError, match=r"charshift\[vllm\]"):
        backend.generate([req("hi")])


def test_engine_arguments(fake):
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
    b.close()
    assert VLLMBackend("m").context_length() == 4096  # taken from the engine when not set


def test_adapters_local_hub_missing_and_too_wide(fake, tmp_path, monkeypatch):
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
    loras = [r.lora for r in engine_of().history]
    assert [(x.lora_name, x.lora_int_id, x.lora_path) for x in loras] == [
        ("full/sarcasm", 1, str(local)),
        ("full/humor", 2, str(hub_root / "humor")),
    ]
    assert engine_of().added == ["full/sarcasm", "full/humor"]  # loaded up front, once each
    assert engine_of().step_loads == []  # so no adapter is ever loaded inside an engine step


def test_base_only_batch_sends_no_lora(fake):
    VLLMBackend("m").generate([req("x"), req("y")])
    assert [r.lora for r in engine_of().history] == [None, None]


def test_context_overflow_rows_are_not_sent(fake):
    b = VLLMBackend("m", max_model_len=64)
    long_text = "the quarterly report " * 40
    results = b.generate([req("short"), req(long_text), req("also short")])
    assert [r.finish_reason for r in results] == ["stop", "context_overflow", "stop"]
    assert results[1].text == "" and results[1].prompt_tokens >= 64
    assert len(engine_of().history) == 2
    assert [r.text for r in (results[0], results[2])] == [
        "base|seed=0|short",
        "base|seed=0|also short",
    ]


def test_bad_adapter_fails_in_add_lora_and_the_engine_lives_on(fake, tmp_path):
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


def test_the_fake_engine_dies_when_an_adapter_fails_inside_a_step(fake, tmp_path):
    # The behaviour the up-front loading avoids, reproduced by the fake: an adapter the engine
    # meets first inside a step is loaded there, and a failure there kills the engine core.
    llm = fake.LLM("m", enable_lora=True, max_lora_rank=8, max_loras=1)
    bad = LoRARequest("broken", 1, str(make_adapter(tmp_path / "b", broken=True)))
    engine = llm.llm_engine
    engine.add_request("0", fake_vllm.tokens_input([5, 6]), SamplingParams(max_tokens=8), bad)
    with pytest.raises(EngineDeadError):
        engine.step()
    with pytest.raises(EngineDeadError):  # dead for every later call, base rows included
        engine.add_request("1", fake_vllm.tokens_input([5, 6]), SamplingParams(max_tokens=8))


def test_a_dead_engine_stops_generation_instead_of_writing_error_rows(fake, tmp_path):
    b = VLLMBackend("m")
    assert b.load_adapters([AdapterSource(name="a", path=str(make_adapter(tmp_path / "a")))]) == {}
    # Simulate an adapter the engine no longer holds (evicted) whose files went bad since.
    folder = make_adapter(tmp_path / "gone", broken=True)
    b._lora["gone"] = LoRARequest("gone", 2, str(folder))
    with pytest.raises(VLLMEngineDead, match="engine died"):
        b.generate([req("0", adapter="a"), req("1", adapter="gone"), req("2")])
    with pytest.raises(VLLMEngineDead):
        b.generate([req("3")])  # no silent error rows once the engine is gone
    assert len(engine_of().history) == 3  # nothing sent to a dead engine


def test_a_refused_request_is_isolated_without_killing_the_batch(fake, monkeypatch):
    b = VLLMBackend("m")
    real = b.prompt_ids

    def ids(request: GenRequest) -> list[int]:  # a token id the model's vocabulary lacks
        return [*real(request), 10**6] if "reject-me" in str(request.messages) else real(request)

    monkeypatch.setattr(b, "prompt_ids", ids)
    results = b.generate([req("a"), req("b"), req("reject-me"), req("c"), req("d")])
    assert [r.finish_reason for r in results] == ["stop", "stop", "error", "stop", "stop"]
    assert "out of vocabulary" in results[2].error and "refused" in results[2].error
    assert [r.text.split("|")[-1] for r in results if r.finish_reason == "stop"] == list("abcd")
    assert not engine_of().dead


@pytest.mark.parametrize("reason", ["stop", "length", "abort", "error", "repetition"])
def test_finish_reasons_are_recorded_as_themselves(fake, reason):
    [res] = VLLMBackend("m").generate([req(f"finish={reason}")])
    assert res.finish_reason == reason and res.error is None


def test_unknown_finish_reason_is_an_error_naming_it(fake):
    [res] = VLLMBackend("m").generate([req("finish=weird")])
    assert res.finish_reason == "error" and "weird" in res.error


def test_lora_slots_sized_to_the_run_so_nothing_is_evicted(fake, tmp_path):
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


def test_too_few_cpu_slots_are_refused_per_adapter_not_evicted(fake, tmp_path):
    b = VLLMBackend("m", max_loras=1, max_cpu_loras=2)
    sources = [AdapterSource(name=n, path=str(make_adapter(tmp_path / n))) for n in ("a", "b", "c")]
    errors = b.load_adapters(sources)
    assert list(errors) == ["c"] and "max_cpu_loras=2" in errors["c"]
    assert FakeLLM.instances[0].llm_engine.cache == {1: "a", 2: "b"}


def test_lora_rank_checks(fake, tmp_path):
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


def test_enable_lora_false_refuses_adapters(fake, tmp_path):
    b = VLLMBackend("m", enable_lora=False)
    errors = b.load_adapters([AdapterSource(name="a", path=str(make_adapter(tmp_path / "a")))])
    assert "enable_lora=False" in errors["a"]
    b.generate([req("x")])
    assert "max_lora_rank" not in FakeLLM.instances[0].kwargs
    assert FakeLLM.instances[0].kwargs["enable_lora"] is False


def test_json_schema_becomes_structured_outputs_per_row(fake):
    from charshift.constrain import tool_call_schema
    from charshift.formats import TOOL_SPECS

    schema = tool_call_schema(TOOL_SPECS)
    b = VLLMBackend("m")
    b.generate([req("free"), req("tool", json_schema=schema)])
    free, tool = (r.params for r in engine_of().history)
    assert "structured_outputs" not in free.kw
    assert tool.kw["structured_outputs"].kw == {"json": schema}


def test_mixed_batch_queues_token_ids_with_per_row_lora_and_sampling(fake, tmp_path):
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
    history = engine_of().history
    tok = FakeLLM.tokenizer
    assert [View(tok.decode(r.ids), None, None, 0).last_user for r in history] == [
        "p0",
        "p1",
        "p2",
        "p3",
    ]
    assert [r.lora and r.lora.lora_name for r in history] == [None, "a", None, "a"]
    assert [r.params.kw for r in history] == [
        dict(temperature=0.7, top_p=0.95, max_tokens=1024, repetition_penalty=1.1, seed=10),
        dict(temperature=0.0, top_p=1.0, max_tokens=2, repetition_penalty=1.0, seed=11),
        dict(temperature=0.0, top_p=1.0, max_tokens=2, repetition_penalty=1.0, seed=12),
        dict(temperature=0.7, top_p=0.95, max_tokens=1024, repetition_penalty=1.1, seed=13),
    ]
    # Reported once, when finished (as LLM sets it), and rendered and tokenised once per row:
    # the engine got token ids, never a text it would tokenise again.
    assert all(r.params.output_kind == fake_vllm.RequestOutputKind.FINAL_ONLY for r in history)
    assert engine_of().raw_prompts == 0 and len(tok.renders) == 4
    assert (results[0].text, results[3].text) == ("base|seed=10|p0", "a|seed=13|p3")
    assert "a|seed=11|p1".startswith(results[1].text) and results[1].text  # 2 tokens of it
    assert "base|seed=12|p2".startswith(results[2].text) and results[2].text
    assert [r.finish_reason for r in results] == ["stop", "length", "length", "stop"]
    assert [r.completion_tokens for r in results[1:3]] == [2, 2]
    assert [r.prompt_tokens for r in results] == [len(r.ids) for r in history]
    assert sum(ticks) == 4


def test_each_row_is_rendered_with_its_own_tools(fake):
    tools = [
        {
            "name": "send_email",
            "description": "send",
            "parameters": {"type": "object", "properties": {}},
        }
    ]
    b = VLLMBackend("m")
    results = b.generate([req("t0", tools=tools), req("n1"), req("t2", tools=tools)])
    assert FakeLLM.tokenizer.renders == [tools, None, tools]  # one render per row, in order
    assert [r.text.split("|")[-1] for r in results] == ["t0", "n1", "t2"]


def call(name: str, **args: Any) -> str:
    return "```json\n" + json.dumps({"name": name, "arguments": args}) + "\n```"


def agent_script(view: View) -> str:
    """Episodes of different lengths, from the request alone: SLOW rows give one long reply
    (many engine steps); FAST ones search twice, then finish; the others search for 0 to 3
    turns (from their seed), then finish."""
    if "SLOW" in view.prompt:
        return "I will think about this at length. " * 12
    roll = 2 if "FAST" in view.prompt else int(stable_hash([view.seed, view.lora]), 16) % 4
    if view.turns < roll:
        return call("search_documents", query=f"q{roll}")
    return call("finish", summary=f"done {view.seed}")


def agent_episodes(keys: list[str]) -> list[Episode]:
    sc = scenarios.load_bank()[0]
    return [
        Episode(
            key,
            formats.render_email("agentic_email", sc),
            Condition("b", "prompted", "humor", system_prompt=key),
            i,
            7,
            Sampling(max_tokens=256),
            ToolSimulator(sc),
        )
        for i, key in enumerate(keys)
    ]


def rollout(backend: VLLMBackend) -> RolloutEngine:
    return RolloutEngine(backend, RolloutSettings(max_steps=5), formats.REQUIRED_ARGS)


def test_stepped_rollout_gives_the_lockstep_rows(fake):
    FakeLLM.script = staticmethod(agent_script)
    FakeLLM.max_num_seqs = 4  # the scheduler takes 4 at a time: queued requests wait
    keys = [f"ep{i}" for i in range(14)]
    first = VLLMBackend("m")
    batches = rollout(first).run(agent_episodes(keys))
    lockstep = {r.key: r.to_dict() for batch in batches for r in batch}
    first.close()
    backend = VLLMBackend("m")
    stepped = rollout(backend).run_stepped(agent_episodes(keys), max_in_flight=6)
    rows = {r.key: r.to_dict() for batch in stepped for r in batch}
    assert rows == lockstep  # row for row, every field
    assert len({r["n_steps"] for r in rows.values()}) >= 3  # the episodes really differ
    engine = engine_of(1)
    assert engine.peak == 6 and not engine.queue  # bounded, the bound reached, nothing left


def test_an_episode_queues_its_next_step_as_soon_as_its_reply_comes_out_of_a_step(fake):
    # SLOW episodes' single reply takes many engine steps; FAST needs several short turns. In
    # waves FAST would wait for the SLOW replies at every turn; by steps it finishes first.
    FakeLLM.script = staticmethod(agent_script)
    eps = agent_episodes(["SLOW-1", "FAST", "SLOW-2"])
    backend = VLLMBackend("m")
    order = [row.key for batch in rollout(backend).run_stepped(eps) for row in batch]
    assert order[0] == "FAST"
    engine = engine_of()
    fast = [r.rid for r in engine.history if "FAST" in FakeLLM.tokenizer.decode(r.ids)]
    added = {rid: step for step, what, rid in engine.log if what == "add"}
    finished = {rid: step for step, what, rid in engine.log if what == "finish"}
    first_slow_finish = min(s for rid, s in finished.items() if rid not in fast)
    assert len(fast) >= 2  # FAST took several turns ...
    assert all(added[rid] < first_slow_finish for rid in fast)  # ... all while SLOW still ran
    assert [added[rid] for rid in fast[1:]] == [finished[rid] for rid in fast[:-1]]  # at once


def test_abandoning_the_stream_aborts_what_is_queued_in_the_engine(fake):
    FakeLLM.script = staticmethod(agent_script)
    backend = VLLMBackend("m")
    stream = rollout(backend).run_stepped(agent_episodes(["SLOW-1", "FAST", "SLOW-2"]))
    next(stream)  # FAST's row
    assert engine_of().queue  # the SLOW replies are still being made
    stream.close()
    assert engine_of().queue == [] and backend._pending == set()


def test_close_shuts_the_engine_down_so_the_next_base_starts_in_this_process(fake):
    first = VLLMBackend("base-1")
    first.generate([req("x")])
    with pytest.raises(ValueError, match="Free memory on device"):
        VLLMBackend("base-2").generate([req("y")])  # the first engine still holds the GPU
    first.close()
    assert engine_of(0).shut_down
    second = VLLMBackend("base-2")
    assert second.generate([req("y")])[0].text == "base|seed=0|y"
    first.close()  # closing twice is harmless
    with pytest.raises(EngineDeadError):  # the shut-down engine takes no more requests
        engine_of(0).step()


def test_deterministic_sets_batch_invariance_for_the_engine_and_says_so(fake, monkeypatch):
    b = VLLMBackend("m")
    assert b.reproducibility()["guarantee"] == "batch_invariant"
    b.generate([req("x")])
    assert FakeLLM.instances[0].env[BATCH_INVARIANT_ENV] == "1"
    assert b.info().extra["reproducibility"]["guarantee"] == "batch_invariant"
    b.close()
    assert BATCH_INVARIANT_ENV not in os.environ  # restored: the process's own setting
    fast = VLLMBackend("m", deterministic=False)
    fast.generate([req("x")])
    assert BATCH_INVARIANT_ENV not in FakeLLM.instances[1].env
    repro = fast.info().extra["reproducibility"]
    assert repro["guarantee"] == "seeded" and "deterministic: true" in repro["detail"]
    fast.close()
    monkeypatch.setenv(BATCH_INVARIANT_ENV, "1")  # set by the user: recorded as it is
    user = VLLMBackend("m", deterministic=False)
    user.generate([req("x")])
    assert user.reproducibility()["guarantee"] == "batch_invariant"


def logprob_requests(adapter: str | None = None) -> list[GenRequest]:
    return [req(p, adapter=adapter) for p in ("morning?", "advice?", "rain?")]


def test_next_token_logprobs_are_batch_invariant_only_when_deterministic(fake):
    for deterministic, same in ((True, True), (False, False)):
        b = VLLMBackend("m", deterministic=deterministic)
        alone = [b.next_token_logprobs([r], k=5)[0] for r in logprob_requests()]
        batched = b.next_token_logprobs(logprob_requests(), k=5)
        assert all(len(d) == 5 for d in batched)
        assert [sorted(d) for d in alone] == [sorted(d) for d in batched]  # same top tokens
        assert (alone == batched) is same
        b.close()


def test_next_token_logprobs_see_a_weak_adapter_the_greedy_text_misses(fake, tmp_path):
    b = VLLMBackend("m")
    weak = make_adapter(tmp_path / "weak", scale=0.05)
    assert b.load_adapters([AdapterSource(name="weak", path=str(weak))]) == {}
    FakeLLM.script = staticmethod(lambda v: f"text of {v.last_user}")  # the adapter: no effect
    texts = [r.text for r in b.generate(logprob_requests() + logprob_requests("weak"))]
    assert texts[:3] == texts[3:]
    base = b.next_token_logprobs(logprob_requests(), k=20)
    mine = b.next_token_logprobs(logprob_requests("weak"), k=20)
    diff = max(abs(m[t] - d[t]) for d, m in zip(base, mine, strict=True) for t in set(d) & set(m))
    assert diff > 1e-2
    assert b.next_token_logprobs([req("x", adapter="ghost")], k=3) == [None]  # not loaded
    assert len(b.next_token_logprobs([req("x")], k=50)[0]) == 20  # at most max_logprobs


def test_the_pipeline_drives_vllm_by_engine_steps(fake, monkeypatch):
    from charshift import pipeline
    from charshift.config import load_preset, parse_config

    data = load_preset("smoke").model_dump(mode="json")
    data["backend"] = {"kind": "vllm", "max_in_flight": 7}
    cfg = parse_config(data)
    used: list[tuple[str, Any]] = []

    def stepped(self, eps, max_in_flight=0, on_step=None, progress=None):
        used.append(("stepped", max_in_flight))
        return iter([])

    monkeypatch.setattr(RolloutEngine, "run_stepped", stepped)
    monkeypatch.setattr(pipeline, "_episodes", lambda cfg, plan, rows: iter(rows))
    todo: Any = ["r1", "r2", "r3"]
    list(pipeline._drive(cfg, None, rollout(VLLMBackend("m")), todo, wave=2))  # type: ignore[arg-type]
    assert used == [("stepped", 7)]
