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
this module's own small parser (no `eval`, no `ast.literal_eval`). The first attempt at each
bracket uses the stdlib JSON decoder (exact for valid JSON); the lenient reader runs only where
that fails. Work is capped (bracket attempts, reader steps, nesting depth), so pathological input
returns what was found so far instead of taking long, and no input string raises.
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

# Work caps: far above any real turn, low enough that adversarial input stays fast.
MAX_ATTEMPTS = 5000  # bracket positions tried per text
MAX_STEPS = 200_000  # lenient-reader steps per text
MAX_DEPTH = 64  # nesting depth of the lenient reader
MAX_CALLS = 64


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
    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.attempts = MAX_ATTEMPTS

    def spend(self, n: int = 1) -> None:
        self.steps -= n
        if self.steps < 0:
            raise _OutOfBudget


_WS = re.compile(r"\s*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.])")
_KEYWORD = re.compile(r"(?:true|false|null|True|False|None)(?!\w)")
_KEYWORDS: dict[str, Any] = {
    "true": True,
    "false": False,
    "null": None,
    "True": True,
    "False": False,
    "None": None,
}
_NEXT_KEY = re.compile(r"""(["'])[^"'\n]{1,60}\1\s*:""")
_KWARG = re.compile(r"([A-Za-z_]\w*)\s*=(?!=)")
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


class _Reader:
    """Recursive-descent reader over `s`; every method returns (value, index after it)."""

    def __init__(
        self, s: str, budget: _Budget, call_mode: bool = False, stray_quotes: bool = True
    ) -> None:
        self.s = s
        self.n = len(s)
        self.budget = budget
        self.call_mode = call_mode  # inside `name(kw=...)`: ')' and `kw=` also close a string
        self.stray_quotes = stray_quotes  # False: every unescaped quote closes (plain quoting)

    def ws(self, i: int) -> int:
        return _WS.match(self.s, i).end()  # type: ignore[union-attr]

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
        m = _NUMBER.match(self.s, i)
        if m:
            tok = m.group()
            try:
                num: Any = float(tok) if any(ch in tok for ch in ".eE") else int(tok)
            except ValueError as exc:  # e.g. an integer beyond Python's digit limit
                raise _ParseError("invalid number", i) from exc
            return num, m.end()
        m = _KEYWORD.match(self.s, i)
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
            return bool(_NEXT_KEY.match(s, k))
        if c != ",":
            return False
        k = self.ws(k + 1)
        if k >= n or s[k] in "\"'{[]}-0123456789" or _KEYWORD.match(s, k):
            return True
        return self.call_mode and bool(_KWARG.match(s, k) or s[k] == ")")

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
            m = stop.search(s, i)
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
        s = self.s
        if j + 1 >= self.n:
            return "\\", j + 1
        c = s[j + 1]
        if c in _SIMPLE_ESC:
            return _SIMPLE_ESC[c], j + 2
        width = {"x": 2, "u": 4, "U": 8}.get(c)
        if width:
            digits = s[j + 2 : j + 2 + width]
            if len(digits) == width and _HEX.fullmatch(digits):
                code = int(digits, 16)
                end = j + 2 + width
                if c == "u" and 0xD800 <= code < 0xDC00 and s[end : end + 2] == "\\u":
                    low = s[end + 2 : end + 6]
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


def _read_value(s: str, i: int, budget: _Budget) -> tuple[Any, int]:
    """Exact JSON first; the lenient reader only where that fails. Raises _ParseError."""
    try:
        return _JSON.raw_decode(s, i)
    except ValueError:
        pass
    except RecursionError as exc:  # deeper than MAX_DEPTH, so the lenient reader fails too
        budget.spend(5000)  # the C decoder went deep before giving up: a costly attempt
        raise _ParseError("the JSON is nested too deeply", i) from exc
    try:
        return _Reader(s, budget).value(i)
    except _ParseError:
        # Plain quoting: recovers the rare case the stray-quote rule misreads, and its error
        # (where normal quoting first breaks) is the one worth showing to the model.
        return _Reader(s, budget, stray_quotes=False).value(i)


def _decode_text(s: str, budget: _Budget) -> Any:
    """Decode a whole string as one value (for arguments given as a JSON string)."""
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
# Scanning a text for candidate regions.

_OPEN = re.compile(
    r"```|<(tool_call|function_call|tool_use)\s*>|<function\s*=\s*([A-Za-z0-9_.\-]+)\s*>|[{\[]",
    re.IGNORECASE,
)
_TAG_BOUNDARY = {
    t: re.compile(rf"<(/?)\s*{t}\s*>", re.IGNORECASE)
    for t in ("tool_call", "function_call", "tool_use")
}
_FUNCTION_CLOSE = re.compile(r"</\s*function\s*>", re.IGNORECASE)
# Only brackets that can start a call (or a list of calls) are worth parsing.
_PROMISING = re.compile(r"""\{\s*["'}]|\[\s*[{\[]""")
_FENCE_TAG = re.compile(r"[A-Za-z0-9_+.#-]*")
_PYCALL_HEAD = re.compile(r"(print\s*\(\s*)?([A-Za-z_][\w.]*)\s*\(")


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


class _Scanner:
    def __init__(self) -> None:
        self.budget = _Budget()
        self.calls: list[ToolCall] = []
        self.attempts: list[_Attempt] = []

    def _add(self, calls: Iterable[ToolCall]) -> None:
        for c in calls:
            if len(self.calls) < MAX_CALLS:
                self.calls.append(c)

    def scan(self, s: str, container: str | None = None, tags: bool = True) -> None:
        pos, n = 0, len(s)
        while pos < n and self.budget.attempts > 0:
            m = _OPEN.search(s, pos)
            if m is None:
                return
            tok = m.group(0)
            if tok == "```":
                pos = self._fence(s, m.end(), tags)
            elif tok[0] == "<":
                pos = self._tag(s, m) if tags else m.end()
            else:
                pos = self._bare(s, m.start(), container)

    def _try(self, s: str, i: int, container: str | None) -> _Attempt:
        self.budget.attempts -= 1
        self.budget.spend()
        try:
            value, end = _read_value(s, i, self.budget)
        except _ParseError as exc:
            att = _Attempt(s, i, container, ok=False, error=exc)
            self.attempts.append(att)
            return att
        att = _Attempt(s, i, container, ok=True, value=value, end=end)
        self.attempts.append(att)
        return att

    def _bare(self, s: str, i: int, container: str | None) -> int:
        if not _PROMISING.match(s, i):  # prose braces: "{curly}", "[1]", "[see below]"
            return i + 1
        att = self._try(s, i, container)
        if not att.ok:
            return i + 1
        calls, att.why = _calls_from_value(att.value, self.budget)
        self._add(calls)
        return att.end

    def _fence(self, s: str, after: int, tags: bool) -> int:
        tag_end = _FENCE_TAG.match(s, after).end()  # type: ignore[union-attr]
        tag = s[after:tag_end].lower()
        close = s.find("```", tag_end)
        content_end = len(s) if close < 0 else close
        next_pos = len(s) if close < 0 else close + 3
        content = s[tag_end:content_end]
        before = len(self.calls)
        if tag in _DATA_TAGS:
            self.scan(content, "fence", tags)
            if len(self.calls) == before and tag in _PYCALL_TAGS:
                self._add(_parse_pycalls(content, self.budget) or [])
            if len(self.calls) > before:
                return next_pos
            # Nothing found: maybe a string held ``` and closed the fence early.
            broken = self._broken_fence(s, tag_end)
            return broken if broken is not None else tag_end  # else: read on as prose
        values = self._pure_values(content)
        if values is None:
            broken = self._broken_fence(s, tag_end)
            return broken if broken is not None else next_pos
        for v in values:
            self._add(_calls_from_value(v, self.budget)[0])
        return next_pos

    def _broken_fence(self, s: str, content_start: int) -> int | None:
        """A fence whose data holds ``` in a string (which closed the fence early): read the
        values from the real text; accept them where the fence really closes after them."""
        values: list[Any] = []
        i = _WS.match(s, content_start).end()  # type: ignore[union-attr]
        while i < len(s) and s[i] in "{[":
            try:
                value, end = _read_value(s, i, self.budget)
            except _ParseError:
                return None
            values.append(value)
            i = _WS.match(s, end).end()  # type: ignore[union-attr]
        if not values or not s.startswith("```", i):
            return None
        for v in values:
            self._add(_calls_from_value(v, self.budget)[0])
        return i + 3

    def _pure_values(self, content: str) -> list[Any] | None:
        """The values of a code fence whose whole content is data, else None."""
        values: list[Any] = []
        reader = _Reader(content, self.budget)
        i = reader.ws(0)
        while i < len(content):
            if content[i] == ",":
                i = reader.ws(i + 1)
                continue
            if content[i] not in "{[":
                return None
            att = self._try(content, i, "code-fence")
            if not att.ok:
                return None
            values.append(att.value)
            i = reader.ws(att.end)
        return values

    def _tag(self, s: str, m: re.Match[str]) -> int:
        if m.group(2):  # <function=NAME>{...}</function>
            close = _FUNCTION_CLOSE.search(s, m.end())
            content = s[m.end() : close.start() if close else len(s)]
            next_pos = close.end() if close else len(s)
            stripped = content.strip()
            if not stripped:
                self._add([ToolCall(m.group(2), {})])
                return next_pos
            reader = _Reader(content, self.budget)
            i = reader.ws(0)
            if content[i] == "{":
                att = self._try(content, i, "tag")
                if att.ok and isinstance(att.value, dict):
                    att.why = ""
                    self._add([ToolCall(m.group(2), att.value)])
                    return next_pos
                if att.ok:
                    att.why = f"the arguments of {m.group(2)} are {_kind(att.value)}, not an object"
            return m.end()
        boundary = _TAG_BOUNDARY[m.group(1).lower()]
        b = boundary.search(s, m.end())
        if b is None:
            content, next_pos = s[m.end() :], len(s)
        else:
            content = s[m.end() : b.start()]
            next_pos = b.end() if b.group(1) else b.start()
        before, tried = len(self.calls), len(self.attempts)
        self.scan(content, "tag", tags=False)
        if len(self.calls) == before:
            self._add(_parse_pycalls(content, self.budget) or [])
        if len(self.calls) == before and len(self.attempts) == tried:
            tag = m.group(1).lower()
            note = f"Your <{tag}> tags hold no JSON object."
            self.attempts.append(_Attempt(s, m.start(), "tag", ok=False, note=note))
        # Nothing found: maybe a string held a closing tag; read on from the content as prose.
        return next_pos if len(self.calls) > before else m.end()


def _parse_pycalls(content: str, budget: _Budget) -> list[ToolCall] | None:
    """`name(kw=literal, ...)` calls (optionally in print(...)), one or more, and nothing else."""
    reader = _Reader(content, budget, call_mode=True)
    n = len(content)
    calls: list[ToolCall] = []
    try:
        i = reader.ws(0)
        while i < n:
            m = _PYCALL_HEAD.match(content, i)
            if m is None:
                return None
            name = m.group(2).rsplit(".", 1)[-1]
            args: dict[str, Any] = {}
            i = reader.ws(m.end())
            while i < n and content[i] != ")":
                km = _KWARG.match(content, i)
                if km:
                    args[km.group(1)], i = reader.value(km.end())
                elif content[i] == "{":
                    value, i = reader.value(i)
                    if not isinstance(value, dict):
                        return None
                    args.update(value)
                else:
                    return None
                i = reader.ws(i)
                if i < n and content[i] == ",":
                    i = reader.ws(i + 1)
                elif i >= n or content[i] != ")":
                    return None
            if i >= n:
                return None
            i = reader.ws(i + 1)
            if m.group(1):
                if i >= n or content[i] != ")":
                    return None
                i = reader.ws(i + 1)
            while i < n and content[i] == ";":
                i = reader.ws(i + 1)
            calls.append(ToolCall(name, {str(k): v for k, v in args.items()}))
    except _ParseError:
        return None
    return calls or None


def _scan(text: str) -> _Scanner:
    scanner = _Scanner()
    try:
        scanner.scan(text)
    except (_OutOfBudget, RecursionError):
        pass  # keep what was found before the cap
    return scanner


# --------------------------------------------------------------------------------------------
# Public API.


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every tool call in a model turn, in textual order; [] when there is none. Never raises."""
    if not isinstance(text, str) or not text:
        return []
    try:
        return list(_scan(text).calls)
    except Exception:  # a bug here must not crash a rollout; the turn counts as malformed
        return []


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


_NAMEISH = re.compile(
    r"""["']\s*(?:name|tool|tool_name|function|arguments|args|parameters)\s*["']""", re.IGNORECASE
)


def _position(att: _Attempt, pos: int) -> tuple[int, int]:
    src = att.source
    pos = max(att.start, min(pos, len(src)))
    line = src.count("\n", att.start, pos) + 1
    line_start = max(att.start, src.rfind("\n", att.start, pos) + 1)
    return line, pos - line_start + 1


def _attempt_message(att: _Attempt, tools_note: str) -> str | None:
    if att.note:
        return f"{att.note} {FORMAT_HINT}{tools_note}"
    if att.error is not None:
        err = att.error
        line, col = _position(att, err.pos)
        near = att.source[err.pos : err.pos + 30].split("\n")[0]
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


def diagnose_tool_turn(
    text: str,
    known_tools: Collection[str],
    required: Mapping[str, Collection[str]] | None = None,
) -> str | None:
    """A precise message saying what is wrong with a tool-use turn, or None when it is fine.

    Checks, in order: no call could be recovered (says why: invalid JSON with line/column, an
    object without a 'name', arguments that are not an object, no JSON at all); then each
    recovered call against `known_tools` (exact names; empty means any) and `required`
    ({tool: required argument names}). Several bad calls give one line each. Never raises.
    """
    try:
        return _diagnose(text, known_tools, required)
    except Exception:
        return f"Your message could not be read as a tool call. {FORMAT_HINT}"


def _diagnose(
    text: str,
    known_tools: Collection[str],
    required: Mapping[str, Collection[str]] | None,
) -> str | None:
    known = _tool_list(known_tools or [])
    tools_note = f" Available tools: {', '.join(known)}." if known else ""
    if not isinstance(text, str) or not text.strip():
        return f"Your message was empty. {FORMAT_HINT}{tools_note}"
    scanner = _scan(text)
    if scanner.calls:
        problems = [check_call(c, known, required) for c in scanner.calls]
        found = [p for p in problems if p]
        return "\n".join(dict.fromkeys(found)) or None
    for att in scanner.attempts:
        relevant = (
            att.container is not None
            or att.ok
            or _NAMEISH.search(att.source, att.start, att.start + 400)
            or any(k in att.source[att.start : att.start + 400] for k in known)
        )
        if not relevant:
            continue
        msg = _attempt_message(att, tools_note)
        if msg:
            return msg
    mentioned = [k for k in known if re.search(rf"(?<!\w){re.escape(k)}(?!\w)", text, re.I)]
    if mentioned:
        return (
            f"Your message mentions {mentioned[0]} but contains no tool call. "
            f"{FORMAT_HINT}{tools_note}"
        )
    return f"No tool call found: {FORMAT_HINT[0].lower()}{FORMAT_HINT[1:]}{tools_note}"
