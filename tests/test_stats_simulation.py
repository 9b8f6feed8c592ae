"""A simulation with a known truth for the chain decomposition, the contrasts and their intervals.

Predictions are generated from a model whose population figures are known in closed form:

* K = 4 personas; every unit of both chains and both contrasts (`charshift.ladder`) has its own
  per-persona recall r[u, p] and yield y[u, p], so each rung and contrast has a planted loss;
* items are clusters: each item has a random effect on the hit rate (d_i) and on the yield
  (e_i), uniform and centred, shared by every unit and persona (a hard item is hard everywhere);
* a row's hit / output draws reuse the same latent uniforms across units with probability 0.7
  (the same item and persona behave alike in neighbouring formats), so paired rungs are
  correlated as in real data; the marginals stay r + d_i and y + e_i;
* a wrong answer goes to a label outside the run ("goodness") with probability PHI, else evenly
  to one of the other K - 1 personas;
* some units miss some items (a partial run), so chains are estimated on their common items.

Population truth (ratio of expectations; the item effects average out because every count is
linear in them): with n_p = y_p, tp_p = y_p r_p and
pred_p = y_p r_p + (1 - PHI) / (K - 1) * sum_{q != p} y_q (1 - r_q),
conditional F1_p = 2 tp_p / (pred_p + y_p), ITT F1_p = 2 tp_p / (pred_p + 1), conditional
accuracy = sum_p tp_p / sum_p y_p and ITT accuracy = mean_p tp_p.

Coverage measured with `pytest tests/test_stats_simulation.py -m slow -s` (400 simulations, 60
prompt and 60 scenario items, 500 resamples) is printed by the slow test; the fast test runs
100 simulations of 40 + 40 items with 200 resamples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from charshift import ladder, stats
from charshift.schema import PredictionRecord as R

PERSONAS = ["sarcasm", "humor", "remorse", "loving"]
K = len(PERSONAS)
PHI = 0.2  # share of wrong answers that go to a label outside the run
SHARE = 0.7  # probability that a row reuses its latent draw across units
D_HIT, D_YIELD = 0.08, 0.06  # half-widths of the item effects
OUTSIDE = "goodness"

# planted recall (persona-average) and yield per unit; persona offsets below
RECALL = {
    "id_chat": 0.86,
    "id_chat.short": 0.78,
    "scenario_chat": 0.76,
    "chat_email.whole": 0.70,
    "chat_email.head": 0.64,
    "chat_email": 0.58,
    "chat_email_multiturn": 0.48,
    "email_syscontext": 0.50,
    "tool_email_oneshot": 0.42,
    "agentic_email": 0.30,
}
YIELD = {
    "id_chat": 0.90,
    "id_chat.short": 0.90,
    "scenario_chat": 0.88,
    "chat_email.whole": 0.85,
    "chat_email.head": 0.85,
    "chat_email": 0.85,
    "chat_email_multiturn": 0.80,
    "email_syscontext": 0.80,
    "tool_email_oneshot": 0.72,
    "agentic_email": 0.60,
}
R_OFFSET = np.array([0.06, 0.0, -0.06, 0.02])
Y_OFFSET = np.array([0.0, 0.04, -0.04, 0.02])
PROMPT_UNITS = ("id_chat", "id_chat.short")


def _rates(unit: str) -> tuple[np.ndarray, np.ndarray]:
    r, y = RECALL[unit] + R_OFFSET, YIELD[unit] + Y_OFFSET
    # no clipping anywhere, so the item effects average out exactly
    assert r.min() - D_HIT >= 0 and r.max() + D_HIT <= 1, unit
    assert y.min() - D_YIELD >= 0 and y.max() + D_YIELD <= 1, unit
    return r, y


def truth(unit: str) -> dict[str, float]:
    """The population value of every statistic of `unit` (see the module docstring)."""
    r, y = _rates(unit)
    tp = y * r
    wrong = y * (1 - r) * (1 - PHI) / (K - 1)
    pred = tp + (wrong.sum() - wrong)
    return {
        "macro_f1": float(np.mean(2 * tp / (pred + y))),
        "macro_f1_itt": float(np.mean(2 * tp / (pred + 1))),
        "accuracy": float(tp.sum() / y.sum()),
        "accuracy_itt": float(tp.mean()),
    }


def _items(unit: str, n: int) -> range:
    """The items each unit has: a few units miss some (partial runs)."""
    if unit == "agentic_email":
        return range(n // 10, n)
    if unit == "email_syscontext":
        return range(0, n - 2)
    if unit == "chat_email.head":
        return range(1, n)
    if unit == "id_chat.short":
        return range(0, n - 3)
    return range(n)


@dataclass
class _Latent:
    hit: np.ndarray  # (n_items, K) shared uniforms
    out: np.ndarray
    wrong: np.ndarray
    d: np.ndarray  # (n_items,) item effect on the hit rate
    e: np.ndarray  # item effect on the yield


def _latent(rng: np.random.Generator, n: int) -> _Latent:
    return _Latent(
        rng.random((n, K)),
        rng.random((n, K)),
        rng.random((n, K)),
        rng.uniform(-D_HIT, D_HIT, n),
        rng.uniform(-D_YIELD, D_YIELD, n),
    )


def _unit_rows(rng: np.random.Generator, unit: str, lat: _Latent, prefix: str) -> list[R]:
    n = len(lat.d)
    r, y = _rates(unit)

    def keep(shared: np.ndarray) -> np.ndarray:  # the shared draw, or with 1 - SHARE a fresh one
        return np.where(rng.random((n, K)) < SHARE, shared, rng.random((n, K)))

    u_hit, u_out, u_wrong = keep(lat.hit), keep(lat.out), keep(lat.wrong)
    rows = []
    for i in _items(unit, n):
        for j, p in enumerate(PERSONAS):
            if u_out[i, j] >= y[j] + lat.e[i]:
                pred = None
            elif u_hit[i, j] < r[j] + lat.d[i]:
                pred = p
            elif u_wrong[i, j] < PHI:
                pred = OUTSIDE
            else:
                others = [q for q in PERSONAS if q != p]
                pred = others[int((u_wrong[i, j] - PHI) / (1 - PHI) * (K - 1))]
            rows.append(R("sim", "full", unit, p, f"{prefix}:{i}", pred))
    return rows


def simulate(rng: np.random.Generator, n_prompts: int, n_scenarios: int) -> list[R]:
    lat_p, lat_s = _latent(rng, n_prompts), _latent(rng, n_scenarios)
    recs = []
    for unit in RECALL:
        prompt = unit in PROMPT_UNITS
        lat, prefix = (lat_p, "prompt") if prompt else (lat_s, "scenario")
        recs += _unit_rows(rng, unit, lat, prefix)
    return recs


def _true_diff(a: str, b: str, name: str) -> float:
    return truth(a)[name] - truth(b)[name]


def _collect(res: stats.MetricsResult) -> list[tuple[str, bool, float, float, float, float]]:
    """(group, itt, truth, estimate, lo, hi) for every rung, total and contrast."""
    out = []
    for dec in res.chains:
        name = f"{dec.metric}_itt" if dec.itt else dec.metric
        for group, d in [("rung", r) for r in dec.rungs] + [("total", dec.total)]:
            t = _true_diff(d.a.slice, d.b.slice, name)
            out.append((group, dec.itt, t, d.estimate, d.lo, d.hi))
    for d in res.differences:
        if d.kind == "contrast":
            name = f"{d.metric}_itt" if d.itt else d.metric
            t = _true_diff(d.a.slice, d.b.slice, name)
            out.append(("contrast", d.itt, t, d.estimate, d.lo, d.hi))
    return out


def test_planted_truth_is_a_real_loss_on_every_rung_and_contrast():
    """The design plants a non-zero loss on every rung and contrast of `charshift.ladder`."""
    for chain in ladder.CHAINS:
        for rung in chain.rungs:
            for name in ("macro_f1", "accuracy_itt"):
                assert _true_diff(rung.frm, rung.to, name) > 0.01, (rung, name)
    for c in ladder.CONTRASTS:
        assert _true_diff(c.frm, c.to, "macro_f1") > 0.01


def test_decomposition_recovers_planted_values_with_large_n():
    rng = np.random.default_rng(1)
    res = stats.compute_metrics(simulate(rng, 600, 600), PERSONAS, n_boot=50)
    assert len(res.chains) == len(ladder.CHAINS) * 2 * 2
    for dec in res.chains:
        assert dec.units == dec_units(dec.chain)  # every unit of every chain present
        name = f"{dec.metric}_itt" if dec.itt else dec.metric
        for u, iv in zip(dec.units, dec.estimates, strict=True):
            assert iv.estimate == pytest.approx(truth(u)[name], abs=0.02), (u, name)
        assert sum(r.estimate for r in dec.rungs) == pytest.approx(dec.total.estimate, abs=1e-12)
    rows = _collect(res)
    assert {g for g, *_ in rows} == {"rung", "total", "contrast"}
    for group, itt, t, est, _lo, _hi in rows:
        assert est == pytest.approx(t, abs=0.025), (group, itt, t, est)


def dec_units(chain_name: str) -> list[str]:
    return next(c.units for c in ladder.CHAINS if c.name == chain_name)


def _coverage(n_sims: int, n_items: int, n_boot: int, seed: int) -> dict[tuple[str, bool], float]:
    rng = np.random.default_rng(seed)
    hits: dict[tuple[str, bool], list[bool]] = {}
    for sim in range(n_sims):
        res = stats.compute_metrics(
            simulate(rng, n_items, n_items), PERSONAS, n_boot=n_boot, seed=sim
        )
        for group, itt, t, _est, lo, hi in _collect(res):
            hits.setdefault((group, itt), []).append(lo <= t <= hi)
    return {key: float(np.mean(v)) for key, v in hits.items()}


def _report(cov: dict[tuple[str, bool], float], what: str) -> None:
    print(f"\ncoverage of nominal 95% intervals ({what}):")
    for (group, itt), c in sorted(cov.items()):
        print(f"  {group:8s} {'ITT' if itt else 'conditional':11s} {c:.3f}")


def test_interval_coverage_fast():
    cov = _coverage(n_sims=100, n_items=40, n_boot=200, seed=7)
    _report(cov, "100 simulations, 40 + 40 items, 200 resamples")
    assert set(cov) == {(g, itt) for g in ("rung", "total", "contrast") for itt in (False, True)}
    for key, c in cov.items():
        assert c >= 0.88, (key, c)


@pytest.mark.slow
def test_interval_coverage_many_simulations():
    cov = _coverage(n_sims=400, n_items=60, n_boot=500, seed=11)
    _report(cov, "400 simulations, 60 + 60 items, 500 resamples")
    for key, c in cov.items():
        assert 0.88 <= c <= 0.99, (key, c)
