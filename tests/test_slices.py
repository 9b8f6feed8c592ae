"""The slice registry: every entry complete, the names derived from it, and a slice added at
run time reaching config, planning, units, the ladder and the statistics with no other edit."""

from __future__ import annotations

import dataclasses

import pytest

from charshift import config, items, ladder, planning, render, slices, stats, units
from charshift.schema import EpisodeSpec
from charshift.schema import PredictionRecord as R
from charshift.slices import RenderContext, SliceDef


def test_every_entry_has_a_renderer_and_a_rung_description():
    assert set(render.RENDERERS) == set(slices.SLICES)
    for e in slices.SLICES.values():
        assert e.changes.strip() and e.summary.strip(), e.name
        assert e.mode in slices.ENGINE_MODES and e.family and e.items
        assert e.control is None or e.control in slices.SLICES, e.name
        assert set(e.variants) <= set(ladder.VARIANTS), e.name


def test_each_scaffold_is_one_entry_with_its_chat_control_and_its_own_bank():
    kinds = slices.scaffold_kinds()
    assert set(kinds) == set(items.KINDS)
    for kind in kinds:
        main, control = slices.get(kind), slices.get(kind + slices.CONTROL_SUFFIX)
        assert main.control == control.name and control.control is None
        assert main.items == control.items == kind
        assert control.renderer_key == main.renderer_key == kind and control.is_control
        assert control.mode == "chat" and control.output == "reply"
        assert render.RENDERERS[kind] is render.RENDERERS[control.name]
    assert len(kinds) == 6


def test_derived_names_keep_their_meaning():
    assert config.ID_SLICES == ("id_chat", "id_chat_break", "id_chat_prefill")
    assert config.CHAT_EMAIL_SLICES == ("chat_email", "chat_email_multiturn", "email_syscontext")
    assert config.EMAIL_SLICES == config.CHAT_EMAIL_SLICES + ("tool_email_oneshot", "agentic_email")
    assert config.SCENARIO_SLICES == ("scenario_chat", *config.EMAIL_SLICES)
    assert config.ALL_SLICES[:9] == config.ID_SLICES + config.SCENARIO_SLICES
    assert set(config.TOOL_SLICES) == {
        "tool_email_oneshot",
        "agentic_email",
        "agentic_tools",
        "agentic_actions",
    }


def test_chain_rungs_are_worded_by_the_registry_and_every_other_rung_is_a_contrast():
    for chain in ladder.CHAINS:
        for rung in chain.rungs:
            to, variant = ladder.split_unit(rung.to)
            frm = ladder.split_unit(rung.frm)[0]
            if frm != to:  # a rung between two slices: the registry's words
                assert rung.changes == slices.get(to).changes
                assert slices.get(to).control == frm
    pairs = [
        (ladder.split_unit(r.frm)[0], ladder.split_unit(r.to)[0]) for r in ladder.ALL_CONTRASTS
    ]
    assert len(pairs) == len(set(pairs))
    for kind in slices.scaffold_kinds():
        assert (kind + "_chat", kind) in pairs
    assert ladder.CONTRASTS[0].to == "chat_email_multiturn"  # the email family's, first


def test_judge_units_are_planned_but_not_text_units():
    assert slices.judge_units(["agentic_actions", "code_review"]) == ["agentic_actions.behaviour"]
    assert units.units_of("agentic_actions") == ["agentic_actions"]
    assert units.units_of("chat_email") == ["chat_email", "chat_email.whole", "chat_email.head"]


def _base_cfg(slice_list: list[str], **over: object) -> config.RunConfig:
    d = {
        "bases": [{"name": "b", "model": "tiny:llama", "classifier": "x"}],
        "personas": ["sarcasm", "humor"],
        "slices": slice_list,
    }
    return config.parse_config({**d, **over})


@pytest.fixture
def added_slice(monkeypatch):
    """A new slice registered at run time: one entry and one renderer, nothing else."""
    entry = SliceDef(
        "code_review_terse", "work", "chat", "code_review", "reply",
        "reviews the change in one line",
        "the review must fit in one line",
        control="code_review_chat",
    )  # fmt: skip

    def renderer(sl: SliceDef, it: items.ReviewItem, ctx: RenderContext) -> EpisodeSpec:
        base = render.render("code_review", it, ctx)
        turn = base.user_turns[0] + "\n\nAnswer in one line."
        return dataclasses.replace(base, slice=sl.name, user_turns=[turn])

    monkeypatch.setitem(slices.SLICES, entry.name, entry)
    monkeypatch.setitem(render.RENDERERS, entry.name, renderer)
    return entry


def test_a_slice_added_at_run_time_needs_no_other_edit(added_slice):
    cfg = _base_cfg(["code_review_chat", "code_review_terse"], items={"code_review": {"n": 3}})
    plan = planning.build_plan(cfg)
    ids = {}
    for r in plan.rows:
        ids.setdefault(r.spec.slice, set()).add(r.spec.item_id)
    assert set(ids) == {"code_review_chat", "code_review_terse"}
    assert ids["code_review_chat"] == ids["code_review_terse"] and len(ids["code_review_chat"]) == 3
    assert all(i.startswith("code_review:") for i in ids["code_review_terse"])
    assert units.units_of("code_review_terse") == ["code_review_terse"]
    rung = [r for r in ladder.registry_contrasts() if r.to == "code_review_terse"]
    assert rung == [ladder.Rung("code_review_chat", "code_review_terse", added_slice.changes)]
    recs = [
        R("b", "prompted", sl, p, f"code_review:{i}", p if (sl.endswith("chat") or i % 2) else "x")
        for sl in ("code_review_chat", "code_review_terse")
        for p in ("sarcasm", "humor")
        for i in range(8)
    ]
    res = stats.compute_metrics(recs, ["sarcasm", "humor"], n_boot=50, contrasts=rung)
    con = [d for d in res.differences if d.kind == "contrast" and d.metric == "macro_f1"]
    assert con and all(d.paired and d.changes == added_slice.changes for d in con)
    assert con[0].estimate > 0  # the terse slice loses persona by construction


def test_unknown_slice_and_unknown_bank_are_named_errors():
    with pytest.raises(config.ConfigError, match="unknown slice"):
        _base_cfg(["code_review_terse"])
    d = _base_cfg(["id_chat"]).model_dump(mode="json")
    d["items"] = {"limericks": {}}
    with pytest.raises(config.ConfigError, match="items.limericks: unknown item bank"):
        config.parse_config(d)
    d["items"] = {"structured_form": {"n": 2}}
    with pytest.raises(config.ConfigError, match="no slice of the run renders it"):
        config.parse_config(d)


def test_opt_in_block_joins_the_slices_once_and_keeps_its_budgets():
    d = _base_cfg(["id_chat"]).model_dump(mode="json")
    d["items"] = {}
    d["opt_in"] = {"extra": {"slices": ["code_review_chat", "code_review"]}}
    d["sampling"]["max_tokens_by_slice"] = {"code_review": 300}
    off = config.parse_config(d)
    assert off.slices == ["id_chat"]  # off: its budgets are kept for when it is switched on
    d["opt_in"]["extra"]["enabled"] = True
    on = config.parse_config(d)
    assert on.slices == ["id_chat", "code_review_chat", "code_review"]
    again = config.parse_config(config.config_to_dict(on))  # a resolved config reads back equal
    assert again.slices == on.slices
    d["opt_in"]["extra"]["slices"] = ["code_review", "nope"]
    with pytest.raises(config.ConfigError, match="opt_in.extra.slices"):
        config.parse_config(d)
