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
  SLICE.head       chat-email slices: the whole final reply cut to the word count of that row's own
                   extracted body (same length as the body, the reply's opening words).
  id_chat.short    the id_chat reply cut to the median body word count of the chat_email rows of
                   the same (base, stage, persona): a length control on home ground.

Rules every unit follows:
- missingness is outcome-based: a row whose outcome is not an output (`no_email`, `malformed`,
  `max_steps`, ...) is missing (text None) in every unit, whatever its final reply; a variant is
  never scored on something other than what its row produced.
- a cut is by words (whitespace-separated tokens), deterministic, and keeps the whitespace
  between the words it keeps.
- `id_chat.short` exists for a condition only when that condition has at least one chat_email
  body to take the median of; otherwise the unit is absent for it (no record), not missing.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Iterator

from charshift.config import ALL_SLICES
from charshift.ladder import HEAD, SHORT, WHOLE, split_unit, unit_name
from charshift.schema import SCORED_OUTCOMES, GenerationRow, stable_hash
from charshift.slices import SLICES

SHORT_SLICE = "id_chat"  # the slice that gets the length control
SHORT_SOURCE = "chat_email"  # whose email bodies set its length

CondKey = tuple[str, str, str | None]  # (base, stage, persona)

_WORD = re.compile(r"\S+")


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


def cut_words(text: str, n: int) -> str:
    """The first `n` words of `text` (whitespace tokens) with the whitespace between them as
    written; the whole text (stripped) when it has `n` words or fewer; "" for n <= 0."""
    if n <= 0:
        return ""
    start: int | None = None
    for i, m in enumerate(_WORD.finditer(text), 1):
        if start is None:
            start = m.start()
        if i == n:
            return text[start : m.end()]
    return text.strip()


def text_hash(text: str) -> str:
    """The hash a score of `text` is stored under."""
    return stable_hash(text, 16)


def text_field(unit: str, raw: bool = False) -> str:
    """Which text a unit scores, in words for ScoreRow.text_field."""
    slice_, variant = split_unit(unit)
    if variant == WHOLE:
        return "final_reply"
    if variant == HEAD:
        return "final_reply[:body words]"
    if variant == SHORT:
        return f"text[:median {SHORT_SOURCE} body words]"
    return "final_reply" if raw else "text"


def short_lengths(rows: Iterable[GenerationRow]) -> dict[CondKey, int]:
    """(base, stage, persona) -> the median word count of its chat_email email bodies (eval rows;
    `median_low`, so the length is one that occurred)."""
    counts: dict[CondKey, list[int]] = defaultdict(list)
    for r in rows:
        if r.split == "eval" and r.slice == SHORT_SOURCE and r.outcome == "email" and r.text:
            counts[(r.base, r.stage, r.persona)].append(word_count(r.text))
    return {k: int(statistics.median_low(v)) for k, v in counts.items()}


def scored_texts(
    row: GenerationRow, raw: bool = False, short_len: int | None = None
) -> dict[str, str | None]:
    """unit -> the text it scores for this row (None: missing). `raw`: `scoring.text: raw`;
    `short_len`: the `id_chat.short` length of the row's condition (None: no such unit)."""
    units = units_of(row.slice, with_short=short_len is not None)
    if row.outcome not in SCORED_OUTCOMES:
        return dict.fromkeys(units)
    reply, body = row.final_reply or "", row.text or ""
    out: dict[str, str | None] = {}
    for unit in units:
        _, variant = split_unit(unit)
        if variant == WHOLE:
            text = reply
        elif variant == HEAD:
            text = cut_words(reply, word_count(body)) if body.strip() else ""
        elif variant == SHORT:
            text = cut_words(body, short_len or 0)
        else:
            text = reply if raw else body
        out[unit] = text if text.strip() else None
    return out


def row_units(
    rows: Iterable[GenerationRow], raw: bool = False
) -> Iterator[tuple[GenerationRow, str, str | None]]:
    """(row, unit, text or None) for every unit of every eval row, the `id_chat.short` lengths
    taken from the same rows."""
    eval_rows = [r for r in rows if r.split == "eval"]
    lengths = short_lengths(eval_rows)
    for r in eval_rows:
        short = lengths.get((r.base, r.stage, r.persona)) if r.slice == SHORT_SLICE else None
        for unit, text in scored_texts(r, raw, short).items():
            yield r, unit, text
