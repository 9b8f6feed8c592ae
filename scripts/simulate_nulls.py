"""Simulated worlds with no persona: how often charshift claims one anyway.

The worlds and their truth are those of tests/test_stats_simulation.py (issue 13), run here
with more repetitions than a test can afford. Prints:

1. case a: no persona, a base stage that names one label 87% of the time, prompted predictions
   uniform and unrelated to the persona (K = 4, 30 prompts): the coverage of 0 by the prompted
   id_chat excess interval, how often its lower bound clears 0 (a false "detected"), and the
   old comparison (raw prompted minus raw base) for contrast;
2. a format-skewed scorer with no persona (85% one label on scenario units, uniform on chat):
   per unit, the coverage of 0 by the excess interval and on which side it misses, at
   10, 15 and 30 items;
3. the familywise error of the primary family under that global null (two trained stages,
   six members): any member's simultaneous band excluding 0, and any Holm p below 0.05.

Usage: python scripts/simulate_nulls.py [--reps 400] [--n-boot 500] [--n-perm 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

from charshift import stats

ROOT = Path(__file__).resolve().parents[1]


def _worlds() -> ModuleType:
    """The simulation module of the tests (its worlds, generator and truth)."""
    spec = importlib.util.spec_from_file_location(
        "stats_simulation", ROOT / "tests/test_stats_simulation.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["stats_simulation"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def case_a(sim: ModuleType, reps: int, n_boot: int, seed: int, n_perm: int) -> None:
    base = (0.87, 0.05, 0.04, 0.04, 0.0)
    world = sim.World({("prompted", "id_chat"): 0.0}, {"id_chat": sim.UNIFORM},
                      base={"id_chat": base})  # fmt: skip
    rng = np.random.default_rng(seed)
    cover = above = 0
    old = []
    for rep in range(reps):
        res = stats.compute_metrics(sim.draw_world(world, rng, 30, 0), sim.PERSONAS,
                                    n_boot=n_boot, seed=rep, n_perm=n_perm)  # fmt: skip
        iv = res.get("sim", "prompted", "id_chat").macro_f1_excess
        cover += iv.lo <= 0 <= iv.hi
        above += iv.lo > 0
        old.append(res.get("sim", "prompted", "id_chat").macro_f1.estimate
                   - res.get("sim", "base", "id_chat").macro_f1.estimate)  # fmt: skip
    print(f"case a ({reps} runs, 30 prompts): excess interval covers 0 in {cover / reps:.3f}, "
          f"lower bound above 0 in {above / reps:.3f} (nominal 0.025); raw prompted - base "
          f"{np.mean(old):+.3f} on average")  # fmt: skip


def skewed_coverage(
    sim: ModuleType, reps: int, n_items: int, n_boot: int, seed: int, n_perm: int
) -> None:
    world = sim.null_world(("prompted",))
    rng = np.random.default_rng([seed, n_items])
    hits: dict[str, list[tuple[bool, bool]]] = {}
    for rep in range(reps):
        res = stats.compute_metrics(sim.draw_world(world, rng, n_items, n_items), sim.PERSONAS,
                                    n_boot=n_boot, seed=rep, n_perm=n_perm,
                                    differences=False)  # fmt: skip
        for c in res.cells.values():
            if not c.null:
                iv = c.macro_f1_excess
                hits.setdefault(c.cell.slice, []).append((iv.lo > 0, iv.hi < 0))
    for unit, h in hits.items():
        above, below = np.mean([a for a, _ in h]), np.mean([b for _, b in h])
        print(
            f"  {n_items:3d} items  {unit:15s} covers {1 - above - below:.3f}  "
            f"lower bound > 0: {above:.3f}  upper bound < 0: {below:.3f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-perm", type=int, default=1000, help="permutations per cell (0: none, "
                    "so no permutation floor on the excess intervals)")  # fmt: skip
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    sim = _worlds()
    case_a(sim, args.reps, args.n_boot, args.seed, args.n_perm)
    print("format-skewed scorer, no persona: excess interval per unit (nominal 0.95; each "
          "side 0.025)")  # fmt: skip
    for n_items in (10, 15, 30):
        skewed_coverage(sim, args.reps, n_items, args.n_boot, args.seed, args.n_perm)
    print("primary family under that global null (2 trained stages, 6 members):")
    for n_items in (15, 30):
        out = sim.familywise_error(args.reps, n_items, args.n_boot, args.seed, args.n_perm)
        print(f"  {n_items:3d} items: familywise error, simultaneous band {out['fwer_band']:.3f}"
              f", Holm p < 0.05 {out['fwer_holm']:.3f}; cell excess intervals cover 0 in "
              f"{out['cover']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
