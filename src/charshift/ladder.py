"""The ladder: which measured units are compared, in what order, and the one thing each rung changes.

A *unit* is what one column of the results measures: a slice scored on its default text (`id_chat`:
the whole reply; an email slice: the email body), or a scoring variant of a slice written
`SLICE.VARIANT`:

  `SLICE.whole`   a chat-email slice scored on the whole reply instead of the extracted email body
  `SLICE.head`    a chat-email slice scored on the whole reply cut to the length of that row's
                  own extracted body: the same length as the body, the reply's opening words
  `id_chat.short` the id_chat reply cut to a chat_email body length of the same (base, stage,
                  persona), matched by rank so that the cut lengths follow the bodies' length
                  distribution: a length control on home ground
  `SLICE.behaviour` a tool slice's actions (calls, arguments, results, order), without the
                  email's text: read only by the LLM judge, with its own rubric

Lengths are counted in the scorer's tokens (words for a scorer without a tokenizer), and a cut
ends at a sentence end within 10% of its target where there is one (`charshift.units`). A cut
keeps a text's opening, so besides length it drops the text's end: the rung labels say so.

Chains are read from home ground outward; each rung changes exactly one thing, stated in
`changes`, and the report prints it. The rungs of one chain are estimated on the chain's common
items, so they sum exactly to the chain's total. Contrasts are single comparisons outside a chain.

This module is the one home of these definitions: stats, plots and the report read them.
"""

from __future__ import annotations

from dataclasses import dataclass

VARIANT_SEP = "."
WHOLE = "whole"  # scoring variant: the whole chat reply instead of the extracted email body
HEAD = "head"  # scoring variant: the whole reply cut to its own email body's length
SHORT = "short"  # scoring variant: the id_chat reply cut to a rank-matched email body's length
VARIANTS = (WHOLE, HEAD, SHORT)
# A unit only the LLM judge reads: a tool slice's behaviour (its calls, arguments, results and
# order, without the email's text), judged with its own rubric (scoring.judge_views).
BEHAVIOUR = "behaviour"


def unit_name(slice_: str, variant: str | None = None) -> str:
    return f"{slice_}{VARIANT_SEP}{variant}" if variant else slice_


def split_unit(unit: str) -> tuple[str, str | None]:
    """`chat_email.whole` -> ("chat_email", "whole"); `chat_email` -> ("chat_email", None)."""
    slice_, _, variant = unit.partition(VARIANT_SEP)
    return slice_, variant or None


@dataclass(frozen=True)
class Rung:
    """One comparison: `frm` (closer to home) -> `to`; a positive difference frm - to is persona
    lost. `changes` names the one element that differs between the two."""

    frm: str
    to: str
    changes: str


@dataclass(frozen=True)
class Chain:
    name: str
    title: str
    rungs: tuple[Rung, ...]

    @property
    def units(self) -> list[str]:
        return [self.rungs[0].frm] + [r.to for r in self.rungs]


MAIN_CHAIN = Chain(
    "agentic",
    "From a chat email to an agentic email",
    (
        Rung(
            "chat_email",
            "email_syscontext",
            "adds the agent's long operational system prompt (same user turn, no tools)",
        ),
        Rung(
            "email_syscontext",
            "tool_email_oneshot",
            "the email goes out through a send_email tool call (tool descriptions in the system "
            "prompt; all facts still given)",
        ),
        Rung(
            "tool_email_oneshot",
            "agentic_email",
            "the facts must be found with tools in a multi-turn loop before send_email",
        ),
    ),
)

EMAIL_STEP_CHAIN = Chain(
    "email_step",
    "Splitting the step from a chat reply to a chat email",
    (
        Rung(
            "id_chat",
            "scenario_chat",
            "topic: a business scenario with its facts instead of a general prompt (a chat "
            "answer, not an email; whole reply scored)",
        ),
        Rung(
            "scenario_chat",
            unit_name("chat_email", WHOLE),
            "genre: the user asks for an email instead of a chat answer (whole reply scored)",
        ),
        Rung(
            unit_name("chat_email", WHOLE),
            unit_name("chat_email", HEAD),
            "length: the whole reply is cut to the length of its own email body (in scorer "
            "tokens, at a sentence end within 10% where there is one); the cut also drops the "
            "reply's end (the rest of the email, its sign-off, any closing chat)",
        ),
        Rung(
            unit_name("chat_email", HEAD),
            "chat_email",
            "scored unit: the extracted email body instead of the reply's opening (any "
            "preamble, subject line and the start of the email), at the same length within 10%",
        ),
    ),
)

CHAINS: tuple[Chain, ...] = (EMAIL_STEP_CHAIN, MAIN_CHAIN)

CONTRASTS: tuple[Rung, ...] = (
    Rung(
        "chat_email",
        "chat_email_multiturn",
        "the situation arrives over three live user turns instead of one",
    ),
    Rung(
        "id_chat",
        unit_name("id_chat", SHORT),
        "length on home ground: each reply is cut to a chat_email body length of the same "
        "condition, matched by rank so the cut lengths follow the bodies' distribution (in "
        "scorer tokens, at a sentence end within 10% where there is one); the cut also drops "
        "the end of each reply it shortens, and a reply shorter than its matched body is scored "
        "whole",
    ),
)
