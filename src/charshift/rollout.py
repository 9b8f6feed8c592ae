"""The rollout engine: every active episode advances in lockstep, one batched call per step.

An episode is one row being generated: a rendered slice (`EpisodeSpec`) under one `Condition`, for
one sample. Chat episodes send their scripted user turns one by one and the model answers each live;
tool episodes parse the model's tool calls, run them against the scenario's simulated tools and feed
the results back, until the email is sent or a limit is reached. At each step the engine gathers the
next request of every episode still running, across personas, stages, scenarios and samples, and
makes ONE `backend.generate` call for all of them (`RolloutEngine.run`).

Against a server (`Backend.async_capable`), `RolloutEngine.run_streaming` drops the step barrier:
each episode sends its next request as soon as its own reply arrives, with a bounded number of
requests in flight, so short episodes never wait for the slowest reply of a step. Both drivers
build each request with the same `_request`/`_advance` and per-episode-and-step seeds, so they
give the same rows.

Termination of tool episodes (outcome in brackets):
  - the first successful send_email when `stop_on_send` ("email");
  - an explicit `finish` call ("email" if one was sent before, else "no_email");
  - the episode's step budget ("max_steps", or "email" if one was sent and stop_on_send is off);
  - `max_malformed` consecutive turns with no parseable tool call ("malformed"); in
    tool_email_oneshot one such turn ends it, as a chat reply without an email ends a chat row;
  - a prompt that no longer fits the context ("context_overflow");
  - a reply that the backend failed or the engine aborted ("error", unless an email was sent).
A tool loop scored on its free text (`output: final`, agentic_actions) is not ended by a send:
`finish` ends it, with outcome "reply" (the bodies it sent and its finish message, joined) or
"empty" (neither); the step budget and malformed turns end it as above.

Chat episodes may continue a transcript: `spec.context` (pre-written turns) goes before the
first user turn. A structured answer (`output: fields`) is read from the reply by
`forms.read_answer` ("reply" with its free-text fields, "empty" or "malformed"); under the
constrained protocol its turn decodes under the grammar of `spec.response_schema`.

A reply the engine cut short for repetition is used like one cut at max_tokens; its turn index is
recorded in the row's `meta["repetition_turns"]`.

The step budget of an episode is `spec.max_steps`, sized from its scenario (`step_budget`). In
tool_email_oneshot a call other than send_email (the address check the operational prompt asks
for) gets its result and the model goes on within the budget; `meta["non_send_calls"]` counts
such calls in both tool modes, so "email after N look-ups" is on record.

"Is there an email, and what of it is scored?" has one answer for every slice:
`extraction.scored_email`, applied to a chat reply and to the body sent with send_email alike
(the wrapper stripped, the structure checked). The row's `text` is its result; `email` keeps
what was sent as it was sent. A sent body that fails it is kept in `email` but the outcome is
"no_email" (`meta["not_an_email"]`).
"""

from __future__ import annotations

import itertools
import json
import queue
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from charshift.backends.base import Backend, BackendDead
from charshift.constrain import tool_call_schema
from charshift.extraction import scored_email
from charshift.formats import compose_system
from charshift.forms import read_answer
from charshift.inputs import replace_surrogates
from charshift.schema import (
    Condition,
    EpisodeSpec,
    GenerationRow,
    GenRequest,
    GenResult,
    Message,
    Sampling,
    derive_seed,
)
from charshift.toolcalls import WorkStats, diagnose_tool_turn, parse_tool_calls
from charshift.tools import FINISH_TOOL, SEND_TOOL, result_message
from charshift.tools import required_args as tools_required


@dataclass
class RolloutSettings:
    max_steps: int = 8  # the agentic floor, and the budget of an episode with no needed_calls
    max_malformed: int = 3
    stop_on_send: bool = True
    native_tools: bool = False
    step_margin: int = 4
    # tool turns decode under the grammar of `tool_call_schema(spec.tools)` (tool_protocol
    # "constrained"); chat turns are never constrained
    constrained: bool = False


def step_budget(mode: str, needed_calls: int | None, max_steps: int, step_margin: int) -> int:
    """The model turns a tool episode may take: the calls a perfect agent needs plus the margin,
    and for agentic_email at least `max_steps`. Without `needed_calls`: `max_steps`."""
    if needed_calls is None:
        return max_steps
    budget = needed_calls + step_margin
    return max(max_steps, budget) if mode == "agentic" else budget


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
    body: str | None = None  # the scored email body (`extraction.scored_email`)
    outcome: str | None = None
    final_reply: str | None = None
    output_text: str | None = None  # the scored text of a "fields" or "final" output
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
        self.required_args = dict(tools_required() if required_args is None else required_args)

    # -- requests ----------------------------------------------------------------------------
    def _request(self, ep: Episode) -> GenRequest:
        if ep.spec.mode == "chat":
            if not ep.messages:  # a transcript the episode continues (pre-written turns)
                ep.messages.extend(dict(m) for m in ep.spec.context)
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
            json_schema=self._json_schema(ep, base_turn),
            session=ep.key,
        )

    def _json_schema(self, ep: Episode, base_turn: bool) -> dict[str, Any] | None:
        """Under the constrained protocol: a tool turn's call envelope, or the schema of a
        structured answer on the turn that gives it; chat turns are otherwise free."""
        if not self.settings.constrained or base_turn:
            return None
        if ep.spec.mode != "chat":
            return tool_call_schema(ep.spec.tools) if ep.spec.tools else None
        last = ep.next_turn == len(ep.spec.user_turns) - 1
        return ep.spec.response_schema if last else None

    # -- advancing ---------------------------------------------------------------------------
    def _advance_chat(self, ep: Episode, text: str) -> None:
        ep.messages.append({"role": "assistant", "content": text})
        ep.next_turn += 1
        if ep.next_turn < len(ep.spec.user_turns):
            return
        ep.final_reply = text
        if ep.spec.output == "fields":
            answer = read_answer(text, ep.spec.response_schema or {})
            ep.outcome, ep.output_text = answer.outcome, answer.text
            if answer.values is not None:
                ep.meta["form"] = answer.values
        elif ep.spec.output != "email":
            ep.outcome = "reply" if text.strip() else "empty"
        else:
            found = scored_email(text)
            if found is not None:
                ep.email = {"to": found.to, "subject": found.subject, "body": found.body}
                ep.body = found.body
                ep.outcome = "email"
            else:
                ep.outcome = "no_email"

    def _budget(self, ep: Episode) -> int:
        s = self.settings
        if ep.spec.max_steps is not None:
            return ep.spec.max_steps
        return step_budget(ep.spec.mode, ep.spec.needed_calls, s.max_steps, s.step_margin)

    @staticmethod
    def _ended(ep: Episode, otherwise: str) -> str:
        """The outcome of a tool episode that stops now: "email" if what was sent is an email
        by the one rule (its scored body goes to `ep.body`), "no_email" if something else was
        sent, else `otherwise`. A "final" output (agentic_actions) ends with its free text when
        `finish` ended it."""
        if ep.spec.output == "final":
            return _final_outcome(ep, otherwise)
        if ep.email is None:
            return otherwise
        subject = ep.email.get("subject")
        found = scored_email(
            ep.email.get("body"), subject=subject if isinstance(subject, str) else None
        )
        if found is not None:
            ep.body = found.body
            return "email"
        ep.meta["not_an_email"] = True
        return "no_email"

    def _advance_tools(self, ep: Episode, text: str) -> None:
        s = self.settings
        ep.messages.append({"role": "assistant", "content": text})
        ep.final_reply = text
        ep.meta["step_budget"] = self._budget(ep)
        read = WorkStats()
        calls = parse_tool_calls(text, stats=read)
        unread = read.note(len(text))
        if unread:  # the parser stopped early: a call after that point was not run
            ep.meta.setdefault("unread_tool_text", []).append(
                {"turn": ep.steps - 1, "note": unread}
            )
        if not calls:
            ep.malformed_run += 1
            ep.meta.setdefault("malformed_turns", []).append(ep.steps - 1)
            if ep.spec.mode == "tool_oneshot" or ep.malformed_run >= s.max_malformed:
                ep.outcome = self._ended(ep, "malformed")
                return
            ep.messages.append({"role": "user", "content": f"[error] {self._problem(ep, text)}"})
        elif self._run_calls(ep, calls):
            ep.outcome = self._ended(ep, "no_email")
            return
        if ep.steps >= ep.meta["step_budget"]:
            ep.outcome = self._ended(ep, "max_steps")

    def _problem(self, ep: Episode, text: str) -> str:
        known = [
            t["function"]["name"] if "function" in t else t["name"] for t in ep.spec.tools or []
        ]
        return diagnose_tool_turn(text, known, self.required_args) or (
            "No tool call found in your message."
        )

    def _run_calls(self, ep: Episode, calls: list[Any]) -> bool:
        """Run one turn's calls in order against the simulator; True when the episode ends."""
        s = self.settings
        ep.malformed_run = 0
        finished = False
        for call in calls:
            res = ep.simulator.call(call)
            if call.name != SEND_TOOL:
                ep.meta["non_send_calls"] = ep.meta.get("non_send_calls", 0) + 1
            if call.name == SEND_TOOL and res.ok and ep.email is None:
                ep.email = dict(res.email or {})
            if res.terminal:  # a "final" output goes on after a send, until finish
                finished = call.name == FINISH_TOOL or (
                    s.stop_on_send and ep.spec.output != "final"
                )
            ep.messages.append(result_message(call.name, res.content, s.native_tools))
            if finished:
                break
        if len(calls) > 1:
            ep.meta.setdefault("multi_call_turns", []).append(ep.steps - 1)
        return finished

    def _advance(self, ep: Episode, text: str, finish_reason: str) -> None:
        ep.steps += 1
        if text:  # a server's JSON can hold half a surrogate pair, which no file can store
            text, n_bad = replace_surrogates(text)
            if n_bad:
                ep.meta["surrogates_replaced"] = ep.meta.get("surrogates_replaced", 0) + n_bad
        if finish_reason == "context_overflow":
            ep.outcome = self._ended(ep, "context_overflow")
            return
        if finish_reason in ("error", "abort"):  # no usable reply came back
            ep.outcome = self._ended(ep, "error")
            return
        if finish_reason == "repetition":  # cut short like "length"; the text is still the reply
            ep.meta.setdefault("repetition_turns", []).append(ep.steps - 1)
        if ep.spec.mode == "chat":
            self._advance_chat(ep, text)
        else:
            self._advance_tools(ep, text)

    # -- driving -----------------------------------------------------------------------------
    def run(
        self,
        episodes: list[Episode],
        on_step: Callable[[int, int], None] | None = None,
        progress: Any = None,
    ) -> Iterator[list[GenerationRow]]:
        """Advance all episodes in lockstep; after each step, yield the rows that finished in it.
        `progress` (tqdm-like or a callable) counts model calls as the backend finishes them, so
        a long step shows movement before its rows are done."""
        active = [e for e in episodes if not e.done]
        while active:
            requests = [self._request(e) for e in active]
            results = self.backend.generate(requests, progress)
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

    def run_streaming(
        self,
        episodes: Iterable[Episode],
        max_in_flight: int = 256,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Iterator[list[GenerationRow]]:
        """Advance each episode as soon as its own reply arrives: no step barrier.

        At most `max_in_flight` requests are outstanding at once (`backend.submit`); an episode
        whose reply arrives sends its next request at once, and a new episode starts whenever a
        slot frees up (episodes are drawn lazily from `episodes`). Each request carries the seed
        of its episode and step, so a row's text does not depend on the interleaving: the rows
        equal those of `run`, in another order. Yields the rows finished at each wake-up.
        """
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        waiting = (e for e in episodes if not e.done)
        in_flight: dict[Future[GenResult], Episode] = {}
        replies: queue.SimpleQueue[Future[GenResult]] = queue.SimpleQueue()

        def send(ep: Episode) -> None:
            fut = self.backend.submit(self._request(ep))
            in_flight[fut] = ep
            fut.add_done_callback(replies.put)

        try:
            for ep in itertools.islice(waiting, max_in_flight):
                send(ep)
            while in_flight:
                done = [replies.get()]  # wait for one reply, then take all that are in
                while not replies.empty():
                    done.append(replies.get())
                finished: list[GenerationRow] = []
                for fut in done:
                    ep = in_flight.pop(fut)
                    res = _future_result(fut)
                    if res.error:
                        ep.meta.setdefault("errors", []).append(res.error)
                    self._advance(ep, res.text, res.finish_reason)
                    if ep.done:
                        finished.append(to_row(ep))
                    else:
                        send(ep)  # the episode goes on at once, in its own slot
                for ep in itertools.islice(waiting, max_in_flight - len(in_flight)):
                    send(ep)
                if on_step:
                    on_step(len(finished), len(in_flight))
                if finished:
                    yield finished
        finally:  # an error, Ctrl-C or an abandoned generator: drop what is still queued
            for fut in in_flight:
                fut.cancel()


def _future_result(fut: Future[GenResult]) -> GenResult:
    """A submitted request's result; an exception in the backend becomes an error result, except
    BackendDead (the engine is gone), which stops the run."""
    try:
        return fut.result()
    except BackendDead:
        raise
    except Exception as exc:  # noqa: BLE001 - one failed request must not end the other rows
        return GenResult("", "error", error=f"{type(exc).__name__}: {exc}")


def _final_outcome(ep: Episode, otherwise: str) -> str:
    """A tool loop scored on its free text: when `finish` ended it ("no_email" passed for a
    terminal call), "reply" with the bodies it sent and its finish message, or "empty" without
    any; otherwise how it stopped (max_steps, malformed, ...)."""
    if otherwise != "no_email":
        return otherwise
    sim = ep.simulator
    parts = [str(e.get("body") or "").strip() for e in getattr(sim, "sent", [])]
    finish = [c for c in getattr(sim, "log", []) if c.get("tool") == FINISH_TOOL and c.get("ok")]
    if finish:
        summary = finish[-1]["arguments"].get("summary")
        parts.append(summary.strip() if isinstance(summary, str) else "")
    text = "\n\n".join(p for p in parts if p)
    ep.output_text = text or None
    return "reply" if text else "empty"


def to_row(ep: Episode) -> GenerationRow:
    spec = ep.spec
    if ep.output_text is not None and ep.outcome in ("reply", "email"):
        text: str | None = ep.output_text
    elif ep.outcome == "email":
        text = ep.body or None
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
