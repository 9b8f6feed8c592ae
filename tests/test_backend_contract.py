"""The Backend contract, one suite run against every backend that can run on this machine.

  - scripted: the deterministic fake (backends/scripted.py);
  - hf: HFBackend on a tiny random Llama (`tiny:llama`) with a tiny random LoRA adapter;
  - openai: OpenAIBackend against a real `transformers serve` subprocess serving the same tiny
    model folder on 127.0.0.1.

`transformers serve` facts this suite relies on (transformers 5.24, checked by hand):
  - it takes a local folder as its FORCE_MODEL argument and then answers only to that model name;
  - it seeds the global torch RNG from `seed` when a request arrives, so seeded sampling is
    reproducible only with one request in flight (`max_concurrency=1` below);
  - it samples only when the model's generation_config says `do_sample: true` (a temperature
    alone does not switch sampling on), so it serves a copy of the tiny folder with that flag;
  - it rejects unknown body fields (422), so `repetition_penalty` is not sent (extra_sampling=False);
  - it cannot serve LoRA adapters and does not enforce a context limit: those cases are skipped
    for it here and covered against an HTTP stub in test_backend_openai.py.

vLLM cannot run here; tests/test_backend_vllm.py checks it against a fake `vllm` module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from charshift.backends.base import AdapterSource, Backend
from charshift.schema import GenRequest, GenResult, Sampling

ADAPTER = "persona"
PROMPTS = (
    "Could you send me the file by Friday?",
    "Write a short poem about rain.",
    "What is 17 * 23?",
    "Please contact support about the shipping delay.",
)
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=8, repetition_penalty=1.0)
SAMPLED = Sampling(temperature=1.0, top_p=1.0, max_tokens=8, repetition_penalty=1.0)


@dataclass
class Subject:
    """A backend under test and what it can be asked to show."""

    backend: Backend
    adapter: str | None  # a loaded adapter's name, or None where the backend serves none
    skips: dict[str, str] = field(default_factory=dict)  # case -> reason

    def skip_unless(self, case: str) -> None:
        if case in self.skips:
            pytest.skip(self.skips[case])


def req(
    text: str, sampling: Sampling = GREEDY, seed: int = 0, adapter: str | None = None
) -> GenRequest:
    return GenRequest(
        messages=[{"role": "user", "content": text}], adapter=adapter, sampling=sampling, seed=seed
    )


def texts(results: list[GenResult]) -> list[str]:
    return [r.text for r in results]


# ----- fixtures: one Subject per backend -------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    from charshift.tiny import build_tiny_lora

    return build_tiny_lora(tiny_llama_dir, tmp_path_factory.mktemp("lora") / ADAPTER, seed=1)


@pytest.fixture(scope="session")
def scripted_subject() -> Subject:
    from charshift.backends.scripted import ScriptedBackend

    backend = ScriptedBackend(context_length=512)
    assert backend.load_adapters([AdapterSource(name=ADAPTER)]) == {}
    return Subject(backend, ADAPTER)


@pytest.fixture(scope="session")
def hf_subject(tiny_llama_dir, tiny_lora_dir) -> Subject:
    from charshift.backends.hf import HFBackend

    backend = HFBackend(str(tiny_llama_dir), device="cpu", dtype="float32", batch_size=8)
    assert backend.load_adapters([AdapterSource(name=ADAPTER, path=str(tiny_lora_dir))]) == {}
    yield Subject(backend, ADAPTER)
    backend.close()


@pytest.fixture(scope="session")
def openai_subject(transformers_server) -> Subject:
    from charshift.backends.openai import OpenAIBackend

    base_url, model = transformers_server
    backend = OpenAIBackend(
        base_url, model, max_concurrency=1, timeout=120, retries=1, extra_sampling=False
    )
    yield Subject(
        backend,
        adapter=None,
        skips={
            "adapters": "transformers serve cannot serve LoRA adapters (routing is stub-tested)",
            "overflow": "transformers serve does not enforce a context limit (mapping is stub-tested)",
        },
    )
    backend.close()


@pytest.fixture(
    params=["scripted", "hf", pytest.param("openai", marks=pytest.mark.slow)],
)
def subject(request) -> Subject:
    return request.getfixturevalue(f"{request.param}_subject")


# ----- the contract ------------------------------------------------------------------------------


def test_one_result_per_request_in_request_order(subject):
    requests = [req(p) for p in PROMPTS]
    forward = subject.backend.generate(requests)
    backward = subject.backend.generate(requests[::-1])
    assert len(forward) == len(requests) and all(isinstance(r, GenResult) for r in forward)
    assert all(r.finish_reason in ("stop", "length") for r in forward)
    assert len(set(texts(forward))) > 1  # otherwise order would be unobservable
    assert texts(backward)[::-1] == texts(forward)
    assert subject.backend.generate([]) == []


def test_same_request_and_seed_give_the_same_text(subject):
    target = req(PROMPTS[0], SAMPLED, seed=1234)
    alone = subject.backend.generate([target])[0].text
    again = subject.backend.generate([target])[0].text
    in_company = subject.backend.generate(
        [req(PROMPTS[1], SAMPLED, seed=7), target, req(PROMPTS[2], SAMPLED, seed=8)]
    )
    assert again == alone
    assert in_company[1].text == alone  # a row's text does not depend on its batch
    by_seed = texts(subject.backend.generate([req(PROMPTS[0], SAMPLED, seed=s) for s in range(4)]))
    assert len(set(by_seed)) > 1  # the seed is really used: sampling is on


def test_temperature_zero_is_deterministic_whatever_the_seed(subject):
    first = subject.backend.generate([req(p, GREEDY, seed=1) for p in PROMPTS])
    second = subject.backend.generate([req(p, GREEDY, seed=2) for p in PROMPTS])
    assert texts(first) == texts(second)


def test_max_tokens_is_respected(subject):
    tight = Sampling(temperature=0.0, top_p=1.0, max_tokens=3, repetition_penalty=1.0)
    results = subject.backend.generate([req(p, tight) for p in PROMPTS])
    assert all(r.completion_tokens <= 3 for r in results)
    assert all(r.completion_tokens == 3 for r in results if r.finish_reason == "length")
    assert any(r.finish_reason == "length" for r in results)


def test_context_overflow_is_a_result_not_an_exception(subject):
    subject.skip_unless("overflow")
    too_long = " ".join(["report"] * (subject.backend.context_length() + 16))
    results = subject.backend.generate([req(PROMPTS[0]), req(too_long), req(PROMPTS[1])])
    assert results[1].finish_reason == "context_overflow" and results[1].text == ""
    assert results[0].finish_reason in ("stop", "length")
    assert results[2].finish_reason in ("stop", "length")


def test_missing_adapter_is_an_error_entry_and_its_rows_error(subject, tmp_path):
    errors = subject.backend.load_adapters(
        [AdapterSource(name="ghost", path=str(tmp_path / "no-such-adapter"))]
    )
    assert set(errors) == {"ghost"} and errors["ghost"]
    results = subject.backend.generate([req(PROMPTS[0], adapter="ghost"), req(PROMPTS[0])])
    assert results[0].finish_reason == "error" and results[0].text == ""
    assert results[1].finish_reason in ("stop", "length")


def test_adapter_rows_share_a_call_with_base_rows(subject):
    subject.skip_unless("adapters")
    a = subject.adapter
    base_only = subject.backend.generate([req(PROMPTS[0]), req(PROMPTS[1])])
    adapter_only = subject.backend.generate(
        [req(PROMPTS[0], adapter=a), req(PROMPTS[1], adapter=a)]
    )
    mixed = subject.backend.generate(
        [req(PROMPTS[0]), req(PROMPTS[0], adapter=a), req(PROMPTS[1]), req(PROMPTS[1], adapter=a)]
    )
    assert texts(mixed) == [
        base_only[0].text,
        adapter_only[0].text,
        base_only[1].text,
        adapter_only[1].text,
    ]
    assert texts(adapter_only) != texts(base_only)  # the adapter really changes the output


# ----- ScriptedBackend's own behaviour (the fake that rollout tests lean on) -----------------------


def test_scripted_list_dict_and_callable_scripts():
    from charshift.backends.scripted import NoScriptMatch, ScriptedBackend, ScriptExhausted

    listed = ScriptedBackend(["one", "two", GenResult("", "error", error="boom")])
    assert texts(listed.generate([req("a"), req("b")])) == ["one", "two"]
    assert listed.generate([req("c")])[0].error == "boom"
    with pytest.raises(ScriptExhausted):
        listed.generate([req("d")])
    assert [len(call) for call in listed.calls] == [2, 1, 1]
    assert [r.messages[-1]["content"] for r in listed.requests] == ["a", "b", "c", "d"]

    keyed = ScriptedBackend({"exact prompt": "E", "poem": "P", "*": "D"})
    assert texts(keyed.generate([req("exact prompt"), req("a poem please"), req("other")])) == [
        "E",
        "P",
        "D",
    ]
    with pytest.raises(NoScriptMatch):
        ScriptedBackend({"x": "y"}).generate([req("z")])

    called = ScriptedBackend(lambda r: f"seed {r.seed} adapter {r.adapter}", adapters=["a"])
    assert called.generate([req("q", seed=5, adapter="a")])[0].text == "seed 5 adapter a"


def test_scripted_max_tokens_unavailable_adapters_and_progress(tmp_path):
    from charshift.backends.scripted import ScriptedBackend

    b = ScriptedBackend(["w1 w2 w3 w4 w5"], unavailable=["gated"])
    cut = b.generate([req("x", Sampling(max_tokens=2))], progress=(ticks := []).append)
    assert (cut[0].text, cut[0].finish_reason, cut[0].completion_tokens) == ("w1 w2", "length", 2)
    assert ticks == [1]
    errors = b.load_adapters(
        [
            AdapterSource(name="gated"),
            AdapterSource(name="gone", path=str(tmp_path / "missing")),
            AdapterSource(name="here", path=str(tmp_path)),
        ]
    )
    assert sorted(errors) == ["gated", "gone"]
    assert set(b.info().adapters) == {"here"}
