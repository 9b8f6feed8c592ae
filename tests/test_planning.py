"""Planning: per-slice token budgets and per-episode step budgets enter each row, and the
prompted stages."""

from __future__ import annotations

from charshift import formats, planning, prompts
from charshift.config import parse_config


def _cfg(**over):
    d = {
        "bases": [{"name": "b", "model": "tiny:llama", "classifier": "x"}],
        "personas": ["sarcasm", "humor"],
        "slices": ["id_chat", "scenario_chat", "chat_email", "tool_email_oneshot", "agentic_email"],
        "id_prompts": {"n_eval": 3},
        "scenarios": {"n": 4},
    }
    d.update(over)
    return parse_config(d)


def _keys(plan, slice_):
    return {r.key for r in plan.rows if r.spec.slice == slice_}


def test_slice_token_budget_is_used_and_enters_the_key():
    plain = planning.build_plan(_cfg())
    budget = planning.build_plan(
        _cfg(sampling={"max_tokens": 64, "max_tokens_by_slice": {"chat_email": 300}})
    )
    by_slice = {r.spec.slice: r.sampling.max_tokens for r in budget.rows}
    assert by_slice["chat_email"] == 300 and by_slice["id_chat"] == 64
    assert by_slice["agentic_email"] == 64
    same_default = planning.build_plan(
        _cfg(sampling={"max_tokens": 1024, "max_tokens_by_slice": {"chat_email": 300}})
    )
    assert _keys(same_default, "id_chat") == _keys(plain, "id_chat")
    assert _keys(same_default, "chat_email").isdisjoint(_keys(plain, "chat_email"))


def test_step_budget_per_episode_from_its_scenario():
    plan = planning.build_plan(_cfg(rollout={"max_steps": 8, "step_margin": 3}))
    for r in plan.rows:
        sc = plan.scenario_bank.get(r.spec.scenario_id or "")
        if r.spec.slice == "agentic_email":
            need = formats.needed_calls("agentic_email", sc)
            assert r.spec.needed_calls == need and r.spec.max_steps == max(8, need + 3)
        elif r.spec.slice == "tool_email_oneshot":
            need = formats.needed_calls("tool_email_oneshot", sc)
            assert r.spec.max_steps == need + 3
        else:
            assert r.spec.max_steps is None
    wider = planning.build_plan(_cfg(rollout={"max_steps": 8, "step_margin": 5}))
    assert _keys(wider, "agentic_email").isdisjoint(_keys(plan, "agentic_email"))
    assert _keys(wider, "chat_email") == _keys(plan, "chat_email")


def test_paper_bank_budgets_leave_a_margin_over_every_perfect_agent():
    cfg = _cfg(scenarios={}, slices=["agentic_email"])
    plan = planning.build_plan(cfg)
    need = [r.spec.needed_calls for r in plan.rows if r.condition.stage == "base"]
    budgets = [r.spec.max_steps for r in plan.rows if r.condition.stage == "base"]
    assert len(need) == 65
    assert all(b - n >= cfg.rollout.step_margin for n, b in zip(need, budgets, strict=True))


def test_prompted_explicit_is_its_own_stage():
    plan = planning.build_plan(_cfg(stages=["base", "prompted", "prompted_explicit"]))
    conds = {(c.stage, c.persona): c for c in plan.conditions["b"]}
    plain = conds[("prompted", "humor")].system_prompt
    explicit = conds[("prompted_explicit", "humor")].system_prompt
    assert plain == prompts.persona_system_prompt("humor")
    assert explicit == plain + "\n" + prompts.EXPLICIT_FORMAT_SENTENCE
    assert _cfg().stages == ["base", "prompted"]  # never the default


def test_item_ids_pair_scenario_slices_and_never_prompts():
    plan = planning.build_plan(_cfg())
    ids = {}
    for r in plan.rows:
        ids.setdefault(r.spec.slice, set()).add(r.spec.item_id)
    assert ids["scenario_chat"] == ids["chat_email"] == ids["agentic_email"]
    assert all(i.startswith("scenario:") for i in ids["chat_email"])
    assert all(i.startswith("prompt:") for i in ids["id_chat"])


def test_row_keys_equal_row_key_for_every_sample_and_slice():
    """`build_plan` hashes the shared part of a row's identity once per episode (issue 18: the
    dry run of n_samples: 10000 ran for minutes); every key must still be `row_key`'s, or every
    stored row of an earlier run would count as new."""
    cfg = _cfg(
        stages=["base", "prompted"],
        sampling={"n_samples": 12, "max_tokens_by_slice": {"chat_email": 300}},
    )
    plan = planning.build_plan(cfg)
    base = cfg.bases[0]
    assert len(plan.rows) == 3 * (3 + 4 * 4) * 12
    for r in plan.rows:
        assert r.key == planning.row_key(cfg, base, r.condition, r.spec, r.sample_idx, r.adapter)
    assert len({r.key for r in plan.rows}) == len(plan.rows)


def test_a_plan_too_large_is_refused_before_it_is_built(monkeypatch):
    import pytest

    from charshift.config import ConfigError

    built = []
    monkeypatch.setattr(planning, "row_keys", lambda *a: built.append(a) or [])
    cfg = _cfg(sampling={"n_samples": 10_000}, id_prompts={"n_eval": 100})
    with pytest.raises(ConfigError, match=r"3,480,000 rows .* sampling.n_samples 10000"):
        planning.build_plan(cfg)
    assert not built  # counted, not built
