"""Reading a judge's answer: `parse_answer(text, mode, labels) -> Answer | None` (pure).

The judge is asked for one JSON object, `{"score": 1-5, "rationale": "..."}` (Likert) or
`{"persona": "<label or none>", "rationale": "..."}` (identify). What it writes is model output,
so it is read as data, leniently and in time linear in its length:

- every JSON object in the answer, fenced, tagged or bare in prose, with the tool-call parser's
  lenient reader (`toolcalls.json_objects`: raw newlines in strings, single quotes, trailing
  commas, Python literals); the objects that hold a verdict key must all agree, else the answer
  is ambiguous (None);
- where no object holds one (an answer cut off inside its rationale), a `"score": 4` or
  `"persona": "humor"` written as a key and value anywhere, again only when every such pair
  agrees;
- an answer that is nothing but the verdict (`4`, `humor`).

A Likert verdict is a number from 1 to 5 (a string such as "4" or "4/5" is read; 0, 6, true,
NaN are not); an identify verdict is one of the labels or "none" (case, spaces and quotes
aside). Anything else is None: unparseable, never a guess.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from charshift.schema import JUDGE_NONE
from charshift.toolcalls import json_objects

SCORE_KEYS = ("score", "rating")
LABEL_KEYS = ("persona", "label", "answer", "score")
RATIONALE_KEYS = ("rationale", "reason", "reasoning", "explanation")
LIKERT_MIN, LIKERT_MAX = 1.0, 5.0
_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:(?:/|out of)\s*5)?\s*\Z")
_SCORE_PAIR = re.compile(r"""["']?(?:score|rating)["']?\s*[:=]\s*["']?([0-9]+(?:\.[0-9]+)?)""")
_LABEL_PAIR = re.compile(r"""["']?(?:persona|label|answer)["']?\s*[:=]\s*["']?([A-Za-z_]+)""")
_TRIM = " \t\r\n\"'`.,;:!*()[]{}<>"


@dataclass(frozen=True)
class Answer:
    """A judge's parsed answer: the verdict (a Likert number, or a label) and its rationale."""

    verdict: float | str
    rationale: str | None


def likert_value(v: Any) -> float | None:
    """A Likert score from a JSON value: a number in [1, 5], or a string that writes one."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        x = float(v)
    elif isinstance(v, str) and len(v) <= 40 and (m := _NUMBER.match(v)):
        x = float(m.group(1))
    else:
        return None
    return x if math.isfinite(x) and LIKERT_MIN <= x <= LIKERT_MAX else None


def label_value(v: Any, labels: Sequence[str]) -> str | None:
    """An identify verdict from a JSON value: one of `labels` or "none", as written."""
    if not isinstance(v, str) or len(v) > 200:
        return None
    word = v.strip(_TRIM).lower()
    known = {lab.lower(): lab for lab in labels}
    known[JUDGE_NONE] = JUDGE_NONE
    return known.get(word)


def _verdict(obj: dict[str, Any], mode: str, labels: Sequence[str]) -> float | str | None:
    keys = SCORE_KEYS if mode == "likert" else LABEL_KEYS
    for k in keys:
        if k in obj:
            return likert_value(obj[k]) if mode == "likert" else label_value(obj[k], labels)
    return None


def _rationale(obj: dict[str, Any]) -> str | None:
    for k in RATIONALE_KEYS:
        if isinstance(obj.get(k), str):
            return obj[k]
    return None


def _agreed(values: list[Any]) -> Any | None:
    """The one value every entry holds; None where there is none or they disagree."""
    return values[0] if values and all(v == values[0] for v in values) else None


def parse_answer(text: str, mode: str, labels: Sequence[str]) -> Answer | None:
    """A judge's answer (see the module doc); None when it holds no verdict or several."""
    if not isinstance(text, str) or not text.strip():
        return None
    found = [(v, o) for o in json_objects(text) if (v := _verdict(o, mode, labels)) is not None]
    if found:
        verdict = _agreed([v for v, _ in found])
        return None if verdict is None else Answer(verdict, _rationale(found[0][1]))
    pairs = _SCORE_PAIR if mode == "likert" else _LABEL_PAIR
    read = [
        likert_value(m.group(1)) if mode == "likert" else label_value(m.group(1), labels)
        for m in pairs.finditer(text)
    ]
    if read:
        verdict = _agreed(read)
        return None if verdict is None else Answer(verdict, None)
    bare = likert_value(text) if mode == "likert" else label_value(text, labels)
    return None if bare is None else Answer(bare, None)
