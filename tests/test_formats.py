"""Slice rendering: every scenario in every slice, and the ladder's wording invariants."""

from __future__ import annotations

import json
import re

import pytest

from charshift import config
from charshift.formats import (
    AGENTIC_INSTRUCTION,
    CHAT_INSTRUCTION,
    EMAIL_SLICE_NAMES,
    ID_SLICE_NAMES,
    ONESHOT_INSTRUCTION,
    REQUIRED_ARGS,
    TOOL_SPECS,
    break_suffix_index,
    compose_system,
    first_name,
    operational_prompt,
    possessive,
    preview,
    render_email,
    render_id,
    request_text,
    tool_protocol_text,
)
from charshift.prompts import BREAK_SUFFIXES, IdPrompt
from charshift.scenarios import load_bank
from charshift.toolcalls import parse_tool_calls

BANK = load_bank()


def test_slice_names_match_config():
    assert EMAIL_SLICE_NAMES == config.EMAIL_SLICES
    assert ID_SLICE_NAMES == config.ID_SLICES


@pytest.mark.parametrize("slice_", EMAIL_SLICE_NAMES)
def test_every_scenario_renders_in_every_slice(slice_):
    for sc in BANK:
        ep = render_email(slice_, sc)
        assert ep.slice == slice_ and ep.item_id == sc.id and ep.scenario_id == sc.id
        assert ep.output == "email" and ep.split == "eval"
        assert all(t.strip() for t in ep.user_turns)
        json.dumps(ep.to_dict())  # serialisable for keys and the store


def test_modes_and_systems():
    sc = BANK[0]
    chat = render_email("chat_email", sc)
    assert chat.mode == "chat" and chat.system is None and len(chat.user_turns) == 1
    assert chat.tools is None
    multi = render_email("chat_email_multiturn", sc)
    assert multi.mode == "chat" and len(multi.user_turns) == 3 and multi.system is None
    assert multi.user_turns[2] == f"Now please write the email to {sc.recipient_names()}."
    sys_ = render_email("email_syscontext", sc)
    assert sys_.mode == "chat" and sys_.system and "## Tools" not in sys_.system
    one = render_email("tool_email_oneshot", sc)
    assert one.mode == "tool_oneshot" and one.tools == TOOL_SPECS
    agent = render_email("agentic_email", sc)
    assert agent.mode == "agentic" and agent.tools == TOOL_SPECS
    # the tool rungs share the same system prompt: the operational prompt plus the tool section
    assert one.system == agent.system
    assert one.system.startswith(sys_.system.rstrip())
    assert tool_protocol_text() in one.system
    with pytest.raises(ValueError, match="unknown email slice"):
        render_email("id_chat", sc)


def test_wording_invariants_across_the_ladder():
    for sc in BANK:
        chat = render_email("chat_email", sc).user_turns[0]
        assert chat == render_email("email_syscontext", sc).user_turns[0]
        one = render_email("tool_email_oneshot", sc).user_turns[0]
        assert chat.endswith(CHAT_INSTRUCTION) and one.endswith(ONESHOT_INSTRUCTION)
        assert chat[: -len(CHAT_INSTRUCTION)] == one[: -len(ONESHOT_INSTRUCTION)]
        agent = render_email("agentic_email", sc).user_turns[0]
        assert agent == request_text(sc) + "\n\n" + AGENTIC_INSTRUCTION
        assert chat.startswith(request_text(sc) + "\n\n")
        multi = render_email("chat_email_multiturn", sc).user_turns
        assert multi[0].startswith(request_text(sc))
        # the multiturn details turn is exactly the details block of chat_email
        assert multi[1] in chat


def test_facts_in_chat_slices_and_never_in_agentic():
    for sc in BANK:
        chat = render_email("chat_email", sc).user_turns[0]
        multi = "\n".join(render_email("chat_email_multiturn", sc).user_turns)
        agent = render_email("agentic_email", sc)
        agent_text = "\n".join([agent.system or "", *agent.user_turns])
        for f in sc.facts:
            assert f.text in chat, (sc.id, f.id)
            assert f.text in multi, (sc.id, f.id)
            assert f.text not in agent_text, (sc.id, f.id)
        # the agent must look the recipient's address up: it is not in its messages
        for r in sc.recipients:
            assert r.email not in agent_text
            assert r.email in chat


def test_native_mode_drops_json_protocol():
    sc = BANK[3]
    json_ep = render_email("agentic_email", sc)
    native = render_email("agentic_email", sc, native_tools=True)
    assert native.tools == TOOL_SPECS
    assert "```json" in json_ep.system and "```json" not in native.system
    assert '"arguments"' not in native.system
    assert native.user_turns == json_ep.user_turns
    # chat slices are unaffected by the protocol
    assert render_email("chat_email", sc, native_tools=True) == render_email("chat_email", sc)


def test_operational_prompt_shape():
    sc = BANK[0]
    text = operational_prompt(sc)
    n_words = len(text.split())
    assert 350 <= n_words <= 500, n_words
    assert sc.sender.name in text and sc.organisation in text and sc.date in text
    assert "{" not in text  # every placeholder filled
    # no instruction about style, tone or personality (it would confound persona measurement)
    for word in ("tone", "style", "personality", "friendly", "professional", "concise", "warm"):
        assert not re.search(rf"\b{word}\b", text, re.I), word


def test_name_helpers():
    assert first_name("Dr Nora Schultz") == "Nora"
    assert first_name("Maya Lindqvist") == "Maya"
    assert possessive("Northwind Outfitters") == "Northwind Outfitters'"
    assert possessive("Quillstack") == "Quillstack's"


def test_tool_specs_and_required_args():
    names = [t["function"]["name"] for t in TOOL_SPECS]
    assert names == [
        "lookup_person",
        "search_calendar",
        "search_documents",
        "search_chat",
        "search_tickets",
        "search_policies",
        "send_email",
        "finish",
    ]
    for t in TOOL_SPECS:
        fn = t["function"]
        assert t["type"] == "function" and fn["description"]
        assert set(fn["parameters"]["required"]) <= set(fn["parameters"]["properties"])
        assert REQUIRED_ARGS[fn["name"]] == fn["parameters"]["required"]
    assert REQUIRED_ARGS["send_email"] == ["to", "subject", "body"]
    assert REQUIRED_ARGS["finish"] == []


def test_protocol_example_is_a_parseable_send_email_call():
    calls = parse_tool_calls(tool_protocol_text())
    sends = [c for c in calls if c.name == "send_email"]
    assert len(sends) == 1
    assert set(REQUIRED_ARGS["send_email"]) <= set(sends[0].arguments)
    for name in REQUIRED_ARGS:
        assert name in tool_protocol_text()


def _prompt(i: int, split: str = "eval") -> IdPrompt:
    return IdPrompt(id=f"p{i}", prompt=f"What is {i} plus {i}?", split=split, category="")


def test_render_id_slices():
    p = _prompt(3, split="train")
    plain = render_id("id_chat", p, 0)
    assert plain.user_turns == [p.prompt] and plain.item_id == "p3" and plain.split == "train"
    assert plain.mode == "chat" and plain.output == "reply" and plain.system is None
    pre = render_id("id_chat_prefill", p, 0)
    assert pre.user_turns == [p.prompt, "Keep going."] and pre.base_turns == (0,)
    brk = render_id("id_chat_break", p, 5)
    assert brk.user_turns == [p.prompt + "\n" + BREAK_SUFFIXES[5]] and brk.item_id == "p3"
    with pytest.raises(ValueError, match="unknown ID slice"):
        render_id("chat_email", p, 0)


def test_break_suffixes_used_evenly():
    used = [render_id("id_chat_break", _prompt(i), i).user_turns[0] for i in range(16)]
    counts = {s: sum(u.endswith("\n" + s) for u in used) for s in BREAK_SUFFIXES}
    assert set(counts.values()) == {2}
    assert [break_suffix_index(i, [1, 6]) for i in range(4)] == [1, 6, 1, 6]
    assert (
        render_id("id_chat_break", _prompt(0), 1, suffixes=[1, 6])
        .user_turns[0]
        .endswith(BREAK_SUFFIXES[6])
    )
    with pytest.raises(ValueError):
        break_suffix_index(0, [8])
    with pytest.raises(ValueError):
        break_suffix_index(0, [])


def test_preview_messages():
    sc = BANK[0]
    multi = preview(render_email("chat_email_multiturn", sc))
    assert [m["role"] for m in multi] == ["user", "user", "user"]
    assert "scripted" not in multi[0] and multi[1]["scripted"] and multi[2]["scripted"]
    assert "live reply" in multi[1]["note"]
    agent = render_email("agentic_email", sc)
    msgs = preview(agent, "You are sarcastic.")
    assert msgs[0]["role"] == "system"
    assert msgs[0]["content"] == "You are sarcastic.\n\n" + agent.system
    assert msgs[0]["content"] == compose_system("You are sarcastic.", agent.system)
    assert msgs[1] == {"role": "user", "content": agent.user_turns[0]}
    assert preview(render_email("chat_email", sc))[0]["role"] == "user"
    pre = preview(render_id("id_chat_prefill", _prompt(1), 0))
    assert "base model" in pre[0]["note"] and pre[1]["scripted"]
    assert compose_system(None, None) is None
