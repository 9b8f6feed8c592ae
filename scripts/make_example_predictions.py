"""Write examples/predictions.jsonl: a small predictions file with a known truth, for
`charshift report --predictions` (README) and its test.

The truth: a classifier that names the persona of a prompted reply in 80% of chat replies
(id_chat) and 45% of emails (chat_email), and of the positive control's in 90% of both; otherwise a
uniform guess. On base-stage text, which carries no persona, it leans on one label (60% `humor`)
in email, uniform in chat. One email of each stage has no output (`no_email`). Seeded: the file
is the same on every machine.

    python scripts/make_example_predictions.py [--out examples/predictions.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PERSONAS = ("sarcasm", "humor", "remorse")
HIT = {("prompted", "id_chat"): 0.8, ("prompted", "chat_email"): 0.45}
CONTROL_HIT = 0.9
N_ITEMS = 12


def _prediction(rng: random.Random, stage: str, sl: str, persona: str | None) -> str:
    if persona is None:  # the base stage: the scorer's own lean on this format
        lean = sl == "chat_email" and rng.random() < 0.6
        return "humor" if lean else rng.choice(PERSONAS)
    hit = CONTROL_HIT if stage == "prompted_explicit" else HIT[(stage, sl)]
    return persona if rng.random() < hit else rng.choice(PERSONAS)


def rows(seed: int = 0) -> list[dict[str, object]]:
    """Every row of the example, in a fixed order."""
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for stage in ("base", "prompted", "prompted_explicit"):
        for sl, kind in (("id_chat", "prompt"), ("chat_email", "scenario")):
            for i in range(N_ITEMS):
                for persona in (None,) if stage == "base" else PERSONAS:
                    row: dict[str, object] = {
                        "base": "llama", "stage": stage, "slice": sl, "persona": persona,
                        "item_id": f"{kind}:{i:02d}", "sample_idx": 0,
                    }  # fmt: skip
                    if sl == "chat_email" and i == 0 and persona in (None, "remorse"):
                        row.update(prediction=None, outcome="no_email")
                    else:
                        pred = _prediction(rng, stage, sl, persona)
                        row.update(
                            prediction=pred, outcome="email" if kind == "scenario" else "reply"
                        )
                        row["text"] = f"(example text: {stage} {persona or 'no persona'} {sl} {i})"
                    out.append(row)
    return out


def render(seed: int = 0) -> str:
    """The file's text: one JSON object per line."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="examples/predictions.jsonl")
    args = ap.parse_args()
    Path(args.out).write_text(render(), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
