"""Recover tool calls from what small or unusual models actually write, and explain failures.

Why lenient: the DCT study counted a raw newline inside a JSON string, a ```json fence, a
Python-style dict and two calls in one turn as "malformed", and dropped those rollouts. Format
breaking is not random (strongly expressed personas break the format more often), so a strict
parser turns a formatting quirk into missing data that biases the agentic slice. This parser
accepts every reading whose intent is clear, and `diagnose_tool_turn` tells the model precisely
what was wrong where no reading is possible, so its next turn can succeed.

The protocol shown to models (`FORMAT_HINT`): a call is
``{"name": "<tool>", "arguments": {...}}``, optionally inside a ```json fence or
``<tool_call>...</tool_call>`` tags. What is recovered, in textual order:

- fenced blocks with any data tag (```json, ```tool_call, plain ```); a fence tagged with a
  programming language (```python, ```js, ...) counts only when its whole content is data, so a
  code sample that merely contains a dict is not a call;
- ``<tool_call>``/``<function_call>``/``<tool_use>`` tags, also left unclosed at the end; Llama's
  ``<function=NAME>{...}</function>``; Python call syntax ``send_email(to="a", body="b")`` inside
  a ```tool_code fence or a tool-call tag (Gemma's convention);
- bare JSON objects or lists of calls anywhere in prose, several per turn, JSON Lines; calls in
  lists nested at any depth, and the calls written inside a value left unclosed at the end (a
  line of ``[`` or ``{"a":`` before the call, closed by the end of the text);
- JSON with raw newlines/tabs in strings, trailing commas, missing closing brackets at the very
  end, stray unescaped quotes inside a string value (a quote closes it only where the next
  character is structural: ``, : } ]`` or the end; a key closes at its first quote), Python
  literals (single quotes, True, None);
- key names: ``name``/``tool``/``tool_name``/``function``/``function_name``/``action`` for the
  tool, ``arguments``/``args``/``parameters``/``input``/``params``/``action_input``/``tool_input``
  for its arguments (a JSON string is decoded); OpenAI's ``{"type": "function", "function":
  {...}}`` and ``{"tool_calls": [...]}`` wrappers. An object is a call only when a tool-name key
  holds a non-empty string. Without an arguments key, its remaining keys (except ``type``/``id``)
  are the arguments, so ``{"name": "list_inbox"}`` gets ``{}`` and a "flat" call
  ``{"name": "send_email", "to": "a", "body": "b"}`` keeps its arguments.

Safety and cost: model output is data. Nothing is evaluated: Python-style literals go through
this module's own small parser (no `eval`, no `ast.literal_eval`). `json_objects` hands the
same reader's objects to other callers (the LLM judge's answers). The first attempt at each
bracket uses the stdlib JSON decoder (exact for valid JSON); the lenient reader runs only where
that fails. Time is linear in the length of the text, whatever the text: every piece of work (each
regex search by the distance it scans, each bracket attempt, each reader step, each character
the JSON decoder reads) is charged to one work budget per text, `BASE_UNITS` plus one unit per
`CHARS_PER_UNIT` characters of the text, and when it is spent the parser returns what it found
so far (`WorkStats` tells a caller how much was spent, whether it ran out, where the scan
stopped and whether a call lies in what it did not read). Searches for a closing tag or fence are
remembered, so repeated openers never rescan the rest of the text, and regions (tag and fence
contents) are read in place, never copied. Hostile prefixes cost little of the budget: a value
nested past `MAX_DEPTH` is refused at once (one bounded match) and the scan goes on at its
innermost opener, not at the next bracket of the nest; where the exact decoder read to the end of
an unclosed value, the starts inside it go to the lenient reader alone. At most `MAX_CALLS` calls
are kept per text; `WorkStats` says when there were more. No input string raises.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from charshift.inputs import replace_surrogates

FORMAT_HINT = (
    'To call a tool, reply with a JSON object {"name": "<tool>", "arguments": {...}}, '
    "optionally inside a ```json fence or <tool_call></tool_call> tags."
)

NAME_KEYS = ("name", "tool", "tool_name", "function", "function_name", "action")
ARG_KEYS = ("arguments", "args", "parameters", "input", "params", "action_input", "tool_input")
META_KEYS = frozenset({"type", "id", "call_id", "tool_call_id", "index"})
WRAPPER_KEYS = ("tool_calls", "tool_call", "function_call", "function_calls", "calls")

# Fence tags whose content is data; any other tag is treated as a code sample.
_DATA_TAGS = frozenset(
    {
        "",
        "json",
        "jsonc",
        "json5",
        "jsonl",
        "tool_call",
        "tool_calls",
        "toolcall",
        "tool",
        "tools",
        "tool_code",
        "tool_use",
        "function",
        "function_call",
        "call",
        "text",
        "txt",
        "plaintext",
    }
)
_PYCALL_TAGS = frozenset(
    {"tool_code", "tool_call", "tool_calls", "toolcall", "tool", "function_call"}
)

# The work budget of one text is BASE_UNITS + len(text) // CHARS_PER_UNIT units. A unit is
# one Python-level step (a reader step, a scanner iteration); characters scanned by C code
# (a regex search, the JSON decoder, a copy) cost a unit per SCAN_CHARS_PER_UNIT, and each
# object, list, item or key the JSON decoder builds a TOKENS_PER_UNIT-th of one. BASE_UNITS is
# far above what any real turn needs (a few hundred units): it reads tens of KB of the densest
# hostile text (a bracket attempt every two characters, about 6 units a character) before a
# call, and 5 MB of it in about a second; the per-character share keeps that linear.
BASE_UNITS = 500_000
CHARS_PER_UNIT = 16
SCAN_CHARS_PER_UNIT = 128
TOKENS_PER_UNIT = 4
ATTEMPT_UNITS = 4  # a bracket attempt (decoder call, attempt record) beyond its characters
REGION_UNITS = 1  # opening a tag or fence region (its searches, its nested scan)
MAX_DEPTH = 64  # nesting depth of the lenient reader
MAX_CALLS = 64
_TICKS = SCAN_CHARS_PER_UNIT  # budget bookkeeping: a unit is _TICKS ticks, a scanned char one
_CALL_TICKS = _TICKS // 4  # the fixed cost of one call into C code


@dataclass
class WorkStats:
    """What one call spent: `units` of work out of `limit`; `exhausted` when the budget ran out
    (the result is then what was found before). Pass one as `stats=` to read it.

    Where the scan did not read the whole text (the budget ran out, or MAX_CALLS calls were
    found before more), `read_to` is where it stopped and `unread_call_at` where a tool-name key
    (`"name"`, `"tool"`, ...) or call tag lies in the unread rest, if one does: a call that was
    not read; `calls_cut` when more than MAX_CALLS calls were found or seen. `note` says it in
    one sentence, which a caller records (the rollout, in the row's meta)."""

    units: int = 0
    limit: int = 0
    exhausted: bool = False
    read_to: int | None = None  # None: the whole text was read
    unread_call_at: int | None = None
    calls_cut: bool = False  # more than MAX_CALLS calls: the rest were not kept

    def note(self, length: int) -> str | None:
        """One sentence on what was not read or not kept, or None when nothing was left out."""
        parts = []
        if self.calls_cut:
            parts.append(
                f"it makes more than {MAX_CALLS} tool calls; only the first {MAX_CALLS} were kept"
            )
        if self.read_to is not None:
            why = ", where the parser's work budget ran out" if self.exhausted else ""
            parts.append(f"it was read to character {self.read_to + 1} of {length}{why}")
        if self.unread_call_at is not None:
            parts.append(f"a tool call at character {self.unread_call_at + 1} was not read")
        return "; ".join(parts) or None


@dataclass(frozen=True)
class ToolCall:
    """One recovered call: the tool's name and its keyword arguments."""

    name: str
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


# --------------------------------------------------------------------------------------------
# Lenient reader: JSON plus the quirks listed in the module docstring.


class _ParseError(Exception):
    def __init__(self, msg: str, pos: int, resume: int | None = None, deep: bool = False) -> None:
        super().__init__(msg)
        self.msg = msg
        self.pos = pos
        self.deep = deep  # nested past MAX_DEPTH
        # where a scan goes on after a value nested too deeply: the last opener before the depth
        # was passed (a read from it reaches that point at depth 1, and may end; one from any
        # opener before it reaches it deeper)
        self.resume = resume


class _OutOfBudget(Exception):
    pass


class _Budget:
    """The work budget of one text, in ticks (see SCAN_CHARS_PER_UNIT)."""

    def __init__(self, text_len: int) -> None:
        self.limit = (BASE_UNITS + text_len // CHARS_PER_UNIT) * _TICKS
        self.used = 0
        self.exhausted = False

    def spend(self, units: int = 1) -> None:
        """Charge Python-level steps."""
        self.used += units * _TICKS
        if self.used > self.limit:
            self.exhausted = True
            raise _OutOfBudget

    def scan(self, chars: int) -> None:
        """Charge one call into C code (a regex, a copy) and the characters it read."""
        self.used += _CALL_TICKS + chars
        if self.used > self.limit:
            self.exhausted = True
            raise _OutOfBudget

    def afford(self, ticks: int) -> None:
        """Stop before a call into C code that could cost up to `ticks` more than is left."""
        if self.used + ticks > self.limit:
            self.exhausted = True
            raise _OutOfBudget

    def decode(self, text: str, end: int) -> None:
        """Charge what the JSON decoder read in text[:end]: the characters, and one
        TOKENS_PER_UNIT-th of a unit per object, list, item and key it built."""
        tokens = sum(text.count(c, 0, end) for c in "{[,:")
        self.scan(end + tokens * (_TICKS // TOKENS_PER_UNIT))

    def tally(self, units: int, chars: int = 0) -> None:
        """Count work that must run to the end (the diagnosis after the scan): never raises."""
        self.used += units * _TICKS + chars

    def report(self, stats: WorkStats | None) -> None:
        if stats is not None:
            stats.units = -(-self.used // _TICKS)
            stats.limit = self.limit // _TICKS
            stats.exhausted = self.exhausted


_WS = re.compile(r"\s*")
# Each pattern below fails or matches within its own extent (no lookahead over a run), so what
# it costs is what it matched: a number is `_NUMBER` not followed by `_WORDISH`, a key ahead is
# `_QUOTED` then `:`, a keyword argument `_IDENT` then `=` (not `==`).
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_WORDISH = re.compile(r"[\w.]")
_KEYWORD = re.compile(r"(?:true|false|null|True|False|None)(?!\w)")
_KEYWORDS: dict[str, Any] = {
    "true": True,
    "false": False,
    "null": None,
    "True": True,
    "False": False,
    "None": None,
}
_QUOTED = re.compile(r"""(["'])[^"'\n]{1,60}\1""")
_IDENT = re.compile(r"[A-Za-z_]\w*")
_STOP = {'"': re.compile(r'["\\]'), "'": re.compile(r"['\\]")}
_SIMPLE_ESC = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "a": "\a",
    "0": "\0",
}
_HEX = re.compile(r"[0-9a-fA-F]+")


def _skip_ws(s: str, i: int, hi: int, budget: _Budget) -> int:
    """The index of the first non-space at or after i (at most hi), charged."""
    if i >= hi:
        return hi
    end = _WS.match(s, i, hi).end()  # type: ignore[union-attr]
    budget.scan(end - i + 1)
    return end


class _Reader:
    """Recursive-descent reader over `s[:end]`; every method returns (value, index after it).

    Each step and every character a regex reads is charged to the budget."""

    def __init__(
        self,
        s: str,
        budget: _Budget,
        call_mode: bool = False,
        stray_quotes: bool = True,
        end: int | None = None,
    ) -> None:
        self.s = s
        self.n = len(s) if end is None else end
        self.budget = budget
        self.call_mode = call_mode  # inside `name(kw=...)`: ')' and `kw=` also close a string
        self.stray_quotes = stray_quotes  # False: every unescaped quote closes (plain quoting)
        self.strayed = False  # whether a quote was read as text (else plain quoting reads alike)
        self.truncated = False  # whether the region's end closed a container

    def ws(self, i: int) -> int:
        return _skip_ws(self.s, i, self.n, self.budget)

    def match(self, pattern: re.Pattern[str], i: int) -> re.Match[str] | None:
        """`pattern` anchored at i (a pattern whose cost is its extent), charged."""
        m = pattern.match(self.s, i, self.n)
        self.budget.scan((m.end() - i if m else 0) + 1)
        return m

    def number(self, i: int) -> re.Match[str] | None:
        m = self.match(_NUMBER, i)
        if m is None or (m.end() < self.n and _WORDISH.match(self.s, m.end())):
            return None
        return m

    def kwarg(self, i: int) -> tuple[str, int] | None:
        """`name =` (not `==`) at i: the name and the index after '='."""
        m = self.match(_IDENT, i)
        if m is None:
            return None
        k = self.ws(m.end())
        if k >= self.n or self.s[k] != "=" or (k + 1 < self.n and self.s[k + 1] == "="):
            return None
        return m.group(), k + 1

    def value(self, i: int, depth: int = 0) -> tuple[Any, int]:
        self.budget.spend()
        if depth > MAX_DEPTH:
            raise _ParseError(_TOO_DEEP, i, deep=True)
        i = self.ws(i)
        if i >= self.n:
            raise _ParseError("expected a value but the text ended", i)
        c = self.s[i]
        if c in "{[":
            try:
                return self.obj(i, depth) if c == "{" else self.arr(i, depth)
            except _ParseError as err:
                if err.deep and err.resume is None:
                    err.resume = i  # the innermost opener: see _ParseError.resume
                raise
        if c in "\"'":
            return self.string(i)
        m = self.number(i)
        if m:
            tok = m.group()
            try:
                num: Any = float(tok) if any(ch in tok for ch in ".eE") else int(tok)
            except ValueError as exc:  # e.g. an integer beyond Python's digit limit
                raise _ParseError("invalid number", i) from exc
            return num, m.end()
        m = self.match(_KEYWORD, i)
        if m:
            return _KEYWORDS[m.group()], m.end()
        raise _ParseError(f"expected a value, found {_show(self.s[i])}", i)

    def _closed(self, out: Any, i: int) -> tuple[Any, int]:
        """A container the region's end closes (its closers are missing)."""
        self.truncated = True
        return out, i

    def obj(self, i: int, depth: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        i += 1
        while True:
            self.budget.spend()
            i = self.ws(i)
            if i >= self.n:  # missing closers at the very end of the region: close them
                return self._closed(out, i)
            c = self.s[i]
            if c == "}":
                return out, i + 1
            if c == ",":  # stray or doubled comma
                i += 1
                continue
            if c not in "\"'":
                raise _ParseError(f"expected a quoted key or '}}', found {_show(c)}", i)
            key, i = self.string(i, plain=True)
            i = self.ws(i)
            if i >= self.n or self.s[i] != ":":
                found = "the end" if i >= self.n else _show(self.s[i])
                raise _ParseError(f"expected ':' after the key {key!r}, found {found}", i)
            out[key], i = self.value(i + 1, depth + 1)
            i = self.ws(i)
            if i >= self.n:
                return self._closed(out, i)
            c = self.s[i]
            if c == ",":
                i += 1
            elif c == "}":
                return out, i + 1
            elif c not in "\"'":  # a missing comma before the next key is tolerated
                raise _ParseError(
                    f"expected ',' or '}}' after the value of {key!r}, found {_show(c)}", i
                )

    def arr(self, i: int, depth: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        i += 1
        while True:
            self.budget.spend()
            i = self.ws(i)
            if i >= self.n:
                return self._closed(out, i)
            c = self.s[i]
            if c == "]":
                return out, i + 1
            if c == ",":
                i += 1
                continue
            item, i = self.value(i, depth + 1)
            out.append(item)
            i = self.ws(i)
            if i >= self.n:
                return self._closed(out, i)
            c = self.s[i]
            if c == ",":
                i += 1
            elif c == "]":
                return out, i + 1
            elif c not in "\"'{[-0123456789tfnTFN":
                raise _ParseError(f"expected ',' or ']' in a list, found {_show(c)}", i)

    def _closes(self, k: int) -> bool:
        """Whether a quote just before `k` ends the string: only where structure follows."""
        if not self.stray_quotes:
            return True
        s, n = self.s, self.n
        k = self.ws(k)
        if k >= n:
            return True
        c = s[k]
        if c in ":}]" or (c == ")" and self.call_mode):
            return True
        if c in "\"'":  # a missing comma before the next key: `"a" "key": ...`
            m = self.match(_QUOTED, k)
            if m is None:
                return False
            k = self.ws(m.end())
            return k < n and s[k] == ":"
        if c != ",":
            return False
        k = self.ws(k + 1)
        if k >= n or s[k] in "\"'{[]}-0123456789" or self.match(_KEYWORD, k):
            return True
        return self.call_mode and (s[k] == ")" or self.kwarg(k) is not None)

    def string(self, i: int, plain: bool = False) -> tuple[str, int]:
        """The string at s[i]. `plain` (keys): every unescaped quote closes it; the stray-quote
        rule is for values (a key never holds a quote, and reading one on past a quote let a
        run of `{"` swallow the call after it)."""
        s = self.s
        start = i
        q = s[i]
        stop = _STOP[q]
        parts: list[str] = []
        i += 1
        seg = i
        while True:
            self.budget.spend()
            m = stop.search(s, i, self.n)
            self.budget.scan((m.start() if m else self.n) - i + 1)
            if m is None:
                raise _ParseError("unterminated string (a closing quote is missing)", start)
            j = m.start()
            if s[j] == q:
                if plain or self._closes(j + 1):
                    parts.append(s[seg:j])
                    return "".join(parts), j + 1
                i = j + 1  # a quote inside the text: keep it
                self.strayed = True
                continue
            parts.append(s[seg:j])
            text, i = self._escape(j)
            parts.append(text)
            seg = i

    def _escape(self, j: int) -> tuple[str, int]:
        """Decode the escape at s[j] == '\\'; unknown escapes are kept as written."""
        s, n = self.s, self.n
        if j + 1 >= n:
            return "\\", j + 1
        c = s[j + 1]
        if c in _SIMPLE_ESC:
            return _SIMPLE_ESC[c], j + 2
        width = {"x": 2, "u": 4, "U": 8}.get(c)
        if width:
            digits = s[j + 2 : min(j + 2 + width, n)]
            if len(digits) == width and _HEX.fullmatch(digits):
                code = int(digits, 16)
                end = j + 2 + width
                if c == "u" and 0xD800 <= code < 0xDC00 and s[end : min(end + 2, n)] == "\\u":
                    low = s[end + 2 : min(end + 6, n)]
                    if len(low) == 4 and _HEX.fullmatch(low) and 0xDC00 <= int(low, 16) < 0xE000:
                        code = 0x10000 + ((code - 0xD800) << 10) + (int(low, 16) - 0xDC00)
                        end += 6
                if code <= 0x10FFFF:
                    return chr(code), end
        if c == "\n":  # Python line continuation inside a string
            return "", j + 2
        return "\\" + c, j + 2


def _show(c: str) -> str:
    return {"\n": "a line break", "\t": "a tab"}.get(c, repr(c))


_JSON = json.JSONDecoder(strict=False)  # strict=False: raw control characters in strings


_WINDOW = 1024  # first window of text the JSON decoder sees (doubled while it is too short)
_MARGIN = 64  # an error this close to a window's end may be the window's, not the text's


class _GaveUp(ValueError):
    """The exact decoder read to `reach` without finding where the value ends: the text ran out
    (an unclosed value), or the nesting passed Python's recursion limit."""

    def __init__(self, reach: int) -> None:
        super().__init__("the exact decoder gave up")
        self.reach = reach


class _StrictMemo:
    """Per region end, how far the exact decoder read before it gave up (`_GaveUp`). A start
    before that point would make it read the same text again (inside an unclosed value, every
    start reads to the end: quadratic work), so such starts go to the lenient reader alone,
    which reads valid JSON alike and stops at MAX_DEPTH."""

    def __init__(self) -> None:
        self.until: dict[int, int] = {}

    def worth(self, i: int, hi: int) -> bool:
        return i >= self.until.get(hi, -1)

    def gave_up(self, hi: int, reach: int) -> None:
        self.until[hi] = max(self.until.get(hi, -1), reach)


def _json_at(s: str, i: int, hi: int, budget: _Budget) -> tuple[Any, int]:
    """`raw_decode` of the value at s[i] within s[:hi]; raises ValueError (`_GaveUp` where it
    read to the region's end without finding the value's end, or nested past the recursion
    limit).

    The stdlib's error counts the lines of everything before the error (O(position)), so the
    decoder sees a window s[i:i+w] instead of the whole text; an error that may come from the
    window's end (an unterminated string, or near the end) is retried with a window twice as
    long. A value read inside a window ends inside it, so the result is the same as raw_decode
    on the whole text."""
    w = _WINDOW
    while True:
        stop = min(hi, i + w)
        chunk = s[i:stop]
        budget.scan(len(chunk) // 8)  # a copy: far cheaper per character than a regex
        budget.afford(len(chunk) * (1 + _TICKS // TOKENS_PER_UNIT))  # at most a token a char
        try:
            value, end = _JSON.raw_decode(chunk, 0)
        except json.JSONDecodeError as exc:
            budget.decode(chunk, exc.pos)
            cut = exc.pos >= len(chunk) - _MARGIN or exc.msg.startswith("Unterminated")
            if not cut:
                raise
            if stop >= hi:
                raise _GaveUp(hi) from None
            w *= 2
            continue
        except RecursionError:
            budget.decode(chunk, len(chunk))
            raise _GaveUp(stop) from None
        except ValueError:  # a number beyond int's digit limit
            budget.decode(chunk, len(chunk))
            raise
        budget.decode(chunk, end)
        return value, i + end


# Up to MAX_DEPTH + 1 openers, each right inside the one before (a short key between them
# allowed; keys hold no bracket, so the brackets in a match count its levels): all of them means
# a value nested past what the lenient reader reads. Possessive, so it never backtracks and
# costs what it matched; bounded, so it never reads a long run twice.
_LEVEL = r"""[\[{]\s*+(?:"[^"\\\n\[\]{}]{0,64}"\s*+:\s*+)?+"""
_NEST = re.compile(f"(?:{_LEVEL}){{0,{MAX_DEPTH + 1}}}+")
_TOO_DEEP = "the JSON is nested too deeply"


def _too_deep(s: str, i: int, hi: int, budget: _Budget) -> int | None:
    """Where the value at s[i] starts with MAX_DEPTH + 1 directly nested openers (so it is
    nested past MAX_DEPTH): the last opener before the one past that depth, the resume point of
    `_ParseError`. Else None. Charged for what it read."""
    end = _NEST.match(s, i, hi).end()  # type: ignore[union-attr]
    budget.scan(end - i + 1)
    if s.count("[", i, end) + s.count("{", i, end) <= MAX_DEPTH:
        return None
    last = max(s.rfind("[", i, end), s.rfind("{", i, end))
    return max(s.rfind("[", i, last), s.rfind("{", i, last))


# How a value was read: exact JSON, leniently, or leniently with containers the end closed.
STRICT, LENIENT, TRUNCATED = "strict", "lenient", "truncated"


def _read_value(
    s: str, i: int, budget: _Budget, hi: int | None = None, memo: _StrictMemo | None = None
) -> tuple[Any, int, str]:
    """(value, index after it, how it was read): exact JSON first (unless `memo` says
    the exact decoder would only read again what it gave up on), the lenient reader where that
    fails. Raises _ParseError; for a value nested past MAX_DEPTH, at once, with `resume` at the
    opener past that depth: every opener before it starts a value at least as deep, and
    retrying each (a run of 40 KB of `[`) read the rest of the run again, quadratic work that
    spent the budget before a later call."""
    hi = len(s) if hi is None else hi
    past = _too_deep(s, i, hi, budget)
    if past is not None:
        raise _ParseError(_TOO_DEEP, i, resume=past)
    if memo is None or memo.worth(i, hi):
        try:
            value, end = _json_at(s, i, hi, budget)
            return value, end, STRICT
        except _GaveUp as gave_up:
            budget.spend()
            if memo is not None:
                memo.gave_up(hi, gave_up.reach)
        except ValueError:
            budget.spend()  # a raised error costs about a step
    reader = _Reader(s, budget, end=hi)
    try:
        value, end = reader.value(i)
    except _ParseError as err:
        if err.deep or not reader.strayed:  # plain quoting would read it the same way
            raise
        budget.spend()
        # Plain quoting: recovers the rare case the stray-quote rule misreads, and its error
        # (where normal quoting first breaks) is the one worth showing to the model.
        reader = _Reader(s, budget, stray_quotes=False, end=hi)
        value, end = reader.value(i)
    return value, end, TRUNCATED if reader.truncated else LENIENT


def _decode_text(s: str, budget: _Budget) -> Any:
    """Decode a whole string as one value (for arguments given as a JSON string)."""
    budget.decode(s, len(s))
    try:
        return json.loads(s, strict=False)
    except (ValueError, RecursionError):
        pass
    reader = _Reader(s, budget)
    value, end = reader.value(0)
    if reader.ws(end) != len(s):
        raise _ParseError("unexpected text after the value", end)
    return value


# --------------------------------------------------------------------------------------------
# Interpreting a parsed value as calls.


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    return "an object"


def _looks_like_schema(d: Mapping[str, Any], args: Any) -> bool:
    """A tool *description* echoed back ({"name", "description", "parameters": {schema}})."""
    return (
        "description" in d
        and isinstance(args, dict)
        and args.get("type") == "object"
        and isinstance(args.get("properties"), dict)
    )


def _interpret(d: dict[str, Any], budget: _Budget, depth: int = 0) -> tuple[ToolCall | None, str]:
    """A call from one object, or None and the reason it is not one."""
    for key in NAME_KEYS:
        if key not in d:
            continue
        v = d[key]
        if isinstance(v, dict) and depth < 3:  # {"type": "function", "function": {...}}
            inner, why = _interpret(v, budget, depth + 1)
            if inner is not None and not inner.arguments:
                outer_args, _ = _arguments(d, key, budget)
                if outer_args:
                    inner = ToolCall(inner.name, outer_args)
            return inner, why
        if not isinstance(v, str):
            return None, f"its '{key}' field is {_kind(v)}, not the tool's name as a string"
        name = v.strip()
        if not name:
            return None, f"its '{key}' field is empty"
        args, why = _arguments(d, key, budget)
        if args is None:
            return None, why
        return ToolCall(name, args), ""
    return None, "no_name"


def _arguments(
    d: dict[str, Any], name_key: str, budget: _Budget
) -> tuple[dict[str, Any] | None, str]:
    for key in ARG_KEYS:
        if key not in d:
            continue
        a = d[key]
        if key == "parameters" and _looks_like_schema(d, a):
            return None, "it looks like a tool description (a schema), not a call"
        if a is None:
            return {}, ""
        if isinstance(a, dict):
            return a, ""
        if isinstance(a, str):
            if not a.strip():
                return {}, ""
            try:
                decoded = _decode_text(a.strip(), budget)
            except _ParseError:
                decoded = None
            if isinstance(decoded, dict):
                return decoded, ""
            return None, f"its '{key}' is a string that does not hold a JSON object"
        return None, f"its '{key}' is {_kind(a)}, but it must be an object of named arguments"
    rest = {k: v for k, v in d.items() if k != name_key and k not in META_KEYS}
    return rest, ""


def _calls_from_value(v: Any, budget: _Budget, depth: int = 0) -> tuple[list[ToolCall], str]:
    """All calls in a parsed value, and (when there are none) why not."""
    budget.spend(1 + len(v) // 8 if isinstance(v, (list, dict)) else 1)
    if depth > 4:
        return [], "it is nested too deeply"
    if isinstance(v, list):
        return _calls_in_lists(v, budget, depth)
    if isinstance(v, dict):
        call, why = _interpret(v, budget)
        if call is not None:
            return [call], ""
        if why == "no_name":
            for key in WRAPPER_KEYS:
                if isinstance(v.get(key), (dict, list)):
                    inner, inner_why = _calls_from_value(v[key], budget, depth + 1)
                    if inner:
                        return inner, ""
        return [], why
    return [], "scalar"


def _calls_in_lists(v: list[Any], budget: _Budget, depth: int) -> tuple[list[ToolCall], str]:
    """The calls of the objects in a list and in the lists inside it, at any depth, in textual
    order: `[[[{call}]]]`, or a call after a line of unclosed `[` (which the lenient reader
    closes at the end of the text), is still a call. Iterative: a list can nest past Python's
    recursion limit."""
    calls: list[ToolCall] = []
    stack = [iter(v)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            budget.spend(1 + len(item) // 8)
            stack.append(iter(item))
        elif isinstance(item, dict):
            calls.extend(_calls_from_value(item, budget, depth + 1)[0])
    return calls, "" if calls else "list"


_END = object()


def _calls_anywhere(v: Any, budget: _Budget) -> list[ToolCall]:
    """The calls among the objects at any depth of a value whose closers the end of the text
    supplied (`{"a": [` left open, then a call): what was written after the unclosed opener,
    in textual order. An object that is a call is not searched further. Iterative."""
    calls: list[ToolCall] = []
    stack: list[Any] = [iter([v])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
            continue
        if isinstance(item, dict):
            budget.spend(1 + len(item) // 8)
            call, _ = _interpret(item, budget)
            if call is not None:
                calls.append(call)
            else:
                stack.append(iter(item.values()))
        elif isinstance(item, list):
            budget.spend(1 + len(item) // 8)
            stack.append(iter(item))
    return calls


# --------------------------------------------------------------------------------------------
# Scanning a text for candidate regions. Names are matched case-insensitively only where they
# are spelled (scoped flags), so the searches keep the regex engine's fast first-character scan.

_OPEN = re.compile(
    r"```|<(?i:(tool_call|function_call|tool_use))\s*>"
    r"|<(?i:function)\s*=\s*([A-Za-z0-9_.\-]+)\s*>"
    # Only brackets that can start a call (or a list of calls) are worth parsing; not prose
    # braces such as "{curly}", "[1]", "[see below]".
    r"""|\{(?=\s*["'}])|\[(?=\s*[{\[])"""
)
_TAG_NAMES = ("tool_call", "function_call", "tool_use")
_TAG_BOUNDARY = {t: re.compile(rf"<(/?)\s*(?i:{t})\s*>") for t in _TAG_NAMES}
_FUNCTION_CLOSE = re.compile(r"</\s*(?i:function)\s*>")
_FENCE = re.compile("```")
_FENCE_TAG = re.compile(r"[A-Za-z0-9_+.#-]*")
_PYCALL_HEAD = re.compile(r"(print\s*\(\s*)?([A-Za-z_][\w.]*)\s*\(")


def _tag_name(written: str) -> str:
    """The canonical name of a tag as written (any case the regex accepted)."""
    low = written.lower()
    if low in _TAG_BOUNDARY:
        return low
    return next((t for t in _TAG_NAMES if re.fullmatch(t, written, re.IGNORECASE)), low)


@dataclass
class _Attempt:
    """One candidate the scanner tried (kept for diagnosis)."""

    source: str
    start: int
    container: str | None  # None (bare, in prose), "fence", "code-fence", "tag"
    ok: bool
    value: Any = None
    error: _ParseError | None = None
    why: str = ""  # why a parsed value holds no call
    end: int = 0  # index just after the parsed value
    note: str = ""  # a ready explanation (e.g. tags with no JSON inside)
    limit: int = -1  # end of the region it was read in (-1: the whole source)
    how: str = STRICT  # how the value was read (`_read_value`)

    @property
    def stop(self) -> int:
        """The end of the region it was read in."""
        return self.limit if self.limit >= 0 else len(self.source)

    def region(self, i: int, width: int) -> str:
        """Up to `width` characters of its region from index i."""
        return self.source[i : min(i + width, self.stop)]


class _Scanner:
    """Reads one text; regions (tag and fence contents) are index ranges of it, never copies."""

    def __init__(self, s: str) -> None:
        self.s = s
        self.budget = _Budget(len(s))
        self.calls: list[ToolCall] = []
        self.attempts: list[_Attempt] = []
        self._strict = _StrictMemo()
        self.frontier = 0  # the furthest candidate the scan started to read
        self.cut_at: int | None = None  # where MAX_CALLS stopped it
        self.dropped = 0  # calls of one value (a list of calls) past MAX_CALLS
        # (pattern, region end) -> (searched from, first match): a later search from a position
        # between the two gives the same match, so repeated openers never rescan.
        self._found: dict[tuple[re.Pattern[str], int], tuple[int, re.Match[str] | None]] = {}

    def _add(self, calls: Iterable[ToolCall]) -> None:
        for c in calls:
            if len(self.calls) < MAX_CALLS:
                self.calls.append(c)
            else:  # a list of calls past the limit: the rest are not kept
                self.dropped += 1

    def _search(self, pattern: re.Pattern[str], pos: int, hi: int) -> re.Match[str] | None:
        key = (pattern, hi)
        hit = self._found.get(key)
        if hit is not None and hit[0] <= pos and (hit[1] is None or pos <= hit[1].start()):
            return hit[1]
        m = pattern.search(self.s, pos, hi)
        self.budget.scan((m.start() if m else hi) - pos + 1)
        self._found[key] = (pos, m)
        return m

    def _ws(self, i: int, hi: int) -> int:
        return _skip_ws(self.s, i, hi, self.budget)

    def scan(self, lo: int, hi: int, container: str | None = None, tags: bool = True) -> None:
        s, pos = self.s, lo
        while pos < hi:
            if len(self.calls) >= MAX_CALLS:  # more would not be run: stop, and say where
                self.cut_at = pos if self.cut_at is None else self.cut_at
                return
            self.budget.spend()
            m = _OPEN.search(s, pos, hi)
            self.budget.scan((m.start() if m else hi) - pos + 1)
            if m is None:
                return
            self.frontier = max(self.frontier, m.start())
            tok = m.group(0)
            if tok == "```":
                pos = self._fence(m.end(), hi, tags)
            elif tok[0] == "<":
                pos = self._tag(m, hi) if tags else m.end()
            else:
                pos = self._bare(m.start(), hi, container)

    def _try(self, i: int, hi: int, container: str | None) -> _Attempt:
        self.budget.spend(ATTEMPT_UNITS)
        try:
            value, end, how = _read_value(self.s, i, self.budget, hi, self._strict)
        except _ParseError as exc:
            exc.__traceback__ = exc.__context__ = exc.__cause__ = None  # keep no frames alive
            att = _Attempt(self.s, i, container, ok=False, error=exc, limit=hi)
            self.attempts.append(att)
            return att
        att = _Attempt(self.s, i, container, ok=True, value=value, end=end, limit=hi)
        att.how = how
        self.attempts.append(att)
        return att

    def _bare(self, i: int, hi: int, container: str | None) -> int:
        att = self._try(i, hi, container)
        if not att.ok:  # past a value nested too deeply: every opener before it is as deep
            resume = att.error.resume if att.error is not None else None
            return resume if resume is not None and resume > i else i + 1
        calls, att.why = _calls_from_value(att.value, self.budget)
        if not calls and att.how == TRUNCATED:  # an unclosed value holds what came after it
            calls = _calls_anywhere(att.value, self.budget)
        self._add(calls)
        return att.end

    def _fence(self, after: int, hi: int, tags: bool) -> int:
        self.budget.spend(REGION_UNITS)
        m = _FENCE_TAG.match(self.s, after, hi)
        tag_end = m.end() if m else after
        self.budget.scan(2 * (tag_end - after) + 1)
        tag = self.s[after:tag_end].lower()
        close = self._search(_FENCE, tag_end, hi)
        content_end = hi if close is None else close.start()
        next_pos = hi if close is None else close.end()
        before = len(self.calls)
        if tag in _DATA_TAGS:
            self.scan(tag_end, content_end, "fence", tags)
            if len(self.calls) == before and tag in _PYCALL_TAGS:
                self._add(_parse_pycalls(self.s, tag_end, content_end, self.budget) or [])
            if len(self.calls) > before:
                return next_pos
            # Nothing found: maybe a string held ``` and closed the fence early.
            broken = self._broken_fence(tag_end, hi)
            return broken if broken is not None else tag_end  # else: read on as prose
        values = self._pure_values(tag_end, content_end)
        if values is None:
            broken = self._broken_fence(tag_end, hi)
            return broken if broken is not None else next_pos
        for v in values:
            self._add(_calls_from_value(v, self.budget)[0])
        return next_pos

    def _broken_fence(self, content_start: int, hi: int) -> int | None:
        """A fence whose data holds ``` in a string (which closed the fence early): read the
        values from the real text; accept them where the fence really closes after them."""
        s = self.s
        values: list[Any] = []
        i = self._ws(content_start, hi)
        while i < hi and s[i] in "{[":
            self.budget.spend()
            try:
                value, end, _ = _read_value(s, i, self.budget, hi, self._strict)
            except _ParseError:
                return None
            values.append(value)
            i = self._ws(end, hi)
        if not values or not s.startswith("```", i, hi):
            return None
        for v in values:
            self._add(_calls_from_value(v, self.budget)[0])
        return i + 3

    def _pure_values(self, lo: int, hi: int) -> list[Any] | None:
        """The values of a code fence whose whole content is data, else None."""
        s = self.s
        values: list[Any] = []
        i = self._ws(lo, hi)
        while i < hi:
            self.budget.spend()
            if s[i] == ",":
                i = self._ws(i + 1, hi)
                continue
            if s[i] not in "{[":
                return None
            att = self._try(i, hi, "code-fence")
            if not att.ok:
                return None
            values.append(att.value)
            i = self._ws(att.end, hi)
        return values

    def _tag(self, m: re.Match[str], hi: int) -> int:
        self.budget.spend(REGION_UNITS)
        if m.group(2):
            return self._function_tag(m, hi)
        tag = _tag_name(m.group(1))
        b = self._search(_TAG_BOUNDARY[tag], m.end(), hi)
        if b is None:
            content_end, next_pos = hi, hi
        else:
            content_end = b.start()
            next_pos = b.end() if b.group(1) else b.start()
        before, tried = len(self.calls), len(self.attempts)
        self.scan(m.end(), content_end, "tag", tags=False)
        if len(self.calls) == before:
            self._add(_parse_pycalls(self.s, m.end(), content_end, self.budget) or [])
        if len(self.calls) == before and len(self.attempts) == tried:
            self.budget.spend()
            note = f"Your <{tag}> tags hold no JSON object."
            self.attempts.append(_Attempt(self.s, m.start(), "tag", ok=False, note=note, limit=hi))
        # Nothing found: maybe a string held a closing tag; read on from the content as prose.
        return next_pos if len(self.calls) > before else m.end()

    def _function_tag(self, m: re.Match[str], hi: int) -> int:
        """<function=NAME>{...}</function>"""
        close = self._search(_FUNCTION_CLOSE, m.end(), hi)
        content_end = close.start() if close else hi
        next_pos = close.end() if close else hi
        i = self._ws(m.end(), content_end)
        if i >= content_end:  # nothing but whitespace inside
            self._add([ToolCall(m.group(2), {})])
            return next_pos
        if self.s[i] == "{":
            att = self._try(i, content_end, "tag")
            if att.ok and isinstance(att.value, dict):
                att.why = ""
                self._add([ToolCall(m.group(2), att.value)])
                return next_pos
            if att.ok:
                att.why = f"the arguments of {m.group(2)} are {_kind(att.value)}, not an object"
        return m.end()


def _parse_pycalls(s: str, lo: int, hi: int, budget: _Budget) -> list[ToolCall] | None:
    """`name(kw=literal, ...)` calls (optionally in print(...)) filling s[lo:hi], else None."""
    reader = _Reader(s, budget, call_mode=True, end=hi)
    budget.spend()
    budget.scan(hi - lo)  # each call head's pattern may read a name run once more
    calls: list[ToolCall] = []
    try:
        i = reader.ws(lo)
        while i < hi:
            budget.spend()
            m = _PYCALL_HEAD.match(s, i, hi)
            if m is None:
                return None
            args, i = _pycall_args(reader, reader.ws(m.end()))
            if args is None or i >= hi:
                return None
            i = reader.ws(i + 1)
            if m.group(1):
                if i >= hi or s[i] != ")":
                    return None
                i = reader.ws(i + 1)
            while i < hi and s[i] == ";":
                i = reader.ws(i + 1)
            name = m.group(2).rsplit(".", 1)[-1]
            calls.append(ToolCall(name, {str(k): v for k, v in args.items()}))
    except _ParseError:
        return None
    return calls or None


def _pycall_args(reader: _Reader, i: int) -> tuple[dict[str, Any] | None, int]:
    """The keyword arguments of one call, from after its '(' to its ')' (index returned)."""
    s, n = reader.s, reader.n
    args: dict[str, Any] = {}
    while i < n and s[i] != ")":
        reader.budget.spend()
        kw = reader.kwarg(i)
        if kw:
            args[kw[0]], i = reader.value(kw[1])
        elif s[i] == "{":
            value, i = reader.value(i)
            if not isinstance(value, dict):
                return None, i
            args.update(value)
        else:
            return None, i
        i = reader.ws(i)
        if i < n and s[i] == ",":
            i = reader.ws(i + 1)
        elif i >= n or s[i] != ")":
            return None, i
    return args, i


# Where a call may start in text the scan did not read: a tool-name key, a call tag. Possessive,
# so a long run of spaces after a quote is read once, never backtracked into.
_CALLISH = re.compile(
    r"""["']\s*+(?i:name|tool|tool_name|function|function_name|action)\s*+["']\s*+:"""
    r"|<(?i:tool_call|function_call|tool_use)\s*+>|<(?i:function)\s*+="
)


def _scan(text: str) -> _Scanner:
    scanner = _Scanner(text)
    try:
        scanner.scan(0, len(text))
    except (_OutOfBudget, RecursionError):
        pass  # keep what was found before the budget ran out
    return scanner


def _unread(scanner: _Scanner, stats: WorkStats | None) -> None:
    """Fill in what the scan left out: where it stopped early (the budget ran out, or MAX_CALLS
    calls were found and more text follows), whether a call lies in the unread rest (one search,
    tallied, never cut short), and whether calls past MAX_CALLS were found or seen."""
    if stats is None:
        return
    exhausted = scanner.budget.exhausted
    stop = scanner.frontier if exhausted else scanner.cut_at
    m = None
    if stop is not None:
        m = _CALLISH.search(scanner.s, stop)
        scanner.budget.tally(0, chars=len(scanner.s) - stop + _CALL_TICKS)
    seen_more = scanner.cut_at is not None and m is not None
    stats.calls_cut = scanner.dropped > 0 or (seen_more and not exhausted)
    if exhausted or seen_more:
        stats.read_to = stop
        stats.unread_call_at = m.start() if m else None


# --------------------------------------------------------------------------------------------
# Public API.


def parse_tool_calls(text: str, *, stats: WorkStats | None = None) -> list[ToolCall]:
    """Every tool call in a model turn, in textual order; [] when there is none. Never raises.

    Time is linear in len(text); `stats`, when given, receives the work spent."""
    if not isinstance(text, str) or not text:
        return []
    try:
        scanner = _scan(text)
    except Exception:  # a bug here must not crash a rollout; the turn counts as malformed
        return []
    _unread(scanner, stats)
    scanner.budget.report(stats)
    return [_no_surrogates(c) for c in scanner.calls]


def _no_surrogates(call: ToolCall) -> ToolCall:
    """`call` with every lone surrogate in its name, keys and strings replaced by U+FFFD. A JSON
    escape such as "\\ud83d" decodes to one; it would end up in a stored row (no UTF-8 file can
    hold it) or in the next prompt (no tokenizer takes it). Iterative: arguments nest deeply."""
    name, _ = replace_surrogates(call.name)
    args = dict(call.arguments)
    stack: list[dict[Any, Any] | list[Any]] = [args]
    while stack:
        node = stack.pop()
        pairs = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        if isinstance(node, dict):
            node.clear()
        for k, v in pairs:
            if isinstance(v, str):
                v = replace_surrogates(v)[0]
            elif isinstance(v, dict | list):
                v = dict(v) if isinstance(v, dict) else list(v)
                stack.append(v)
            node[replace_surrogates(k)[0] if isinstance(k, str) else k] = v
    return ToolCall(name, args)


def parse_json_objects(text: str, *, stats: WorkStats | None = None) -> list[dict[str, Any]]:
    """Every top-level JSON object in a text, in textual order, read as leniently as tool calls
    are (fences, tags, raw newlines in strings, trailing commas, Python literals, a missing
    closing bracket at the end); objects inside a list count too. [] when there is none; never
    raises. The same scan and work budget as `parse_tool_calls`, so time is linear in len(text)."""
    if not isinstance(text, str) or not text:
        return []
    try:
        scanner = _scan(text)
    except Exception:  # a bug here must not crash a rollout; the reply has no object then
        return []
    scanner.budget.report(stats)
    out: list[dict[str, Any]] = []
    for att in scanner.attempts:
        if not att.ok:
            continue
        values = att.value if isinstance(att.value, list) else [att.value]
        out += [v for v in values if isinstance(v, dict)]
    return out


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object the tool-call scanner reads in `text`, in textual order (fenced, tagged
    or bare in prose, with the same lenient reading and the same linear work budget as
    `parse_tool_calls`); a list's objects are included. Never raises. For other answers asked
    for as JSON (the LLM judge's verdicts)."""
    if not isinstance(text, str) or not text:
        return []
    try:
        attempts = _scan(text).attempts
    except Exception:  # a bug here must not crash a caller: nothing was read
        return []
    out: list[dict[str, Any]] = []
    for att in attempts:
        if not att.ok:
            continue
        values = att.value if isinstance(att.value, list) else [att.value]
        out.extend(v for v in values if isinstance(v, dict))
    return out


def required_from_schemas(tools: Iterable[Mapping[str, Any]] | None) -> dict[str, list[str]]:
    """{tool name: required argument names} from tool schemas (plain or OpenAI-wrapped)."""
    out: dict[str, list[str]] = {}
    for tool in tools or []:
        spec = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
        name = spec.get("name")
        if not isinstance(name, str):
            continue
        params = spec.get("parameters") or spec.get("input_schema") or {}
        req = params.get("required") if isinstance(params, Mapping) else None
        out[name] = [r for r in req or [] if isinstance(r, str)]
    return out


def _tool_list(known_tools: Collection[str]) -> list[str]:
    if isinstance(known_tools, str):
        return [known_tools]
    if isinstance(known_tools, Sequence):
        return [str(t) for t in known_tools]
    return sorted(str(t) for t in known_tools)


def _suggest(name: str, known: list[str]) -> str | None:
    def norm(x: str) -> str:
        return re.sub(r"[^a-z0-9]", "", x.lower())

    for k in known:
        if norm(k) == norm(name):
            return k
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def check_call(
    call: ToolCall,
    known_tools: Collection[str],
    required: Mapping[str, Collection[str]] | None = None,
) -> str | None:
    """What is wrong with one recovered call (unknown tool, missing argument), or None.

    An empty `known_tools` means "any name"; tool names must match exactly.
    """
    known = _tool_list(known_tools)
    if known and call.name not in known:
        msg = f"Unknown tool {call.name!r}"
        hint = _suggest(call.name, known)
        if hint:
            msg += f" (did you mean {hint!r}?)"
        return f"{msg}; available tools: {', '.join(known)}."
    needed = list((required or {}).get(call.name) or [])
    missing = [a for a in needed if a not in call.arguments]
    if missing:
        names = ", ".join(repr(a) for a in missing)
        plural = "s" if len(missing) > 1 else ""
        msg = f"{call.name} is missing required argument{plural} {names}."
        lower = {k.lower(): k for k in call.arguments}
        near = [f"{lower[a.lower()]!r}" for a in missing if a.lower() in lower]
        if near:
            msg += f" (You gave {', '.join(near)}; argument names are case-sensitive.)"
        example = ", ".join(f'"{a}": "..."' for a in needed)
        return msg + f' Call it as {{"name": "{call.name}", "arguments": {{{example}}}}}.'
    empty = [a for a in needed if call.arguments.get(a) is None or call.arguments.get(a) == ""]
    if empty:
        names = ", ".join(repr(a) for a in empty)
        return f"{call.name}'s required argument{'s' if len(empty) > 1 else ''} {names} is empty."
    return None


_NAMEISH = re.compile(  # case-insensitive only in the names: the search keeps its fast scan
    r"""["']\s*(?i:name|tool|tool_name|function|arguments|args|parameters)\s*["']"""
)


def _position(att: _Attempt, pos: int) -> tuple[int, int]:
    src = att.source
    pos = max(att.start, min(pos, att.stop))
    line = src.count("\n", att.start, pos) + 1
    line_start = max(att.start, src.rfind("\n", att.start, pos) + 1)
    return line, pos - line_start + 1


def _attempt_message(att: _Attempt, tools_note: str) -> str | None:
    if att.note:
        return f"{att.note} {FORMAT_HINT}{tools_note}"
    if att.error is not None:
        err = att.error
        line, col = _position(att, err.pos)
        near = att.region(err.pos, 30).split("\n")[0]
        where = f" near {near!r}" if near.strip() else ""
        advice = ""
        before = att.source[att.start : err.pos].rstrip()
        if "unterminated" in err.msg or (
            err.msg.startswith("expected ',' or") and before.endswith(('"', "'"))
        ):
            advice = ' Close every string with " and write a quote inside a string as \\".'
        return (
            f"The JSON in your tool call is invalid at line {line} col {col}: "
            f"{err.msg}{where}.{advice} {FORMAT_HINT}{tools_note}"
        )
    v = att.value
    if att.why == "no_name" and isinstance(v, dict):
        keys = ", ".join(repr(k) for k in list(v)[:8]) or "none"
        return (
            "Your message contains a JSON object but it has no 'name' field "
            f"(its keys: {keys}). {FORMAT_HINT}{tools_note}"
        )
    if att.why == "list":
        return (
            "Your message contains a JSON list, but none of its items is a tool call with a "
            f"'name' field. {FORMAT_HINT}{tools_note}"
        )
    if att.why and att.why != "scalar":
        return f"Your message contains a JSON object, but {att.why}. {FORMAT_HINT}{tools_note}"
    return None


def _fold(text: str) -> str:
    """`text` lowered so that wherever an ASCII word matches it case-insensitively (as
    re.IGNORECASE does: also dotted I, dotless i, long s and the Kelvin sign), the word in
    lower case is found at that place."""
    if text.isascii():
        return text.lower()
    return text.replace("\u0130", "i").lower().replace("\u0131", "i").replace("\u017f", "s")


def _mentioned(text: str, known: list[str]) -> list[str]:
    """The known tools the text names as a word, in any case (one fast search per tool)."""
    folded = _fold(text) if any(k.isascii() for k in known) else text
    out = []
    for k in known:
        if k.isascii():  # the word first (a fast literal search), then the look-behind
            word = re.escape(k.lower())
            found = re.search(rf"{word}(?<!\w[\s\S]{{{len(k)}}})(?!\w)", folded)
        else:
            found = re.search(rf"(?<!\w){re.escape(k)}(?!\w)", text, re.IGNORECASE)
        if found:
            out.append(k)
    return out


def diagnose_tool_turn(
    text: str,
    known_tools: Collection[str],
    required: Mapping[str, Collection[str]] | None = None,
    *,
    stats: WorkStats | None = None,
) -> str | None:
    """A precise message saying what is wrong with a tool-use turn, or None when it is fine.

    Checks, in order: no call could be recovered (says why: invalid JSON with line/column, an
    object without a 'name', arguments that are not an object, no JSON at all); then each
    recovered call against `known_tools` (exact names; empty means any) and `required`
    ({tool: required argument names}). Several bad calls give one line each. Never raises.
    Time is linear in len(text); `stats`, when given, receives the work spent.
    """
    try:
        return _diagnose(text, known_tools, required, stats)
    except Exception:
        return f"Your message could not be read as a tool call. {FORMAT_HINT}"


def _diagnose(
    text: str,
    known_tools: Collection[str],
    required: Mapping[str, Collection[str]] | None,
    stats: WorkStats | None = None,
) -> str | None:
    known = _tool_list(known_tools or [])
    tools_note = f" Available tools: {', '.join(known)}." if known else ""
    if not isinstance(text, str) or not text or text.isspace():
        return f"Your message was empty. {FORMAT_HINT}{tools_note}"
    scanner = _scan(text)
    unread = stats if stats is not None else WorkStats()
    try:
        _unread(scanner, unread)
        scanner.budget.report(unread)
        if not scanner.calls and unread.read_to is not None:
            return (
                f"Your message could not be read to the end: {unread.note(len(text))}. Put "
                f"the tool call first and keep the message short. {FORMAT_HINT}{tools_note}"
            )
        return _explain(scanner, text, known, required, tools_note)
    finally:
        scanner.budget.report(stats)


class _Nearby:
    """Whether a name-like key or a known tool's name lies within 400 characters after an
    attempt's start (inside its region). Each pattern's first match after a position is
    remembered per region, so the attempts together cost about one pass over the text per
    pattern instead of 400 characters each."""

    def __init__(self, scanner: _Scanner, known: list[str]) -> None:
        self.s = scanner.s
        self.budget = scanner.budget
        self.targets: list[re.Pattern[str] | str] = [_NAMEISH, *known]
        # No window reaches past the last attempt's: searching further would be wasted (the
        # scan may have stopped long before the end of the text).
        self.reach = max((a.start for a in scanner.attempts), default=0) + 400
        # (target index, region end) -> (searched from, match start or -1, match end)
        self.hits: dict[tuple[int, int], tuple[int, int, int]] = {}
        # region end -> (valid from, valid until, soonest end of a match or -1)
        self.soonest: dict[int, tuple[int, int, int]] = {}

    def _first(self, k: int, i: int, stop: int) -> tuple[int, int]:
        hit = self.hits.get((k, stop))
        if hit is not None and hit[0] <= i and (hit[1] < 0 or i <= hit[1]):
            return hit[1], hit[2]
        target, upto = self.targets[k], min(stop, self.reach)
        if isinstance(target, str):
            start = self.s.find(target, i, upto)
            end = start + len(target)
        else:
            m = target.search(self.s, i, upto)
            start, end = (m.start(), m.end()) if m else (-1, -1)
        self.budget.tally(0, chars=(upto if start < 0 else start) - i + _CALL_TICKS)
        self.hits[(k, stop)] = (i, start, end)
        return start, end

    def __call__(self, att: _Attempt) -> bool:
        # The first match after the start is inside the window exactly when some match is:
        # a later one cannot end sooner (a match holds no quote, nor a name, inside it). The
        # soonest end over all targets holds until the start passes one of their matches.
        i, stop = att.start, att.stop
        hit = self.soonest.get(stop)
        if hit is None or not hit[0] <= i <= hit[1]:
            found = [self._first(k, i, stop) for k in range(len(self.targets))]
            starts = [start for start, _ in found if start >= 0]
            ends = [end for start, end in found if start >= 0]
            hit = (i, min(starts, default=stop), min(ends, default=-1))
            self.soonest[stop] = hit
        return 0 <= hit[2] <= min(i + 400, stop)


def _explain(
    scanner: _Scanner,
    text: str,
    known: list[str],
    required: Mapping[str, Collection[str]] | None,
    tools_note: str,
) -> str | None:
    """The diagnosis from what the scan found. Its work (a look near each attempt the budget
    allowed, one search of the text per known tool) is tallied, never cut short."""
    tally = scanner.budget.tally
    if scanner.calls:
        problems = [check_call(c, known, required) for c in scanner.calls]
        found = [p for p in problems if p]
        return "\n".join(dict.fromkeys(found)) or None
    nearby = _Nearby(scanner, known)
    for att in scanner.attempts:
        tally(1)
        if not (att.container is not None or att.ok or nearby(att)):
            continue
        msg = _attempt_message(att, tools_note)
        if msg:
            return msg
    tally(len(known), chars=len(text) * (1 + len(known)))
    mentioned = _mentioned(text, known)
    if mentioned:
        return (
            f"Your message mentions {mentioned[0]} but contains no tool call. "
            f"{FORMAT_HINT}{tools_note}"
        )
    return f"No tool call found: {FORMAT_HINT[0].lower()}{FORMAT_HINT[1:]}{tools_note}"
