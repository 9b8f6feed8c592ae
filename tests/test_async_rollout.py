"""The streaming rollout driver: no step barrier, bounded requests in flight, the same rows as
lockstep. Against a scripted backend whose replies arrive out of order, and the finish reasons
the rollout now sees (abort, error, repetition)."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from charshift import formats, scenarios
from charshift.backends.scripted import ScriptedBackend
from charshift.backends.settings import DEFAULT_MAX_IN_FLIGHT
from charshift.prompts import load_bundled_prompts
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import Condition, GenRequest, GenResult, Sampling, stable_hash
from charshift.toolsim import ToolSimulator

SLICES = ("agentic_email", "tool_email_oneshot", "chat_email_multiturn", "chat_email")


def call(name: str, **args: Any) -> str:
    return "```json\n" + json.dumps({"name": name, "arguments": args}) + "\n```"


def seeded_script(req: GenRequest) -> str:
    """A reply that depends only on the request (its seed and turn): episodes take different
    numbers of turns, some send an email, some never produce a tool call."""
    n_turns = sum(m["role"] == "assistant" for m in req.messages)
    roll = int(stable_hash([req.seed, req.adapter]), 16) % 6
    if roll == 0:
        return f"I cannot find a tool for this (seed {req.seed})."
    if n_turns < roll % 3:
        return call("search_documents", query=f"q{req.seed % 97}")
    body = f"Hello,\n\nUpdate number {req.seed % 1000}.\n\nBest,\nDana"
    return call("send_email", to="priya@example.com", subject="Update", body=body) + (
        f"\n\nHello Priya,\n\n{body}" if n_turns % 2 else ""
    )


class OutOfOrderBackend(ScriptedBackend):
    """The scripted backend behind a thread pool: `submit` returns at once and each reply arrives
    after a delay drawn from its seed, so replies come back in another order than sent."""

    async_capable = True

    def __init__(self, *args: Any, workers: int = 16, max_delay: float = 0.02, **kw: Any):
        super().__init__(*args, **kw)
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.max_delay = max_delay
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.log: list[tuple[str, str, int]] = []  # ("send" | "reply", last message, seed)

    def submit(self, request: GenRequest) -> Future[GenResult]:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.log.append(("send", _system(request), request.seed))
        return self.pool.submit(self._delayed, request)

    def _delayed(self, request: GenRequest) -> GenResult:
        time.sleep(random.Random(request.seed).random() * self.max_delay)
        [res] = self.generate([request])
        with self.lock:
            self.in_flight -= 1
            self.log.append(("reply", _system(request), request.seed))
        return res


def _system(req: GenRequest) -> str:
    return str(req.messages[0]["content"]) if req.messages[0]["role"] == "system" else ""


def make_episodes(n_per_slice: int = 12) -> list[Episode]:
    bank = scenarios.load_bank()
    prompts = load_bundled_prompts()
    eps = []
    for i in range(n_per_slice):
        sc = bank[i % len(bank)]
        cond = Condition("b", "full", "humor", adapter="full/humor", system_prompt=f"SP{i}")
        for slice_ in SLICES:
            spec = formats.render_email(slice_, sc)
            sim = ToolSimulator(sc) if spec.mode != "chat" else None
            eps.append(Episode(f"{slice_}-{i}", spec, cond, i % 2, 7, Sampling(), sim))
        spec = formats.render_id("id_chat", prompts[i])
        eps.append(Episode(f"id-{i}", spec, cond, 0, 7, Sampling()))
    return eps


def rows_by_key(batches: Any) -> dict[str, dict[str, Any]]:
    return {r.key: r.to_dict() for batch in batches for r in batch}


def engine_for(backend: Any) -> RolloutEngine:
    return RolloutEngine(backend, RolloutSettings(max_steps=4), formats.REQUIRED_ARGS)


def test_streaming_gives_the_lockstep_rows_whatever_the_reply_order():
    lockstep = rows_by_key(
        engine_for(ScriptedBackend(seeded_script, adapters=["full/humor"])).run(make_episodes())
    )
    backend = OutOfOrderBackend(seeded_script, adapters=["full/humor"])
    streamed = rows_by_key(engine_for(backend).run_streaming(make_episodes(), max_in_flight=7))
    assert streamed == lockstep  # row for row, every field
    assert len(lockstep) == 5 * 12
    assert len({r["outcome"] for r in lockstep.values()}) >= 3  # the episodes really differ
    assert len({r["n_steps"] for r in lockstep.values()}) >= 3
    assert backend.peak == 7  # bounded, and the bound was reached
    sent = [seed for what, _, seed in backend.log if what == "send"]
    replied = [seed for what, _, seed in backend.log if what == "reply"]
    assert sorted(sent) == sorted(replied) and sent != replied  # out of order, all answered


def test_an_episode_goes_on_as_soon_as_its_own_reply_arrives():
    # "SLOW" episodes take 0.5 s per reply; a "FAST" episode needs 3 turns. In lockstep the fast
    # one would wait for the slow reply at every step; streaming finishes it first.
    def script(req: GenRequest) -> str:
        n = sum(m["role"] == "assistant" for m in req.messages)
        return call("search_documents", query="x") if n < 2 else call("finish", summary="ok")

    class Slow(OutOfOrderBackend):
        def _delayed(self, request: GenRequest) -> GenResult:
            if _system(request).startswith("SLOW"):
                time.sleep(0.5)
            return super()._delayed(request)

    sc = scenarios.load_bank()[0]
    eps = [
        Episode(
            key,
            formats.render_email("agentic_email", sc),
            Condition("b", "prompted", "humor", system_prompt=key),
            0,
            0,
            Sampling(),
            ToolSimulator(sc),
        )
        for key in ("SLOW-1", "FAST", "SLOW-2")
    ]
    backend = Slow(script, max_delay=0.0)
    order = [row.key for batch in engine_for(backend).run_streaming(eps) for row in batch]
    assert order[0] == "FAST"
    fast_replies = [i for i, (w, s, _) in enumerate(backend.log) if w == "reply" and "FAST" in s]
    first_slow_reply = next(
        i for i, (w, s, _) in enumerate(backend.log) if w == "reply" and "SLOW" in s
    )
    assert len(fast_replies) == 3 and fast_replies[-1] < first_slow_reply


def test_new_episodes_start_lazily_as_slots_free_up():
    drawn: list[str] = []

    def lazy():
        for ep in make_episodes(2):
            drawn.append(ep.key)
            yield ep

    backend = OutOfOrderBackend(seeded_script, adapters=["full/humor"], max_delay=0.0)
    stream = engine_for(backend).run_streaming(lazy(), max_in_flight=3)
    next(stream)  # the first finished rows
    assert len(drawn) < 10  # not all drawn up front
    rest = [r for batch in stream for r in batch]
    assert len(drawn) == 10 and backend.peak <= 3 and len(rest) >= 1


def test_a_failed_future_is_an_error_row_not_a_crash():
    class Broken(OutOfOrderBackend):
        def _delayed(self, request: GenRequest) -> GenResult:
            raise ConnectionError("socket closed")

    eps = make_episodes(1)[:2]
    rows = rows_by_key(engine_for(Broken(seeded_script)).run_streaming(eps))
    assert {r["outcome"] for r in rows.values()} == {"error"}
    assert all("socket closed" in r["meta"]["errors"][0] for r in rows.values())


def test_a_dead_backend_stops_the_stream():
    from charshift.backends.base import BackendDead

    class Dead(OutOfOrderBackend):
        def _delayed(self, request: GenRequest) -> GenResult:
            raise BackendDead("the engine core died")

    with pytest.raises(BackendDead, match="engine core died"):
        list(engine_for(Dead(seeded_script)).run_streaming(make_episodes(1)))


def test_abandoning_the_stream_cancels_queued_requests():
    backend = OutOfOrderBackend(seeded_script, adapters=["full/humor"], workers=1, max_delay=0.05)
    stream = engine_for(backend).run_streaming(make_episodes(3), max_in_flight=8)
    next(stream)
    stream.close()  # e.g. Ctrl-C in the consumer
    time.sleep(0.3)
    replies = sum(1 for what, _, _ in backend.log if what == "reply")
    sends = sum(1 for what, _, _ in backend.log if what == "send")
    assert replies < sends  # the queued ones never ran


def tool_episode(sc: Any) -> Episode:
    spec = formats.render_email("agentic_email", sc)
    cond = Condition("b", "prompted", "humor")
    return Episode("k", spec, cond, 0, 0, Sampling(), ToolSimulator(sc))


@pytest.mark.parametrize(
    "reason,outcome",
    [("abort", "error"), ("error", "error"), ("repetition", "email"), ("length", "email")],
)
def test_finish_reasons_in_the_rollout(reason, outcome):
    sc = scenarios.load_bank()[0]
    body = "Hello Priya,\n\nThe order is late.\n\nBest,\nDana"
    text = call("send_email", to=sc.recipients[0].email, subject="Late", body=body)
    backend = ScriptedBackend(lambda req: GenResult(text, reason))
    ep = tool_episode(sc)
    [row] = [r for batch in engine_for(backend).run([ep]) for r in batch]
    assert row.outcome == outcome  # abort/error: the reply is not used; repetition: like length
    assert ("repetition_turns" in row.meta) == (reason == "repetition")


def test_abort_after_an_email_was_sent_keeps_the_email():
    sc = scenarios.load_bank()[0]
    body = "Hello Priya,\n\nThe order is late.\n\nBest,\nDana"
    turns = [call("send_email", to=sc.recipients[0].email, subject="Late", body=body)]

    def script(req: GenRequest) -> str | GenResult:
        n = sum(m["role"] == "assistant" for m in req.messages)
        return turns[0] if n == 0 else GenResult("", "abort")

    ep = tool_episode(sc)
    engine = RolloutEngine(
        ScriptedBackend(script), RolloutSettings(stop_on_send=False), formats.REQUIRED_ARGS
    )
    [row] = [r for batch in engine.run([ep]) for r in batch]
    assert row.outcome == "email" and row.email["body"] == body


def test_pipeline_streams_on_a_server_backend_and_steps_in_lockstep_elsewhere(monkeypatch):
    from charshift import pipeline
    from charshift.config import load_preset

    cfg = load_preset("smoke")
    used: list[tuple[str, Any]] = []

    def streaming(self, eps, max_in_flight=0):
        used.append(("stream", max_in_flight))
        return iter([])

    def lockstep(self, eps, progress=None):
        used.append(("run", len(eps)))
        return iter([])

    monkeypatch.setattr(RolloutEngine, "run_streaming", streaming)
    monkeypatch.setattr(RolloutEngine, "run", lockstep)
    monkeypatch.setattr(pipeline, "_episodes", lambda cfg, plan, rows: iter(rows))
    todo: Any = ["r1", "r2", "r3"]
    list(pipeline._drive(cfg, None, engine_for(OutOfOrderBackend()), todo, wave=2))  # type: ignore[arg-type]
    assert used == [("stream", DEFAULT_MAX_IN_FLIGHT)]
    used.clear()
    list(pipeline._drive(cfg, None, engine_for(ScriptedBackend()), todo, wave=2))  # type: ignore[arg-type]
    assert used == [("run", 2), ("run", 1)]  # waves of `wave` rows
