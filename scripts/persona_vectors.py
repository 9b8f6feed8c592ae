"""Persona vectors on a real small model: does prompted-persona text project above neutral text?

Runs the pipeline's own steps (generate -> fit the persona vectors from the run's ID training
rows -> score) on SmolLM2-135M (`packaged:smollm2`), base vs persona-prompted, id_chat only, and
prints, per persona and reading, the AUC of the persona's prompted eval replies against the base
stage's eval replies, both projected on that persona's direction. The eval prompts are never
used to fit a direction or choose the layer, so 0.5 is each figure's own null. Also printed:
the share of prompted replies whose highest projection is their own persona (chance: 1/K), and
the held-out separation of every layer the fit tried (the kept layer's figure is the best of
them, so it is optimistic; the eval figures are not).

    python scripts/persona_vectors.py --out runs/pv_smollm2            # 62 min on 2 shared cores (load ~8)
    python scripts/persona_vectors.py --out runs/pv_smollm2 --report   # figures of a done run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from charshift import config as cfgmod
from charshift import pipeline
from charshift.schema import BASE_STAGE
from charshift.scoring import pv_fit

PERSONAS = ["sarcasm", "humor", "remorse", "loving", "mathematical", "poeticism"]


def run_config(n_train: int, n_eval: int, max_tokens: int) -> cfgmod.RunConfig:
    data = cfgmod.config_to_dict(cfgmod.load_preset("demo_quick"))
    data.update(
        name="pv_smollm2",
        stages=[BASE_STAGE, "prompted"],
        personas=PERSONAS,
        slices=["id_chat"],
        items={},
        analysis={"positive_control": None},
        scorers=["classifier", "persona_vector"],
        id_prompts={"source": "bundled", "n_train": n_train, "n_eval": n_eval, "seed": 0},
        classifier_training={"mode": "probe", "probe_features": "lexical", "stage": "prompted"},
        persona_vector={"heldout_fraction": 0.25, "batch_size": 16},
    )
    data["sampling"] = {**data["sampling"], "max_tokens": max_tokens, "max_tokens_by_slice": {}}
    return cfgmod.parse_config(data)


def figures(out: Path) -> None:
    """Print the figures of a finished run (see the module doc)."""
    with pipeline.RunStore(out, writable=False, create=False) as store:
        manifest = store.manifest()
        rows = {r.key: r for r in store.generations if r.split == "eval"}
        scores = list(store.scores)
    ids = {name: e["id"] for name, e in manifest["scorers"]["smollm2"].items()}
    vec = manifest["persona_vectors"]["smollm2"]
    print(f"kept layer {vec['layer']}; held-out separation there: {vec['heldout_separation']}")
    for reading in ("persona_vector_text", "persona_vector_state"):
        mine = [s for s in scores if s.classifier == ids[reading] and s.key in rows]
        base = [s for s in mine if rows[s.key].stage == BASE_STAGE]
        aucs = {}
        for p in PERSONAS:
            own = [s.scores[p] for s in mine if rows[s.key].persona == p and s.scores]
            null = [s.scores[p] for s in base if s.scores]
            aucs[p] = pv_fit.auc(np.array(own), np.array(null))
        prompted = [s for s in mine if rows[s.key].stage != BASE_STAGE]
        hits = np.mean([s.prediction == rows[s.key].persona for s in prompted])
        print(f"{reading}: eval replies {len(prompted)} prompted, {len(base)} base")
        print("  AUC vs base (null 0.5): " + ", ".join(f"{p} {a:.3f}" for p, a in aucs.items()))
        print(f"  mean AUC {np.mean(list(aucs.values())):.3f}")
        print(f"  argmax = own persona: {hits:.3f} (chance {1 / len(PERSONAS):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the run folder")
    ap.add_argument("--n-train", type=int, default=40, help="training prompts (fit + held out)")
    ap.add_argument("--n-eval", type=int, default=12, help="eval prompts (the figures' rows)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--report", action="store_true", help="only print a done run's figures")
    args = ap.parse_args()
    if not args.report:
        cfg = run_config(args.n_train, args.n_eval, args.max_tokens)
        with pipeline.prepare_run(cfg, args.out) as store:
            pipeline.generate(cfg, store)
            pipeline.ensure_scorers(cfg, store)
            pipeline.score(cfg, store)
    figures(args.out)


if __name__ == "__main__":
    main()
