"""KV reuse across an episode's steps: the quick demo's rollouts with reuse off and on, one run.

    python scripts/bench_kv.py [--model packaged:smollm2] [--n-scenarios 2] [--max-steps 3]

Builds the quick demo's multi-step slices (agentic_email: the tool loop; chat_email_multiturn:
three live user turns) for a few scenarios and persona-prompted conditions, with the demo
preset's sampling and token budget, and runs them through the lockstep rollout engine twice per
round on the same model: on a backend with KV reuse off (`kv_cache_mb=0`: every step prefills the
whole conversation) and on one with it on (each step prefills only what its episode added). It
prints both wall times, the ratio, the prompt tokens each prefilled, and whether every
trajectory (all messages, outcome, steps) is identical. Malformed tool turns do not end an
episode before `--max-steps` (max_malformed = max_steps), so every episode runs its steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from charshift import formats, prompts, scenarios
from charshift.backends.hf import HFBackend
from charshift.config import load_preset
from charshift.models import default_cache_dir
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import Condition, GenerationRow, Sampling
from charshift.toolsim import ToolSimulator

SLICES = ("agentic_email", "chat_email_multiturn")


def episodes(n_scen: int, personas: list[str], sampling: Sampling, seed: int) -> list[Episode]:
    bank = scenarios.select_scenarios(scenarios.load_bank(), n=n_scen, seed=seed)
    out = []
    for slice_ in SLICES:
        for sc in bank:
            spec = formats.render_email(slice_, sc)
            for p in personas:
                system = prompts.persona_system_prompt(p)
                out.append(
                    Episode(
                        key=f"{slice_}/{sc.id}/{p}",
                        spec=spec,
                        condition=Condition("bench", "prompted", p, system_prompt=system),
                        sample_idx=0,
                        run_seed=seed,
                        sampling=sampling,
                        simulator=ToolSimulator(sc) if spec.mode != "chat" else None,
                    )
                )
    return out


def rollout(
    backend: HFBackend, args: argparse.Namespace, sampling: Sampling
) -> tuple[float, dict[str, GenerationRow], int]:
    """Wall time, rows by key, and prompt tokens prefilled, for one full set of rollouts."""
    settings = RolloutSettings(max_steps=args.max_steps, max_malformed=args.max_steps)
    engine = RolloutEngine(backend, settings, formats.REQUIRED_ARGS)
    eps = episodes(args.n_scenarios, args.personas.split(","), sampling, args.seed)
    backend.clear_sessions()
    before = backend.kv_stats()["prefill_tokens"]
    t0 = time.perf_counter()
    rows = {r.key: r for step in engine.run(eps) for r in step}
    return time.perf_counter() - t0, rows, backend.kv_stats()["prefill_tokens"] - before


def same(a: GenerationRow, b: GenerationRow) -> bool:
    return (a.messages, a.outcome, a.n_steps) == (b.messages, b.outcome, b.n_steps)


def main() -> None:
    preset = load_preset("demo_quick")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=preset.bases[0].model)
    ap.add_argument("--n-scenarios", type=int, default=2)
    ap.add_argument("--personas", default=",".join(preset.personas[:3]))
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=preset.sampling.max_tokens)
    ap.add_argument("--batch-size", type=int, default=preset.backend.batch_size)
    ap.add_argument("--dtype", default=preset.backend.dtype, help="model dtype (the preset's)")
    ap.add_argument("--rounds", type=int, default=1, help="off/on pairs to run (best is shown)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = preset.sampling
    sampling = Sampling(s.temperature, s.top_p, args.max_tokens, s.repetition_penalty)
    common = dict(
        device=preset.backend.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_batch_tokens=preset.backend.max_batch_tokens,
        cache_dir=default_cache_dir(),
    )
    off = HFBackend(args.model, kv_cache_mb=0, **common)
    on = HFBackend(args.model, **common)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        t_off, rows_off, pre_off = rollout(off, args, sampling)
        t_on, rows_on, pre_on = rollout(on, args, sampling)
        times["off"].append(t_off)
        times["on"].append(t_on)
    identical = sum(same(rows_off[k], rows_on[k]) for k in rows_off)
    turns = sum(r.n_steps for r in rows_on.values())
    print(
        f"model {args.model}, torch threads {torch.get_num_threads()}: {len(rows_on)} rollouts "
        f"({', '.join(SLICES)}; {args.n_scenarios} scenarios x personas {args.personas}), "
        f"{turns} model turns, max_tokens {args.max_tokens}, max_steps {args.max_steps}"
    )
    print(f"prompt tokens prefilled: reuse off {pre_off}, on {pre_on} ({pre_on / pre_off:.2f}x)")
    best_off, best_on = min(times["off"]), min(times["on"])
    print(f"wall time, reuse off: {best_off:8.1f} s   (rounds: {times['off']})")
    print(f"wall time, reuse on:  {best_on:8.1f} s   (rounds: {times['on']})")
    print(
        f"speed-up: {best_off / best_on:.2f}x; identical trajectories: {identical}/{len(rows_on)}"
    )
    print(f"kv reuse counters: {on.kv_stats()}")


if __name__ == "__main__":
    main()
