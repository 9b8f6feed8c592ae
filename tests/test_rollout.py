"""The rollout engine against a scripted backend: every termination path, lockstep batching."""

import dataclasses
import json

import pytest

from charshift import formats, scenarios
from charshift.backends.scripted import ScriptedBackend
from charshift.rollout import Episode, RolloutEngine, RolloutSettings, step_budget
from charshift.schema import Condition, GenResult, Sampling
from charshift.toolsim import ToolSimulator


@pytest.fixture(scope="module")
def scenario():
    return scenarios.load_bank()[0]


def call(name, **args):
    return "```json\n" + json.dumps({"name": name, "arguments": args}) + "\n```"


def send(sc, body="Hello Priya,\n\nThe order is late.\n\nBest,\nDana"):
    return call("send_email", to=sc.recipients[0].email, subject="Update", body=body)


def episode(sc, slice_="agentic_email", key="k1", cond=None, budget=None, **kw):
    spec = formats.render_email(slice_, sc)
    if budget is not None:
        spec = dataclasses.replace(spec, max_steps=budget)
    return Episode(
        key=key,
        spec=spec,
        condition=cond or Condition("b", "prompted", "sarcasm", system_prompt="You are wry."),
        sample_idx=0,
        run_seed=0,
        sampling=Sampling(max_tokens=400),
        simulator=ToolSimulator(sc) if spec.mode != "chat" else None,
        **kw,
    )


def run(backend, eps, **settings):
    engine = RolloutEngine(backend, RolloutSettings(**settings), formats.REQUIRED_ARGS)
    rows = [r for step in engine.run(eps) for r in step]
    return {r.key: r for r in rows}


def scripted_turns(turns):
    """A script answering by turn number: the count of assistant messages so far."""

    def script(req):
        n = sum(m["role"] == "assistant" for m in req.messages)
        out = turns[min(n, len(turns) - 1)]
        return out(req) if callable(out) else out

    return script


def test_send_email_ends_rollout(scenario):
    be = ScriptedBackend(scripted_turns([call("search_documents", query="x"), send(scenario)]))
    rows = run(be, [episode(scenario)])
    r = rows["k1"]
    assert r.outcome == "email" and r.n_steps == 2
    assert r.email["body"].startswith("Hello Priya") and r.text == r.email["body"]
    assert [t["tool"] for t in r.tool_log] == ["search_documents", "send_email"]
    assert r.messages[0]["role"] == "system" and r.messages[0]["content"].startswith("You are wry.")


def test_two_calls_in_one_turn_both_run_in_order(scenario):
    two = call("lookup_person", query=scenario.recipients[0].name) + "\n" + send(scenario)
    rows = run(ScriptedBackend(scripted_turns([two])), [episode(scenario)])
    r = rows["k1"]
    assert r.outcome == "email" and r.n_steps == 1
    assert [t["tool"] for t in r.tool_log] == ["lookup_person", "send_email"]
    assert r.meta["multi_call_turns"] == [0]


def test_max_steps(scenario):
    be = ScriptedBackend(scripted_turns([call("search_chat", query="budget")]))
    r = run(be, [episode(scenario, budget=4)])["k1"]
    assert r.outcome == "max_steps" and r.n_steps == 4 and r.text is None
    assert r.meta["step_budget"] == 4 and r.meta["non_send_calls"] == 4


def test_consecutive_malformed_turns(scenario):
    be = ScriptedBackend(scripted_turns(["I will just write it: Dear Priya, ..."]))
    r = run(be, [episode(scenario)], max_malformed=3)["k1"]
    assert r.outcome == "malformed" and r.n_steps == 3
    errors = [m["content"] for m in r.messages if m["content"].startswith("[error]")]
    assert len(errors) == 2 and all("tool call" in e.lower() for e in errors)


def test_malformed_run_resets_after_a_good_call(scenario):
    bad = "no call here"
    turns = [bad, bad, call("search_documents", query="x"), bad, bad, send(scenario)]
    r = run(ScriptedBackend(scripted_turns(turns)), [episode(scenario)], max_malformed=3)["k1"]
    assert r.outcome == "email" and r.n_steps == 6


def test_finish_without_email_is_no_email(scenario):
    r = run(ScriptedBackend(scripted_turns([call("finish", summary="done")])), [episode(scenario)])
    assert r["k1"].outcome == "no_email" and r["k1"].text is None


def test_email_sent_before_finish_is_kept(scenario):
    body = "Dear all,\n\nFirst version of the rota for next week, for your comments.\n\nDana"
    turns = [send(scenario, body=body), call("finish")]
    be = ScriptedBackend(scripted_turns(turns))
    r = run(be, [episode(scenario)], stop_on_send=False)["k1"]
    assert r.outcome == "email" and r.n_steps == 2 and "First version" in r.text


def test_context_overflow(scenario):
    be = ScriptedBackend(scripted_turns([call("search_documents", query="x")]), context_length=10)
    r = run(be, [episode(scenario)])["k1"]
    assert r.outcome == "context_overflow" and r.n_steps == 1


def test_unknown_tool_gets_error_result_and_goes_on(scenario):
    turns = [call("sendEmail", to="x"), send(scenario)]
    r = run(ScriptedBackend(scripted_turns(turns)), [episode(scenario)])["k1"]
    assert r.outcome == "email"
    assert r.tool_log[0]["ok"] is False


def test_oneshot_single_turn(scenario):
    ok = run(
        ScriptedBackend(scripted_turns([send(scenario)])), [episode(scenario, "tool_email_oneshot")]
    )
    assert ok["k1"].outcome == "email" and ok["k1"].n_steps == 1
    bad = run(
        ScriptedBackend(scripted_turns(["Dear Priya, hi"])),
        [episode(scenario, "tool_email_oneshot")],
    )
    assert bad["k1"].outcome == "malformed" and bad["k1"].n_steps == 1


def test_chat_email_extracts_body(scenario):
    reply = "Sure! Here's a draft:\n\nSubject: Late order\n\nHi Priya,\n\nThe order is late and we need a date.\n\nBest regards,\nDana\n\nLet me know if you want changes."
    r = run(ScriptedBackend(scripted_turns([reply])), [episode(scenario, "chat_email")])["k1"]
    assert r.outcome == "email" and r.text.startswith("Hi Priya") and "Let me know" not in r.text
    assert r.final_reply == reply


def test_chat_email_without_email(scenario):
    r = run(
        ScriptedBackend(scripted_turns(["What tone would you like?"])),
        [episode(scenario, "chat_email")],
    )
    assert r["k1"].outcome == "no_email" and r["k1"].text is None


def test_multiturn_answers_each_turn_live(scenario):
    be = ScriptedBackend(
        scripted_turns(
            [
                "Got it.",
                "Thanks, noted.",
                "Hi Priya,\n\nThe shipment is late, please confirm a date.\n\nBest,\nDana",
            ]
        )
    )
    r = run(be, [episode(scenario, "chat_email_multiturn")])["k1"]
    roles = [m["role"] for m in r.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert r.outcome == "email" and r.n_steps == 3
    # each later request carried the model's own earlier replies
    assert [len(req.messages) for req in be.requests] == [2, 4, 6]


def test_prefill_base_turn_has_no_adapter_or_persona_prompt():
    from charshift.prompts import IdPrompt

    spec = formats.render_id("id_chat_prefill", IdPrompt("p1", "Tell me about tides."))
    ep = Episode(
        "k",
        spec,
        Condition("b", "full", "humor", adapter="full/humor", system_prompt="SP"),
        0,
        0,
        Sampling(),
    )
    be = ScriptedBackend(adapters=["full/humor"])
    r = run(be, [ep])["k"]
    first, second = be.requests
    assert first.adapter is None and all(m["role"] != "system" for m in first.messages)
    assert second.adapter == "full/humor" and second.messages[0]["content"] == "SP"
    assert second.messages[-1]["content"] == "Keep going." and r.outcome == "reply"


def test_lockstep_one_call_per_step(scenario):
    """Episodes of different lengths advance together: one generate call per step."""
    short = [send(scenario)]
    long = [call("search_documents", query="a"), call("search_chat", query="b"), send(scenario)]

    def script(req):
        sp = req.messages[0]["content"]
        turns = long if sp.startswith("LONG") else short
        n = sum(m["role"] == "assistant" for m in req.messages)
        return turns[min(n, len(turns) - 1)]

    eps = [
        episode(
            scenario, key=f"s{i}", cond=Condition("b", "prompted", "humor", system_prompt="SHORT")
        )
        for i in range(3)
    ] + [
        episode(
            scenario, key=f"l{i}", cond=Condition("b", "prompted", "humor", system_prompt="LONG")
        )
        for i in range(2)
    ]
    be = ScriptedBackend(script)
    rows = run(be, eps)
    assert [len(c) for c in be.calls] == [5, 2, 2]
    assert all(r.outcome == "email" for r in rows.values())
    assert rows["l0"].n_steps == 3 and rows["s0"].n_steps == 1


def test_seed_depends_on_key_and_step_only(scenario):
    be1, be2 = (
        ScriptedBackend(scripted_turns([call("search_chat", query="x")])),
        ScriptedBackend(scripted_turns([call("search_chat", query="x")])),
    )
    run(be1, [episode(scenario, key="a", budget=2), episode(scenario, key="b", budget=2)])
    run(be2, [episode(scenario, key="b", budget=2)])
    seeds_b_batched = [r.seed for r in be1.requests if True][1::2]
    assert seeds_b_batched == [r.seed for r in be2.requests]
    assert len({r.seed for r in be1.requests}) == 4


def test_backend_error_row_is_kept(scenario):
    be = ScriptedBackend(lambda req: GenResult("", "error", error="boom"))
    r = run(be, [episode(scenario)])["k1"]
    assert r.outcome == "error" and r.meta["errors"] == ["boom"]


# ----------------------------------------------------------- a level chat/tool boundary (defect 7)


def test_oneshot_lookup_then_send_is_an_email(scenario):
    """The operational prompt asks to check each address: a compliant lookup_person in
    tool_email_oneshot used to end the row as no_email. It now gets its result and the model
    goes on within the budget; the look-up is on record."""
    turns = [call("lookup_person", query=scenario.recipients[0].name), send(scenario)]
    r = run(ScriptedBackend(scripted_turns(turns)), [episode(scenario, "tool_email_oneshot")])["k1"]
    assert r.outcome == "email" and r.n_steps == 2 and r.text.startswith("Hello Priya")
    assert r.meta["non_send_calls"] == 1
    assert [t["tool"] for t in r.tool_log] == ["lookup_person", "send_email"]
    assert r.messages[3]["content"].startswith("[tool result: lookup_person]")


def test_oneshot_budget_is_the_address_checks_plus_the_margin(scenario):
    turns = [call("lookup_person", query="someone")]
    eps = [episode(scenario, "tool_email_oneshot")]
    r = run(ScriptedBackend(scripted_turns(turns)), eps, step_margin=2)["k1"]
    need = formats.needed_calls("tool_email_oneshot", scenario)
    assert r.outcome == "max_steps" and r.n_steps == need + 2 == r.meta["step_budget"]


def test_step_budget_rule():
    assert step_budget("agentic", 7, 8, 4) == 11
    assert step_budget("agentic", 2, 8, 4) == 8  # max_steps is the agentic floor
    assert step_budget("tool_oneshot", 2, 8, 4) == 6  # no floor: the address checks + margin
    assert step_budget("agentic", None, 8, 4) == 8


SHORT = "Thanks, Dana."  # 2 words: not an email by the one rule, however it was produced
PASTED_CALL = json.dumps(
    {
        "name": "send_email",
        "arguments": {
            "to": "a",
            "body": "Dear Priya, the order is late and we need a new date soon.",
        },
    }
)


@pytest.mark.parametrize("body", [SHORT, PASTED_CALL])
def test_one_rule_for_a_sent_body_and_a_chat_body(scenario, body):
    sent = run(
        ScriptedBackend(scripted_turns([send(scenario, body=body)])),
        [episode(scenario, "tool_email_oneshot")],
    )["k1"]
    assert sent.outcome == "no_email" and sent.text is None and sent.meta["not_an_email"]
    assert sent.email["body"] == body  # what was sent stays on record
    chat = run(ScriptedBackend(scripted_turns([body])), [episode(scenario, "chat_email")])["k1"]
    assert chat.outcome == "no_email" and chat.text is None


WRAPPED = (
    "Sure! Here's the email:\n\nSubject: Late order\n\nHi Priya,\n\nThe PO-4471 jackets are "
    "late and we need a new delivery date.\n\nBest regards,\nDana\n\nLet me know if you want "
    "changes."
)
PLAIN = "The PO-4471 jackets are overdue; please confirm a delivery date by Friday."  # 12 words
PLAIN_LONG = PLAIN + " We need them before the store opens next week."  # 21 words


@pytest.mark.parametrize(
    ("text", "scored"),
    [
        (WRAPPED, "Hi Priya,\n\nThe PO-4471 jackets are late and we need a new delivery date."
         "\n\nBest regards,\nDana"),
        ("```\nHi Priya,\n\n" + PLAIN + "\n\nDana\n```\nShall I send it?",
         "Hi Priya,\n\n" + PLAIN + "\n\nDana"),
        ("Subject: Late order\n\n" + PLAIN_LONG, PLAIN_LONG),
        ("Subject: Late order\n\n" + PLAIN, None),  # no greeting, no sign-off, under 15 words
    ],
)  # fmt: skip
def test_a_chat_body_and_a_tool_body_of_the_same_text_score_the_same(scenario, text, scored):
    """One rule and one scored text: the wrapper an agent puts into send_email's body (a
    preamble, a Subject line, closing chat, a fence) is stripped as it is from a chat reply,
    and the structure check applies to both; send_email's subject stands for a Subject line."""
    tool = call("send_email", to=scenario.recipients[0].email, subject="Late order", body=text)
    sent = run(ScriptedBackend(scripted_turns([tool])), [episode(scenario, "tool_email_oneshot")])
    chat = run(ScriptedBackend(scripted_turns([text])), [episode(scenario, "chat_email")])
    sent, chat = sent["k1"], chat["k1"]
    assert sent.text == chat.text == scored
    assert sent.outcome == chat.outcome == ("email" if scored else "no_email")
    assert sent.email["body"] == text  # what was sent stays on record, as sent
    # the subject argument counts as the chat reply's Subject line, not more
    bare = text.removeprefix("Subject: Late order\n\n")
    tool = call("send_email", to=scenario.recipients[0].email, subject="Late order", body=bare)
    again = run(ScriptedBackend(scripted_turns([tool])), [episode(scenario, "tool_email_oneshot")])
    assert again["k1"].text == scored


def test_is_email_body_rule():
    from charshift.extraction import MIN_BODY_WORDS, is_email_body

    words = " ".join(["word"] * MIN_BODY_WORDS)
    assert is_email_body(words) and not is_email_body(" ".join(["word"] * (MIN_BODY_WORDS - 1)))
    assert not is_email_body(None) and not is_email_body("   ")
    assert not is_email_body(PASTED_CALL) and not is_email_body("```json\n" + PASTED_CALL + "\n```")
    assert is_email_body("[Draft] " + words)  # a bracket that opens no call is still prose


def test_lockstep_progress_counts_every_model_call(scenario):
    """The generate bar's "model calls" counter: one increment per request the backend finished,
    over every step (a two-step episode counts twice), not per finished row."""
    backend = ScriptedBackend(
        scripted_turns([call("lookup_person", query="Priya"), send(scenario)])
    )
    engine = RolloutEngine(backend, RolloutSettings(), formats.REQUIRED_ARGS)
    eps = [episode(scenario, key="a"), episode(scenario, key="b")]
    counted: list[int] = []
    rows = [r for step in engine.run(eps, progress=counted.append) for r in step]
    assert {r.key: r.n_steps for r in rows} == {"a": 2, "b": 2}
    assert sum(counted) == 4


def test_a_lone_surrogate_in_a_reply_is_replaced_recorded_and_storable(scenario, tmp_path):
    """Issue 18: a server's JSON reply can hold half a surrogate pair ("\\ud83d"), and a tool
    call's JSON can escape one; no UTF-8 file or tokenizer takes it, so writing the row (or the
    next prompt) died. Each becomes U+FFFD, as a UTF-8 decoder does with bytes it cannot read;
    the engine records how many the reply's own text held."""
    from charshift.store import RunStore

    body = "Hello Priya,\n\nThe order is late \ud83d, sorry.\n\nBest,\nDana"
    rows = run(ScriptedBackend([body]), [episode(scenario, "chat_email", key="chat")])
    rows |= run(ScriptedBackend([send(scenario, body)]), [episode(scenario, key="agent")])
    assert rows["chat"].meta["surrogates_replaced"] == 1  # in the reply's own text
    # in the tool call, escaped as JSON ("\\ud83d"): the parser's calls hold none either
    assert "\\ud83d" in rows["agent"].final_reply
    for row in rows.values():
        assert row.outcome == "email"
        assert row.text is not None and "late \ufffd, sorry" in row.text
        text = json.dumps(row.to_dict(), ensure_ascii=False)
        assert not any(0xD800 <= ord(c) < 0xE000 for c in text)
    with RunStore(tmp_path / "run") as store:
        assert store.generations.append(list(rows.values())) == 2


def test_calls_left_unread_are_recorded_in_the_row(scenario):
    """Issue 18: calls after the 64th of a turn were dropped without a trace. The row's meta
    says which turn left calls unread and where."""
    one = {"name": "search_directory", "arguments": {"query": "x"}}
    lookups = "\n".join(json.dumps(one, separators=(",", ":")) for _ in range(70))  # 70 words
    rows = run(ScriptedBackend([lookups, send(scenario)]), [episode(scenario)])
    (row,) = rows.values()
    (unread,) = row.meta["unread_tool_text"]
    assert unread["turn"] == 0 and "more than 64 tool calls" in unread["note"]
    assert "was not read" in unread["note"] and row.outcome == "email"
    assert row.meta["non_send_calls"] == 64
