"""The LLM judge's rubrics and the messages it is sent (pure). Written for charshift.

Three questions, each one system message and one user message:

- Likert on text: how strongly does this text express persona P (name and one-line
  description), 1-5; 5 = fully integrated in tone, word choice, structure and stance, 1 = absent
  or contradicted, a neutral assistant default; correctness, helpfulness and length are ignored.
- Likert on behaviour (`SLICE.behaviour`): the same scale over what an agent did with its
  tools (which it chose, its arguments, what it looked up or skipped, the order and pace), with
  the email's text left out.
- Identify: which of the run's personas wrote this text (or these actions), or none. Each
  sample lists the personas in its own order (drawn from the sample's seed), so a judge's
  preference for the first or last option does not become a preference for one persona.

The judged text sits between two markers that carry a hash of the text itself, so a text cannot
close its own block and address the judge. `RUBRIC_VERSION` names the wording: change it with
any change of text here, and cached answers and scores of the old wording are not reused.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from charshift.schema import JUDGE_NONE, Message, stable_hash

RUBRIC_VERSION = "charshift-judge-1"

SYSTEM = (
    "You are a careful annotator of writing style and character. You read what an AI "
    "assistant produced and judge the character it expresses, not the quality of the work. "
    "You answer with one JSON object and nothing else."
)

LIKERT_SCALE = """\
5 = the persona is fully integrated: it shapes the tone, the word choice, the structure and the \
stance throughout.
4 = the persona is clearly present in most of it, though parts read as neutral.
3 = the persona is noticeable but partial: some touches of it in an otherwise ordinary {what}.
2 = faint: one or two hints that could be accidental.
1 = absent or contradicted: a neutral assistant default, or the opposite of the persona."""

TEXT_FOCUS = (
    "Judge only how strongly the TEXT expresses the persona. Ignore whether it is correct, "
    "helpful, complete, well formatted or long. The conversation is context: do not rate it."
)
BEHAVIOUR_FOCUS = (
    "Judge only how strongly the persona shows in what the agent DID: which tools it chose, "
    "the arguments it gave, what it looked up or skipped before acting, and the order and pace "
    "of its actions. The text of its email is not shown and is judged elsewhere; do not guess "
    "it. Ignore whether the task succeeded."
)
LIKERT_ANSWER = 'Answer with one JSON object: {"score": <an integer from 1 to 5>, "rationale": \
"<one or two sentences>"}'
IDENTIFY_ANSWER = 'Answer with one JSON object: {{"persona": "<one of: {options}>", "rationale": \
"<one or two sentences>"}}'


@dataclass(frozen=True)
class Question:
    """One question to the judge. `target`: the persona a Likert question is about (None for
    identify). `behaviour`: the shown material is an agent's actions, not a text. `context`: the
    conversation or trajectory (may be empty); `text`: the judged text or actions."""

    mode: str
    target: str | None
    behaviour: bool
    context: str
    text: str


def _block(question: Question) -> str:
    nonce = stable_hash(question.text, 10)
    what = "ACTIONS OF THE AGENT" if question.behaviour else "TEXT TO RATE"
    parts = []
    if question.context and not question.behaviour:
        parts.append(f"CONVERSATION SO FAR (context only):\n{question.context}\n")
    parts.append(f"{what} (between the markers {nonce}):\n<<<{nonce}\n{question.text}\n{nonce}>>>")
    return "\n".join(parts)


def likert_messages(question: Question, summaries: Mapping[str, str]) -> list[Message]:
    """A Likert question about `question.target`."""
    target = question.target or ""
    focus = BEHAVIOUR_FOCUS if question.behaviour else TEXT_FOCUS
    scale = LIKERT_SCALE.format(what="course of action" if question.behaviour else "text")
    user = (
        f"PERSONA: {target}\nDESCRIPTION: {summaries.get(target, '')}\n\n{_block(question)}\n\n"
        f"How strongly is the persona expressed, from 1 to 5?\n{scale}\n\n{focus}\n"
        f"{LIKERT_ANSWER}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def identify_order(personas: Sequence[str], seed: int) -> list[str]:
    """The personas in the order one identify sample lists them."""
    order = list(personas)
    random.Random(seed).shuffle(order)
    return order


def identify_messages(
    question: Question, summaries: Mapping[str, str], order: Sequence[str]
) -> list[Message]:
    """Which of `order` (or none) wrote the text or took the actions."""
    options = [f"- {p}: {summaries.get(p, '')}" for p in order]
    options.append(f"- {JUDGE_NONE}: none of these; a neutral assistant default")
    who = "took these actions" if question.behaviour else "wrote the TEXT"
    focus = (
        BEHAVIOUR_FOCUS
        if question.behaviour
        else TEXT_FOCUS.replace(
            "how strongly the TEXT expresses the persona", "which persona the TEXT expresses"
        )
    )
    answer = IDENTIFY_ANSWER.format(options=", ".join([*order, JUDGE_NONE]))
    listed = "\n".join(options)
    user = (
        f"PERSONAS:\n{listed}\n\n{_block(question)}\n\n"
        f"Which persona {who}? Name the one whose character shows most; answer {JUDGE_NONE} "
        f"when none of them shows.\n{focus}\n{answer}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def answer_schema(mode: str, labels: Sequence[str]) -> dict[str, object]:
    """The JSON schema of an answer, for a backend that enforces it (`judge.constrained`)."""
    verdict: dict[str, object] = (
        {"type": "integer", "minimum": 1, "maximum": 5}
        if mode == "likert"
        else {"type": "string", "enum": [*labels, JUDGE_NONE]}
    )
    key = "score" if mode == "likert" else "persona"
    return {
        "type": "object",
        "properties": {key: verdict, "rationale": {"type": "string"}},
        "required": [key, "rationale"],
        "additionalProperties": False,
    }
