"""Linear time for the tool-call parser, its diagnosis and the email extractor, on any input.

Three kinds of evidence, none of them an absolute timing:
- the work counter (`WorkStats`) of every adversarial family grows at most linearly with the
  input and stays within the budget the parser promises (BASE_UNITS + len / CHARS_PER_UNIT);
- the CPU time at 2 MB over the CPU time at 500 KB (for the extractor, which reads at most
  200 KB, at 192 KB over 48 KB) stays near 4 (a quadratic path gives 16), with the budget's
  fixed part set to 0 so that the per-character part is what is measured;
- no text makes any of them raise (hypothesis).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import pytest
from adversarial import CALL, FAMILIES, text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charshift import toolcalls
from charshift.extraction import MAX_CHARS, extract_email, extract_email_body, looks_like_email
from charshift.toolcalls import (
    SCAN_CHARS_PER_UNIT,
    ToolCall,
    WorkStats,
    diagnose_tool_turn,
    parse_tool_calls,
)

TOOLS = ["send_email", "search_directory", "read_document", "finish"]
REQUIRED = {"send_email": ["to", "subject", "body"]}

Run = Callable[[str, WorkStats], object]
RUNS: dict[str, Run] = {
    "parse": lambda t, s: parse_tool_calls(t, stats=s),
    "diagnose": lambda t, s: diagnose_tool_turn(t, TOOLS, REQUIRED, stats=s),
    "extract": lambda t, s: extract_email(t, stats=s),
}


def units(run: str, t: str) -> WorkStats:
    stats = WorkStats()
    RUNS[run](t, stats)
    return stats


# --------------------------------------------------------------------------------------------
# The work counter.

N = 16_000  # and 4N: both far below the extractor's MAX_CHARS
SMALL_BASE = 20_000


@pytest.fixture
def small_base(monkeypatch: pytest.MonkeyPatch) -> int:
    """A smaller fixed part of the budget (the default is 200_000 units), so that a family
    which spends its whole budget does so quickly; the per-character part is unchanged."""
    monkeypatch.setattr(toolcalls, "BASE_UNITS", SMALL_BASE)
    return SMALL_BASE


@pytest.mark.parametrize("run", list(RUNS))
def test_work_grows_linearly_for_every_family(run: str, small_base: int) -> None:
    assert 4 * N < MAX_CHARS
    worst = []
    for name in FAMILIES:
        small, large = units(run, text(name, N)), units(run, text(name, 4 * N))
        assert small.units > 0, name
        worst.append((large.units / small.units, name))
    ratio, name = max(worst)
    assert ratio <= 4.5, f"{run}: work grew {ratio:.2f}x for 4x the input ({name})"


def test_work_stays_within_the_budget(small_base: int) -> None:
    exhausted = 0
    for name in FAMILIES:
        t = text(name, 4 * N)
        limit = small_base + len(t) // toolcalls.CHARS_PER_UNIT
        one_search = len(t) // SCAN_CHARS_PER_UNIT + 8  # a regex search is charged after it ran
        parsed = units("parse", t)
        assert parsed.limit == limit, name
        assert parsed.units <= limit + one_search, name
        assert parsed.exhausted or parsed.units <= limit, name
        exhausted += parsed.exhausted
        # The diagnosis adds, after the scan, a look at up to 400 characters of each attempt
        # and one search of the text per known tool: a few times the scan's budget at most.
        assert units("diagnose", t).units <= (2 + len(TOOLS)) * (limit + one_search), name
        # The extractor has no budget: a unit per line visit (a few visits each) plus its
        # characters, and a few passes over the whole text.
        lines = len(t.splitlines()) + 1  # at least as many as the extractor's (\r\n, \r, \n)
        assert units("extract", t).units <= 16 * lines + 16 * len(t) // SCAN_CHARS_PER_UNIT, name
    assert 0 < exhausted < len(FAMILIES)  # the budget binds on some families, not on all


def test_budget_runs_out_on_hostile_input_and_keeps_what_was_found(monkeypatch) -> None:
    monkeypatch.setattr(toolcalls, "BASE_UNITS", 2_000)
    t = CALL + " " + text("stray_quotes", 400_000)
    stats = WorkStats()
    assert parse_tool_calls(t, stats=stats) == [
        ToolCall("send_email", {"to": "a@b.c", "body": "hi"})
    ]
    assert stats.exhausted and stats.limit == 2_000 + len(t) // toolcalls.CHARS_PER_UNIT
    assert diagnose_tool_turn(t, TOOLS) is None  # the call found before the budget ran out


def test_budget_does_not_bind_on_a_normal_turn() -> None:
    turn = "Sure, I'll send it now.\n```json\n" + CALL + "\n```\nDone!"
    stats = WorkStats()
    assert len(parse_tool_calls(turn, stats=stats)) == 1
    assert not stats.exhausted and 0 < stats.units < stats.limit // 1000


@pytest.mark.parametrize(
    "prefix",
    ["<function=send_email>", "<function=send_email>{", "<tool_call>", "```json\n", "{", '"'],
)
def test_call_after_many_repeated_openers_is_found(prefix: str) -> None:
    # Repeated <function=...> openers each searched the rest of the text for </function> and
    # copied it (quadratic); the search is now remembered and regions are not copied, so all
    # of these cost a bounded amount per opener and the call at the end is within the budget.
    t = prefix * (100_000 // len(prefix)) + "</function>\n" + CALL
    stats = WorkStats()
    got = parse_tool_calls(t, stats=stats)
    assert not stats.exhausted
    assert got[-1] == ToolCall("send_email", {"to": "a@b.c", "body": "hi"})


def test_repeated_function_tags_give_the_last_one_empty_call() -> None:
    # Only the last <function=...> has nothing but whitespace before the end: a call with no
    # arguments; every other one holds the next tag, not a JSON object.
    t = "<function=send_email>" * 50_000
    assert parse_tool_calls(t) == [ToolCall("send_email", {})]


# Realistic hostile prefixes (issue 18): before, 4 KB of `[[...]]`, 12 KB of nested objects or a
# line of unclosed `[` spent the whole budget (every bracket re-read the rest of the nest) or
# swallowed the call after them. Each is read in a small share of the budget now.
HOSTILE_PREFIXES = {
    "brackets_balanced": lambda k: "[" * k + "]" * k,
    "brackets_unclosed_line": lambda k: "[" * 2 * k,
    "brackets_spaced_unclosed": lambda k: "[ " * k,
    "objects_nested": lambda k: '{"a": ' * (k // 3) + "1" + "}" * (k // 3),
    "objects_nested_unclosed": lambda k: '{"a": ' * (k // 3),
    "objects_pretty_printed": lambda k: (
        "".join("\n" + "  " * (j % 30) + '{"key":' for j in range(k // 30)) + "1" + "}" * (k // 30)
    ),
    "objects_with_members": lambda k: '{"a": 1, "b": ' * (k // 7) + "{}" + "}" * (k // 7),
    "objects_with_members_unclosed": lambda k: '{"a": 1, "b": ' * (k // 7),
    "lists_of_objects_unclosed": lambda k: '[{"k": ' * (k // 4),
    "empty_objects_in_lists_unclosed": lambda k: "[{}, " * (k // 3),
    "lists_of_numbers_unclosed": lambda k: "[1, " * (k // 2),
    "repeated_empty_nests": lambda k: "[[]] " * (k // 3),
    "brace_quote_run": lambda k: '{"' * k,
}


@pytest.mark.parametrize("size", [10_000, 60_000])
@pytest.mark.parametrize("family", list(HOSTILE_PREFIXES))
def test_a_call_after_a_hostile_prefix_is_found_within_the_budget(family: str, size: int) -> None:
    prefix = HOSTILE_PREFIXES[family](size // 2)
    assert size // 2 <= len(prefix) <= 2 * size
    for sep in ("\n", " Sure, here it is: ", "\n```json\n"):
        t = prefix + sep + CALL
        stats = WorkStats()
        got = parse_tool_calls(t, stats=stats)
        assert got and got[-1] == ToolCall("send_email", {"to": "a@b.c", "body": "hi"}), sep
        assert not stats.exhausted and stats.note(len(t)) is None


# --------------------------------------------------------------------------------------------
# Time: a ratio of CPU times at two sizes, measured side by side.

SIZES = {
    "diagnose": (500_000, 2_000_000),
    # The extractor reads at most MAX_CHARS (200_000) characters: beyond that its time is flat,
    # so it is timed below the cut, where its passes over the lines are what grows.
    "extract": (48_000, 192_000),
}


def cpu_seconds(run: str, t: str) -> float:
    """CPU time (other processes on the machine do not count) with the garbage collector off
    during the call, as timeit does: a full collection of the test session's heap landing in
    one run would otherwise be timed as the parser's."""
    gc.disable()
    try:
        start = time.process_time()
        RUNS[run](t, WorkStats())
        return time.process_time() - start
    finally:
        gc.enable()


def linear_enough(small: float, large: float) -> bool:
    # 5 ms of slack: below that, a ratio measures the clock, not the code
    return large <= 6 * small + 0.005


@pytest.mark.parametrize("run", ["diagnose", "extract"])  # diagnose runs the whole parser
def test_time_grows_linearly_for_every_family(run: str, monkeypatch) -> None:
    # Only the budget's per-character part: what is timed is then linear by the budget alone
    # unless some work escapes it (a search, a copy or a decoder error that costs more than it
    # is charged, e.g. the stdlib's error counting the lines before it), which is what this
    # test is for. (The full decoder on the whole text instead of a window fails it.)
    monkeypatch.setattr(toolcalls, "BASE_UNITS", 0)
    lo, hi = SIZES[run]
    assert hi == 4 * lo and (hi < MAX_CHARS or run != "extract")
    slow = []
    for name in FAMILIES:
        small_text, large_text = text(name, lo), text(name, hi)
        small, large = [cpu_seconds(run, small_text)], [cpu_seconds(run, large_text)]
        if not linear_enough(small[0], large[0]):  # decide on the median of 3 runs each
            small += [cpu_seconds(run, small_text) for _ in range(2)]
            large += [cpu_seconds(run, large_text) for _ in range(2)]
        small_s, large_s = statistics.median(small), statistics.median(large)
        if not linear_enough(small_s, large_s):
            slow.append(f"{name}: {small_s:.4f}s -> {large_s:.4f}s")
    assert not slow, f"{run} grew faster than linearly: " + "; ".join(slow)


# --------------------------------------------------------------------------------------------
# Never raises.

UNITS = st.sampled_from([f.unit for f in FAMILIES.values()] + list("{}[]\"':,\n\\ <>`"))
HOSTILE = st.lists(st.tuples(UNITS, st.integers(1, 30)), max_size=10).map(
    lambda parts: "".join(u * k for u, k in parts)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), HOSTILE))
def test_property_never_raises_and_stays_in_budget(t: str) -> None:
    stats = WorkStats()
    calls = parse_tool_calls(t, stats=stats)
    assert all(isinstance(c, ToolCall) and isinstance(c.arguments, dict) for c in calls)
    assert stats.units <= stats.limit + len(t) // SCAN_CHARS_PER_UNIT + 64
    msg = diagnose_tool_turn(t, TOOLS, REQUIRED)
    assert msg is None or isinstance(msg, str)
    body = extract_email_body(t)
    assert body is None or isinstance(body, str)
    assert looks_like_email(t) is (body is not None)
