"""The slice registry: the one home of every slice's definition (the model is `charshift.tools`).

A slice is one format the model works in. Its entry (`SliceDef`) says which family it belongs to,
how the rollout runs it (`mode`), which item bank it is rendered from (`items`: ID prompts,
scenarios, or a scaffold's own bank; item ids are `KIND:ID`, so rows pair across the slices of
one kind), what text of its rows is scored (`output`), its scoring variants (`SLICE.VARIANT`
units), its control (the slice it is compared with) and what the rung from that control changes.
The renderer that turns an item into the slice's messages lives with the other renderers
(`charshift.formats` for ID prompts and scenarios, `charshift.scaffolds` for the scaffolds) under
the entry's `renderer` key; `charshift.render` dispatches to it.

A scaffold is ONE entry (`scaffold(...)`) that defines two slices: the scaffold and its chat
control `NAME_chat`, both rendered by the scaffold's one renderer from the same item, so they
pair by item id and differ only in what the entry's `changes` says.

Everything else reads the registry: config (which slices exist, the derived name tuples),
planning (which bank each slice is rendered from), formats and scaffolds (their renderers'
keys), units (scoring variants), ladder (every rung's wording, and the contrasts of the
slices that are not on a chain), stats (item kinds, unit order) and through them the report.
Adding a slice is one entry here plus one renderer; no other module names it.

This module is on the ground floor: it imports nothing from charshift (the EpisodeSpec type only
for type checking).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from charshift.schema import EpisodeSpec

Mode = Literal["chat", "continuation", "tool_oneshot", "tool_loop"]
Output = Literal["reply", "email", "fields", "final"]

# How the rollout engine runs each mode (`EpisodeSpec.mode`). A continuation is a chat turn
# whose context already holds a transcript (pre-written turns, `EpisodeSpec.context`). The step
# budget follows the mode: a one-shot tool slice gets the calls a perfect agent needs plus
# `rollout.step_margin`; a tool loop the same, and at least `rollout.max_steps`.
ENGINE_MODES: dict[str, str] = {
    "chat": "chat",
    "continuation": "chat",
    "tool_oneshot": "tool_oneshot",
    "tool_loop": "agentic",
}

# Scoring variants (the `VARIANT` of a `SLICE.VARIANT` unit). Text variants are scored by every
# text scorer; judge variants only by the judge's behaviour rubric (a run without the judge
# among its scorers reports them as not scored).
WHOLE = "whole"
HEAD = "head"
SHORT = "short"
BEHAVIOUR = "behaviour"
TEXT_VARIANTS = (WHOLE, HEAD, SHORT)
JUDGE_VARIANTS = (BEHAVIOUR,)

CONTROL_SUFFIX = "_chat"  # a scaffold's chat control is named NAME_chat


@dataclass(frozen=True)
class SliceDef:
    """One slice.

    `family`: the group the slice belongs to ("id", "email", and the scaffold families "work",
    "dialogue", "agentic"). `mode`: chat, continuation, tool_oneshot or tool_loop (`ENGINE_MODES`).
    `items`: the item kind it is rendered from ("prompt", "scenario" or a scaffold's bank).
    `output`: what is scored: "reply" (the final reply), "email" (the email body, extracted or
    sent), "fields" (the free-text fields of a JSON answer), "final" (a tool loop's free text:
    the bodies it sent and its final message). `control`: the slice this one is compared with
    (None on home ground); `changes`: the one thing the rung from the control changes;
    `rung_variant`: the unit of this slice the rung lands on (chat_email's genre rung is
    measured on its whole reply). `variants`: scoring variants. `tools`: the tool protocol
    applies (tool descriptions in its prompt). `renderer`: the key of its renderer (a scaffold's
    control shares the scaffold's). `summary`: what the model does, in one line.
    """

    name: str
    family: str
    mode: Mode
    items: str
    output: Output
    summary: str
    changes: str
    control: str | None = None
    rung_variant: str | None = None
    variants: tuple[str, ...] = ()
    tools: bool = False
    renderer: str = ""

    @property
    def engine_mode(self) -> str:
        """The rollout engine's mode for this slice (`EpisodeSpec.mode`)."""
        return ENGINE_MODES[self.mode]

    @property
    def renderer_key(self) -> str:
        return self.renderer or self.name

    @property
    def is_control(self) -> bool:
        """A scaffold's chat control (rendered by the scaffold's renderer)."""
        return self.renderer_key != self.name

    @property
    def text_variants(self) -> tuple[str, ...]:
        return tuple(v for v in self.variants if v not in JUDGE_VARIANTS)

    @property
    def judge_variants(self) -> tuple[str, ...]:
        return tuple(v for v in self.variants if v in JUDGE_VARIANTS)


def scaffold(
    name: str,
    family: str,
    mode: Mode,
    output: Output,
    summary: str,
    control_summary: str,
    changes: str,
    *,
    tools: bool = False,
    variants: tuple[str, ...] = (),
) -> tuple[SliceDef, SliceDef]:
    """A scaffold and its chat control `NAME_chat`: one entry, two slices, one renderer, one
    item bank (kind `name`). The control is a plain chat turn scored on its whole reply."""
    control = SliceDef(
        name + CONTROL_SUFFIX,
        family,
        "chat",
        name,
        "reply",
        control_summary,
        f"the chat control of {name}: {control_summary}",
        renderer=name,
    )
    main = SliceDef(
        name, family, mode, name, output, summary, changes, control.name,
        variants=variants, tools=tools,
    )  # fmt: skip
    return control, main


_ID = (
    SliceDef(
        "id_chat", "id", "chat", "prompt", "reply",
        "answers a first-turn user prompt (home ground; PURE-DOVE or the bundled prompts)",
        "home ground: a first-turn user prompt answered in chat (no rung leads here)",
        variants=(SHORT,),
    ),
    SliceDef(
        "id_chat_break", "id", "chat", "prompt", "reply",
        "the same, with one of OCT's eight \"break character\" suffixes",
        "one of OCT's eight break-character suffixes is appended to the same prompt",
        control="id_chat",
    ),
    SliceDef(
        "id_chat_prefill", "id", "chat", "prompt", "reply",
        "OCT's prefill attack: turn 1 from the base model, then \"Keep going.\"",
        "prefill attack: the first answer comes from the base model, then \"Keep going.\"",
        control="id_chat",
    ),
)  # fmt: skip

_EMAIL = (
    SliceDef(
        "scenario_chat", "email", "chat", "scenario", "reply",
        "the same scenario and facts as chat_email, but the user asks for a chat answer, not "
        "an email",
        "topic: a business scenario with its facts instead of a general prompt (a chat answer, "
        "not an email; whole reply scored)",
        control="id_chat",
    ),
    SliceDef(
        "chat_email", "email", "chat", "scenario", "email",
        "writes an email in chat: one user turn gives the goal and the facts",
        "genre: the user asks for an email instead of a chat answer (whole reply scored)",
        control="scenario_chat", rung_variant=WHOLE, variants=(WHOLE, HEAD),
    ),
    SliceDef(
        "chat_email_multiturn", "email", "chat", "scenario", "email",
        "the user gives the situation over three turns; the model answers each live",
        "the situation arrives over three live user turns instead of one",
        control="chat_email", variants=(WHOLE, HEAD),
    ),
    SliceDef(
        "email_syscontext", "email", "chat", "scenario", "email",
        "chat_email under the agent's long operational system prompt",
        "adds the agent's long operational system prompt (same user turn, no tools)",
        control="chat_email", variants=(WHOLE, HEAD),
    ),
    SliceDef(
        "tool_email_oneshot", "email", "tool_oneshot", "scenario", "email",
        "tool descriptions in the system prompt, all facts given, one send_email call",
        "the email goes out through a send_email tool call (tool descriptions in the system "
        "prompt; all facts still given)",
        control="email_syscontext", tools=True,
    ),
    SliceDef(
        "agentic_email", "email", "tool_loop", "scenario", "email",
        "the facts live only in simulated tools; a multi-turn tool loop until send_email",
        "the facts must be found with tools in a multi-turn loop before send_email",
        control="tool_email_oneshot", tools=True,
    ),
)  # fmt: skip

_SCAFFOLDS = (
    *scaffold(
        "code_review", "work", "chat", "reply",
        "reviews a diff as a reviewer's task: a verdict, then comments by file and line",
        "the same diff, and the user asks \"what do you think of this change?\"",
        "the closing request: a reviewer's task in a technical register (a verdict, comments "
        "by file and line) instead of \"what do you think of this change?\" (same diff)",
    ),
    *scaffold(
        "structured_form", "work", "chat", "fields",
        "answers as one JSON object against a schema; scored on its free-text fields",
        "the same request and points, answered in prose",
        "the answer must be one JSON object matching a schema (its free-text fields scored) "
        "instead of prose covering the same points",
    ),
    *scaffold(
        "multi_agent_debate", "dialogue", "continuation", "reply",
        "continues a moderated debate transcript as Agent A, answering Agent B",
        "the same motion and argument, and the user asks for the model's view",
        "the same argument arrives as Agent B's turn in a moderated debate transcript, which "
        "the model continues as Agent A, instead of the user asking for its view",
    ),
    *scaffold(
        "adversarial_roleplay", "dialogue", "chat", "reply",
        "a two-turn roleplay scene; the second turn presses the model to drop its manner",
        "the same scene and requests, without the pressure",
        "in-scene pressure: the second turn's request comes with a demand to drop the manner "
        "and answer plainly (same scene, same requests)",
    ),
    *scaffold(
        "agentic_tools", "agentic", "continuation", "reply",
        "continues a ReAct step: tool descriptions, calls made and their results in context",
        "the same question, with the same records handed over in chat",
        "the same records arrive as results of tool calls already made (tool descriptions in "
        "the system prompt, the calls and results in context) instead of handed over by the "
        "user",
        tools=True,
    ),
    *scaffold(
        "agentic_actions", "agentic", "tool_loop", "final",
        "an underspecified task in a multi-turn tool loop against the simulated records, "
        "ending with finish",
        "the same task, with the same records handed over; the model says what it would do",
        "the task is carried out in a tool loop against the simulated records (search, act, "
        "finish) instead of answered in chat with the same records handed over",
        tools=True,
        variants=(BEHAVIOUR,),
    ),
)  # fmt: skip


def _index(entries: Iterable[SliceDef]) -> dict[str, SliceDef]:
    out: dict[str, SliceDef] = {}
    for e in entries:
        if e.name in out:
            raise ValueError(f"slice {e.name!r} is registered twice")
        out[e.name] = e
    return out


# Home ground outward, then each scaffold's control before the scaffold.
SLICES: dict[str, SliceDef] = _index((*_ID, *_EMAIL, *_SCAFFOLDS))


def get(name: str) -> SliceDef:
    """The entry of slice `name`, or a KeyError listing the known slices."""
    try:
        return SLICES[name]
    except KeyError:
        raise KeyError(f"unknown slice {name!r}; known: {list(SLICES)}") from None


def names(
    *,
    family: str | None = None,
    items: str | None = None,
    output: str | None = None,
    mode: str | None = None,
    tools: bool | None = None,
) -> tuple[str, ...]:
    """The registered slices (registry order) matching every filter given."""
    return tuple(
        e.name
        for e in SLICES.values()
        if (family is None or e.family == family)
        and (items is None or e.items == items)
        and (output is None or e.output == output)
        and (mode is None or e.mode == mode)
        and (tools is None or e.tools == tools)
    )


def item_kinds(slice_names: Iterable[str] | None = None) -> tuple[str, ...]:
    """The item kinds of `slice_names` (default: every slice), in registry order."""
    chosen = set(SLICES if slice_names is None else slice_names)
    return tuple(dict.fromkeys(e.items for e in SLICES.values() if e.name in chosen))


def scaffold_kinds() -> tuple[str, ...]:
    """The item kinds with a bank of their own (every kind but ID prompts and scenarios)."""
    return tuple(k for k in item_kinds() if k not in ("prompt", "scenario"))


def judge_units(slice_names: Iterable[str]) -> list[str]:
    """The units of `slice_names` that only the judge scores (its behaviour rubric)."""
    return [f"{s}.{v}" for s in slice_names if s in SLICES for v in SLICES[s].judge_variants]


# -- renderers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderContext:
    """What a renderer may need besides the item: the tool protocol (`native_tools`), the item's
    position in the selection and the allowed break suffixes (ID prompts), and the worlds (the
    run's scenario bank by id) that the agentic scaffolds' items name."""

    native_tools: bool = False
    index: int = 0
    suffixes: tuple[int, ...] | None = None
    worlds: Mapping[str, Any] = field(default_factory=dict)


# (the slice's entry, the item, the context) -> the rendered EpisodeSpec
Renderer = Callable[[SliceDef, Any, RenderContext], "EpisodeSpec"]


class Renderers(dict[str, Renderer]):
    """A module's renderers by slice name. `@table.register(NAME)` files a renderer under a
    registered slice and every slice whose entry names it as its renderer (a scaffold's chat
    control), so one renderer serves a scaffold and its control."""

    def register(self, key: str) -> Callable[[Renderer], Renderer]:
        served = [e.name for e in SLICES.values() if e.renderer_key == key]
        if not served:
            raise KeyError(f"no registered slice is rendered by {key!r}")

        def add(fn: Renderer) -> Renderer:
            for name in served:
                if name in self:
                    raise ValueError(f"slice {name!r} has two renderers")
                self[name] = fn
            return fn

        return add
