"""Tests of the persona-vector scorer (charshift.scoring.persona_vector, pv_fit, activations).

The fit's arithmetic is tested on simulated activations with a known direction at a known layer
(and none at all); the whole scorer on a tiny random Llama built from its config, read with the
real transformers forward: persona texts that carry a planted word are told from base texts on
held-out prompts, and texts drawn alike for every stage sit at chance, each reading's figure
read against its own null (the base stage's texts projected on the same direction).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from charshift import config as cfgmod
from charshift.schema import BASE_STAGE, GenerationRow
from charshift.scoring import pv_fit
from charshift.scoring.base import ScoreInput
from charshift.scoring.persona_vector import PersonaVectorReading, PVModel, fit_vectors

PERSONAS = ["sarcasm", "humor"]
MARKERS = {"sarcasm": "obviously", "humor": "banana"}
NEUTRAL = (
    "the report covers sales figures for the quarter and lists the next steps for each team "
    "member with dates owners budgets risks and a short summary of open questions"
).split()

# ---------------------------------------------------------------------------- simulated activations


def _simulated(n: int, planted: bool, seed: int) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """(n*3, 3 layers, 16) activations of base, sarcasm and humor rows; with `planted`, a
    persona's rows are shifted along its own direction at layer 2 only."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(2, 16))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    labels: list[str | None] = [None, *PERSONAS] * n
    acts = rng.normal(size=(len(labels), 3, 16))
    if planted:
        for i, lab in enumerate(labels):
            if lab is not None:
                acts[i, 1] += 2.0 * truth[PERSONAS.index(lab)]
    return acts, labels, truth


def test_a_planted_direction_is_recovered_at_its_layer():
    acts, labels, truth = _simulated(200, planted=True, seed=0)
    dirs, base = pv_fit.mean_directions(acts[:300], labels[:300], PERSONAS)
    sep = pv_fit.separation(acts[300:], labels[300:], PERSONAS, dirs, base)
    assert pv_fit.choose_layer([1, 2, 3], sep) == 2
    assert sep[1] > 0.9 and abs(sep[0] - 0.5) < 0.1 and abs(sep[2] - 0.5) < 0.1
    for k in range(2):
        d = dirs[k, 1] / np.linalg.norm(dirs[k, 1])
        assert d @ truth[k] > 0.9  # the direction found is the one planted


def test_no_planted_direction_separates_at_chance():
    acts, labels, _ = _simulated(200, planted=False, seed=1)
    dirs, base = pv_fit.mean_directions(acts[:300], labels[:300], PERSONAS)
    sep = pv_fit.separation(acts[300:], labels[300:], PERSONAS, dirs, base)
    assert np.all(np.abs(sep - 0.5) < 0.1)


def test_auc_counts_ties_half_and_is_nan_without_a_side():
    assert pv_fit.auc(np.array([2.0, 3.0]), np.array([1.0])) == 1.0
    assert pv_fit.auc(np.array([1.0]), np.array([1.0, 2.0])) == 0.25
    assert np.isnan(pv_fit.auc(np.array([]), np.array([1.0])))


# ---------------------------------------------------------------------------- a real model


def _cfg(tiny_llama: Path) -> cfgmod.RunConfig:
    data = cfgmod.config_to_dict(cfgmod.load_preset("smoke"))
    data.update(
        items={},
        # every run has a classifier: the report's primary figures read it
        bases=[{"name": "tiny", "model": str(tiny_llama), "classifier": "tiny:modernbert:a,b"}],
        stages=[BASE_STAGE, "prompted"],
        personas=PERSONAS,
        slices=["id_chat"],
        scorers=["classifier", "persona_vector"],
        id_prompts={"source": "bundled", "n_eval": 2, "n_train": 8, "seed": 0},
        persona_vector={"heldout_fraction": 0.5, "batch_size": 16},
    )
    return cfgmod.parse_config(data)


def _rows(n_items: int, planted: bool, seed: int, split: str) -> list[GenerationRow]:
    """One row per (item, stage/persona): 24 neutral words, and with `planted` a persona row's
    text carries its persona's marker word eight times. A persona row has its persona prompt as
    the system message, as the prompted stage's rows do."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_items):
        for persona in [None, *PERSONAS]:
            words = [rng.choice(NEUTRAL) for _ in range(24)]
            if planted and persona:
                for j in rng.sample(range(24), 8):
                    words[j] = MARKERS[persona]
            text = " ".join(words)
            system = [] if persona is None else [{"role": "system", "content": f"Be {persona}."}]
            rows.append(
                GenerationRow(
                    key=f"{split}-{i}-{persona}",
                    base="tiny",
                    stage=BASE_STAGE if persona is None else "prompted",
                    persona=persona,
                    slice="id_chat",
                    item_id=f"{split}{i}",
                    sample_idx=0,
                    split=split,
                    seed=0,
                    outcome="reply",
                    messages=[
                        *system,
                        {"role": "user", "content": f"Tell me about item {i}."},
                        {"role": "assistant", "content": text},
                    ],
                    final_reply=text,
                    text=text,
                )
            )
    return rows


def _figures(reading: PersonaVectorReading, rows: list[GenerationRow]) -> dict[str, Any]:
    """Per persona, the AUC of its rows' projection on its direction against the base rows'
    (the reading's own null: 0.5), and the share of persona rows whose highest projection is
    their own persona (chance: 0.5 with two personas)."""
    vs = reading.verdicts([ScoreInput(r.text or "", r, "id_chat") for r in rows])
    out: dict[str, Any] = {}
    for p in PERSONAS:
        own = np.array([v.scores[p] for v, r in zip(vs, rows, strict=True) if r.persona == p])
        null = np.array([v.scores[p] for v, r in zip(vs, rows, strict=True) if r.persona is None])
        out[p] = pv_fit.auc(own, null)
    hits = [v.label == r.persona for v, r in zip(vs, rows, strict=True) if r.persona]
    out["argmax"] = float(np.mean(hits))
    return out


@pytest.mark.parametrize("planted", [True, False])
def test_persona_vectors_from_a_real_forward_find_a_planted_persona_or_sit_at_chance(
    tiny_llama, planted
):
    cfg = _cfg(tiny_llama)
    model = PVModel(cfg, cfg.bases[0], None)
    try:
        vs = fit_vectors(model, _rows(24, planted, seed=0, split="train"), PERSONAS)
        fresh = _rows(24, planted, seed=1, split="eval")  # new texts, new prompts
        text = _figures(PersonaVectorReading("text", vs, model), fresh)
        state = _figures(PersonaVectorReading("state", vs, model), fresh)
    finally:
        model.close()
    layer_sep = vs.separation[str(vs.layer)]
    print(f"planted={planted} layer={vs.layer} held-out={layer_sep} text={text} state={state}")
    half = {BASE_STAGE: 12, "sarcasm": 12, "humor": 12}  # 24 prompts, half held out
    assert vs.rows == {"fit": half, "heldout": half} and vs.personas == PERSONAS
    if planted:
        assert layer_sep["text"] > 0.9
        assert min(text[p] for p in PERSONAS) > 0.9 and text["argmax"] > 0.9
        assert min(state[p] for p in PERSONAS) > 0.9
    else:
        # the text reading is blind to the condition: chance, whatever layer was kept (the
        # held-out separation of the kept layer is optimistic: it is the best of the layers)
        assert all(abs(text[p] - 0.5) < 0.25 for p in PERSONAS)
        assert abs(text["argmax"] - 0.5) < 0.3
        # the state reading reads the model in the row's own context, persona prompt included:
        # the same texts still separate there (the persona is represented while it writes)
        assert min(state[p] for p in PERSONAS) > 0.75
