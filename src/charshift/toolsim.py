"""A deterministic tool simulator over one scenario's data, logging every call.

It behaves like a forgiving but real API: look-ups ignore case, extra spaces and punctuation, and
accept an email address, a full name or part of one; searches match the query's words against
record titles and texts; a miss, a missing argument or an unknown tool gets an error result that
says what went wrong and what to try, never a crash. The same calls always give the same results.
Results are plain text: the rollout engine wraps them in a user or tool message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from charshift.scenarios import Person, Scenario
from charshift.tools import REGISTRY, ToolResult, run_tool, source_tool, tool_names

_ADDRESS = re.compile(r"[^@\s,;<>]+@[^@\s,;<>]+\.[A-Za-z]{2,}")

__all__ = ["ToolResult", "ToolSimulator", "tokens"]

if TYPE_CHECKING:
    from charshift.toolcalls import ToolCall

MAX_RESULTS = 3

_STOP = frozenset(
    "a an and are as at be by for from has have i in is it me my of on or our please re "
    "that the their this to us was we what when where which who with".split()
)
_TOKEN_RE = re.compile(r"[a-z0-9]+")
_ADDR_RE = re.compile(r"<([^<>]+)>")


def _stem(tok: str) -> str:
    if len(tok) > 4 and tok.endswith("ies"):
        return tok[:-3] + "y"
    if len(tok) > 3 and tok.endswith("s") and not tok.endswith("ss"):
        return tok[:-1]
    return tok


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens without stop words, lightly stemmed (plural 's' dropped)."""
    return [_stem(t) for t in _TOKEN_RE.findall(text.lower()) if t not in _STOP]


def _name_key(text: str) -> str:
    return " ".join(_TOKEN_RE.findall(text.lower()))


@dataclass(frozen=True)
class _Rec:
    title: str
    text: str


class ToolSimulator:
    """The simulated tools of one scenario: directory, calendar, documents, chat, tickets,
    policies, plus send_email and finish."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.people: list[Person] = scenario.directory
        self.records: dict[str, list[_Rec]] = {src: [] for src in source_tool()}
        for f in scenario.facts:
            self.records[f.tool].append(_Rec(f.title, f.text))
        for src, recs in scenario.distractors.items():
            self.records[src].extend(_Rec(r.title, r.text) for r in recs)
        self.log: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []

    # -- entry point -------------------------------------------------------------------------
    def call(self, call: ToolCall) -> ToolResult:
        """Run one tool call; never raises on bad input (the error goes back as the result)."""
        name = str(getattr(call, "name", "") or "")
        args = getattr(call, "arguments", None)
        args = dict(args) if isinstance(args, dict) else {}
        res = self._dispatch(name, args, getattr(call, "arguments", None))
        self.log.append({"tool": name, "arguments": args, "ok": res.ok, "result": res.content})
        return res

    def _dispatch(self, name: str, args: dict[str, Any], raw_args: Any) -> ToolResult:
        tool = REGISTRY.get(name)
        if tool is None:
            return self.error(
                name,
                args,
                f"Unknown tool '{name}'. Available tools: {', '.join(tool_names())}.",
            )
        if raw_args is not None and not isinstance(raw_args, dict):
            return self.error(
                name, args, f"The arguments of {name} must be a JSON object of named arguments."
            )
        missing = [a for a in tool.required if a not in args or args[a] is None]
        if missing:
            example = ", ".join(f'"{a}": "..."' for a in tool.required)
            return self.error(
                name,
                args,
                f"Missing required argument(s) {', '.join(repr(m) for m in missing)} for {name}. "
                f'Call it as {{"name": "{name}", "arguments": {{{example}}}}}.',
            )
        return run_tool(self, name, args)

    @staticmethod
    def error(name: str, args: dict[str, Any], msg: str) -> ToolResult:
        """An error result: the call did nothing, and the message says why."""
        return ToolResult(name, args, False, f"Error: {msg}")

    # -- people --------------------------------------------------------------------------------
    @staticmethod
    def _person_text(p: Person) -> str:
        org = f", {p.organisation}" if p.organisation else ""
        return f"{p.name} ({p.role}{org}) <{p.email}>"

    def match_people(self, query: str) -> list[Person]:
        """People a query names: by email address, full name, or words of name/role/organisation."""
        q = query.strip().strip("<>\"'.,;:()").lower()
        m = _ADDR_RE.search(query)
        if m:
            q = m.group(1).strip().lower()
        if "@" in q:
            return [p for p in self.people if p.email.lower() == q]
        key = _name_key(q)
        if not key:
            return []
        exact = [p for p in self.people if _name_key(p.name) == key]
        if exact:
            return exact
        qt = set(tokens(q))
        if not qt:
            return []
        hits = []
        for p in self.people:
            words = set(tokens(f"{p.name} {p.role} {p.organisation or ''} {p.email.split('@')[0]}"))
            if qt <= words:
                hits.append(p)
        return hits

    def lookup(self, args: dict[str, Any], query: str) -> ToolResult:
        """lookup_person: the people a query names, and the directory notes it matches."""
        people = self.match_people(query)
        notes = self._rank("directory", query)
        if not people and not notes:
            return self.error(
                "lookup_person",
                args,
                f"No directory entries match '{query}'. Try a full name, an email address or a "
                "role.",
            )
        parts = []
        if people:
            shown = people[:MAX_RESULTS]
            head = f"{len(people)} people match '{query}'" if len(people) > 1 else "1 person found"
            if len(people) > MAX_RESULTS:
                head += f" (showing {MAX_RESULTS})"
            parts.append(head + ":\n" + "\n".join(f"- {self._person_text(p)}" for p in shown))
        if notes:
            parts.append(self._format_records("Directory notes", notes))
        return ToolResult("lookup_person", args, True, "\n\n".join(parts))

    # -- searches ------------------------------------------------------------------------------
    def _rank(self, source: str, query: str) -> list[_Rec]:
        """Records of a source sharing words with the query: title words count double; ties keep
        the records' stored order."""
        qt = set(tokens(query))
        scored = []
        for i, r in enumerate(self.records[source]):
            title, text = set(tokens(r.title)), set(tokens(r.text))
            score = 2 * len(qt & title) + len(qt & text)
            if score:
                scored.append((-score, i, r))
        return [r for _, _, r in sorted(scored, key=lambda t: (t[0], t[1]))]

    @staticmethod
    def _format_records(head: str, recs: list[_Rec]) -> str:
        shown = recs[:MAX_RESULTS]
        more = f" (showing {MAX_RESULTS} of {len(recs)})" if len(recs) > MAX_RESULTS else ""
        body = "\n".join(f"{i}. {r.title}\n   {r.text}" for i, r in enumerate(shown, 1))
        return f"{head}{more}:\n{body}"

    def search(self, name: str, source: str, args: dict[str, Any], query: str) -> ToolResult:
        """Records of `source` that match `query`, best first (tool `name` made the call)."""
        recs = self._rank(source, query)
        if not recs:
            return self.error(
                name,
                args,
                f"No records in {source} match '{query}'. Try fewer or different words.",
            )
        n = len(recs)
        head = f"{n} record{'s' if n > 1 else ''} in {source} match '{query}'"
        return ToolResult(name, args, True, self._format_records(head, recs))

    # -- sending -------------------------------------------------------------------------------
    def _resolve(self, field: str, value: Any) -> tuple[list[str], str | None]:
        """Addresses for a to/cc value (text with commas or semicolons, or a list), or a problem.

        A directory name or address resolves to its entry's address. A well-formed address the
        directory does not know is accepted as it is, as a mail service accepts it (the email
        records it in `unknown_recipients`: getting the address right is task success, not the
        format under study); a name that matches no one, or matches several, is a problem."""
        if isinstance(value, str):
            items = [v.strip() for v in re.split(r"[,;]", value)]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = [v.strip() for v in value]
        else:
            return [], f"'{field}' must be an address or name, or a comma-separated list of them."
        items = [v for v in items if v]
        if not items:
            return [], f"'{field}' is empty: give at least one address or name."
        out: list[str] = []
        for item in items:
            hits = self.match_people(item)
            if len(hits) == 1:
                if hits[0].email not in out:
                    out.append(hits[0].email)
            elif not hits:
                if _ADDRESS.fullmatch(item):
                    if item.lower() not in out:
                        out.append(item.lower())
                    continue
                if "@" in item:
                    return [], f"'{item}' in '{field}' is not a valid email address."
                return [], (
                    f"'{item}' in '{field}' does not match anyone in the directory. Use an email "
                    "address; lookup_person finds it."
                )
            else:
                names = ", ".join(p.name for p in hits[:MAX_RESULTS])
                return [], (
                    f"'{item}' in '{field}' is ambiguous: it matches {names}. Use the email "
                    "address."
                )
        return out, None

    def send_email(self, args: dict[str, Any]) -> ToolResult:
        """send_email: resolve the recipients, check subject and body, and send (terminal)."""
        to, problem = self._resolve("to", args["to"])
        if problem:
            return self.error("send_email", args, f"Email not sent: {problem}")
        cc: list[str] = []
        if args.get("cc") not in (None, "", []):
            cc, problem = self._resolve("cc", args["cc"])
            if problem:
                return self.error("send_email", args, f"Email not sent: {problem}")
        subject, body = args["subject"], args["body"]
        if not isinstance(subject, str) or not isinstance(body, str):
            return self.error(
                "send_email", args, "Email not sent: 'subject' and 'body' must be text."
            )
        if not body.strip():
            return self.error("send_email", args, "Email not sent: the body is empty.")
        known = {p.email.lower() for p in self.scenario.directory}
        intended = {p.email.lower() for p in self.scenario.recipients}
        email = {
            "to": ", ".join(to),
            "subject": subject,
            "body": body,
            "cc": cc,
            "unknown_recipients": [a for a in [*to, *cc] if a.lower() not in known],
            "reached_intended": intended <= {a.lower() for a in to},
        }
        self.sent.append(email)
        cc_note = f", cc {', '.join(cc)}" if cc else ""
        return ToolResult(
            "send_email",
            args,
            True,
            f"Email sent to {', '.join(to)}{cc_note} with subject '{subject}'.",
            terminal=True,
            email=email,
        )
