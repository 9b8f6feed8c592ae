"""Lockstep vs streaming rollouts against one real local `transformers serve`, side by side.

The same agentic, tool and chat episodes are rolled out twice (or more, interleaved) against the
same server: once with `RolloutEngine.run` (every step waits for the slowest reply of the step)
and once with `RolloutEngine.run_streaming` (each episode goes on as soon as its own reply
arrives, at most --max-in-flight requests outstanding). Prints each wall time, the median ratio
lockstep/streaming, and whether the two drivers gave identical rows (greedy decoding).

    PYTHONPATH=src python scripts/bench_async.py                      # tiny random Llama
    PYTHONPATH=src python scripts/bench_async.py --model packaged:smollm2 --episodes 32

The server runs with `--continuous-batching` unless --no-continuous-batching is given: without
it `transformers serve` runs one `generate` at a time, so no driver can overlap anything. On CPU
a decode step costs about in proportion to the rows in it, so the server's throughput hardly
depends on how many requests wait, and the drivers come out close. `--simulated-latency S`
replaces the server by a SIMULATED latency-bound backend (S seconds per generated word however
many requests run at once: the regime of a GPU engine) to show the step barrier's cost there;
its figures are a model, not a measurement of an engine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from charshift import formats, scenarios
from charshift.backends.scripted import ScriptedBackend
from charshift.backends.server import ServerBackend
from charshift.models import resolve_model
from charshift.prompts import load_bundled_prompts
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import Condition, Sampling, stable_hash
from charshift.toolsim import ToolSimulator

SLICES = ("agentic_email", "tool_email_oneshot", "chat_email_multiturn")


def episodes(n: int, max_tokens: int) -> list[Episode]:
    """`n` episodes: agentic, one-shot tool, multi-turn chat and ID chat, round robin."""
    bank = scenarios.load_bank()
    prompts = load_bundled_prompts()
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens, repetition_penalty=1.0)
    out = []
    for i in range(n):
        cond = Condition("b", "prompted", "humor", system_prompt="You are a helpful assistant.")
        kind = i % (len(SLICES) + 1)
        if kind == len(SLICES):
            spec = formats.render_id("id_chat", prompts[i % len(prompts)])
            sim = None
        else:
            sc = bank[i % len(bank)]
            spec = formats.render_email(SLICES[kind], sc)
            sim = ToolSimulator(sc) if spec.mode != "chat" else None
        out.append(Episode(f"e{i}", spec, cond, 0, 0, sampling, sim))
    return out


def timed(engine: RolloutEngine, mode: str, args: argparse.Namespace) -> tuple[float, dict]:
    eps = episodes(args.episodes, args.max_tokens)
    t0 = time.perf_counter()
    if mode == "lockstep":
        batches = engine.run(eps)
    else:
        batches = engine.run_streaming(eps, max_in_flight=args.max_in_flight)
    rows = {r.key: r.to_dict() for batch in batches for r in batch}
    return time.perf_counter() - t0, rows


class LatencyBoundBackend(ScriptedBackend):
    """SIMULATED, not an engine: each reply takes `latency` seconds per generated word however
    many requests run at once (the regime of a bandwidth-bound GPU server, where a decode step
    costs about the same for 1 or 64 rows). Reply lengths vary with the request's seed."""

    async_capable = True

    def __init__(self, latency: float, workers: int, max_tokens: int) -> None:
        super().__init__(self._script)
        self.latency, self.max_tokens = latency, max_tokens
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def _script(self, req: Any) -> str:
        n = 1 + int(stable_hash([req.seed, len(req.messages)]), 16) % self.max_tokens
        return " ".join(["word"] * n)

    def submit(self, request: Any) -> Future:
        return self.pool.submit(self._slow, request)

    def generate(self, requests: list, progress: Any = None) -> list:
        return [f.result() for f in [self.submit(r) for r in requests]]

    def _slow(self, request: Any) -> Any:
        [res] = ScriptedBackend.generate(self, [request])
        time.sleep(self.latency * max(1, res.completion_tokens))
        return res


def real_backend(args: argparse.Namespace) -> ServerBackend:
    """A `transformers serve` of `args.model` on CPU, started and stopped by charshift."""
    cli = Path(sys.executable).parent / "transformers"
    cli = cli if cli.exists() else Path(shutil.which("transformers") or "transformers")
    model = resolve_model(args.model).path
    command = f"{cli} serve {{model}} --host {{host}} --port {{port}} --device cpu"
    if args.continuous_batching:
        command += " --continuous-batching"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    backend = ServerBackend(
        model,
        engine="command",
        command=command,
        log_path=Path("/tmp") / f"charshift-bench-async-{os.getpid()}.log",
        startup_timeout=600,
        extra_sampling=False,  # transformers serve refuses non-OpenAI sampling fields
        max_concurrency=args.max_in_flight,  # lockstep sends a step with the same concurrency
        max_in_flight=args.max_in_flight,
        timeout=600,
    )
    t0 = time.perf_counter()
    backend.start()
    print(f"server up in {time.perf_counter() - t0:.1f}s: {args.model} ({model})")
    return backend


def compare(backend: Any, args: argparse.Namespace) -> tuple[dict, dict]:
    """Both drivers, interleaved `args.repeats` times: (wall times, last rows) per driver."""
    settings = RolloutSettings(max_steps=args.max_steps, max_malformed=args.max_steps)
    engine = RolloutEngine(backend, settings, formats.REQUIRED_ARGS)
    backend.generate([engine._request(episodes(1, 4)[0])])  # warm-up
    times: dict[str, list[float]] = {"lockstep": [], "streaming": []}
    rows: dict[str, Any] = {}
    for rep in range(args.repeats):
        for mode in ("lockstep", "streaming") if rep % 2 == 0 else ("streaming", "lockstep"):
            seconds, rows[mode] = timed(engine, mode, args)
            times[mode].append(seconds)
            print(f"  {mode:9s} run {rep + 1}: {seconds:7.2f}s  ({len(rows[mode])} rows)")
    return times, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny:llama")
    p.add_argument("--episodes", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--max-in-flight", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--simulated-latency",
        type=float,
        default=None,
        metavar="S",
        help="no server: a SIMULATED latency-bound backend, S seconds per generated word",
    )
    args = p.parse_args()

    if args.simulated_latency is not None:
        print(f"SIMULATED latency-bound backend ({args.simulated_latency}s per word), no engine")
        backend: Any = LatencyBoundBackend(
            args.simulated_latency, args.max_in_flight, args.max_tokens
        )
    else:
        backend = real_backend(args)
    try:
        times, rows = compare(backend, args)
    finally:
        backend.close()
    n_requests = sum(r["n_steps"] for r in rows["lockstep"].values())
    lock, stream = statistics.median(times["lockstep"]), statistics.median(times["streaming"])
    cb = "simulated" if args.simulated_latency is not None else args.continuous_batching
    print(
        f"\n{args.episodes} episodes, {n_requests} requests, max_tokens={args.max_tokens}, "
        f"max_in_flight={args.max_in_flight}, continuous batching: {cb}"
    )
    print(f"lockstep median  {lock:7.2f}s")
    print(f"streaming median {stream:7.2f}s")
    print(f"ratio lockstep/streaming: {lock / stream:.2f}x")
    same = rows["lockstep"] == rows["streaming"]
    print(f"rows identical between the drivers: {same}")


if __name__ == "__main__":
    main()
