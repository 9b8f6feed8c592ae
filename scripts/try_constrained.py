"""How many one-shot tool turns end in a valid send_email call, with and without the grammar.

Runs the real rollout engine on `tool_email_oneshot` episodes (the first N scenarios of the bundled
bank, each under a persona system prompt, personas in turn) twice with the same seeds: once with
the JSON protocol (prompt only) and once with the constrained protocol (the same prompt, the call
envelope enforced during decoding). For each protocol it prints, per row and in total:

  finish     how the model's turn ended (stop / length / error)
  parsed     the turn holds at least one tool call (charshift.toolcalls.parse_tool_calls)
  send_args  a send_email call carrying every required argument (formats.REQUIRED_ARGS)
  email      the simulator accepted it and the row's outcome is "email" (recipients resolve,
             body not empty): what the tool slice counts as an output

Usage (SmolLM2 on CPU takes a few minutes):
    PYTHONPATH=src python scripts/try_constrained.py --n 6 --max-tokens 300
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from charshift import formats, prompts, scenarios
from charshift.backends.hf import HFBackend
from charshift.constrain import row_constraint, tool_call_schema
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import Condition, GenRequest, GenResult, Sampling
from charshift.toolcalls import parse_tool_calls
from charshift.toolsim import ToolSimulator

DEFAULT_PERSONAS = ("sarcasm", "humor", "remorse", "goodness", "loving", "poeticism")


class Recording:
    """Passes requests to a backend and keeps every (request, result) pair."""

    def __init__(self, backend: HFBackend) -> None:
        self.backend = backend
        self.log: list[tuple[GenRequest, GenResult]] = []

    def generate(self, requests: list[GenRequest], progress: Any = None) -> list[GenResult]:
        results = self.backend.generate(requests, progress)
        self.log.extend(zip(requests, results, strict=True))
        return results

    def context_length(self) -> int:
        return self.backend.context_length()


def episodes(n: int, personas: list[str], sampling: Sampling, seed: int) -> list[Episode]:
    out = []
    for i, sc in enumerate(scenarios.load_bank()[:n]):
        persona = personas[i % len(personas)]
        spec = formats.render_email("tool_email_oneshot", sc)
        cond = Condition(
            "smollm2", "prompted", persona, system_prompt=prompts.persona_system_prompt(persona)
        )
        out.append(
            Episode(
                key=f"{sc.id}/{persona}",
                spec=spec,
                condition=cond,
                sample_idx=0,
                run_seed=seed,
                sampling=sampling,
                simulator=ToolSimulator(sc),
            )
        )
    return out


def judge(text: str) -> tuple[bool, bool]:
    calls = parse_tool_calls(text)
    need = formats.REQUIRED_ARGS["send_email"]
    send = any(c.name == "send_email" and all(a in c.arguments for a in need) for c in calls)
    return bool(calls), send


def run(backend: HFBackend, constrained: bool, args: argparse.Namespace) -> dict[str, Any]:
    sampling = Sampling(args.temperature, args.top_p, args.max_tokens, args.repetition_penalty)
    eps = episodes(args.n, args.personas, sampling, args.seed)
    rec = Recording(backend)
    settings = RolloutSettings(max_steps=1, max_malformed=1, constrained=constrained)
    engine = RolloutEngine(rec, settings, formats.REQUIRED_ARGS)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    rows = {r.key: r for step in engine.run(eps) for r in step}
    seconds = time.perf_counter() - t0
    table = []
    for ep, (req, res) in zip(eps, rec.log, strict=True):
        parsed, send = judge(res.text)
        row = rows[ep.key]
        table.append(
            {
                "key": ep.key,
                "finish": res.finish_reason,
                "tokens": res.completion_tokens,
                "parsed": parsed,
                "send_args": send,
                "email": row.outcome == "email",
                "outcome": row.outcome,
                "constrained": req.json_schema is not None,
                "text": res.text,
            }
        )
    return {"rows": table, "seconds": seconds}


def grammar_cost(backend: HFBackend) -> float:
    """Milliseconds per token of the grammar work alone (mask + advance), teacher-forcing a
    send_email call with a 12-line body on this model's vocabulary."""
    body = "\n".join(f'Line {i}: the order ships on Thursday, "as agreed".' for i in range(12))
    call = {"name": "send_email", "arguments": {"to": "a@b.org", "subject": "Order", "body": body}}
    ids = backend.tokenizer(json.dumps(call), add_special_tokens=False)["input_ids"]
    schema = tool_call_schema(formats.TOOL_SPECS)
    row_constraint(backend.tokenizer, schema, backend._stop_ids)  # compile outside the timing
    t0 = time.perf_counter()
    rc = row_constraint(backend.tokenizer, schema, backend._stop_ids)
    width = backend._peek_vocab()
    for t in ids:
        assert bool(rc.allowed(width)[t]), "the grammar refused a valid call"
        rc.accept(t)
    assert rc.done and rc.error is None
    return 1000 * (time.perf_counter() - t0) / len(ids)


def summary(name: str, out: dict[str, Any]) -> str:
    rows = out["rows"]
    n = len(rows)
    count = {k: sum(bool(r[k]) for r in rows) for k in ("parsed", "send_args", "email")}
    stops = sum(r["finish"] == "stop" for r in rows)
    return (
        f"{name:12s} finish=stop {stops}/{n}  parsed {count['parsed']}/{n}  "
        f"send_email+required args {count['send_args']}/{n}  outcome email {count['email']}/{n}  "
        f"({out['seconds']:.0f} s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="packaged:smollm2")
    ap.add_argument("--n", type=int, default=6, help="scenarios (first N of the bundled bank)")
    ap.add_argument("--personas", nargs="+", default=list(DEFAULT_PERSONAS))
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--repetition-penalty", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--show", action="store_true", help="print every reply")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()

    backend = HFBackend(args.model, device=args.device, batch_size=max(args.n, 1))
    print(f"model {args.model}, {args.n} tool_email_oneshot prompts, max_tokens {args.max_tokens}")
    results = {}
    for name in ("json", "constrained"):
        out = results[name] = run(backend, name == "constrained", args)
        print(summary(name, out), flush=True)
        for r in out["rows"]:
            flags = " ".join(k for k in ("parsed", "send_args", "email") if r[k]) or "-"
            print(f"  {r['key']:40s} {r['finish']:6s} {r['tokens']:4d} tok  {flags}")
            if args.show:
                print("    " + json.dumps(r["text"])[:600])
    print(f"grammar work: {grammar_cost(backend):.2f} ms per token (mask + advance, one row)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
