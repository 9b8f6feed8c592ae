"""How well the length controls match the lengths they are meant to match, side by side.

For `id_chat.short` the question is whether the cut replies' length distribution equals that of
the chat_email bodies of the same (base, stage, persona); for `SLICE.head`, whether each cut
reply is as long as its own body. Both are measured in the scorer's tokens, for two schemes:

  before  the scheme this replaced: `.head` cut to the body's word count, `id_chat.short` cut to
          the median body word count of the condition (a cap);
  after   `charshift.units`: cut in the scorer's tokens at a sentence end within 10%, and
          `id_chat.short` rank-matched to the body lengths.

Printed per scheme: the Kolmogorov-Smirnov distance between the short cuts' lengths and the
bodies' lengths (pooled over conditions, each condition's lengths divided by its bodies' median
so conditions of different lengths pool), their quartiles, the share of replies shorter than
their target, and the median relative length error of `.head` against its body.

    python scripts/length_controls.py --run runs/demo_quick      # a run's own rows and counter
    python scripts/length_controls.py --synthetic                # a planted set, MiniLM tokens
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import defaultdict
from pathlib import Path

from charshift import lengths, units
from charshift.schema import GenerationRow


def ks(a: list[float], b: list[float]) -> float:
    """The two-sample Kolmogorov-Smirnov distance (largest gap between the empirical CDFs)."""
    pts = sorted(set(a) | set(b))
    sa, sb = sorted(a), sorted(b)

    def cdf(s: list[float], x: float) -> float:
        lo, hi = 0, len(s)
        while lo < hi:
            mid = (lo + hi) // 2
            if s[mid] <= x:
                lo = mid + 1
            else:
                hi = mid
        return lo / len(s)

    return max(abs(cdf(sa, x) - cdf(sb, x)) for x in pts) if a and b else float("nan")


def quartiles(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs}"
    q = statistics.quantiles(xs, n=4)
    return f"{q[0]:.2f} / {statistics.median(xs):.2f} / {q[2]:.2f}"


def before_short(rows: list[GenerationRow]) -> dict[str, str]:
    """The replaced scheme: each id_chat reply cut to its condition's median body word count."""
    words: dict[tuple, list[int]] = defaultdict(list)
    for r in rows:
        if r.slice == "chat_email" and r.outcome == "email" and r.text:
            words[(r.base, r.stage, r.persona)].append(len(r.text.split()))
    out = {}
    for r in rows:
        n = words.get((r.base, r.stage, r.persona))
        if r.slice == "id_chat" and r.outcome == "reply" and r.text and n:
            out[r.key] = " ".join(r.text.split()[: statistics.median_low(n)])
    return out


def measure(rows: list[GenerationRow], counter: units.LengthCounter, label: str) -> None:
    rows = [r for r in rows if r.split == "eval"]
    count = lambda t: len(counter.starts(t))  # noqa: E731
    bodies: dict[tuple, list[int]] = defaultdict(list)
    for r in rows:
        if r.slice == "chat_email" and r.outcome == "email" and r.text:
            bodies[(r.base, r.stage, r.persona)].append(count(r.text))
    after = {
        u.row.key: u for u in units.unit_texts(rows, counters={rows[0].base: counter}) if u.text
    }
    old = before_short(rows)
    cond = {r.key: (r.base, r.stage, r.persona) for r in rows}
    med = {c: statistics.median(b) for c, b in bodies.items()}
    body_rel = [x / med[c] for c, b in bodies.items() for x in b]
    print(f"\n{label}: counter {counter.name}")
    print(f"  {len(bodies)} conditions, {len(body_rel)} chat_email bodies")
    print(f"  bodies' length / condition median, quartiles: {quartiles(body_rel)}")
    for name, texts in (
        ("before", old),
        ("after", {u.row.key: u.text for u in after.values() if u.unit == "id_chat.short"}),
    ):
        rel = [count(t) / med[cond[k]] for k, t in texts.items() if t]
        print(
            f"  id_chat.short {name:6s}: {len(rel)} cuts, quartiles {quartiles(rel)}, "
            f"KS distance to the bodies {ks(rel, body_rel):.3f}"
        )
    shorts = [u for u in after.values() if u.unit == "id_chat.short"]
    n_short = sum(u.length["cut"] == "short" for u in shorts)
    print(f"  id_chat.short after: {n_short} of {len(shorts)} replies shorter than their target")
    head_before = []
    for r in rows:
        if r.slice == "chat_email" and r.outcome == "email" and r.text and r.final_reply:
            b = count(r.text)
            wcut = " ".join(r.final_reply.split()[: len(r.text.split())])
            head_before.append(abs(count(wcut) - b) / b)
    heads = [u for u in after.values() if u.unit.endswith(".head") and u.row.slice == "chat_email"]
    head_after = [abs(u.length["length"] - u.length["target"]) / u.length["target"] for u in heads]
    if head_before:
        print(
            f"  chat_email.head |length - body| / body, median (max): before "
            f"{statistics.median(head_before):.3f} ({max(head_before):.3f}), after "
            f"{statistics.median(head_after):.3f} ({max(head_after):.3f})"
        )


SENTENCES = [
    "The shipment of PO-4471 is late again.",
    "We expected it on 3 June, per the contract.",
    "Could you confirm a new date by Friday?",
    "I am sorry for the trouble this causes your team.",
    "Honestly, nothing about this surprises me anymore.",
    "The invoice INV-2025-0613 stays on hold until then.",
    "Thanks for your patience while we sort it out.",
    "Let's talk tomorrow at 10:30 if that suits you.",
]


def synthetic(seed: int = 0) -> list[GenerationRow]:
    """Six conditions; id_chat replies of 2-30 sentences (some shorter than any body), chat_email
    bodies of 3-12 sentences framed by a chat wrapper, 40 of each per condition."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(SENTENCES) for _ in range(n))

    rows = []
    for c in range(6):
        for i in range(40):
            reply = text(rng.randint(2, 30))
            body = "Hi Dana,\n\n" + text(rng.randint(3, 12)) + "\n\nBest,\nMaya"
            wrapped = "Sure, here is a draft of the email for PO-4471/ZX:\n\n" + body
            common = dict(base="b", stage="prompted", persona=f"p{c}", split="eval", seed=0)
            rows.append(GenerationRow(key=f"i{c}-{i}", slice="id_chat", item_id=f"prompt:{i}",
                                      sample_idx=0, outcome="reply", messages=[],
                                      final_reply=reply, text=reply, **common))  # fmt: skip
            rows.append(GenerationRow(key=f"c{c}-{i}", slice="chat_email", item_id=f"s{i}",
                                      sample_idx=0, outcome="email", messages=[],
                                      final_reply=wrapped, text=body, **common))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a run directory (its rows and its scorer's counter)")
    ap.add_argument("--synthetic", action="store_true", help="a planted set, MiniLM tokens")
    args = ap.parse_args()
    if args.synthetic:
        from transformers import AutoTokenizer

        from charshift.scoring.sources import packaged_minilm_dir

        class Clf:
            tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))

        counter, _ = lengths.counter_for(Clf())
        measure(synthetic(), counter, "synthetic set")
    if args.run:
        from charshift.store import RunStore

        store = RunStore(args.run, create=False, writable=False)
        cids = store.recorded("classifier_ids")
        counters = lengths.run_counters(store, cids)
        for base, counter in counters.items():
            rows = [r for r in store.generations if r.base == base]
            measure(rows, counter, f"{args.run} base {base}")
        for base in set(cids) - set(counters):
            rows = [r for r in store.generations if r.base == base]
            measure(rows, units.WORDS, f"{args.run} base {base}")


if __name__ == "__main__":
    main()
