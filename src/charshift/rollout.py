"""The rollout engine: every active episode advances in lockstep, one batched call per step.

An episode is one row being generated: a rendered slice (`EpisodeSpec`) under one `Condition`, for
one sample. Chat episodes send their scripted user turns one by one and the model answers each live;
tool episodes parse the model's tool calls, run them against the scenario's simulated tools and feed
the results back, until the email is sent or a limit is reached. At each step the engine gathers the
next request of every episode still running, across personas, stages, scenarios and samples, and
makes ONE `backend.generate` call for all of them.

Termination of tool episodes (outcome in brackets):
  - the first successful send_email when `stop_on_send` ("email");
  - an explicit `finish` call ("email" if one was sent before, else "no_email");
  - `max_steps` model turns ("max_steps", or "email" if one was sent and stop_on_send is off);
  - `max_malformed` consecutive turns with no parseable tool call ("malformed");
  - a prompt that no longer fits the context ("context_overflow").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from charshift.backends.base import Backend
from charshift.extraction import extract_email
from charshift.formats import compose_system
from charshift.schema import (
    Condition,
    EpisodeSpec,
    GenerationRow,
    GenRequest,
    Message,
    Sampling,
    derive_seed,
)
from charshift.toolcalls import diagnose_tool_turn, parse_tool_calls


@dataclass
class RolloutSettings:
    max_steps: int = 8
    max_malformed: int = 3
    stop_on_send: bool = True
    native_tools: bool = False


@dataclass
class Episode:
    """One row in flight."""

    key: str
    spec: EpisodeSpec
    condition: Condition
    sample_idx: int
    run_seed: int
    sampling: Sampling
    simulator: Any = None  # toolsim.ToolSimulator for tool modes
    messages: list[Message] = field(default_factory=list)  # without the system prompt
    next_turn: int = 0  # chat mode: index of the next scripted user turn to send
    steps: int = 0
    malformed_run: int = 0
    email: dict[str, Any] | None = None
    outcome: str | None = None
    final_reply: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def system_prompt(self, base_turn: bool) -> str | None:
        """The persona prompt (prompted stage, not for base turns) followed by the slice's system."""
        persona = None if base_turn else self.condition.system_prompt
        return compose_system(persona, self.spec.system)

    def full_messages(self) -> list[Message]:
        sys_prompt = self.system_prompt(base_turn=False)
        head = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
        return head + self.messages


def _tool_result_message(name: str, content: str, native: bool) -> Message:
    if native:
        return {"role": "tool", "name": name, "content": content}
    return {"role": "user", "content": f"[tool result: {name}]\n{content}"}


class RolloutEngine:
    """Runs episodes to completion against one backend, lockstep."""

    def __init__(
        self,
        backend: Backend,
        settings: RolloutSettings | None = None,
        required_args: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings or RolloutSettings()
        self.required_args = dict(required_args or {})

    # -- requests ----------------------------------------------------------------------------
    def _request(self, ep: Episode) -> GenRequest:
        if ep.spec.mode == "chat":
            ep.messages.append({"role": "user", "content": ep.spec.user_turns[ep.next_turn]})
            base_turn = ep.next_turn in ep.spec.base_turns
        else:
            if not ep.messages:
                ep.messages.append({"role": "user", "content": ep.spec.user_turns[0]})
            base_turn = False
        sys_prompt = ep.system_prompt(base_turn)
        msgs = ([{"role": "system", "content": sys_prompt}] if sys_prompt else []) + list(
            ep.messages
        )
        return GenRequest(
            messages=msgs,
            adapter=None if base_turn else ep.condition.adapter,
            sampling=ep.sampling,
            seed=derive_seed(ep.run_seed, ep.key, ep.steps),
            tools=ep.spec.tools if self.settings.native_tools else None,
            session=ep.key,
        )

    # -- advancing ---------------------------------------------------------------------------
    def _advance_chat(self, ep: Episode, text: str) -> None:
        ep.messages.append({"role": "assistant", "content": text})
        ep.next_turn += 1
        if ep.next_turn < len(ep.spec.user_turns):
            return
        ep.final_reply = text
        if ep.spec.output == "reply":
            ep.outcome = "reply" if text.strip() else "empty"
        else:
            found = extract_email(text)
            if found and found.body:
                ep.email = {"to": found.to, "subject": found.subject, "body": found.body}
                ep.outcome = "email"
            else:
                ep.outcome = "no_email"

    def _advance_tools(self, ep: Episode, text: str) -> None:
        s = self.settings
        ep.messages.append({"role": "assistant", "content": text})
        ep.final_reply = text
        calls = parse_tool_calls(text)
        known = [
            t["function"]["name"] if "function" in t else t["name"] for t in ep.spec.tools or []
        ]
        if not calls:
            ep.malformed_run += 1
            problem = diagnose_tool_turn(text, known, self.required_args) or (
                "No tool call found in your message."
            )
            ep.meta.setdefault("malformed_turns", []).append(ep.steps - 1)
            if ep.spec.mode == "tool_oneshot" or ep.malformed_run >= s.max_malformed:
                ep.outcome = "email" if ep.email else "malformed"
                return
            ep.messages.append({"role": "user", "content": f"[error] {problem}"})
        else:
            ep.malformed_run = 0
            finished = False
            for call in calls:
                res = ep.simulator.call(call)
                content = res.content
                if call.name == "send_email" and res.ok and ep.email is None:
                    ep.email = dict(res.email or {})
                if res.terminal:
                    finished = call.name == "finish" or s.stop_on_send
                ep.messages.append(_tool_result_message(call.name, content, s.native_tools))
                if finished:
                    break
            if len(calls) > 1:
                ep.meta.setdefault("multi_call_turns", []).append(ep.steps - 1)
            if finished:
                ep.outcome = "email" if ep.email else "no_email"
                return
            if ep.spec.mode == "tool_oneshot":
                ep.outcome = "email" if ep.email else "no_email"
                return
        if ep.steps >= s.max_steps:
            ep.outcome = "email" if ep.email else "max_steps"

    def _advance(self, ep: Episode, text: str, finish_reason: str) -> None:
        ep.steps += 1
        if finish_reason == "context_overflow":
            ep.outcome = "email" if ep.email else "context_overflow"
            return
        if finish_reason == "error":
            ep.outcome = "email" if ep.email else "error"
            return
        if ep.spec.mode == "chat":
            self._advance_chat(ep, text)
        else:
            self._advance_tools(ep, text)

    # -- driving -----------------------------------------------------------------------------
    def run(
        self,
        episodes: list[Episode],
        on_step: Callable[[int, int], None] | None = None,
    ) -> Iterator[list[GenerationRow]]:
        """Advance all episodes in lockstep; after each step, yield the rows that finished in it."""
        active = [e for e in episodes if not e.done]
        while active:
            requests = [self._request(e) for e in active]
            results = self.backend.generate(requests)
            finished: list[GenerationRow] = []
            for ep, res in zip(active, results, strict=True):
                if res.error:
                    ep.meta.setdefault("errors", []).append(res.error)
                self._advance(ep, res.text, res.finish_reason)
                if ep.done:
                    finished.append(to_row(ep))
            active = [e for e in active if not e.done]
            if on_step:
                on_step(len(finished), len(active))
            yield finished


def to_row(ep: Episode) -> GenerationRow:
    spec = ep.spec
    if ep.email is not None:
        text = ep.email.get("body") or None
    elif spec.output == "reply" and ep.outcome == "reply":
        text = ep.final_reply
    else:
        text = None
    return GenerationRow(
        key=ep.key,
        base=ep.condition.base,
        stage=ep.condition.stage,
        persona=ep.condition.persona,
        slice=spec.slice,
        item_id=spec.item_id,
        sample_idx=ep.sample_idx,
        split=spec.split,
        seed=derive_seed(ep.run_seed, ep.key, 0),
        outcome=ep.outcome or "error",
        messages=ep.full_messages(),
        final_reply=ep.final_reply,
        text=text,
        email=ep.email,
        tool_log=list(getattr(ep.simulator, "log", []) or []),
        n_steps=ep.steps,
        meta=json.loads(json.dumps(ep.meta, default=str)),
    )
