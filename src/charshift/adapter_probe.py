"""Prove that every adapter is applied before any row is generated with it.

A backend can accept an adapter and still run the base model: SGLang given a bare adapter name as
`model`, a server started without the adapter mapped to the base's name, an adapter whose LoRA B
matrices are all zero. Every such row would silently be a base-model row. So, for each adapter,
the probe runs a few fixed prompts greedily (temperature 0, a short `max_tokens`) under the
adapter and under the base model, in one `generate` call, and compares:

  - next-token logits where the backend exposes them (`Backend.next_token_logits`; the HF backend
    through its model): the adapter is applied when, on some prompt, the largest absolute
    difference exceeds `rtol` times the largest base logit (at least `rtol`). More sensitive than
    text: a small LoRA may not change the greedy text, but it always moves the logits;
  - otherwise the greedy texts: applied when some prompt's text differs.

Identical outputs mean the adapter is not applied: `require_applied` raises
`AdapterNotApplied` naming the adapters and the backend. A probe request that fails counts as
not applied (with its error). The record (`probe_adapters`' return value) goes into the run
manifest under `adapter_probe`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from charshift.backends.base import Backend
from charshift.schema import GenRequest, GenResult, Sampling

PROBE_PROMPTS: tuple[str, ...] = (
    "Tell me about your morning in two sentences.",
    "Write a one-line note to a colleague about a delayed report.",
    "What do you think about rainy days?",
    "Give me one piece of advice for a job interview.",
)
PROBE_MAX_TOKENS = 16
DEFAULT_RTOL = 1e-5


class AdapterNotApplied(RuntimeError):
    """An adapter that loaded but does not change the model's output."""


def probe_request(prompt: str, adapter: str | None, max_tokens: int) -> GenRequest:
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens, repetition_penalty=1.0)
    return GenRequest([{"role": "user", "content": prompt}], adapter, greedy, seed=0)


def probe_adapters(
    backend: Backend,
    adapters: Sequence[str],
    *,
    prompts: Sequence[str] = PROBE_PROMPTS,
    max_tokens: int = PROBE_MAX_TOKENS,
    rtol: float = DEFAULT_RTOL,
) -> dict[str, Any]:
    """Probe each adapter against the base model (see the module docstring); the record."""
    record: dict[str, Any] = {
        "backend": backend.kind,
        "prompts": list(prompts),
        "max_tokens": max_tokens,
        "adapters": {},
    }
    if not adapters:
        return record
    groups: list[str | None] = [None, *adapters]
    requests = [probe_request(p, a, max_tokens) for a in groups for p in prompts]
    results = backend.generate(requests)
    logits = next_token_logits(backend, requests)
    n = len(prompts)
    base = results[:n]
    base_logits = logits[:n] if logits is not None else None
    for k, name in enumerate(adapters, start=1):
        mine = results[k * n : (k + 1) * n]
        mine_logits = logits[k * n : (k + 1) * n] if logits is not None else None
        record["adapters"][name] = _compare(base, mine, base_logits, mine_logits, rtol)
    record["method"] = "logits" if logits is not None else "greedy_text"
    return record


def _compare(
    base: list[GenResult],
    mine: list[GenResult],
    base_logits: list[Any] | None,
    mine_logits: list[Any] | None,
    rtol: float,
) -> dict[str, Any]:
    errors = [r.error or r.finish_reason for r in (*base, *mine) if r.finish_reason == "error"]
    differs_on = [i for i, (b, m) in enumerate(zip(base, mine, strict=True)) if b.text != m.text]
    entry: dict[str, Any] = {
        "outputs_differ": bool(differs_on),
        "differs_on": differs_on,
        "base_outputs": [r.text for r in base],
        "adapter_outputs": [r.text for r in mine],
        "max_logit_diff": None,
    }
    if base_logits is not None and mine_logits is not None:
        diff, scale = _max_diff(base_logits, mine_logits)
        entry["max_logit_diff"] = diff
        entry["logit_threshold"] = rtol * max(1.0, scale)
        applied = diff > entry["logit_threshold"]
    else:
        applied = bool(differs_on)
    if errors:
        entry["errors"] = errors[:4]
        applied = False
    entry["applied"] = applied
    return entry


def _max_diff(base: list[Any], mine: list[Any]) -> tuple[float, float]:
    """(largest |adapter - base| logit over all prompts, largest |base| logit)."""
    import numpy as np

    diff = scale = 0.0
    for b, m in zip(base, mine, strict=True):
        b_arr, m_arr = np.asarray(b, dtype=np.float64), np.asarray(m, dtype=np.float64)
        diff = max(diff, float(np.max(np.abs(m_arr - b_arr))))
        scale = max(scale, float(np.max(np.abs(b_arr))))
    return diff, scale


def next_token_logits(backend: Backend, requests: list[GenRequest]) -> list[Any] | None:
    """The backend's own `next_token_logits` (the HF backend's model logits), or None."""
    return backend.next_token_logits(requests)


def require_applied(record: dict[str, Any]) -> None:
    """Raise AdapterNotApplied naming every adapter the probe found not applied."""
    bad = {name: e for name, e in record.get("adapters", {}).items() if not e.get("applied")}
    if not bad:
        return
    lines = []
    for name, e in bad.items():
        if e.get("errors"):
            why = f"the probe requests failed: {e['errors'][0]}"
        elif e.get("max_logit_diff") is not None:
            why = (
                f"its next-token logits equal the base model's (max difference "
                f"{e['max_logit_diff']:.3g} <= {e['logit_threshold']:.3g})"
            )
        else:
            why = f"its greedy outputs equal the base model's on all {len(e['base_outputs'])} probe prompts"
        lines.append(f"  {name}: {why}")
    raise AdapterNotApplied(
        f"adapter(s) not applied by the {record.get('backend')} backend:\n"
        + "\n".join(lines)
        + "\nEvery row for them would be a base-model row. Check how the backend serves "
        "adapters (SGLang: requests must say model 'BASE:ADAPTER'; a server must be started "
        "with the adapters) and that the adapter weights are not zero."
    )
