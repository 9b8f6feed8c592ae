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
- bare JSON objects or lists of calls anywhere in prose, several per turn, JSON Lines;
- JSON with raw newlines/tabs in strings, trailing commas, missing closing brackets at the very
  end, stray unescaped quotes inside a string (a quote closes a string only where the next
  character is structural: ``, : } ]`` or the end), Python literals (single quotes, True, None);
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
so far (`WorkStats` tells a caller how much was spent and whether it ran out). Searches for a
closing tag or fence are remembered, so repeated openers never rescan the rest of the text, and
regions (tag and fence contents) are read in place, never copied. No input string raises.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
# far above what any real turn needs; the per-character share keeps 5 MB of hostile text under
# a second.
BASE_UNITS = 200_000
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
    (the result is then what was found before). Pass one as `stats=` to read it."""

    units: int = 0
    limit: int = 0
    exhausted: bool = False


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
    def __init__(self, msg: str, pos: int) -> None:
        super().__init__(msg)
        self.msg = msg
        self.pos = pos


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
            raise _ParseError("the JSON is nested too deeply", i)
        i = self.ws(i)
        if i >= self.n:
            raise _ParseError("expected a value but the text ended", i)
        c = self.s[i]
        if c == "{":
            return self.obj(i, depth)
        if c == "[":
            return self.arr(i, depth)
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

    def obj(self, i: int, depth: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        i += 1
        while True:
            self.budget.spend()
            i = self.ws(i)
            if i >= self.n:  # missing closers at the very end of the region: close them
                return out, i
            c = self.s[i]
            if c == "}":
                return out, i + 1
            if c == ",":  # stray or doubled comma
                i += 1
                continue
            if c not in "\"'":
                raise _ParseError(f"expected a quoted key or '}}', found {_show(c)}", i)
            key, i = self.string(i)
            i = self.ws(i)
            if i >= self.n or self.s[i] != ":":
                found = "the end" if i >= self.n else _show(self.s[i])
                raise _ParseError(f"expected ':' after the key {key!r}, found {found}", i)
            out[key], i = self.value(i + 1, depth + 1)
            i = self.ws(i)
            if i >= self.n:
                return out, i
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
                return out, i
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
                return out, i
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

    def string(self, i: int) -> tuple[str, int]:
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
                if self._closes(j + 1):
                    parts.append(s[seg:j])
                    return "".join(parts), j + 1
                i = j + 1  # a quote inside the text: keep it
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


def _json_at(s: str, i: int, hi: int, budget: _Budget) -> tuple[Any, int]:
    """`raw_decode` of the value at s[i] within s[:hi]; raises ValueError or RecursionError.

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
            if stop >= hi or not cut:
                raise
            w *= 2
            continue
        except (ValueError, RecursionError):  # a number beyond int's digit limit; too deep
            budget.decode(chunk, len(chunk))
            raise
        budget.decode(chunk, end)
        return value, i + end


def _read_value(s: str, i: int, budget: _Budget, hi: int | None = None) -> tuple[Any, int]:
    """Exact JSON first; the lenient reader only where that fails. Raises _ParseError."""
    hi = len(s) if hi is None else hi
    try:
        return _json_at(s, i, hi, budget)
    except ValueError:
        budget.spend()  # a raised error costs about a step
    except RecursionError as exc:  # deeper than MAX_DEPTH, so the lenient reader fails too
        raise _ParseError("the JSON is nested too deeply", i) from exc
    try:
        return _Reader(s, budget, end=hi).value(i)
    except _ParseError:
        budget.spend()
        # Plain quoting: recovers the rare case the stray-quote rule misreads, and its error
        # (where normal quoting first breaks) is the one worth showing to the model.
        return _Reader(s, budget, stray_quotes=False, end=hi).value(i)


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
        calls: list[ToolCall] = []
        for item in v:
            if isinstance(item, (dict, list)):
                calls.extend(_calls_from_value(item, budget, depth + 1)[0])
        return calls, "" if calls else "list"
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
        # (pattern, region end) -> (searched from, first match): a later search from a position
        # between the two gives the same match, so repeated openers never rescan.
        self._found: dict[tuple[re.Pattern[str], int], tuple[int, re.Match[str] | None]] = {}

    def _add(self, calls: Iterable[ToolCall]) -> None:
        for c in calls:
            if len(self.calls) < MAX_CALLS:
                self.calls.append(c)

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
        while pos < hi and len(self.calls) < MAX_CALLS:  # more calls would be dropped anyway
            self.budget.spend()
            m = _OPEN.search(s, pos, hi)
            self.budget.scan((m.start() if m else hi) - pos + 1)
            if m is None:
                return
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
            value, end = _read_value(self.s, i, self.budget, hi)
        except _ParseError as exc:
            exc.__traceback__ = exc.__context__ = exc.__cause__ = None  # keep no frames alive
            att = _Attempt(self.s, i, container, ok=False, error=exc, limit=hi)
            self.attempts.append(att)
            return att
        att = _Attempt(self.s, i, container, ok=True, value=value, end=end, limit=hi)
        self.attempts.append(att)
        return att

    def _bare(self, i: int, hi: int, container: str | None) -> int:
        att = self._try(i, hi, container)
        if not att.ok:
            return i + 1
        calls, att.why = _calls_from_value(att.value, self.budget)
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
                value, end = _read_value(s, i, self.budget, hi)
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


def _scan(text: str) -> _Scanner:
    scanner = _Scanner(text)
    try:
        scanner.scan(0, len(text))
    except (_OutOfBudget, RecursionError):
        pass  # keep what was found before the budget ran out
    return scanner


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
    scanner.budget.report(stats)
    return list(scanner.calls)


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
    try:
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
