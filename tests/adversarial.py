"""Adversarial inputs for the tool-call parser and the email extractor, at any size.

`text(family, size)` is a deterministic string of exactly `size` characters built from the
family's repeating unit (after an optional head, before an optional tail), so the same family at
two sizes differs only in how often the unit repeats. Each family targets a way a scanner can go
super-linear: a search re-run from every candidate over the rest of the text, a bracket retried
at every position, a string or whitespace run re-read by every attempt, deep nesting, many
lines that each look at their neighbours. Used by tests/test_linear_time.py and
scripts/bench_parser.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    unit: str
    head: str = ""
    tail: str = ""
    target: str = "parser"  # "parser", "extractor" or "both"

    def text(self, size: int) -> str:
        body = max(0, size - len(self.head) - len(self.tail))
        reps = body // len(self.unit) + 1
        middle = (self.unit * reps)[:body]
        return (self.head + middle + self.tail)[:size]


CALL = '{"name": "send_email", "arguments": {"to": "a@b.c", "body": "hi"}}'

PARSER_FAMILIES: list[Family] = [
    # Tags and fences repeated: each opener looks for its closer over the rest of the text.
    Family("function_tag", "<function=send_email>"),
    Family("function_tag_brace", "<function=send_email>{"),
    Family("function_tag_key", '<function=send_email>{"to": "'),
    Family("function_tag_closed_bad", "<function=send_email>{x}</function>"),
    Family("tool_call_tag", "<tool_call>"),
    Family("tool_call_close_tag", "</tool_call>"),
    Family("tool_call_brace", "<tool_call>{"),
    Family("tool_call_name", '<tool_call>{"name": '),
    Family("tool_call_pycall", '<tool_call>send_email(to="'),
    Family("tool_call_open_json", '<tool_call>{"name": "send_email", "arguments": {"body": "x'),
    Family("name_key", '{"name": '),
    Family("name_key_str", '{"name": "send_email", "arguments": {"body": "'),
    Family("json_fence", "```json\n"),
    Family("json_fence_obj", '```json\n{"name": "x", "arguments": {"a": "'),
    Family("unclosed_fence", '{"a": 1, "b": [2, 3]}, ', head="```json\n"),
    Family("unclosed_fence_quotes", '"a", ', head="```json\n{"),
    Family("python_fence", "```python\n{"),
    Family("tool_code_fence", "```tool_code\nsend_email(to="),
    Family("fence_in_string", '```json\n{"name": "x", "arguments": {"body": "```'),
    # Brackets, quotes and escapes.
    Family("open_brace", "{"),
    Family("open_bracket", "["),
    Family("double_quote", '"'),
    Family("single_quote", "'"),
    Family("backslash", "\\"),
    Family("brace_quote", '{"'),
    Family("brace_single_quote", "{'"),
    Family("brace_close", "{}"),
    Family("bracket_brace", "[{"),
    Family("nested_key", '{"a": '),
    Family("nested_list_obj", '[{"name": "x", "arguments": '),
    Family("nested_close", '{"a": [1, {"b": ', tail="}]" * 50),
    Family("stray_quotes", '{"a": "b" c "d'),
    Family("quote_comma", '{"a": "x", '),
    Family("escapes", '{"a": "\\u00e9\\n\\'),
    Family("kwargs", '{"a": "b", c="'),
    # Many candidates that parse: each is an attempt.
    Family("bare_calls", CALL + " "),
    Family("bare_objects", '{"a": 1} '),
    Family("bare_invalid", '{"a": x} '),
    Family("bare_python", "{'name': 'x', 'arguments': {'a': True}} "),
    Family("list_of_calls", '[{"name": "x"}, '),
    Family("jsonl_calls", CALL + "\n"),
    # Long runs: a value or a token that a reader could re-read from many places.
    Family("long_string", "x", head='{"name": "send_email", "arguments": {"body": "'),
    Family("long_digits", "1", head='{"name": "x", "arguments": {"a": '),
    Family("long_spaces", " ", head='{"name"'),
    Family("angle_spaces", " ", head="<"),
    Family("prose", "words and {braces} [see] "),
    Family("long_word", "x"),
]

EXTRACTOR_FAMILIES: list[Family] = [
    Family("greetings", "Hi Dana,\n", target="extractor"),
    Family("signoffs", "Best,\n", target="extractor"),
    Family("signoff_name", "Best,\nDana\n", target="extractor"),
    Family("thanks_blank", "Thanks!\n\n\n", head="Dear Sam,\n", target="extractor"),
    Family("subjects", "Subject: hello\n", target="extractor"),
    Family("quoted", "> Hi Dana, the report is late.\n", target="extractor"),
    Family("blank_lines", "\n", head="Dear Sam,\n", target="extractor"),
    Family("fences", "```\n", target="extractor"),
    Family("fenced_words", "```\nsome words here\n", target="extractor"),
    Family("rules", "---\n", target="extractor"),
    Family("ps_lines", "P.S. one more thing\n", head="Hi Sam,\n", target="extractor"),
    Family("preamble", "Sure, here's the draft:\n", target="extractor"),
    Family("long_line", "word ", target="extractor"),
    Family(
        "email_body", "The report is late and I am sorry.\n", head="Hi Dana,\n", target="extractor"
    ),
    Family(
        "commentary",
        "Let me know if you'd like changes.\n\n",
        head="Hi Dana,\n",
        target="extractor",
    ),
    Family("carriage_returns", "Hi\r\n\r", target="extractor"),
]


def _mixed_unit(seed: int = 0) -> str:
    """A fixed pseudo-random mixture of every family's unit (and some prose)."""
    rng = random.Random(seed)
    units = [f.unit for f in PARSER_FAMILIES + EXTRACTOR_FAMILIES] + ["lorem ipsum ", "\n"]
    return "".join(rng.choice(units) for _ in range(400))


MIXED = Family("mixed", _mixed_unit(), target="both")

FAMILIES: dict[str, Family] = {f.name: f for f in PARSER_FAMILIES + EXTRACTOR_FAMILIES + [MIXED]}


def parser_families() -> list[Family]:
    return [f for f in FAMILIES.values() if f.target in ("parser", "both")]


def extractor_families() -> list[Family]:
    return [f for f in FAMILIES.values() if f.target in ("extractor", "both")]


def text(family: str, size: int) -> str:
    return FAMILIES[family].text(size)
