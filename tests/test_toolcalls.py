"""Tool-call recovery: fixed formats, negatives, diagnosis messages, and property tests."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charshift.toolcalls import (
    FORMAT_HINT,
    ToolCall,
    check_call,
    diagnose_tool_turn,
    parse_tool_calls,
    required_from_schemas,
)

TOOLS = ["send_email", "search_directory", "read_document", "finish"]
REQUIRED = {"send_email": ["to", "subject", "body"], "search_directory": ["query"]}


def calls(text: str) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, c.arguments) for c in parse_tool_calls(text)]


# --------------------------------------------------------------------------------------------
# Formats that must be recovered (the first four are the ones DCT called "malformed").

RECOVERED: list[tuple[str, str, list[tuple[str, dict[str, Any]]]]] = [
    (
        "raw newlines inside a JSON string",
        '{"name": "send_email", "arguments": {"to": "dana@acme.test", "subject": "Hi",'
        ' "body": "Hi Dana,\n\nThe report is late.\n\tSorry!\nSam"}}',
        [
            (
                "send_email",
                {
                    "to": "dana@acme.test",
                    "subject": "Hi",
                    "body": "Hi Dana,\n\nThe report is late.\n\tSorry!\nSam",
                },
            )
        ],
    ),
    (
        "json fence with prose around it",
        'Sure, sending it now.\n```json\n{"name": "send_email", "arguments": {"to": "a@b.c", '
        '"body": "ok"}}\n```\nDone!',
        [("send_email", {"to": "a@b.c", "body": "ok"})],
    ),
    (
        "Python-style dict",
        "{'name': 'x', 'arguments': {'a': 1, 'b': True, 'c': None, 'd': [1.5, False]}}",
        [("x", {"a": 1, "b": True, "c": None, "d": [1.5, False]})],
    ),
    (
        "two calls in one turn, textual order",
        'First I look her up: {"name": "search_directory", "arguments": {"query": "Dana"}}\n'
        'Then: {"name": "send_email", "arguments": {"to": "dana@x.test"}}',
        [
            ("search_directory", {"query": "Dana"}),
            ("send_email", {"to": "dana@x.test"}),
        ],
    ),
    (
        "fence without a language tag",
        '```\n{"name": "finish", "arguments": {}}\n```',
        [("finish", {})],
    ),
    (
        "tool_call fence tag",
        '```tool_call\n{"name": "finish", "arguments": {"summary": "done"}}\n```',
        [("finish", {"summary": "done"})],
    ),
    (
        "tool_call tags (Qwen style)",
        '<tool_call>\n{"name": "read_document", "arguments": {"title": "Q3 plan"}}\n</tool_call>',
        [("read_document", {"title": "Q3 plan"})],
    ),
    (
        "unclosed tool_call tag at the end",
        'Let me check.\n<tool_call>\n{"name": "search_directory", "arguments": {"query": "ops"}}',
        [("search_directory", {"query": "ops"})],
    ),
    (
        "two tool_call tags, the second unclosed",
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b"}',
        [("a", {}), ("b", {})],
    ),
    (
        "JSON list of calls",
        '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": 2}}]',
        [("a", {"x": 1}), ("b", {"y": 2})],
    ),
    (
        "JSON Lines",
        '{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {}}\n',
        [("a", {}), ("b", {})],
    ),
    (
        "stray unescaped quotes inside a string",
        '{"name": "send_email", "arguments": {"body": "He said "hi" to me", "to": "x"}}',
        [("send_email", {"body": 'He said "hi" to me', "to": "x"})],
    ),
    (
        "stray quote before a comma inside the text",
        '{"name": "send_email", "arguments": {"body": "a "quoted", phrase", "to": "x"}}',
        [("send_email", {"body": 'a "quoted", phrase', "to": "x"})],
    ),
    (
        "trailing commas",
        '{"name": "send_email", "arguments": {"to": "x", "cc": ["a", "b",],},}',
        [("send_email", {"to": "x", "cc": ["a", "b"]})],
    ),
    (
        "missing comma between members",
        '{"name": "send_email", "arguments": {"to": "a" "body": "b"}}',
        [("send_email", {"to": "a", "body": "b"})],
    ),
    (
        "missing closing braces at the very end",
        '{"name": "send_email", "arguments": {"to": "a", "body": "hi"}',
        [("send_email", {"to": "a", "body": "hi"})],
    ),
    (
        "apostrophe inside a single-quoted string",
        "{'name': 'send_email', 'arguments': {'body': 'I don't know', 'to': 'x'}}",
        [("send_email", {"body": "I don't know", "to": "x"})],
    ),
    (
        "OpenAI-style function object with JSON-string arguments",
        '{"type": "function", "function": {"name": "send_email", '
        '"arguments": "{\\"to\\": \\"a@b.c\\", \\"body\\": \\"Hi\\\\nthere\\"}"}}',
        [("send_email", {"to": "a@b.c", "body": "Hi\nthere"})],
    ),
    (
        "OpenAI tool_calls wrapper",
        '{"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "finish", '
        '"arguments": "{}"}}]}',
        [("finish", {})],
    ),
    (
        "tool + args keys",
        '{"tool": "finish", "args": {"summary": "s"}}',
        [("finish", {"summary": "s"})],
    ),
    (
        "tool_name + parameters keys",
        '{"tool_name": "finish", "parameters": {"summary": "s"}}',
        [("finish", {"summary": "s"})],
    ),
    (
        "function (string) + input keys",
        '{"function": "finish", "input": {"summary": "s"}}',
        [("finish", {"summary": "s"})],
    ),
    ("name only: arguments default to {}", '{"name": "finish"}', [("finish", {})]),
    (
        "flat arguments next to the name",
        '{"name": "send_email", "to": "a@b.c", "body": "hello"}',
        [("send_email", {"to": "a@b.c", "body": "hello"})],
    ),
    (
        "Llama <function=...> syntax",
        '<function=search_directory>{"query": "Dana"}</function>',
        [("search_directory", {"query": "Dana"})],
    ),
    (
        "Python call syntax in a tool_code fence",
        '```tool_code\nsend_email(to="a@b.c", subject="Hi, there", body="Line 1\\nLine 2")\n```',
        [("send_email", {"to": "a@b.c", "subject": "Hi, there", "body": "Line 1\nLine 2"})],
    ),
    (
        "a Python dict in a ```python fence (all data)",
        "```python\n{'name': 'finish', 'arguments': {'summary': 'ok'}}\n```",
        [("finish", {"summary": "ok"})],
    ),
    (
        "a JSON string holding ``` inside a json fence",
        '```json\n{"name": "send_email", "arguments": {"body": "use ``` for code"}}\n```',
        [("send_email", {"body": "use ``` for code"})],
    ),
    (
        "a string holding </tool_call> inside tags",
        '<tool_call>{"name": "send_email", "arguments": {"body": "a </tool_call> b"}}</tool_call>',
        [("send_email", {"body": "a </tool_call> b"})],
    ),
    (
        "unicode and escapes",
        '{"name": "send_email", "arguments": {"body": "Gr\\u00fc\\u00dfe \\ud83d\\ude00 — ünï"}}',
        [("send_email", {"body": "Grüße 😀 — ünï"})],
    ),
    (
        "curly braces inside string values",
        '{"name": "send_email", "arguments": {"body": "set {a, b} and [c]"}}',
        [("send_email", {"body": "set {a, b} and [c]"})],
    ),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in RECOVERED], ids=[c[0] for c in RECOVERED])
def test_recovers_format(text: str, expected: list[tuple[str, dict[str, Any]]]) -> None:
    assert calls(text) == expected


def test_at_least_25_recovery_cases() -> None:
    assert len(RECOVERED) >= 25


NOT_CALLS = [
    ("plain prose", "I will send the email once I know who the recipient is."),
    ("prose with braces", "Use {curly} braces or [square] ones; a set {1, 2} is fine too."),
    ("JSON object without a name key", '{"to": "a@b.c", "body": "hello"}'),
    ("name is not a string", '{"name": 3, "arguments": {}}'),
    ("name is empty", '{"name": "  ", "arguments": {}}'),
    ("arguments are a list", '{"name": "send_email", "arguments": ["a", "b"]}'),
    ("arguments string is not JSON", '{"name": "send_email", "arguments": "to Dana"}'),
    (
        "code sample in a python fence",
        '```python\ndef make():\n    return {"name": "send_email", "arguments": {}}\n```',
    ),
    ("JS object with bare keys", '```js\nconst call = {name: "send_email", arguments: {}};\n```'),
    (
        "tool schema echoed back",
        '{"name": "send_email", "description": "Send an email.", "parameters": '
        '{"type": "object", "properties": {"to": {"type": "string"}}}}',
    ),
    ("truncated mid-string", '{"name": "send_email", "arguments": {"body": "Hi Dana, the'),
    ("empty string", ""),
]


@pytest.mark.parametrize("text", [c[1] for c in NOT_CALLS], ids=[c[0] for c in NOT_CALLS])
def test_not_a_call(text: str) -> None:
    assert parse_tool_calls(text) == []


def test_toolcall_to_dict_and_defaults() -> None:
    call = ToolCall("finish")
    assert call.arguments == {}
    assert ToolCall("a", {"x": 1}).to_dict() == {"name": "a", "arguments": {"x": 1}}


def test_non_string_input_gives_empty_list() -> None:
    assert parse_tool_calls(None) == []  # type: ignore[arg-type]
    assert parse_tool_calls(b'{"name": "x"}') == []  # type: ignore[arg-type]


def test_never_evaluates_code() -> None:
    text = "{'name': __import__('os').system('echo pwned'), 'arguments': {}}"
    assert parse_tool_calls(text) == []
    assert "invalid" in (diagnose_tool_turn(text, TOOLS) or "")


def test_pathological_inputs_finish() -> None:
    # Each of these would be slow for a naive quadratic scan or a backtracking regex.
    for text in ['{"' * 20000, "[" * 50000, "{" * 50000, '{"a":' * 20000, "<" + " " * 50000]:
        assert parse_tool_calls(text) == []
        assert isinstance(diagnose_tool_turn(text, TOOLS), str)


def test_tag_name_in_letters_that_ignorecase_accepts() -> None:
    # re.IGNORECASE matches the long s and the Kelvin sign to s and k; such a tag used to raise
    # a KeyError that dropped every call of the turn.
    text = '{"name": "finish", "arguments": {}} <tool_u\u017fe>x</tool_use>'
    assert calls(text) == [("finish", {})]
    assert diagnose_tool_turn(text, TOOLS) is None
    assert calls('<tool_u\u017fe>{"name": "finish"}</tool_use>') == [("finish", {})]


def test_call_after_long_prose_is_found() -> None:
    text = "words and {braces} " * 2000 + '{"name": "finish", "arguments": {}}'
    assert calls(text) == [("finish", {})]


# --------------------------------------------------------------------------------------------
# Diagnosis.


def test_diagnose_none_when_fine() -> None:
    text = '{"name": "send_email", "arguments": {"to": "a", "subject": "s", "body": "b"}}'
    assert diagnose_tool_turn(text, TOOLS, REQUIRED) is None
    assert diagnose_tool_turn('{"name": "finish"}', TOOLS) is None


def test_diagnose_object_without_name() -> None:
    msg = diagnose_tool_turn('Here: {"to": "a@b.c", "body": "hi"}', TOOLS)
    assert msg is not None
    assert "JSON object but it has no 'name' field" in msg
    assert "'to', 'body'" in msg
    assert FORMAT_HINT in msg


def test_diagnose_invalid_json_gives_line_and_column() -> None:
    text = '```json\n{"name": "send_email",\n "arguments": {\n   "to": "a" ; "body": "b"}}\n```'
    msg = diagnose_tool_turn(text, TOOLS)
    assert msg is not None
    assert msg.startswith("The JSON in your tool call is invalid at line 3 col 14:")
    assert "';'" in msg


def test_diagnose_unterminated_string() -> None:
    msg = diagnose_tool_turn('<tool_call>{"name": "send_email", "arguments": {"body": "Hi', TOOLS)
    assert msg is not None and "unterminated string" in msg and "line 1 col" in msg


def test_diagnose_unknown_tool_with_suggestion() -> None:
    msg = diagnose_tool_turn('{"name": "sendEmail", "arguments": {}}', TOOLS)
    assert msg == (
        "Unknown tool 'sendEmail' (did you mean 'send_email'?); available tools: "
        "send_email, search_directory, read_document, finish."
    )


def test_diagnose_missing_required_argument() -> None:
    text = '{"name": "send_email", "arguments": {"to": "a", "subject": "s"}}'
    msg = diagnose_tool_turn(text, TOOLS, REQUIRED)
    assert msg is not None and msg.startswith("send_email is missing required argument 'body'.")
    assert '"arguments": {"to": "...", "subject": "...", "body": "..."}' in msg


def test_diagnose_missing_argument_with_wrong_case() -> None:
    text = '{"name": "search_directory", "arguments": {"Query": "Dana"}}'
    msg = diagnose_tool_turn(text, TOOLS, REQUIRED)
    assert msg is not None and "'Query'" in msg and "case-sensitive" in msg


def test_diagnose_empty_required_argument() -> None:
    text = '{"name": "search_directory", "arguments": {"query": ""}}'
    assert diagnose_tool_turn(text, TOOLS, REQUIRED) == (
        "search_directory's required argument 'query' is empty."
    )


def test_diagnose_one_line_per_bad_call() -> None:
    text = '{"name": "nope", "arguments": {}} {"name": "search_directory", "arguments": {}}'
    msg = diagnose_tool_turn(text, TOOLS, REQUIRED) or ""
    lines = msg.split("\n")
    assert len(lines) == 2
    assert lines[0].startswith("Unknown tool 'nope'")
    assert lines[1].startswith("search_directory is missing required argument 'query'")


def test_diagnose_arguments_not_an_object() -> None:
    msg = diagnose_tool_turn('{"name": "send_email", "arguments": ["a"]}', TOOLS)
    assert msg is not None and "'arguments' is a list" in msg


def test_diagnose_no_call_at_all() -> None:
    msg = diagnose_tool_turn("I think the email should be friendly.", TOOLS)
    assert msg == (
        'No tool call found: to call a tool, reply with a JSON object {"name": "<tool>", '
        '"arguments": {...}}, optionally inside a ```json fence or <tool_call></tool_call> '
        "tags. Available tools: send_email, search_directory, read_document, finish."
    )


def test_diagnose_tool_mentioned_but_not_called() -> None:
    msg = diagnose_tool_turn("Now I will use send_email to reply.", TOOLS)
    assert msg is not None and msg.startswith("Your message mentions send_email")


def test_diagnose_empty_message() -> None:
    assert (diagnose_tool_turn("  \n", TOOLS) or "").startswith("Your message was empty.")


def test_diagnose_ignores_prose_braces_but_reports_call_like_ones() -> None:
    text = 'I like {braces}. {"name": "send_email", "arguments": {"to": "a", }, oops}'
    msg = diagnose_tool_turn(text, TOOLS) or ""
    assert msg.startswith("The JSON in your tool call is invalid at line 1 col 52")


def test_diagnose_tags_without_json() -> None:
    msg = diagnose_tool_turn("<tool_call>send the email to Dana</tool_call>", TOOLS) or ""
    assert msg.startswith("Your <tool_call> tags hold no JSON object.")


def test_diagnose_accepts_unordered_tool_collections() -> None:
    msg = diagnose_tool_turn('{"name": "zzz"}', {"b_tool", "a_tool"})
    assert msg == "Unknown tool 'zzz'; available tools: a_tool, b_tool."


def test_check_call_and_required_from_schemas() -> None:
    schemas = [
        {"name": "send_email", "parameters": {"type": "object", "required": ["to", "body"]}},
        {"type": "function", "function": {"name": "finish", "parameters": {"type": "object"}}},
    ]
    req = required_from_schemas(schemas)
    assert req == {"send_email": ["to", "body"], "finish": []}
    assert check_call(ToolCall("finish"), list(req), req) is None
    assert check_call(ToolCall("send_email", {"to": "x"}), list(req), req) == (
        "send_email is missing required argument 'body'. "
        'Call it as {"name": "send_email", "arguments": {"to": "...", "body": "..."}}.'
    )
    assert check_call(ToolCall("anything"), [], None) is None  # empty tool list: any name


# --------------------------------------------------------------------------------------------
# Property tests.

IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
NASTY = st.sampled_from(
    [
        'He said "hi"',
        "it's",
        "```",
        "</tool_call>",
        "<tool_call>",
        '{"name": "x"}',
        "\\n",
        "a\\",
        "\n\t\r",
        "}, {",
        "', '",
        '", "',
        "\u2028",
        "😀",
    ]
)
STRINGS = st.one_of(st.text(max_size=30), NASTY)
LEAF = st.one_of(STRINGS, st.integers(), st.booleans(), st.none())
VALUE = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4), max_leaves=10)
ARGS = st.dictionaries(STRINGS, VALUE, max_size=5)
PROSE = st.text(
    alphabet=st.characters(blacklist_characters="{}[]`", blacklist_categories=("Cs",)),
    max_size=60,
)
WRAPPINGS = [
    "json",
    "json_indent",
    "json_ascii",
    "raw_newlines",
    "fence_json",
    "fence_plain",
    "tags",
    "python",
    "python_fence",
    "list",
    "openai",
]


def _raw_newlines(js: str) -> str:
    """Turn the \\n and \\t escapes of a JSON text into raw characters (as small models write)."""
    return re.sub(
        r"(?<!\\)((?:\\\\)*)\\([nt])",
        lambda m: m.group(1) + ("\n" if m.group(2) == "n" else "\t"),
        js,
    )


def _wrap(name: str, args: dict[str, Any], how: str, name_key: str, args_key: str) -> str:
    obj = {name_key: name, args_key: args}
    if how == "json":
        return json.dumps(obj, ensure_ascii=False)
    if how == "json_indent":
        return json.dumps(obj, indent=2, ensure_ascii=False)
    if how == "json_ascii":
        return json.dumps(obj)
    if how == "raw_newlines":
        return _raw_newlines(json.dumps(obj, ensure_ascii=False))
    if how == "fence_json":
        return "\n```json\n" + json.dumps(obj, indent=2, ensure_ascii=False) + "\n```\n"
    if how == "fence_plain":
        return "```\n" + json.dumps(obj, ensure_ascii=False) + "\n```"
    if how == "tags":
        return "<tool_call>\n" + json.dumps(obj, ensure_ascii=False) + "\n</tool_call>"
    if how == "python":
        return repr(obj)
    if how == "python_fence":
        return "```python\n" + repr(obj) + "\n```"
    if how == "list":
        return json.dumps([obj], ensure_ascii=False)
    if how == "openai":
        return json.dumps(
            {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        )
    raise AssertionError(how)


def same(a: Any, b: Any) -> bool:
    """Equality that also tells True from 1 and 1 from 1.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


CALL = st.tuples(
    IDENT,
    ARGS,
    st.sampled_from(WRAPPINGS),
    st.sampled_from(["name", "tool", "tool_name", "function"]),
    st.sampled_from(["arguments", "args", "parameters", "input"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(CALL, min_size=1, max_size=3), st.lists(PROSE, min_size=4, max_size=4), st.booleans()
)
def test_property_valid_calls_in_prose_are_recovered(items, prose, unclosed_last) -> None:
    parts = [prose[0]]
    for k, (name, args, how, name_key, args_key) in enumerate(items):
        parts.append(_wrap(name, args, how, name_key, args_key))
        parts.append(prose[k + 1])
    if unclosed_last:  # an unclosed <tool_call> tag at the very end of the turn
        name, args, _, name_key, args_key = items[-1]
        parts[-2] = "<tool_call>\n" + json.dumps({name_key: name, args_key: args})
        parts[-1] = ""
    text = " ".join(parts)
    got = parse_tool_calls(text)
    assert [c.name for c in got] == [it[0] for it in items], text
    for call, (_, args, *_rest) in zip(got, items, strict=True):
        assert same(call.arguments, args), text
    assert diagnose_tool_turn(text, [it[0] for it in items]) is None


ADVERSARIAL = st.lists(
    st.sampled_from(
        list("{}[]\"':,\n\\ ")
        + ["name", "arguments", "<tool_call>", "</tool_call>", "```", "```json", "true", "1"]
    ),
    max_size=80,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), ADVERSARIAL))
def test_property_never_raises(text: str) -> None:
    result = parse_tool_calls(text)
    assert isinstance(result, list)
    assert all(isinstance(c, ToolCall) and isinstance(c.arguments, dict) for c in result)
    msg = diagnose_tool_turn(text, TOOLS, REQUIRED)
    assert msg is None or isinstance(msg, str)
    if not result:
        assert msg  # a turn without a call always gets an explanation


def test_escaped_lone_surrogates_never_reach_a_call():
    """Issue 18: "\\ud800" is legal JSON, but no UTF-8 file or tokenizer takes the lone surrogate
    it decodes to; every one in a call's name, keys and strings (at any depth) is U+FFFD, order
    kept, and a proper pair still decodes to its character."""
    deep = '{"k": ' * 200 + '"\\udfff"' + "}" * 200
    text = (
        '{"name": "send\\ud800", "arguments": {"a\\udc00": ["\\ud83d", {"b": "\\udfff"}], '
        f'"z": "\\ud83d\\ude00", "deep": {deep}}}}}'
    )
    (call,) = parse_tool_calls(text)
    assert call.name == "send\ufffd"
    assert list(call.arguments) == ["a\ufffd", "z", "deep"]
    assert call.arguments["a\ufffd"] == ["\ufffd", {"b": "\ufffd"}]
    assert call.arguments["z"] == "\U0001f600"
    node = call.arguments["deep"]
    for _ in range(199):
        node = node["k"]
    assert node == {"k": "\ufffd"}


ONE_CALL = '{"name": "send_email", "arguments": {"to": "a@b.c", "body": "hi"}}'


def test_calls_past_the_limit_are_said_to_be_left_out():
    """Issue 18: calls after the 64th were dropped without a word. The first 64 are kept and
    WorkStats says the rest were not (the rollout records it in the row)."""
    from charshift.toolcalls import MAX_CALLS, WorkStats

    lines = "\n".join([ONE_CALL] * (MAX_CALLS + 6))
    stats = WorkStats()
    assert len(parse_tool_calls(lines, stats=stats)) == MAX_CALLS
    at = (len(ONE_CALL) + 1) * MAX_CALLS
    assert stats.calls_cut and stats.read_to == at - 1 and stats.unread_call_at == at + 1
    note = stats.note(len(lines))
    assert note is not None and f"more than {MAX_CALLS} tool calls" in note
    assert f"a tool call at character {at + 2} was not read" in note
    listed = "[" + ", ".join([ONE_CALL] * (MAX_CALLS + 1)) + "]"
    stats = WorkStats()
    assert len(parse_tool_calls(listed, stats=stats)) == MAX_CALLS and stats.calls_cut
    exactly = "\n".join([ONE_CALL] * MAX_CALLS) + "\nAll sent."
    stats = WorkStats()
    assert len(parse_tool_calls(exactly, stats=stats)) == MAX_CALLS
    assert stats.note(len(exactly)) is None  # nothing was left out


def test_a_call_the_budget_did_not_reach_is_named(monkeypatch):
    """When the budget does run out (here made small), the call it did not reach is named by
    its position, in the stats and in the diagnosis sent back to the model."""
    from charshift import toolcalls
    from charshift.toolcalls import WorkStats

    monkeypatch.setattr(toolcalls, "BASE_UNITS", 2_000)
    text = '{"' * 3000 + "\n" + ONE_CALL
    stats = WorkStats()
    assert parse_tool_calls(text, stats=stats) == []
    at = text.index('"name"')
    assert stats.exhausted and stats.read_to is not None and stats.read_to < at
    assert stats.unread_call_at == at
    message = diagnose_tool_turn(text, TOOLS)
    assert message is not None and "could not be read to the end" in message
    assert f"a tool call at character {at + 1} was not read" in message


def test_calls_inside_nested_or_unclosed_structures_are_found():
    """A call inside lists at any depth, or after an opener left unclosed (whose closers the end
    of the text supplies), is found; a quote run in a key no longer swallows the call after it."""
    call = ToolCall("send_email", {"to": "a@b.c", "body": "hi"})
    for text in (
        "[" * 8 + ONE_CALL + "]" * 8,
        "[" * 40 + "\n" + ONE_CALL,
        '{"a": {"b": [' + ONE_CALL,
        '{"a": 1, "b": {"c": ' + ONE_CALL,
        '{"{"{"{"\n' + ONE_CALL,
    ):
        assert parse_tool_calls(text) == [call], text
