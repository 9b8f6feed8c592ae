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
accuracy = sum_p tp_p / sum_p y_p and ITT accuracy = mean_p tp_p; the nulls (predictions independent
of the persona, same shares) are 2 n_p pred_p / (N (n_p + pred_p)) with n_p = y_p, N = sum y
(conditional) or n_p = 1, N = K (ITT), and the excess is F1 minus its null, per persona.

Coverage measured with `pytest tests/test_stats_simulation.py -m slow -s` (400 simulations, 60
prompt and 60 scenario items, 500 resamples) is printed by the slow test; the fast test runs
100 simulations of 40 + 40 items with 200 resamples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from charshift import ladder, report, stats
from charshift.schema import NULL_PERSONA
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
    f1, f1_itt = 2 * tp / (pred + y), 2 * tp / (pred + 1)
    # the nulls: per persona 2 n m / (N (n + m)), n = y (scored) or 1 (attempted)
    null = 2 * y * pred / (y.sum() * (y + pred))
    null_itt = 2 * pred / (K * (1 + pred))
    return {
        "macro_f1": float(np.mean(f1)),
        "macro_f1_itt": float(np.mean(f1_itt)),
        "accuracy": float(tp.sum() / y.sum()),
        "accuracy_itt": float(tp.mean()),
        "macro_f1_excess": float(np.mean(f1 - null)),
        "macro_f1_excess_itt": float(np.mean(f1_itt - null_itt)),
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


Row = tuple[str, str, bool, float, float, float, float]


def _collect(res: stats.MetricsResult) -> list[Row]:
    """(group, metric, itt, truth, estimate, lo, hi) for every rung, total and contrast."""
    out = []
    for dec in res.chains:
        name = f"{dec.metric}_itt" if dec.itt else dec.metric
        for group, d in [("rung", r) for r in dec.rungs] + [("total", dec.total)]:
            t = _true_diff(d.a.slice, d.b.slice, name)
            out.append((group, dec.metric, dec.itt, t, d.estimate, d.lo, d.hi))
    for d in res.differences:
        if d.kind == "contrast":
            name = f"{d.metric}_itt" if d.itt else d.metric
            t = _true_diff(d.a.slice, d.b.slice, name)
            out.append(("contrast", d.metric, d.itt, t, d.estimate, d.lo, d.hi))
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
    assert len(res.chains) == len(ladder.CHAINS) * 3 * 2
    for dec in res.chains:
        assert dec.units == dec_units(dec.chain)  # every unit of every chain present
        name = f"{dec.metric}_itt" if dec.itt else dec.metric
        for u, iv in zip(dec.units, dec.estimates, strict=True):
            assert iv.estimate == pytest.approx(truth(u)[name], abs=0.02), (u, name)
        assert sum(r.estimate for r in dec.rungs) == pytest.approx(dec.total.estimate, abs=1e-12)
    rows = _collect(res)
    assert {g for g, *_ in rows} == {"rung", "total", "contrast"}
    assert {m for _, m, *_ in rows} == set(stats.METRICS)
    for group, metric, itt, t, est, _lo, _hi in rows:
        assert est == pytest.approx(t, abs=0.025), (group, metric, itt, t, est)


def dec_units(chain_name: str) -> list[str]:
    return next(c.units for c in ladder.CHAINS if c.name == chain_name)


Key = tuple[str, str, bool]


def _coverage(n_sims: int, n_items: int, n_boot: int, seed: int) -> dict[Key, float]:
    rng = np.random.default_rng(seed)
    hits: dict[Key, list[bool]] = {}
    for sim in range(n_sims):
        res = stats.compute_metrics(
            simulate(rng, n_items, n_items), PERSONAS, n_boot=n_boot, seed=sim, n_perm=200
        )
        for group, metric, itt, t, _est, lo, hi in _collect(res):
            hits.setdefault((group, metric, itt), []).append(lo <= t <= hi)
    return {key: float(np.mean(v)) for key, v in hits.items()}


def _report(cov: dict[Key, float], what: str) -> None:
    print(f"\ncoverage of nominal 95% intervals ({what}):")
    for (group, metric, itt), c in sorted(cov.items()):
        print(f"  {group:8s} {metric:16s} {'ITT' if itt else 'conditional':11s} {c:.3f}")


def test_interval_coverage_fast():
    cov = _coverage(n_sims=100, n_items=40, n_boot=200, seed=7)
    _report(cov, "100 simulations, 40 + 40 items, 200 resamples")
    assert set(cov) == {
        (g, m, itt) for g in ("rung", "total", "contrast") for m in stats.METRICS
        for itt in (False, True)
    }  # fmt: skip
    for key, c in cov.items():
        assert c >= 0.88, (key, c)


@pytest.mark.slow
def test_interval_coverage_many_simulations():
    cov = _coverage(n_sims=400, n_items=60, n_boot=500, seed=11)
    _report(cov, "400 simulations, 60 + 60 items, 500 resamples")
    for key, c in cov.items():
        assert 0.88 <= c <= 0.99, (key, c)


# --------------------------------------------------------------------------- chance-corrected
# Worlds with a planted truth for the chance-corrected figures (issue 13). A row's prediction is
# its own persona with probability s (the planted persona signal of its stage and unit, varied
# by item: s * (1 + u), u ~ U(-0.3, 0.3)), else a draw from the unit's noise distribution over
# the personas and one label outside the run, independent of the persona (with `tilt`, each
# item tilts that distribution its own way: a scenario's prose pulls the scorer to a label).
# Every row has an output. Population excess (ratio of expectations, shares of N):
# n_j = 1/K, m_j = s/K + (1 - s) pi_j, tp_j = s/K + (1 - s) pi_j / K, F1_j = 2 tp_j / (n_j + m_j),
# null_j = 2 n_j m_j / (n_j + m_j): the excess is 0 exactly when s = 0, whatever pi.

OUTSIDE_LABEL = "goodness"
HOME_UNITS = ("id_chat", "id_chat.short")
NULL_UNITS = ("id_chat", "scenario_chat", "chat_email", "agentic_email")
UNIFORM = (0.25, 0.25, 0.25, 0.25, 0.0)
SKEWED = (0.85, 0.05, 0.04, 0.03, 0.03)  # a format the scorer reads as one label


@dataclass(frozen=True)
class World:
    signal: dict[tuple[str, str], float]  # (stage, unit) -> s; the stages and units generated
    noise: dict[str, tuple[float, ...]]  # unit -> pi over PERSONAS + OUTSIDE_LABEL
    base: dict[str, tuple[float, ...]] | None = None  # unit -> the base stage's predictions
    tilt: float = 0.0  # Dirichlet concentration of each item's tilt of pi (0: no tilt)


def _noise(rng: np.random.Generator, pi: tuple[float, ...], n: int, tilt: float) -> np.ndarray:
    """(n,) label indices (K = the outside label) drawn from pi, tilted per item when asked."""
    p = np.asarray(pi, dtype=float)
    if tilt:
        p = rng.dirichlet(tilt * p + 1e-3)
    return rng.choice(len(p), size=n, p=p / p.sum())


def draw_world(world: World, rng: np.random.Generator, n_prompts: int, n_scenarios: int) -> list[R]:
    labels = [*PERSONAS, OUTSIDE_LABEL]
    n_items = {"prompt": n_prompts, "scenario": n_scenarios}
    effect = {kind: rng.uniform(-0.3, 0.3, n) for kind, n in n_items.items()}
    recs = []
    for (stage, unit), s in world.signal.items():
        kind = "prompt" if unit in HOME_UNITS else "scenario"
        for i in range(n_items[kind]):
            hit = rng.random(K) < s * (1 + effect[kind][i])
            noise = _noise(rng, world.noise[unit], K, world.tilt)
            for j, p in enumerate(PERSONAS):
                pred = p if hit[j] else labels[noise[j]]
                recs.append(R("sim", stage, unit, p, f"{kind}:{i}", pred))
    for unit, pi in (world.base or {}).items():
        kind = "prompt" if unit in HOME_UNITS else "scenario"
        for i in range(n_items[kind]):
            (pred,) = _noise(rng, pi, 1, world.tilt)
            recs.append(R("sim", "base", unit, NULL_PERSONA, f"{kind}:{i}", labels[pred]))
    return recs


def excess_truth(s: float, pi: tuple[float, ...]) -> float:
    p = np.asarray(pi[:K], dtype=float)
    n, m, tp = 1 / K, s / K + (1 - s) * p, s / K + (1 - s) * p / K
    return float(np.mean(2 * tp / (n + m) - 2 * n * m / (n + m)))


def null_world(stages: tuple[str, ...] = ("prompted",), skew: tuple[float, ...] = SKEWED) -> World:
    """No persona anywhere; the scorer reads scenario units as one label (85%), chat evenly."""
    noise = {u: UNIFORM if u in HOME_UNITS else skew for u in NULL_UNITS}
    signal = {(st, u): 0.0 for st in stages for u in NULL_UNITS}
    return World(signal, noise, base=dict(noise), tilt=20.0)


def _excess(res: stats.MetricsResult, stage: str, unit: str) -> stats.Interval:
    cell = res.get("sim", stage, unit)
    assert cell is not None
    return cell.macro_f1_excess


def test_null_formula_matches_the_permutation_mean():
    """The expected-counts null is the mean of the within-item permutation null: exactly for ITT
    in this balanced design, within 0.01 for the conditional figure with missing outputs."""
    rng = np.random.default_rng(5)
    world = World({("prompted", "chat_email"): 0.5}, {"chat_email": SKEWED}, tilt=5.0)
    recs = draw_world(world, rng, 0, 25)
    recs = [r if rng.random() > 0.3 else R(r.base, r.stage, r.slice, r.persona, r.item_id, None)
            for r in recs]  # fmt: skip
    cell = ("sim", "prompted", "chat_email")
    perm = stats.permutation_draws(recs, PERSONAS, cell, n_perm=3000, seed=1)
    m = stats.compute_metrics(recs, PERSONAS, n_boot=20, differences=False).get(*cell)
    assert np.mean(perm["macro_f1_itt"]) == pytest.approx(m.macro_f1_null_itt.estimate, abs=0.004)
    assert np.mean(perm["macro_f1"]) == pytest.approx(m.macro_f1_null.estimate, abs=0.01)
    assert abs(np.mean(perm["macro_f1_excess"])) < 0.01


def test_case_a_no_persona_and_a_skewed_base_claims_nothing():
    """Issue 13, case 1: base predicted 87% one label, prompted uniform and unrelated to the
    persona, K = 4, 30 prompts. "Prompted minus base" clears 0 (the old claim); the excess
    interval covers 0 at about the nominal rate and the headline claims no detection."""
    base = (0.87, 0.05, 0.04, 0.04, 0.0)
    world = World({("prompted", "id_chat"): 0.0}, {"id_chat": UNIFORM}, base={"id_chat": base})
    rng = np.random.default_rng(2024)
    cover, claims, old = [], 0, []
    for rep in range(150):
        res = stats.compute_metrics(draw_world(world, rng, 30, 0), PERSONAS, n_boot=200,
                                    seed=rep, n_perm=300)  # fmt: skip
        iv = _excess(res, "prompted", "id_chat")
        cover.append(iv.lo <= 0 <= iv.hi)
        (home,) = res.family
        claims += home.lo_simul > 0
        raw = res.get("sim", "prompted", "id_chat").macro_f1.estimate
        old.append(raw - res.get("sim", "base", "id_chat").macro_f1.estimate)
    print(f"\ncase a: excess coverage {np.mean(cover):.3f}, claims {claims}/150, "
          f"mean prompted - base (raw) {np.mean(old):+.3f}")  # fmt: skip
    assert np.mean(old) > 0.05  # the trap: raw prompted beats the skewed base with no persona
    assert np.mean(cover) >= 0.9 and claims <= 0.06 * 150
    lines = report.headline_text(res)
    home_line = next(s for s in lines if s.startswith("sim/prompted, id_chat: macro-F1 excess"))
    assert "persona not detected" in home_line


def test_case_b_format_skewed_scorer_claims_no_loss():
    """Issue 13, case 2: no persona, a scorer that reads scenario text as one label. The raw
    base ladder shows a 'loss' from chat to email; on the excess nothing is lost, the base
    stage's excess is 0 by construction and no chain total is claimed."""
    rng = np.random.default_rng(7)
    res = stats.compute_metrics(draw_world(null_world(), rng, 25, 25), PERSONAS, n_boot=300)
    raw = next(d for d in res.chains if d.stage == "base" and d.chain == "email_step"
               and d.metric == "macro_f1" and not d.itt)  # fmt: skip
    assert raw.total.lo > 0  # what the issue found: the null "loses" raw macro-F1
    for dec in res.chains:
        if dec.metric == "macro_f1_excess" and dec.stage == "base":
            assert all(d.estimate == 0 and d.fixed_by_construction for d in dec.rungs)
    totals = [d for d in res.family if d.kind == "total"]
    assert len(totals) == 2
    for t in totals:
        assert t.lo_simul <= 0 <= t.hi_simul, t
    lines = report.headline_text(res)
    assert sum("no loss shown" in s for s in lines) == 2
    assert not any("persona lost" in s or "persona detected" in s for s in lines)


def test_case_c_blind_scorer_is_flagged_by_the_positive_control():
    """The control shows its persona in chat but the scorer cannot see it in agentic email
    (its verdicts there are noise): the unit is blind, and the trained stage's fall there is
    reported as not evidence of persona loss."""
    signal = {("prompted_explicit", u): 0.8 for u in NULL_UNITS}
    signal |= {("prompted", u): 0.6 for u in NULL_UNITS}
    signal[("prompted_explicit", "agentic_email")] = signal[("prompted", "agentic_email")] = 0.0
    world = World(signal, {u: UNIFORM for u in NULL_UNITS}, base={u: SKEWED for u in NULL_UNITS})
    res = stats.compute_metrics(draw_world(world, np.random.default_rng(3), 20, 20), PERSONAS,
                                n_boot=300)  # fmt: skip
    blind = {s.unit: s.scorer_blind for s in res.scorer_checks}
    assert blind == {u: u == "agentic_email" for u in NULL_UNITS}
    total = next(d for d in res.family if d.chain == "agentic")
    assert total.blind == ("agentic_email",) and total.lo_simul > 0  # a "loss", but blind
    main = next(s for s in report.headline_text(res) if "from a chat email to an agentic" in s)
    assert stats.BLIND_TEXT in main and "persona lost" not in main


@pytest.mark.parametrize("n_items", [300])
def test_case_d_planted_effects_and_losses_are_recovered(n_items):
    signal = {("prompted", "id_chat"): 0.7, ("prompted", "scenario_chat"): 0.6,
              ("prompted", "chat_email"): 0.5, ("prompted", "agentic_email"): 0.2}  # fmt: skip
    noise = {"id_chat": UNIFORM, "scenario_chat": SKEWED, "chat_email": SKEWED,
             "agentic_email": SKEWED}  # fmt: skip
    world = World(signal, noise)
    res = stats.compute_metrics(draw_world(world, np.random.default_rng(9), n_items, n_items),
                                PERSONAS, n_boot=200, n_perm=200)  # fmt: skip
    for (_, unit), s in signal.items():
        iv = _excess(res, "prompted", unit)
        assert iv.estimate == pytest.approx(excess_truth(s, noise[unit]), abs=0.03), unit
        assert iv.lo > 0 and res.get("sim", "prompted", unit).p_null < 0.01
    (home,) = [d for d in res.family if d.kind == "excess"]
    assert home.lo_simul > 0 and home.p_holm < 0.05
    for t in (d for d in res.family if d.kind == "total"):
        want = excess_truth(signal[("prompted", t.a.slice)], noise[t.a.slice]) - excess_truth(
            signal[("prompted", t.b.slice)], noise[t.b.slice]
        )
        assert t.estimate == pytest.approx(want, abs=0.04) and t.lo_simul > 0
    lines = report.headline_text(res)
    assert sum("persona lost" in s for s in lines) == 2
    assert any("persona detected on home ground" in s for s in lines)


def familywise_error(
    reps: int, n_items: int, n_boot: int, seed: int, n_perm: int = 300
) -> dict[str, float]:
    """Share of runs of a global null (two trained stages, no persona, a format-skewed scorer)
    in which any member of the primary family is claimed: band excluding 0, or Holm p < 0.05;
    and the coverage of 0 by every cell's excess interval."""
    world = null_world(("prompted", "full"))
    rng = np.random.default_rng(seed)
    band = holm = 0
    cover: list[bool] = []
    for rep in range(reps):
        res = stats.compute_metrics(draw_world(world, rng, n_items, n_items), PERSONAS,
                                    n_boot=n_boot, seed=rep, n_perm=n_perm)  # fmt: skip
        fam = res.family
        assert len(fam) == 6
        band += any(not d.lo_simul <= 0 <= d.hi_simul for d in fam)
        holm += any(d.p_holm < 0.05 for d in fam)
        cover += [c.macro_f1_excess.lo <= 0 <= c.macro_f1_excess.hi
                  for c in res.cells.values() if not c.null]  # fmt: skip
    return {"fwer_band": band / reps, "fwer_holm": holm / reps, "cover": float(np.mean(cover))}


def test_case_e_familywise_error_under_a_global_null():
    """The bigger run (scripts/simulate_nulls.py) measures it; here a smoke check of 40 runs."""
    out = familywise_error(reps=40, n_items=15, n_boot=200, seed=1)
    print(f"\ncase e (40 runs): {out}")
    assert out["fwer_band"] <= 0.1 and out["fwer_holm"] <= 0.1 and out["cover"] >= 0.9
