"""Email extraction from chat replies: fixed cases and a never-raises property."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charshift.extraction import extract_email, extract_email_body, looks_like_email

BODY = """Hi Dana,

The migration finished on Friday and all services are back online.
We saw no data loss.

Next week we start the audit, so please keep Tuesday free.

Best regards,
Sam"""


def test_preamble_subject_body_commentary() -> None:
    text = (
        "Sure, here's a draft:\n\n**Subject:** Migration update\n\n"
        + BODY
        + "\n\nLet me know if you'd like any changes!"
    )
    got = extract_email(text)
    assert got is not None
    assert got.body == BODY
    assert got.subject == "Migration update"


def test_plain_headers_are_dropped_and_kept_as_fields() -> None:
    text = "Subject: Migration update\nTo: dana@acme.test\nCc: ops@acme.test\n\n" + BODY
    got = extract_email(text)
    assert got is not None
    assert (got.subject, got.to, got.body) == ("Migration update", "dana@acme.test", BODY)


def test_fenced_email_with_commentary_outside() -> None:
    text = (
        "Here is the email you asked for:\n\n```\nSubject: Meeting\n\nDear Mr. Smith,\n\n"
        "I am writing to confirm our meeting on Tuesday at 10am in room 4.\n\n"
        "Sincerely,\nJane Doe\nHead of Operations\n```\n\nFeel free to adjust the tone."
    )
    assert extract_email_body(text) == (
        "Dear Mr. Smith,\n\nI am writing to confirm our meeting on Tuesday at 10am in room 4."
        "\n\nSincerely,\nJane Doe\nHead of Operations"
    )


def test_subject_outside_the_fence() -> None:
    text = "**Subject:** Hello\n\n```text\n" + BODY + "\n```"
    got = extract_email(text)
    assert got is not None and got.body == BODY and got.subject == "Hello"


def test_multiple_paragraphs_kept_intact() -> None:
    body = extract_email_body("Certainly! Here's the email:\n\n" + BODY + "\n\nNote: adjust dates.")
    assert body == BODY
    assert body.count("\n\n") == 3


def test_markdown_rules_and_bold_headers() -> None:
    text = (
        "Certainly! Here is the email you asked for:\n\n---\n\n**To:** team@acme.test\n"
        "**Subject**: Monday\n\n---\n\nHello team!\n\nOh joy, another Monday deadline. Please "
        "send me your reports by noon, because apparently time is a flat circle.\n\n"
        "With a sarcastic salute,\nDana\n\n---\n\nNote: I kept the sarcasm light."
    )
    got = extract_email(text)
    assert got is not None
    assert got.to == "team@acme.test" and got.subject == "Monday"
    assert got.body.startswith("Hello team!\n\nOh joy")
    assert got.body.endswith("With a sarcastic salute,\nDana")


def test_email_without_subject_or_preamble() -> None:
    assert extract_email_body(BODY) == BODY


def test_email_without_greeting_but_with_subject_and_signoff() -> None:
    text = (
        "Subject: Quarterly numbers\n\nThe quarterly numbers are in and they look better than "
        "expected across all regions.\n\nThanks,\nPriya\n\nWould you like a shorter version?"
    )
    assert extract_email_body(text) == (
        "The quarterly numbers are in and they look better than expected across all regions."
        "\n\nThanks,\nPriya"
    )


def test_signoff_on_its_own_then_commentary() -> None:
    text = (
        "Hi all,\n\nThe office is closed on Friday for maintenance, so please plan ahead.\n\n"
        "Thanks!\n\nI hope this helps! Feel free to tweak it."
    )
    assert extract_email_body(text) == (
        "Hi all,\n\nThe office is closed on Friday for maintenance, so please plan ahead."
        "\n\nThanks!"
    )


def test_sentence_starting_with_thank_you_is_not_a_signoff() -> None:
    text = (
        "Hi all,\n\nQuick note: the office is closed Friday.\n\nThank you for your patience.\n\n"
        "Cheers!\nMo\n\nP.S. Cake in the kitchen.\n\nI hope this helps!"
    )
    assert extract_email_body(text) == (
        "Hi all,\n\nQuick note: the office is closed Friday.\n\nThank you for your patience."
        "\n\nCheers!\nMo\n\nP.S. Cake in the kitchen."
    )


def test_signature_block_and_placeholder_name() -> None:
    text = (
        "Dear Hiring Committee,\n\nI am delighted to recommend Alex for the analyst role; "
        "their work has been superb.\n\nWarm regards,\n[Your Name]\nSenior Manager, Acme Corp\n"
        "+1 555 0100\n\nYou can replace [Your Name] with your own name."
    )
    body = extract_email_body(text) or ""
    assert body.endswith("Warm regards,\n[Your Name]\nSenior Manager, Acme Corp\n+1 555 0100")
    assert "replace" not in body


def test_no_email_structure_returns_none() -> None:
    text = (
        "The migration finished on Friday and all services are back online. We saw no data "
        "loss, and the audit starts next week."
    )
    assert extract_email_body(text) is None


def test_refusal_returns_none() -> None:
    assert extract_email_body("I'm sorry, but I can't help with writing that email.") is None


def test_question_back_to_user_returns_none() -> None:
    assert extract_email_body("Could you tell me who the recipient is and what to say?") is None
    text = "Hi there!\n\nCould you tell me who the email is for and what it should cover?"
    assert extract_email_body(text) is None


@pytest.mark.parametrize("text", ["", "   \n ", "Sure!", "Hi Dana,\n\nThanks!\n\nBest,\nMe"])
def test_empty_or_few_words_returns_none(text: str) -> None:
    assert extract_email_body(text) is None
    assert looks_like_email(text) is False


def test_looks_like_email_true_for_an_email() -> None:
    assert looks_like_email("Sure! Here it is:\n\n" + BODY) is True


def test_persona_markdown_inside_body_is_kept() -> None:
    text = (
        "Hey Sam,\n\n*Sigh.* The report is **late**, again. Shocking, truly.\n\n"
        "- item one\n- item two\n\nYours in eternal disappointment,\nDana"
    )
    assert extract_email_body(text) == text


def test_windows_line_endings() -> None:
    assert extract_email_body(BODY.replace("\n", "\r\n")) == BODY


def test_blockquoted_email() -> None:
    quoted = "\n".join("> " + ln if ln else ">" for ln in BODY.split("\n"))
    assert extract_email_body("Here you go:\n\n" + quoted) == BODY


def test_two_versions_gives_the_first() -> None:
    text = (
        "**Version 1:**\n\n"
        + BODY
        + "\n\n**Version 2:**\n\nHello Dana,\n\nAll done, see you at the audit next week "
        "and thanks for the help.\n\nCheers,\nSam"
    )
    assert extract_email_body(text) == BODY


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.lists(
            st.sampled_from(
                ["Hi Dana,", "Best,", "Sam", "\n", "\n\n", "```", "---", "**Subject:** x", "word"]
            ),
            max_size=40,
        ).map(" ".join),
    )
)
def test_property_never_raises(text: str) -> None:
    body = extract_email_body(text)
    assert body is None or (isinstance(body, str) and body == body.strip() and body)
    assert looks_like_email(text) is (body is not None)


def test_scored_email_is_one_rule_for_chat_and_tool_bodies() -> None:
    from charshift.extraction import scored_email

    plain = (
        "The jackets are overdue, so please confirm a new delivery date for all of them by Friday."
    )
    assert scored_email(plain) is None  # no greeting, no sign-off, no subject
    got = scored_email(plain, subject="Late jackets")  # send_email's subject argument
    assert got is not None and got.body == plain
    assert scored_email("Subject: Late jackets\n\n" + plain).body == plain  # type: ignore[union-attr]
    call = '{"name": "send_email", "arguments": {"to": "a", "subject": "s", "body": "Hi"}}'
    assert scored_email(call + " " + plain, subject="s") is None  # a pasted call is no email
    assert scored_email(None) is None and scored_email("   ", subject="s") is None
