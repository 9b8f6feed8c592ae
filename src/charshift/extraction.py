"""Find the email inside a text, so the classifier scores the email and not the wrapper.

Why: when a chat model is asked to write an email, its reply usually wraps the email in chat
material ("Sure, here's a draft:", a Subject line, a closing "Let me know if you'd like any
changes!"). That wrapper is written in the model's chat voice, so scoring the whole reply would
mix chat-format persona into the "email" slice. We keep what an agent would have put into the
body of `send_email`: greeting ... sign-off and signature, and nothing around it. An agent puts
the same wrapper into send_email's body argument too, so a sent body goes through the same
function (`scored_email`, the one rule for "this is an email" and the one scored text, with
send_email's subject argument standing for a Subject line): the same text scores the same
whether it came as a chat reply or as a tool call.

Heuristics (line based, each a plain regex over one line, so no catastrophic backtracking):

1. Normalise line breaks. If a ``` fence holds an email, only that fence's content is used
   (the first such fence); otherwise fence marker lines are dropped. A block quoted with ``>``
   is unquoted.
2. Header lines (``Subject:``, ``To:``, ``Cc:``, ``Bcc:``, ``From:``, ``Date:``, ``Sent:``, ``Re:``,
   also as ``**Subject:**`` or ``### Subject:``), label lines (``Email:``, ``**Draft:**``,
   ``Version 1:``), markdown horizontal rules and preamble lines ("Sure, here's a draft:",
   "Certainly!", "Here is the email you asked for:") before the body are dropped; Subject and
   To are kept as fields of `EmailOut`.
3. The body starts at the first greeting line ("Dear ...,", "Hi Dana,", "Hello team!",
   "Good morning,", "To whom it may concern,", or a short "Name," line), or, without one,
   at the first line after the dropped head.
4. The body ends at the sign-off: the first closing line ("Best regards,", "Thanks!",
   "Sincerely,", "- Dana", or any short line ending in a comma followed by a name-like line)
   that is followed by a name or by the end. The signature block (up to five short lines) and
   a "P.S." paragraph stay; everything after (commentary such as "Let me know if you'd like
   any changes", "Feel free to adjust ...", "Note: ...") is dropped. Without a sign-off, the
   body ends before the first rule line or commentary paragraph.
5. No email (None): an empty reply, no greeting and no sign-off (unless a Subject header
   introduces a body of 15 words or more), a body under 8 words, or a short clarifying
   question back to the user ("Could you tell me who the recipient is?"). A refusal has no
   greeting/sign-off structure and so also gives None.

Everything inside the body is kept verbatim (markdown included): persona lives in the wording.

Cost: linear in the length of the reply. Only the first `MAX_CHARS` characters are read (an
email in a chat reply is a few thousand); each pass visits each line a bounded number of times
(a look-ahead over blank lines is done once per run of them), and every pattern is anchored to
one line. `WorkStats` (pass `stats=`) reports the lines visited and characters read, in the
units of the tool-call parser's budget.
"""

from __future__ import annotations

import re

from charshift.schema import EmailOut
from charshift.toolcalls import SCAN_CHARS_PER_UNIT, WorkStats

MIN_BODY_WORDS = 8
MIN_HEADLESS_WORDS = 15  # a body without greeting or sign-off needs a Subject and this many words
MAX_CHARS = 200_000

_FENCE = re.compile(r"^\s*(```|~~~)")
_RULE = re.compile(r"^\s*(?:(?:-\s*){3,}|(?:\*\s*){3,}|(?:_\s*){3,}|={3,})$")
# Header and label patterns apply to `_plain(line)` (markdown marks stripped at both ends), so
# they need no runs of optional markup that could make a regex backtrack.
_HEADER = re.compile(r"^(subject|to|cc|bcc|from|date|sent|re)[*_]{0,2}\s?:(.*)$", re.IGNORECASE)
_LABEL = re.compile(
    r"^(?:(?:the |your |final |revised |sample |example )?(?:email|e-mail|mail|message|draft|"
    r"body|letter|reply|response)(?: (?:draft|body|text|content|below))?|"
    r"(?:version|option|draft) \d+|email draft|draft email)"
    r"(?: ?\([^)]{0,40}\))?[*_]{0,2}:?$",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(
    r"^(?:sure|certainly|of course|absolutely|okay|ok|alright|all right|great|no problem|"
    r"happy to|glad to|here(?:'s|’s| is| are)|below is|below you|i(?:'ve|’ve| have) "
    r"(?:drafted|written|prepared|put together|created|composed)|i'd be (?:happy|glad)|"
    r"as requested|understood|got it|yes|done)\b",
    re.IGNORECASE,
)
_PREAMBLE_TOPIC = re.compile(
    r"\b(?:here(?:'s|’s| is| are)|below|draft|e-?mail|version|message|note|letter)\b", re.I
)
_GREETING = re.compile(
    r"^(?:dear|dearest|hi|hello|hey|hiya|greetings|good (?:morning|afternoon|evening|day)|"
    r"to whom it may concern|salutations|howdy|ahoy|yo)\b",
    re.IGNORECASE,
)
_NAME_GREETING = re.compile(r"^[A-Z][\w'.-]*(?: [A-Z][\w'.-]*){0,3},$")
_NOT_A_NAME = re.compile(
    r"^(?:sure|certainly|okay|ok|absolutely|yes|no|well|so|great|alright|understood|"
    r"however|also|thanks|thank you|of course|unfortunately|hopefully|first|finally)\b",
    re.IGNORECASE,
)
_ABBREV = re.compile(r"\b(?:Mr|Mrs|Ms|Mx|Dr|Prof|St|Jr|Sr|Rev|Hon)\.", re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"[.!?:;]\s+\S")
_CLOSING = re.compile(
    r"^(?:(?:best|kind|kindest|warm|warmest|warmly|with)\s+(?:regards|wishes|thanks)|"
    r"best|regards|sincerely(?: yours)?|yours(?: truly| sincerely| faithfully| always)?|"
    r"(?:many |warm |big )?thanks(?: again| so much| a lot| in advance)?|"
    r"thank you(?: again| so much| kindly| in advance)?|cheers|all the best|warmly|"
    r"respectfully(?: yours)?|take care|talk soon|speak soon|with (?:gratitude|appreciation|"
    r"love|thanks|best wishes)|love|hugs|fondly|cordially|until next time|see you soon)\b",
    re.IGNORECASE,
)
_DASH_NAME = re.compile(r"^[—–-]{1,2}\s*[A-Z\[][\w.'\]\- ]{0,40}$")
_COMMENTARY = re.compile(
    r"^(?:\(?note\b|please note|let me know|just let me know|feel free|i hope (?:this|that)|"
    r"hope (?:this|that) helps|this (?:draft|version|should|keeps|strikes)|"
    r"the (?:email|draft|tone) (?:above|keeps|should|is (?:concise|polite|professional|warm))|"
    r"the tone|would you like|do you want|"
    r"want me to|shall i|should i|if you(?:'d|’d| would)? (?:like|want|need|prefer)|if needed|"
    r"you (?:can|may|might|could) (?:adjust|modify|tweak|change|customi[sz]e|edit|"
    r"personali[sz]e|replace|add|also)|i(?:'ve|’ve| have) (?:kept|made|tried|added|included|"
    r"used|written|drafted|aimed|focused|adjusted|chosen)\b|i (?:kept|aimed|tried to keep)\b|"
    r"alternatively|key (?:points|elements|"
    r"changes|features)|changes made|explanation|tips?\b|remember to|make sure to|"
    r"replace (?:\[|the )|happy to help|is there anything|anything else|i can also|"
    r"let's|does this|how does this)",
    re.IGNORECASE,
)
_PS = re.compile(r"^(?:p\.?\s?p\.?\s?s|p\.?\s?s)\b[.:]?", re.IGNORECASE)
_CLARIFY = re.compile(
    r"\b(?:(?:could|can|would) you (?:please )?(?:provide|share|tell|give|clarify|confirm|"
    r"let me know|specify)|what (?:would|should|do) you (?:like|want)|who (?:is|should) the "
    r"(?:email|recipient)|before i (?:write|draft)|i need (?:a bit )?more (?:information|details))",
    re.IGNORECASE,
)


class _Work:
    """Work of one extraction: a unit per line visit, plus its characters in scan units.
    Counted per pass over a run of lines (a per-line call would cost more than the work)."""

    def __init__(self) -> None:
        self.ticks = 0

    def lines(self, lines: list[str], visits: int = 1) -> None:
        self.ticks += visits * (SCAN_CHARS_PER_UNIT * len(lines) + sum(map(len, lines)))

    def chars(self, n: int) -> None:
        self.ticks += SCAN_CHARS_PER_UNIT + n

    def report(self, stats: WorkStats | None) -> None:
        if stats is not None:
            stats.units = -(-self.ticks // SCAN_CHARS_PER_UNIT)
            stats.limit = 0  # no budget: the input is cut at MAX_CHARS
            stats.exhausted = False


def _plain(line: str) -> str:
    """A line without surrounding whitespace and markdown emphasis/heading/quote marks."""
    return line.strip().strip("*_#> \t").strip()


def _is_rule(line: str) -> bool:
    return bool(_RULE.match(line))


def _is_greeting(line: str) -> bool:
    p = _plain(line)
    if not p or len(p) > 80:
        return False
    if _GREETING.match(p):
        body = _ABBREV.sub("X", p)
        if _SENTENCE_BREAK.search(body) or _PREAMBLE_TOPIC.search(p):
            return False
        return p[-1] in ",.:!—-" or p[-1].isalnum()
    return bool(_NAME_GREETING.match(p)) and not _NOT_A_NAME.match(p) and not _CLOSING.match(p)


def _is_name_like(line: str) -> bool:
    p = _plain(line)
    if not p or len(p) > 60 or len(p.split()) > 6 or _COMMENTARY.match(p):
        return False
    if p[-1] in "?:,;!" or (p[-1] == "." and len(p.split()) > 4):
        return False
    return p[0].isupper() or p[0] in "[(<{" or p[0].isdigit()


def _is_signature_line(line: str) -> bool:
    p = _plain(line)
    if not p or len(p) > 80 or len(p.split()) > 10 or _COMMENTARY.match(p):
        return False
    return p[-1] not in "?:" and not re.search(r"[.!?]\s+[A-Z]", p)


def _closing_kind(lines: list[str], i: int) -> int:
    """0: not a sign-off; 1: a closing phrase; 2: a sign-off followed by a name (or a '- Name')."""
    p = _plain(lines[i])
    if not p or len(p) > 50 or len(p.split()) > 7:
        return 0
    if _DASH_NAME.match(p):
        return 2
    nxt = _next_nonblank(lines, i + 1, max_gap=1)
    followed_by_name = nxt is not None and _is_name_like(lines[nxt])
    if _CLOSING.match(p):
        if p[-1] == "." and len(p.split()) > 2:
            return 0  # "Thank you for your patience." is a sentence
        if p[-1] not in ",!.—-" and not p[-1].isalnum():
            return 0
        return 2 if followed_by_name else 1
    if p.endswith(",") and followed_by_name and len(p.split()) <= 6:
        return 2  # persona sign-offs: "With a sarcastic salute,\nDana"
    return 0


def _next_nonblank(lines: list[str], i: int, max_gap: int) -> int | None:
    gap = 0
    while i < len(lines):
        if lines[i].strip():
            return i
        gap += 1
        if gap > max_gap:
            return None
        i += 1
    return None


def _unquote(lines: list[str], work: _Work) -> list[str]:
    work.lines(lines, visits=4)  # rstrip, two filters, perhaps the unquoting
    nonblank = [ln for ln in lines if ln.strip()]
    quoted = [ln for ln in nonblank if ln.lstrip().startswith(">")]
    if nonblank and len(quoted) >= 0.6 * len(nonblank):
        return [re.sub(r"^\s*>\s?", "", ln) for ln in lines]
    return lines


def _fenced_blocks(lines: list[str], work: _Work) -> tuple[list[list[str]], list[str]]:
    """The contents of ``` fences (an unclosed one runs to the end), and the lines outside."""
    blocks: list[list[str]] = []
    outside: list[str] = []
    current: list[str] | None = None
    work.lines(lines)
    for ln in lines:
        if _FENCE.match(ln):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
            continue
        (outside if current is None else current).append(ln)
    if current is not None:
        blocks.append(current)
    return blocks, outside


def _find_email(lines: list[str], work: _Work, given_subject: str | None) -> EmailOut | None:
    lines = _unquote([ln.rstrip() for ln in lines], work)
    n = len(lines)
    subject: str | None = None
    to: str | None = None

    greeting = next((i for i, ln in enumerate(lines) if _is_greeting(ln)), None)
    work.lines(lines if greeting is None else lines[: greeting + 1])
    # The head: headers, labels, rules, blank lines and preamble before the body.
    i, seen = 0, 0
    while i < n and (greeting is None or i < greeting):
        raw = lines[i]
        p = _plain(raw)
        h = _HEADER.match(p)
        if h:
            field, value = h.group(1).lower(), h.group(2).strip().strip("*_ ").strip()
            if field == "subject" and subject is None:
                subject = value or None
            elif field == "to" and to is None:
                to = value or None
        elif p and not _is_rule(raw) and not _LABEL.match(p):
            preamble = seen < 2 and _PREAMBLE.match(p) and len(p) < 300
            preamble = preamble and (
                p.endswith(":") or len(p.split()) <= 3 or bool(_PREAMBLE_TOPIC.search(p))
            )
            if not preamble and greeting is None:
                break
            seen += 1
        i += 1
    work.lines(lines[:i])
    start = greeting if greeting is not None else i
    if start >= n:
        return None

    end, signed = _body_end(lines, start, work)
    if end < start:
        return None
    body = "\n".join(lines[start : end + 1]).strip()
    work.chars(4 * len(body))  # join, strip, split, search
    if not _valid(body, greeting is not None, signed, subject or given_subject):
        return None
    return EmailOut(to=to, subject=subject, body=body)


def _body_end(lines: list[str], start: int, work: _Work) -> tuple[int, bool]:
    """Index of the body's last line, and whether it ends with a sign-off."""
    n = len(lines)
    weak: int | None = None
    signoff: int | None = None
    last = start
    for i in range(start + 1, n):
        last = i
        kind = _closing_kind(lines, i)
        if kind == 2:
            signoff = i
            break
        if kind == 1:  # looks ahead over the blank lines after it, once per run of them
            after = _next_nonblank(lines, i + 1, max_gap=n)
            work.lines(lines[i + 1 : n if after is None else after + 1])
            if after is None or _COMMENTARY.match(_plain(lines[after])) or _is_rule(lines[after]):
                signoff = i
                break
            weak = i
    work.lines(lines[start + 1 : last + 1], visits=3)  # each line, and `_closing_kind`'s look-ahead
    if signoff is None and weak is not None:
        signoff = weak
    if signoff is not None:
        return _signature_end(lines, signoff, work), True
    # No sign-off: paragraphs until a rule line or a commentary paragraph.
    end = start
    i = start + 1
    while i < n:
        line = lines[i]
        if _is_rule(line):
            break
        if line.strip():
            para_start = not lines[i - 1].strip()
            if para_start and _COMMENTARY.match(_plain(line)):
                break
            end = i
        i += 1
    work.lines(lines[start + 1 : i + 1])
    return end, False


def _signature_end(lines: list[str], signoff: int, work: _Work) -> int:
    n = len(lines)
    end = signoff
    j = signoff + 1
    if j < n and not lines[j].strip() and j + 1 < n and _is_name_like(lines[j + 1]):
        j += 1  # "Best,\n\nDana"
    count = 0
    while j < n and lines[j].strip() and count < 5 and _is_signature_line(lines[j]):
        end = j
        j += 1
        count += 1
    # A P.S. paragraph belongs to the email.
    k = _next_nonblank(lines, end + 1, max_gap=2)
    if k is not None and _PS.match(_plain(lines[k])):
        end = k
        while end + 1 < n and lines[end + 1].strip() and not _is_rule(lines[end + 1]):
            end += 1
    work.lines(lines[signoff : end + 4])
    return end


def _valid(body: str, greeted: bool, signed: bool, subject: str | None) -> bool:
    words = len(body.split())
    if words < MIN_BODY_WORDS:
        return False
    if not greeted and not signed and not (subject and words >= MIN_HEADLESS_WORDS):
        return False
    if _CLARIFY.search(body) and words < 80 and body.rstrip().endswith("?"):
        return False
    return True


def _prepare(text: str) -> list[str]:
    return text[:MAX_CHARS].replace("\r\n", "\n").replace("\r", "\n").split("\n")


def extract_email(
    text: str, *, subject: str | None = None, stats: WorkStats | None = None
) -> EmailOut | None:
    """The email in a text (body, plus Subject/To where given), or None. Never raises.

    `subject`: a subject given outside the text (send_email's `subject` argument); it counts as
    a Subject header would (for a body without greeting or sign-off). Time is linear in
    len(text); `stats`, when given, receives the work spent."""
    work = _Work()
    try:
        return _extract(text, work, subject)
    except Exception:  # extraction must never crash a rollout
        return None
    finally:
        work.report(stats)


def _extract(text: str, work: _Work, subject: str | None = None) -> EmailOut | None:
    if not isinstance(text, str) or not text or text.isspace():
        return None
    work.chars(4 * min(len(text), MAX_CHARS))  # cut, two replaces, split
    lines = _prepare(text)
    blocks, outside = _fenced_blocks(lines, work)
    for block in blocks:
        found = _find_email(block, work, subject)
        if found is not None:
            if found.subject is None:  # a Subject line given outside the fence
                found.subject = _subject_only(outside, work)
            return found
    return _find_email(outside, work, subject)


def _subject_only(lines: list[str], work: _Work) -> str | None:
    work.lines(lines)
    for ln in lines:
        h = _HEADER.match(_plain(ln))
        if h and h.group(1).lower() == "subject":
            return h.group(2).strip().strip("*_ ").strip() or None
    return None


def extract_email_body(text: str, *, stats: WorkStats | None = None) -> str | None:
    """The email body (greeting ... sign-off and signature) in a chat reply, or None."""
    found = extract_email(text, stats=stats)
    return found.body if found is not None else None


def looks_like_email(text: str, *, stats: WorkStats | None = None) -> bool:
    """Whether the text holds an email by the heuristics above."""
    return extract_email(text, stats=stats) is not None


def scored_email(text: str | None, *, subject: str | None = None) -> EmailOut | None:
    """The email a text holds, as it is scored, whichever way it was produced: a chat reply, or
    the body sent with send_email (`subject`: its subject argument). One rule for both: the
    wrapper is stripped (`extract_email`: preamble, header and label lines, closing commentary)
    and the structure is checked (a greeting or a sign-off, or a subject and
    MIN_HEADLESS_WORDS words), and the body must pass `is_email_body`. None: not an email."""
    if not isinstance(text, str):
        return None
    found = extract_email(text, subject=subject or None)
    if found is None or not is_email_body(found.body):
        return None
    return found


def is_email_body(body: str | None) -> bool:
    """Whether a body counts as an email, whichever way it was produced: a body extracted from a
    chat reply and a body sent with send_email pass the same test. It must have at least
    MIN_BODY_WORDS words (whitespace tokens) and must not be a tool call (a JSON call, or a
    fenced or tagged one, e.g. a send_email call pasted into the body)."""
    if not isinstance(body, str) or len(body.split()) < MIN_BODY_WORDS:
        return False
    head = body.lstrip()
    if head.startswith(("{", "[", "```", "<tool_call", "<function")):
        from charshift.toolcalls import parse_tool_calls

        if parse_tool_calls(head[:MAX_CHARS]):
            return False
    return True
