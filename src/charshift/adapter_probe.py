"""Prove that every adapter is applied before any row is generated with it.

A backend can accept an adapter and still run the base model: SGLang given a bare adapter name as
`model`, a server started without the adapter mapped to the base's name, an adapter whose LoRA B
matrices are all zero. Every such row would silently be a base-model row. So, for each adapter,
the probe runs a few fixed prompts greedily (temperature 0, a short `max_tokens`) under the
adapter and under the base model, in one `generate` call, and compares, by the most sensitive
method the backend offers:

  - "logits": next-token logits (`Backend.next_token_logits`; the HF backend, one float32 forward
    per row, so no batching noise): applied when, on some prompt, the largest absolute difference
    exceeds `rtol` times the largest base logit (at least `rtol`);
  - "logprobs": the `PROBE_TOP_K` most likely next tokens with their log-probabilities
    (`Backend.next_token_logprobs`; vLLM offline, OpenAI-compatible servers): applied when, on
    some prompt, a token in both top lists moves by more than the threshold, or the lists share
    no token. The threshold is the probe's own null: the base prompts are asked twice, in two
    different batches, and the largest base-against-base difference (what batching alone moves
    on an engine that is not batch-invariant) times `NOISE_MARGIN`, at least `LOGPROB_ATOL`;
  - "greedy_text": otherwise, applied when some prompt's greedy text differs.

A small LoRA may leave the greedy text unchanged yet always moves the logits, so the first two
pass a real adapter with a subtle effect and fail one that is ignored. A probe request that
fails counts as not applied (with its error). The record (`probe_adapters`' return value) goes
into the run manifest under `adapter_probe`.

What a failure does is the run's `adapter_probe` setting (`PROBE_MODES`): `strict` stops the run
(`require_applied` raises `AdapterNotApplied` naming the adapters), `warn` skips only the failing
adapters' rows (named as skipped adapters in the report and the exit status), `off` does not
probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

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
PROBE_TOP_K = 20  # vLLM's default max_logprobs; OpenAI's top_logprobs allows 20 too
LOGPROB_ATOL = 1e-4  # the smallest log-probability move counted, on a batch-invariant engine
NOISE_MARGIN = 4.0  # the threshold over the largest base-against-base move
PROBE_MODES = ("strict", "warn", "off")
ProbeMode = Literal["strict", "warn", "off"]


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
    n = len(prompts)
    method, scores = _scores(backend, requests, n)
    record["method"] = method
    if method == "logprobs":
        record["noise_floor"] = scores.noise
    for k, name in enumerate(adapters, start=1):
        entry = _text_entry(results[:n], results[k * n : (k + 1) * n])
        if scores is not None:
            entry.update(scores.entry(k, rtol))
        applied = entry.pop("_applied", entry["outputs_differ"])
        entry["applied"] = bool(applied and not entry.get("errors"))
        record["adapters"][name] = entry
    return record


class _Scores:
    """Per-request next-token scores of one probe (logits or top log-probabilities), with the
    base group first (`n` prompts per group), and for log-probabilities the noise floor."""

    def __init__(self, method: str, rows: list[Any], n: int, noise: float = 0.0) -> None:
        self.method, self.rows, self.n, self.noise = method, rows, n, noise

    def group(self, k: int) -> list[Any]:
        return self.rows[k * self.n : (k + 1) * self.n]

    def entry(self, k: int, rtol: float) -> dict[str, Any]:
        base, mine = self.group(0), self.group(k)
        if self.method == "logits":
            diff, scale = _max_diff(base, mine)
            threshold = rtol * max(1.0, scale)
            return {
                "max_logit_diff": diff,
                "logit_threshold": threshold,
                "_applied": diff > threshold,
            }
        if any(m is None for m in (*base, *mine)):
            return {"errors": ["no log-probabilities for a probe prompt"], "_applied": False}
        diff = max(_logprob_diff(b, m) for b, m in zip(base, mine, strict=True))
        threshold = max(LOGPROB_ATOL, NOISE_MARGIN * self.noise)
        return {
            "max_logprob_diff": diff if diff != float("inf") else None,  # JSON has no inf
            "top_tokens_disjoint": diff == float("inf"),
            "logprob_threshold": threshold,
            "_applied": diff > threshold,
        }


def _scores(backend: Backend, requests: list[GenRequest], n: int) -> tuple[str, Any]:
    """The most sensitive comparison the backend offers: ("logits", ...), ("logprobs", ...)
    with the noise floor from asking the base prompts again on their own, or ("greedy_text",
    None)."""
    logits = backend.next_token_logits(requests)
    if logits is not None:
        return "logits", _Scores("logits", logits, n)
    logprobs = backend.next_token_logprobs(requests, PROBE_TOP_K)
    if logprobs is None:
        return "greedy_text", None
    again = backend.next_token_logprobs(requests[:n], PROBE_TOP_K) or [None] * n
    pairs = [(a, b) for a, b in zip(logprobs[:n], again, strict=True) if a and b]
    moves = [_logprob_diff(a, b) for a, b in pairs]
    noise = max((m for m in moves if m != float("inf")), default=0.0)
    return "logprobs", _Scores("logprobs", logprobs, n, noise)


def _logprob_diff(base: dict[Any, float], mine: dict[Any, float]) -> float:
    """The largest move of a token in both top lists; infinite when they share none."""
    shared = set(base) & set(mine)
    if not shared:
        return float("inf")
    return max(abs(mine[t] - base[t]) for t in shared)


def _text_entry(base: list[GenResult], mine: list[GenResult]) -> dict[str, Any]:
    errors = [r.error or r.finish_reason for r in (*base, *mine) if r.finish_reason == "error"]
    differs_on = [i for i, (b, m) in enumerate(zip(base, mine, strict=True)) if b.text != m.text]
    entry: dict[str, Any] = {
        "outputs_differ": bool(differs_on),
        "differs_on": differs_on,
        "base_outputs": [r.text for r in base],
        "adapter_outputs": [r.text for r in mine],
        "max_logit_diff": None,
    }
    if errors:
        entry["errors"] = errors[:4]
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


def not_applied(record: dict[str, Any]) -> dict[str, str]:
    """Each adapter the probe found not applied, with why (in the probe's own terms)."""
    out = {}
    for name, e in record.get("adapters", {}).items():
        if e.get("applied"):
            continue
        if e.get("errors"):
            why = f"the probe requests failed: {e['errors'][0]}"
        elif e.get("max_logit_diff") is not None:
            why = (
                f"its next-token logits equal the base model's (max difference "
                f"{e['max_logit_diff']:.3g} <= {e['logit_threshold']:.3g})"
            )
        elif e.get("max_logprob_diff") is not None:
            why = (
                f"its next-token log-probabilities equal the base model's (max difference "
                f"{e['max_logprob_diff']:.3g} <= {e['logprob_threshold']:.3g}, the noise floor "
                f"{record.get('noise_floor', 0.0):.3g} times {NOISE_MARGIN:g})"
            )
        else:
            n = len(e["base_outputs"])
            why = f"its greedy outputs equal the base model's on all {n} probe prompts"
        out[name] = f"adapter not applied by the {record.get('backend')} backend: {why}"
    return out


def require_applied(record: dict[str, Any]) -> None:
    """Raise AdapterNotApplied naming every adapter the probe found not applied."""
    bad = not_applied(record)
    if not bad:
        return
    raise AdapterNotApplied(
        f"adapter(s) not applied by the {record.get('backend')} backend:\n"
        + "\n".join(f"  {name}: {why.split(': ', 1)[1]}" for name, why in bad.items())
        + "\nEvery row for them would be a base-model row. Check how the backend serves "
        "adapters (SGLang: requests must say model 'BASE:ADAPTER'; a server must be started "
        "with the adapters) and that the adapter weights are not zero. adapter_probe: warn "
        "skips only these adapters instead of stopping the run."
    )
