"""What the LLM judge is shown of a generation row (pure): its conversation, or its actions.

- `context_view(row, text)`: the conversation the judged text answers, as "[user] ..." /
  "[assistant] ..." lines. Every system message is left out: the prompted stage's persona
  prompt would tell the judge the condition, and the agent's long operational prompt is the same
  for every row. For a tool slice the context is the trajectory: each tool call with its
  arguments, each tool result, each error the harness sent back; the judged email body appears
  in it only as a placeholder (it is the judged text).
- `behaviour_view(row)`: the unit `SLICE.behaviour` of a slice whose registry entry has that
  judge variant (`slices.SliceDef.judge_variants`): the task, then only what the agent did (calls, arguments, results, errors, how it ended); the email body is reduced to
  its length, so the behaviour rubric never reads the text the text rubric reads.

A message longer than `max_chars` is shortened in its middle with a marker saying how much was
left out; the judged text itself is never shortened. Tool calls are read with the rollout's own
parser (`toolcalls.parse_tool_calls`), so the judge sees the calls the simulator ran.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from charshift import slices
from charshift.config import TOOL_SLICES
from charshift.ladder import BEHAVIOUR, split_unit, unit_name
from charshift.schema import GenerationRow, Message
from charshift.toolcalls import ToolCall, parse_tool_calls
from charshift.tools import SEND_TOOL
from charshift.units import UnitText

BODY_PLACEHOLDER = "<the email body: the text to rate, shown below>"
_TOOL_RESULT = "[tool result: "


def is_behaviour(unit: str | None) -> bool:
    return unit is not None and split_unit(unit)[1] == BEHAVIOUR


def has_behaviour(slice_: str) -> bool:
    """Whether `slice_` has a `SLICE.behaviour` unit (its entry in the slice registry)."""
    entry = slices.SLICES.get(slice_)
    return entry is not None and BEHAVIOUR in entry.judge_variants


def shorten(text: str, max_chars: int) -> str:
    """`text`, or its start and end with a marker naming how many characters were left out."""
    if len(text) <= max_chars:
        return text
    keep = max_chars // 2
    cut = len(text) - 2 * keep
    return f"{text[:keep]} [... {cut} characters left out ...] {text[-keep:]}"


def _words(text: str) -> int:
    return len(text.split())


def _call_line(call: ToolCall, body_words: bool) -> str:
    args: dict[str, Any] = dict(call.arguments) if isinstance(call.arguments, dict) else {}
    if call.name == SEND_TOOL and isinstance(args.get("body"), str):
        body = args["body"]
        args["body"] = f"<email body, {_words(body)} words>" if body_words else BODY_PLACEHOLDER
    shown = json.dumps(args, ensure_ascii=False, sort_keys=True)
    return f"[agent calls] {call.name}({shown})"


def _tool_turn(msg: Message) -> tuple[str, str] | None:
    """(tool name, result) of a tool-result message, in either tool protocol's form."""
    content = str(msg.get("content") or "")
    if msg.get("role") == "tool":
        return str(msg.get("name") or "tool"), content
    if msg.get("role") == "user" and content.startswith(_TOOL_RESULT):
        head, _, rest = content.partition("\n")
        return head[len(_TOOL_RESULT) :].rstrip("]"), rest
    return None


def _trajectory_lines(msgs: Sequence[Message], max_chars: int, body_words: bool) -> list[str]:
    lines: list[str] = []
    for i, msg in enumerate(msgs):
        content = str(msg.get("content") or "")
        result = _tool_turn(msg)
        if result is not None:
            lines.append(f"[tool result: {result[0]}] {shorten(result[1], max_chars)}")
        elif msg.get("role") == "assistant":
            calls = parse_tool_calls(content)
            lines += [_call_line(c, body_words) for c in calls] or [
                f"[agent writes, no tool call] {shorten(content, max_chars)}"
            ]
        elif msg.get("role") == "user" and content.startswith("[error]"):
            lines.append(f"[harness error message] {shorten(content, max_chars)}")
        elif msg.get("role") == "user":
            label = "[user gives the task]" if i == 0 else "[user]"
            lines.append(f"{label} {shorten(content, max_chars)}")
    return lines


def _chat_lines(msgs: Sequence[Message], max_chars: int) -> list[str]:
    """The conversation before the final assistant turn (the judged text comes from that)."""
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=len(msgs))
    return [
        f"[{m.get('role')}] {shorten(str(m.get('content') or ''), max_chars)}"
        for m in msgs[:last]
        if m.get("role") in ("user", "assistant")
    ]


def _unsystem(row: GenerationRow) -> list[Message]:
    return [m for m in row.messages if m.get("role") != "system"]


def context_view(row: GenerationRow | None, max_chars: int = 4000) -> str:
    """The conversation (chat) or trajectory (tool slices) around a judged text; "" without a
    row (an external text scored on its own)."""
    if row is None:
        return ""
    msgs = _unsystem(row)
    if row.slice in TOOL_SLICES:
        return "\n".join(_trajectory_lines(msgs, max_chars, body_words=False))
    return "\n".join(_chat_lines(msgs, max_chars))


def behaviour_view(row: GenerationRow, max_chars: int = 4000) -> str | None:
    """The agent's actions in a row of a slice with a behaviour unit, and how the episode ended;
    None for a row of another slice or one in which the model never took a turn."""
    msgs = _unsystem(row)
    if not has_behaviour(row.slice) or not any(m.get("role") == "assistant" for m in msgs):
        return None
    lines = _trajectory_lines(msgs, max_chars, body_words=True)
    budget = row.meta.get("step_budget")
    of = f" of a budget of {budget}" if isinstance(budget, int) else ""
    lines.append(f"[episode ends] outcome {row.outcome!r} after {row.n_steps} model turns{of}")
    return "\n".join(lines)


def behaviour_units(rows: Sequence[GenerationRow], max_chars: int = 4000) -> list[UnitText]:
    """The `SLICE.behaviour` unit of every row of a slice that has one (`has_behaviour`) in
    which the model took a turn."""
    out = []
    for row in rows:
        view = behaviour_view(row, max_chars)
        if view is not None:
            out.append(UnitText(row, unit_name(row.slice, BEHAVIOUR), view))
    return out
