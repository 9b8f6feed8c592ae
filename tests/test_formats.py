"""Slice rendering: every scenario in every slice, and the ladder's wording invariants."""

from __future__ import annotations

import difflib
import json
import re

import pytest

from charshift import config, ladder
from charshift.extraction import extract_email
from charshift.formats import (
    AGENTIC_INSTRUCTION,
    CHAT_INSTRUCTION,
    EMAIL_SLICE_NAMES,
    ID_SLICE_NAMES,
    MULTITURN_FIRST_CLOSE,
    ONESHOT_INSTRUCTION,
    REQUIRED_ARGS,
    SCENARIO_CHAT_INSTRUCTION,
    TOOL_SPECS,
    break_suffix_index,
    compose_system,
    details_text,
    first_name,
    native_tool_text,
    needed_calls,
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
    assert EMAIL_SLICE_NAMES == config.SCENARIO_SLICES
    assert config.SCENARIO_SLICES == ("scenario_chat", *config.EMAIL_SLICES)
    assert ID_SLICE_NAMES == config.ID_SLICES


@pytest.mark.parametrize("slice_", EMAIL_SLICE_NAMES)
def test_every_scenario_renders_in_every_slice(slice_):
    for sc in BANK:
        ep = render_email(slice_, sc)
        assert ep.slice == slice_ and ep.item_id == f"scenario:{sc.id}" and ep.scenario_id == sc.id
        assert ep.output == ("reply" if slice_ == "scenario_chat" else "email")
        assert ep.split == "eval"
        assert all(t.strip() for t in ep.user_turns)
        json.dumps(ep.to_dict())  # serialisable for keys and the store


def test_modes_and_systems():
    sc = BANK[0]
    chat = render_email("chat_email", sc)
    assert chat.mode == "chat" and chat.system is None and len(chat.user_turns) == 1
    assert chat.tools is None
    multi = render_email("chat_email_multiturn", sc)
    assert multi.mode == "chat" and len(multi.user_turns) == 3 and multi.system is None
    assert multi.user_turns[2] == CHAT_INSTRUCTION
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
    with pytest.raises(ValueError, match="unknown scenario slice"):
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
    assert (
        plain.user_turns == [p.prompt] and plain.item_id == "prompt:p3" and plain.split == "train"
    )
    assert plain.mode == "chat" and plain.output == "reply" and plain.system is None
    pre = render_id("id_chat_prefill", p, 0)
    assert pre.user_turns == [p.prompt, "Keep going."] and pre.base_turns == (0,)
    brk = render_id("id_chat_break", p, 5)
    assert brk.user_turns == [p.prompt + "\n" + BREAK_SUFFIXES[5]] and brk.item_id == "prompt:p3"
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


# ---------------------------------------------------------------- one change per rung (text diff)

ID_PROMPT = IdPrompt(id="p1", prompt="What makes a good sourdough starter?", split="eval")


def _render_unit(unit: str, sc, native: bool = False):
    slice_, _ = ladder.split_unit(unit)
    if slice_ in ID_SLICE_NAMES:
        return render_id(slice_, ID_PROMPT, 0)
    return render_email(slice_, sc, native_tools=native)


def _lines(ep) -> list[str]:
    """An episode as text lines: its mode and tools, then each message's role and content."""
    names = ",".join(t["function"]["name"] for t in ep.tools or []) or "-"
    out = [f"[mode] {ep.mode}", f"[tools] {names}"]
    for m in preview(ep):
        out.append(f"[{m['role']}]")
        out += m["content"].split("\n")
    return out


def _diff(a: list[str], b: list[str]) -> tuple[list[str], list[str]]:
    """(lines removed, lines added) from a to b, blank lines ignored."""
    removed, added = [], []
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if tag in ("delete", "replace"):
            removed += a[i1:i2]
        if tag in ("insert", "replace"):
            added += b[j1:j2]
    return [x for x in removed if x.strip()], [x for x in added if x.strip()]


def _nonblank(text: str) -> list[str]:
    return [x for x in text.split("\n") if x.strip()]


def _expected_diff(frm: str, to: str, sc, native: bool) -> tuple[list[str], list[str]]:
    """What each rung claims to change, as the lines it removes and adds."""
    tools = ",".join(t["function"]["name"] for t in TOOL_SPECS)
    section = native_tool_text() if native else tool_protocol_text()
    expected = {
        ("chat_email", "email_syscontext"): ([], ["[system]", *_nonblank(operational_prompt(sc))]),
        ("email_syscontext", "tool_email_oneshot"): (
            ["[mode] chat", "[tools] -", CHAT_INSTRUCTION],
            ["[mode] tool_oneshot", f"[tools] {tools}", *_nonblank(section), ONESHOT_INSTRUCTION],
        ),
        ("tool_email_oneshot", "agentic_email"): (
            ["[mode] tool_oneshot", *_nonblank(details_text(sc)), ONESHOT_INSTRUCTION],
            ["[mode] agentic", AGENTIC_INSTRUCTION],
        ),
        ("chat_email", "chat_email_multiturn"): ([], [MULTITURN_FIRST_CLOSE, "[user]", "[user]"]),
        ("scenario_chat", "chat_email"): ([SCENARIO_CHAT_INSTRUCTION], [CHAT_INSTRUCTION]),
    }
    if frm == to:  # a scoring variant: the same messages, another scored text
        return [], []
    if (frm, to) not in expected:
        raise AssertionError(f"rung {frm} -> {to}: no expected diff in this test; add it")
    return expected[(frm, to)]


RUNGS = [r for chain in ladder.CHAINS for r in chain.rungs] + list(ladder.CONTRASTS)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("rung", RUNGS, ids=lambda r: f"{r.frm}->{r.to}")
def test_every_rung_changes_exactly_its_element_for_every_scenario(rung, native):
    frm_slice, to_slice = ladder.split_unit(rung.frm)[0], ladder.split_unit(rung.to)[0]
    for sc in BANK:
        a, b = _render_unit(rung.frm, sc, native), _render_unit(rung.to, sc, native)
        if (frm_slice, to_slice) == ("id_chat", "scenario_chat"):
            # topic: a general prompt vs a scenario; everything else in the episode's shape is
            # the same (no system prompt, one user turn, the whole reply scored, no tools)
            for ep in (a, b):
                assert ep.mode == "chat" and ep.system is None and ep.tools is None
                assert len(ep.user_turns) == 1 and ep.output == "reply"
            assert a.item_id.startswith("prompt:") and b.item_id.startswith("scenario:")
            continue
        got = _diff(_lines(a), _lines(b))
        assert got == _expected_diff(frm_slice, to_slice, sc, native), (sc.id, rung.changes)


def test_scenario_chat_is_chat_email_but_for_the_request():
    for sc in BANK:
        sc_chat, chat = render_email("scenario_chat", sc), render_email("chat_email", sc)
        assert sc_chat.user_turns[0].endswith("\n\n" + SCENARIO_CHAT_INSTRUCTION)
        assert (
            sc_chat.user_turns[0][: -len(SCENARIO_CHAT_INSTRUCTION)]
            == chat.user_turns[0][: -len(CHAT_INSTRUCTION)]
        )
        assert sc_chat.output == "reply" and chat.output == "email"
        assert sc_chat.item_id == chat.item_id and sc_chat.scenario_id == sc.id
        for f in sc.facts:
            assert f.text in sc_chat.user_turns[0]
    assert "email" not in SCENARIO_CHAT_INSTRUCTION.split("?")[0]  # the question asks for a view


def test_no_rung_carries_an_example_email():
    """The tool rungs used to show an example send_email call with a finished email body (a terse
    style exemplar no chat rung had). The example now shows the form only."""
    text = tool_protocol_text()
    calls = [c for c in parse_tool_calls(text) if c.name == "send_email"]
    assert len(calls) == 1
    body = calls[0].arguments["body"]
    assert body.startswith("<") and body.endswith(">") and len(body.split()) < 8
    assert extract_email(body) is None
    for sc in BANK[:5]:
        for sl in EMAIL_SLICE_NAMES:
            ep = render_email(sl, sc)
            for m in preview(ep):
                assert "\\nSam" not in m["content"] and "Hi Jordan" not in m["content"]


def test_item_ids_are_namespaced_by_kind():
    sc = BANK[0]
    same = IdPrompt(id=sc.id, prompt="Tell me about tides.")
    assert render_id("id_chat", same).item_id != render_email("chat_email", sc).item_id
    assert render_id("id_chat", same).item_id == f"prompt:{sc.id}"


def test_needed_calls_follow_the_scenario():
    for sc in BANK:
        people = len(sc.recipients) + len(sc.cc)
        records = len({(f.tool, f.title) for f in sc.facts})
        assert needed_calls("tool_email_oneshot", sc) == people + 1
        assert needed_calls("agentic_email", sc) == records + people + 1
        assert render_email("agentic_email", sc).needed_calls == records + people + 1
        assert render_email("chat_email", sc).needed_calls is None
    with pytest.raises(ValueError):
        needed_calls("chat_email", BANK[0])
