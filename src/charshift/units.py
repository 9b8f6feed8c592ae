"""Scoring units: which text of a stored generation row each unit scores (pure).

A unit is a slice (scored on its default text) or a scoring variant `SLICE.VARIANT` (see
`charshift.ladder`). The variants are computed from the stored rows at scoring time; they need no
extra generation:

  SLICE (default)  the row's output (`slices.SliceDef.output`): id, scenario_chat and most
                   scaffold slices: the whole reply; email slices: the email body (extracted
                   from a chat reply, or sent with send_email); structured_form: the answer's
                   free-text fields; agentic_actions: the bodies it sent and its finish message.
                   With `scoring.text: raw`, the whole final reply instead.
  SLICE.whole      chat-email slices: the whole final reply.
  SLICE.head       chat-email slices: the whole final reply cut to the length of that row's own
                   extracted body (the reply's opening, at the body's length).
  id_chat.short    the id_chat reply cut to a chat_email body length of the same (base, stage,
                   persona), matched by rank so that the cut lengths follow the distribution of
                   the body lengths (`short_targets`): a length control on home ground.

Lengths are counted by a `LengthCounter` the caller passes in, per base: the scoring step passes
the scorer's own tokenizer (`charshift.lengths`), so "the same length" is the same number of the
tokens the classifier reads; a scorer without a tokenizer (the TF-IDF lexical probe) counts
words (`WORDS`). Each scored unit carries its length record (`UnitText.length`: the counter's
name, the length, and for a cut its target and how it was cut), which the score rows store.

A cut (`cut_to`) keeps the text's opening, up to the end of a word: at a sentence end (., !, ?
or a line break) when one lies within `SENTENCE_WINDOW` (10%) of the target length, else at the
word end nearest the target, else (no word end that close: a run of text without spaces) exactly
at the target token. A text no longer than its target is kept whole: for `id_chat.short` that
is a reply shorter than the body length matched to it, kept whole and recorded with cut "short"
(it cannot be lengthened, and dropping it would select replies by length, which the persona
shapes).

What each control changes besides length (the rung labels in `charshift.ladder` say the same):
`.head` keeps the reply's opening, so it also drops the reply's end (the rest of the email, its
sign-off, closing chat); `id_chat.short` likewise drops the end of every reply it cuts.

Rules every unit follows:
- missingness is outcome-based: a row whose outcome is not an output (`no_email`, `malformed`,
  `max_steps`, ...) is missing (text None) in every unit, whatever its final reply; a variant is
  never scored on something other than what its row produced.
- a cut is deterministic and keeps the text between the tokens it keeps as written.
- `id_chat.short` exists for a condition only when that condition has at least one chat_email
  body to take a length from; otherwise the unit is absent for it (no record), not missing.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from charshift.config import ALL_SLICES
from charshift.ladder import BEHAVIOUR, HEAD, SHORT, WHOLE, split_unit, unit_name
from charshift.schema import SCORED_OUTCOMES, GenerationRow, stable_hash
from charshift.slices import SLICES

SHORT_SLICE = "id_chat"  # the slice that gets the length control
SHORT_SOURCE = "chat_email"  # whose email bodies set its length
SENTENCE_WINDOW = 0.10  # a sentence end this close to the target (relative) is preferred

CondKey = tuple[str, str, str | None]  # (base, stage, persona)

_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile("[.!?\u2026][\"'\u201d\u2019)\\]*_]*$")  # closers may follow


class LengthCounter(Protocol):
    """How long a text is, for the length controls. `name` says in what (it is recorded with
    every score); `starts(text)` gives the character offset at which each of the text's tokens
    starts, ascending (special tokens such as [CLS] are not counted)."""

    name: str

    def starts(self, text: str) -> Sequence[int]: ...


@dataclass(frozen=True)
class WordCounter:
    """Whitespace-separated words: the counter of a scorer without a tokenizer."""

    name: str = "words"

    def starts(self, text: str) -> list[int]:
        return [m.start() for m in _WORD.finditer(text)]


WORDS = WordCounter()


@dataclass(frozen=True)
class Cut:
    """A text cut to `target` counter units: what is kept, its length, and how it was cut:
    "sentence" / "word" / "token" (see the module doc), "whole" (the text has exactly `target`
    units) or "short" (fewer than `target`: kept whole)."""

    text: str
    length: int
    target: int
    kind: str


@dataclass(frozen=True)
class UnitText:
    """One unit of one row: the text it scores (None: missing) and its length record."""

    row: GenerationRow
    unit: str
    text: str | None
    length: dict[str, Any] | None = None


def units_of(slice_: str, with_short: bool = True) -> list[str]:
    """The units a row of `slice_` is scored as by a text scorer: its slice first, then its
    text variants (the registry's, `charshift.slices`; judge-only variants are not text)."""
    entry = SLICES.get(slice_)
    variants = entry.text_variants if entry else ()
    return [slice_] + [unit_name(slice_, v) for v in variants if v != SHORT or with_short]


def unit_order(slices: Iterable[str] = ALL_SLICES) -> list[str]:
    """Every unit of `slices`, in the slices' order, each slice followed by its variants."""
    return [u for s in slices for u in units_of(s)]


def word_count(text: str) -> int:
    """Whitespace-separated tokens."""
    return len(text.split())


def cut_to(text: str, target: int, counter: LengthCounter = WORDS) -> Cut:
    """The opening of `text` cut to about `target` units of `counter` (see the module doc):
    a sentence end within `SENTENCE_WINDOW` of the target (the nearest; ties: the shorter), else
    the nearest word end, else the exact token. Linear in the text (a bisection per word)."""
    starts = list(counter.starts(text))
    n = len(starts)
    if n <= target:
        return Cut(text.strip(), n, target, "whole" if n == target else "short")
    if target <= 0:
        return Cut("", 0, target, "word")
    lo, hi = math.ceil(target * (1 - SENTENCE_WINDOW)), math.floor(target * (1 + SENTENCE_WINDOW))
    best_sentence: tuple[int, int, int] | None = None  # (distance, length, end)
    best_word: tuple[int, int, int] | None = None
    words = list(_WORD.finditer(text))
    for i, m in enumerate(words):
        k = bisect.bisect_left(starts, m.end())
        cand = (abs(k - target), k, m.end())
        if k > 0 and (best_word is None or cand < best_word):
            best_word = cand
        following = text[m.end() : words[i + 1].start()] if i + 1 < len(words) else "\n"
        if lo <= k <= hi and (_SENTENCE_END.search(m.group()) or "\n" in following):
            best_sentence = cand if best_sentence is None or cand < best_sentence else best_sentence
        if k > hi:
            break
    if best_sentence is not None:
        return Cut(text[: best_sentence[2]].strip(), best_sentence[1], target, "sentence")
    if best_word is not None and lo <= best_word[1] <= hi:
        return Cut(text[: best_word[2]].strip(), best_word[1], target, "word")
    return Cut(text[: starts[target]].strip(), target, target, "token")


def text_hash(text: str) -> str:
    """The hash a score of `text` is stored under."""
    return stable_hash(text, 16)


def text_field(unit: str, raw: bool = False) -> str:
    """Which text a unit scores, in words for ScoreRow.text_field."""
    slice_, variant = split_unit(unit)
    if variant == WHOLE:
        return "final_reply"
    if variant == HEAD:
        return "final_reply[:body length]"
    if variant == SHORT:
        return f"text[:rank-matched {SHORT_SOURCE} body length]"
    if variant == BEHAVIOUR:
        return "messages (the agent's actions)"
    return "final_reply" if raw else "text"


def has_output(row: GenerationRow) -> bool:
    """Whether the row produced something to score (its outcome is an output)."""
    return row.outcome in SCORED_OUTCOMES


class _Lengths:
    """`counter.starts` of each distinct text, computed once (a body is counted for its own
    unit, for its `.head` target and for the `id_chat.short` targets)."""

    def __init__(self, counter: LengthCounter) -> None:
        self.counter = counter
        self._seen: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self._seen.get(text)
        if n is None:
            n = self._seen[text] = len(self.counter.starts(text))
        return n


def short_targets(rows: Iterable[GenerationRow], counter: LengthCounter = WORDS) -> dict[str, int]:
    """Key of each id_chat eval row with a reply -> the length its `id_chat.short` cut aims at.

    Per (base, stage, persona): the replies, sorted by length (ties by key), are matched by rank
    to the sorted lengths of the condition's chat_email bodies: reply r of n gets the body length
    at quantile (r + 0.5) / n (the body at index floor((r + 0.5) m / n) of m), so the targets
    follow the bodies' distribution, whatever the two counts. Matching sorted to sorted leaves
    the fewest replies shorter than their target (any other matching that fits every reply also
    fits this one). A row without a reply gets 0 (its unit is missing); a condition without a
    chat_email body gets no targets (the unit is absent for it)."""
    return _short_targets(rows, _Lengths(counter))


def _short_targets(rows: Iterable[GenerationRow], length: _Lengths) -> dict[str, int]:
    bodies: dict[CondKey, list[int]] = defaultdict(list)
    replies: dict[CondKey, list[GenerationRow]] = defaultdict(list)
    for r in rows:
        if r.split != "eval":
            continue
        cond = (r.base, r.stage, r.persona)
        if r.slice == SHORT_SOURCE and has_output(r) and (r.text or "").strip():
            bodies[cond].append(length(r.text or ""))
        elif r.slice == SHORT_SLICE:
            replies[cond].append(r)
    out: dict[str, int] = {}
    for cond, reps in replies.items():
        b = sorted(bodies.get(cond, ()))
        if not b:
            continue
        ranked = sorted(
            (length(r.text or ""), r.key) for r in reps if has_output(r) and (r.text or "").strip()
        )
        out.update((r.key, 0) for r in reps)  # no reply: the unit is missing
        for rank, (_, key) in enumerate(ranked):
            out[key] = b[(2 * rank + 1) * len(b) // (2 * len(ranked))]
    return out


def _record(counter: LengthCounter, text: str, length: _Lengths, cut: Cut | None) -> dict[str, Any]:
    """The length record a score row stores: the counter, the length, and for a cut its target
    and how it was cut."""
    if cut is None:
        return {"counter": counter.name, "length": length(text)}
    return {"counter": counter.name, "length": cut.length, "target": cut.target, "cut": cut.kind}


def scored_texts(
    row: GenerationRow,
    raw: bool = False,
    short_target: int | None = None,
    counter: LengthCounter = WORDS,
) -> dict[str, str | None]:
    """unit -> the text it scores for this row (None: missing). `raw`: `scoring.text: raw`;
    `short_target`: the row's `id_chat.short` length (`short_targets`; None: no such unit)."""
    units = _unit_texts(row, raw, short_target, _Lengths(counter))
    return {u.unit: u.text for u in units}


def _unit_texts(
    row: GenerationRow, raw: bool, short_target: int | None, length: _Lengths
) -> list[UnitText]:
    units = units_of(row.slice, with_short=short_target is not None)
    if not has_output(row):
        return [UnitText(row, unit, None) for unit in units]
    reply, body = row.final_reply or "", row.text or ""
    out = []
    for unit in units:
        _, variant = split_unit(unit)
        cut: Cut | None = None
        if variant == WHOLE:
            text = reply
        elif variant == HEAD:
            cut = cut_to(reply, length(body), length.counter) if body.strip() else None
            text = cut.text if cut else ""
        elif variant == SHORT:
            cut = cut_to(body, short_target or 0, length.counter)
            text = cut.text
        else:
            text = reply if raw else body
        if not text.strip():
            out.append(UnitText(row, unit, None))
            continue
        out.append(UnitText(row, unit, text, _record(length.counter, text, length, cut)))
    return out


def _lone_surrogate(r: GenerationRow) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in (r.text or "") + (r.final_reply or ""))


def unit_texts(
    rows: Iterable[GenerationRow],
    raw: bool = False,
    counters: Mapping[str, LengthCounter] | None = None,
) -> Iterator[UnitText]:
    """Every unit of every eval row, with the text it scores and its length record.
    `counters`: base -> the counter of its scorer (default `WORDS`); the `id_chat.short`
    targets come from the same rows (`short_targets`), per base with its own counter."""
    # a stored text holding a lone surrogate (a damaged or hand-edited line) is one no tokenizer
    # can take: its row has no units here (the score step names it; the report counts it missing)
    eval_rows = [r for r in rows if r.split == "eval" and not _lone_surrogate(r)]
    by_base: dict[str, list[GenerationRow]] = defaultdict(list)
    for r in eval_rows:
        by_base[r.base].append(r)
    lengths = {b: _Lengths((counters or {}).get(b, WORDS)) for b in by_base}
    targets = {b: _short_targets(rs, lengths[b]) for b, rs in by_base.items()}
    for r in eval_rows:
        short = targets[r.base].get(r.key) if r.slice == SHORT_SLICE else None
        yield from _unit_texts(r, raw, short, lengths[r.base])


def cut_summary(items: Iterable[UnitText]) -> dict[str, dict[str, int]]:
    """unit -> how its texts were cut (`Cut.kind` -> count), for the units that cut."""
    out: dict[str, dict[str, int]] = {}
    for u in items:
        kind = (u.length or {}).get("cut")
        if kind:
            per = out.setdefault(u.unit, {})
            per[kind] = per.get(kind, 0) + 1
    return out


def row_units(
    rows: Iterable[GenerationRow],
    raw: bool = False,
    counters: Mapping[str, LengthCounter] | None = None,
) -> Iterator[tuple[GenerationRow, str, str | None]]:
    """(row, unit, text or None) for every unit of every eval row (`unit_texts` without the
    length records)."""
    for u in unit_texts(rows, raw, counters):
        yield u.row, u.unit, u.text
