"""The tool simulator: forgiving look-ups, searches, informative errors, sending, the log."""

from __future__ import annotations

import pytest

from charshift.formats import SOURCE_TOOL
from charshift.scenarios import get_scenario, load_bank, parse_bank
from charshift.toolcalls import ToolCall
from charshift.toolsim import MAX_RESULTS, ToolSimulator, tokens

BANK = load_bank()


def _scenario_with_priya():
    """A small scenario built here, so the look-up variants below are about known data."""
    raw = {
        "id": "test-priya",
        "domain": "testing",
        "organisation": "Acme",
        "sender": {"name": "Sam Cole", "role": "Coordinator", "email": "sam@acme.example"},
        "recipients": [
            {"name": "Priya Raman", "role": "Operations Lead", "email": "priya@acme.example"}
        ],
        "topic": "the rota",
        "goal": "The email should settle the rota.",
        "facts": [
            {
                "id": "a",
                "tool": "calendar",
                "title": "Rota review",
                "text": "Rota review on 5 June.",
            },
            {
                "id": "b",
                "tool": "documents",
                "title": "Rota draft v2",
                "text": "Draft has 6 shifts.",
            },
            {
                "id": "c",
                "tool": "policies",
                "title": "Shift rules",
                "text": "Max 5 nights a month.",
            },
            {"id": "d", "tool": "directory", "title": "Rota owner", "text": "Lee Chan owns rotas."},
        ],
        "must_cover": ["x", "y", "z"],
        "people": [
            {"name": "Lee Chan", "role": "Planner", "email": "lee.chan@acme.example"},
            {"name": "Lee Park", "role": "Analyst", "email": "lee.park@acme.example"},
        ],
        "distractors": {
            "documents": [
                {"title": "Rota draft v1", "text": "Old draft, 5 shifts."},
                {"title": "Canteen menu", "text": "Soup on Mondays."},
                {"title": "Rota archive 2024", "text": "Last year's rotas."},
                {"title": "Rota template", "text": "Blank rota."},
            ]
        },
    }
    return parse_bank([raw])[0]


@pytest.fixture
def sim() -> ToolSimulator:
    return ToolSimulator(_scenario_with_priya())


@pytest.mark.parametrize(
    "query",
    [
        "priya@acme.example",
        "PRIYA@ACME.EXAMPLE",
        " <priya@acme.example> ",
        "Priya Raman",
        "priya raman ",
        "priya   RAMAN.",
        "Raman",
        "Priya",
        "operations lead",
        "Priya Raman <priya@acme.example>",
    ],
)
def test_lookup_variants(sim, query):
    res = sim.call(ToolCall("lookup_person", {"query": query}))
    assert res.ok, res.content
    assert "priya@acme.example" in res.content
    assert "Priya Raman" in res.content and "Operations Lead" in res.content
    assert not res.terminal


def test_lookup_ambiguous_lists_all_and_notes(sim):
    res = sim.call(ToolCall("lookup_person", {"query": "Lee"}))
    assert res.ok
    assert "lee.chan@acme.example" in res.content and "lee.park@acme.example" in res.content
    assert "2 people match" in res.content
    notes = sim.call(ToolCall("lookup_person", {"query": "rota owner"}))
    assert notes.ok and "Lee Chan owns rotas." in notes.content


def test_lookup_miss_is_informative(sim):
    res = sim.call(ToolCall("lookup_person", {"query": "Zed Nobody"}))
    assert not res.ok and not res.terminal
    assert "No directory entries match 'Zed Nobody'" in res.content
    unknown_addr = sim.call(ToolCall("lookup_person", {"query": "priya@other.example"}))
    assert not unknown_addr.ok


def test_search_matches_titles_and_texts_up_to_three(sim):
    res = sim.call(ToolCall("search_documents", {"query": "rota draft"}))
    assert res.ok
    # title words weigh double: the two drafts come first, in stored order
    assert res.content.index("Rota draft v2") < res.content.index("Rota draft v1")
    assert f"showing {MAX_RESULTS} of" in res.content
    assert res.content.count("\n1. ") == 1 and "\n4. " not in res.content
    assert "Canteen menu" not in res.content
    by_text = sim.call(ToolCall("search_documents", {"query": "soup"}))
    assert by_text.ok and "Canteen menu" in by_text.content
    # case, punctuation and plurals do not matter; same call, same answer
    a = sim.call(ToolCall("search_calendar", {"query": "ROTA reviews?"}))
    b = sim.call(ToolCall("search_calendar", {"query": "ROTA reviews?"}))
    assert a.ok and "Rota review on 5 June." in a.content and a.content == b.content


def test_search_miss_and_tool_isolation(sim):
    res = sim.call(ToolCall("search_documents", {"query": "xyz"}))
    assert not res.ok
    assert (
        res.content == "Error: No records in documents match 'xyz'. Try fewer or different words."
    )
    # a calendar fact is not found by the documents search
    other = sim.call(ToolCall("search_documents", {"query": "review"}))
    assert not other.ok


def test_unknown_tool_and_missing_argument(sim):
    res = sim.call(ToolCall("search_web", {"query": "rota"}))
    assert not res.ok and "Unknown tool 'search_web'" in res.content
    assert "search_documents" in res.content and "send_email" in res.content
    miss = sim.call(ToolCall("search_chat", {}))
    assert not miss.ok and "Missing required argument(s) 'query' for search_chat" in miss.content
    empty = sim.call(ToolCall("search_chat", {"query": "   "}))
    assert not empty.ok and "non-empty" in empty.content
    wrong_type = sim.call(ToolCall("search_chat", {"query": ["a", "b"]}))
    assert not wrong_type.ok


def test_send_email_ok(sim):
    res = sim.call(
        ToolCall(
            "send_email",
            {
                "to": "Priya Raman",
                "subject": "Rota",
                "body": "Hello\nRota attached.",
                "cc": "Lee Chan",
            },
        )
    )
    assert res.ok and res.terminal
    assert res.email == {
        "to": "priya@acme.example",
        "subject": "Rota",
        "body": "Hello\nRota attached.",
        "cc": ["lee.chan@acme.example"],
        "unknown_recipients": [],
        "reached_intended": True,
    }
    assert "Email sent to priya@acme.example" in res.content
    many = sim.call(
        ToolCall(
            "send_email",
            {"to": ["PRIYA@acme.example", "lee.park@acme.example"], "subject": "", "body": "x"},
        )
    )
    assert many.ok and many.email["to"] == "priya@acme.example, lee.park@acme.example"
    assert len(sim.sent) == 2


@pytest.mark.parametrize(
    ("to", "expect"),
    [
        ("nobody@", "not a valid email address"),
        ("Zed Nobody", "does not match anyone"),
        ("Lee", "ambiguous"),
        ("", "empty"),
        (42, "must be an address"),
    ],
)
def test_send_email_bad_recipient(sim, to, expect):
    res = sim.call(ToolCall("send_email", {"to": to, "subject": "s", "body": "b"}))
    assert not res.ok and not res.terminal and res.email is None
    assert "Email not sent" in res.content and expect in res.content
    assert sim.sent == []


def test_an_address_the_directory_does_not_know_is_sent_and_recorded(sim):
    """As a mail service would: the email goes out, and the row says who it did not know."""
    res = sim.call(
        ToolCall("send_email", {"to": "Nobody@Else.example", "subject": "s", "body": "b"})
    )
    assert res.ok and res.terminal
    assert res.email["to"] == "nobody@else.example"
    assert res.email["unknown_recipients"] == ["nobody@else.example"]
    assert res.email["reached_intended"] is False


def test_send_email_missing_or_empty_fields(sim):
    res = sim.call(ToolCall("send_email", {"to": "priya@acme.example", "body": "b"}))
    assert not res.ok and "'subject'" in res.content
    res = sim.call(
        ToolCall("send_email", {"to": "priya@acme.example", "subject": "s", "body": " "})
    )
    assert not res.ok and "body is empty" in res.content
    res = sim.call(
        ToolCall(
            "send_email", {"to": "priya@acme.example", "subject": "s", "body": "b", "cc": "Zed"}
        )
    )
    assert not res.ok and "'cc'" in res.content


def test_finish(sim):
    res = sim.call(ToolCall("finish", {}))
    assert res.ok and res.terminal and res.email is None
    res = sim.call(ToolCall("finish", {"summary": "nothing to send"}))
    assert "nothing to send" in res.content


def test_log_records_every_call(sim):
    sim.call(ToolCall("lookup_person", {"query": "Raman"}))
    sim.call(ToolCall("nope", {}))
    sim.call(ToolCall("send_email", {"to": "priya@acme.example", "subject": "s", "body": "b"}))
    assert [e["tool"] for e in sim.log] == ["lookup_person", "nope", "send_email"]
    assert [e["ok"] for e in sim.log] == [True, False, True]
    assert sim.log[0]["arguments"] == {"query": "Raman"}
    assert "priya@acme.example" in sim.log[0]["result"]
    assert sim.log[2]["result"].startswith("Email sent")


def test_every_fact_reachable_by_its_title():
    for sc in BANK:
        sim = ToolSimulator(sc)
        for f in sc.facts:
            res = sim.call(ToolCall(SOURCE_TOOL[f.tool], {"query": f.title}))
            assert res.ok and f.text in res.content, (sc.id, f.id)


def test_every_recipient_resolves_in_every_scenario():
    for sc in BANK:
        sim = ToolSimulator(sc)
        for r in sc.recipients + sc.cc:
            res = sim.call(ToolCall("lookup_person", {"query": r.name}))
            assert res.ok and r.email in res.content, (sc.id, r.name)
            sent = sim.call(ToolCall("send_email", {"to": r.name, "subject": "s", "body": "b"}))
            assert sent.ok and sent.email["to"] == r.email, (sc.id, r.name)


def test_distractor_people_do_not_shadow_recipients():
    sc = get_scenario(BANK, "vendor-late-jackets")
    sim = ToolSimulator(sc)
    res = sim.call(ToolCall("lookup_person", {"query": "Dana Whitfield"}))
    assert "dana.whitman" not in res.content


def test_tokens():
    assert tokens("The Invoices, for MAY!") == ["invoice", "may"]
