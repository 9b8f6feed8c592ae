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
  `agentic_actions.behaviour`  the tool loop's actions (which tools, in what order, with what
                  arguments), scored only by the judge's behaviour rubric

Lengths are counted in the scorer's tokens (words for a scorer without a tokenizer), and a cut
ends at a sentence end within 10% of its target where there is one (`charshift.units`). A cut
keeps a text's opening, so besides length it drops the text's end: the rung labels say so.

Chains are read from home ground outward; each rung changes exactly one thing, stated in
`changes` (a rung between two slices is worded once, in the slice registry `charshift.slices`),
and the report prints it. The rungs of one chain are estimated on the chain's common items, so
they sum exactly to the chain's total. Contrasts are single comparisons outside a chain:
`CONTRASTS` (the email family's) and, read from the registry, each other slice against its
control (`registry_contrasts`: every scaffold against its chat control); `ALL_CONTRASTS` holds
both.

This module is the one home of these definitions: stats, plots and the report read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from charshift import slices
from charshift.slices import BEHAVIOUR, HEAD, SHORT, WHOLE

VARIANT_SEP = "."
# WHOLE: the whole chat reply instead of the extracted email body; HEAD: the whole reply cut to
# its own email body's length; SHORT: the id_chat reply cut to a rank-matched email body's
# length; BEHAVIOUR: a tool loop's actions, scored by the judge's behaviour rubric only. (The
# names live in the slice registry, `charshift.slices`.)
VARIANTS = (WHOLE, HEAD, SHORT, BEHAVIOUR)


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


def registry_rung(slice_: str) -> Rung:
    """The rung from a slice's control to it, worded as its registry entry states it."""
    entry = slices.get(slice_)
    if entry.control is None:
        raise ValueError(f"slice {slice_!r} has no control (home ground or a control itself)")
    return Rung(entry.control, unit_name(slice_, entry.rung_variant), entry.changes)


MAIN_CHAIN = Chain(
    "agentic",
    "From a chat email to an agentic email",
    (
        registry_rung("email_syscontext"),
        registry_rung("tool_email_oneshot"),
        registry_rung("agentic_email"),
    ),
)

EMAIL_STEP_CHAIN = Chain(
    "email_step",
    "Splitting the step from a chat reply to a chat email",
    (
        registry_rung("scenario_chat"),
        registry_rung("chat_email"),
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
    registry_rung("chat_email_multiturn"),
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


def registry_contrasts(
    chains: tuple[Chain, ...] = CHAINS, contrasts: tuple[Rung, ...] = CONTRASTS
) -> tuple[Rung, ...]:
    """The rung of every registered slice from its control that no chain or contrast above
    already compares: each scaffold against its chat control, the ID variants against
    id_chat. Read from the registry, so a new slice needs no entry here."""
    done = [*(r for c in chains for r in c.rungs), *contrasts]
    taken = {(split_unit(r.frm)[0], split_unit(r.to)[0]) for r in done}
    return tuple(
        registry_rung(e.name)
        for e in slices.SLICES.values()
        if e.control is not None and (e.control, e.name) not in taken
    )


# Every contrast the statistics compute: the email family's, then the registry's.
ALL_CONTRASTS: tuple[Rung, ...] = CONTRASTS + registry_contrasts()
