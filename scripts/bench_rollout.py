"""Lockstep rollouts against one-rollout-at-a-time, same backend, same model, one run.

    python scripts/bench_rollout.py [--model packaged:smollm2] [--n-scenarios 4] [--max-tokens 64]

Builds agentic_email episodes (scenarios x prompted personas), runs them once with the lockstep
engine (one batched backend call per step for every active rollout) and once one rollout at a time
through the same engine and backend, and prints both wall times, the ratio, and how many rows came
out identical (per-row seeds make a row's text independent of its batch, up to float noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from charshift import formats, prompts, scenarios
from charshift.backends.hf import HFBackend
from charshift.pipeline import cache_dir
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import Condition, Sampling, stable_hash
from charshift.toolsim import ToolSimulator


def episodes(n_scen: int, personas: list[str], sampling: Sampling, max_steps: int) -> list[Episode]:
    bank = scenarios.select_scenarios(scenarios.load_bank(), n=n_scen, seed=0)
    out = []
    for sc in bank:
        # a fixed step budget (--max-steps) instead of the scenario-sized one of a run
        spec = dataclasses.replace(formats.render_email("agentic_email", sc), max_steps=max_steps)
        for p in personas:
            cond = Condition("bench", "prompted", p, system_prompt=prompts.persona_system_prompt(p))
            out.append(
                Episode(
                    key=stable_hash([sc.id, p]),
                    spec=spec,
                    condition=cond,
                    sample_idx=0,
                    run_seed=0,
                    sampling=sampling,
                    simulator=ToolSimulator(sc),
                )
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="packaged:smollm2")
    ap.add_argument("--n-scenarios", type=int, default=4)
    ap.add_argument("--personas", default="sarcasm,humor,remorse,poeticism")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    personas = args.personas.split(",")
    sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=args.max_tokens)
    backend = HFBackend(args.model, batch_size=args.batch_size, cache_dir=cache_dir())
    settings = RolloutSettings(max_steps=args.max_steps, max_malformed=args.max_steps)
    engine = RolloutEngine(backend, settings, formats.REQUIRED_ARGS)

    eps = episodes(args.n_scenarios, personas, sampling, args.max_steps)
    t0 = time.perf_counter()
    lock = {r.key: r for step in engine.run(eps) for r in step}
    t_lock = time.perf_counter() - t0

    eps = episodes(args.n_scenarios, personas, sampling, args.max_steps)
    t0 = time.perf_counter()
    seq = {}
    for ep in eps:
        for step in engine.run([ep]):
            seq.update({r.key: r for r in step})
    t_seq = time.perf_counter() - t0

    same = sum(lock[k].messages == seq[k].messages for k in lock)
    steps = sum(r.n_steps for r in lock.values())
    print(f"model {args.model}: {len(lock)} agentic rollouts, {steps} model turns in all")
    print(f"lockstep (one batched call per step): {t_lock:8.1f} s")
    print(f"one rollout at a time:                {t_seq:8.1f} s")
    print(f"speed-up: {t_seq / t_lock:.2f}x; identical trajectories: {same}/{len(lock)}")


if __name__ == "__main__":
    main()
