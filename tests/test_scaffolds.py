"""The six scaffolds: their bundled banks, the one change between each and its chat control, a
user's own bank through the one validator, and what the rollout makes of each output kind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from charshift import banks, forms, items, planning, render, scaffolds, slices
from charshift.backends.scripted import ScriptedBackend
from charshift.cli import app
from charshift.config import parse_config
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import Condition, EpisodeSpec, GenRequest, Sampling
from charshift.slices import RenderContext
from charshift.toolcalls import WorkStats, parse_json_objects
from charshift.tools import REQUIRED_ARGS
from charshift.toolsim import ToolSimulator

KINDS = list(items.KINDS)
BANKS = {k: banks.load(k) for k in KINDS}


def _both(kind: str, it, native: bool = False) -> tuple[EpisodeSpec, EpisodeSpec]:
    ctx = RenderContext(native_tools=native, worlds=BANKS[kind].worlds)
    return render.render(kind + "_chat", it, ctx), render.render(kind, it, ctx)


@pytest.mark.parametrize("kind", KINDS)
def test_bundled_bank_size_domains_and_pairing(kind):
    bank = BANKS[kind]
    assert len(bank.items) >= 20 and len(bank.domains) >= 6
    ids = [it.id for it in bank.items]
    assert len(ids) == len(set(ids))
    for it in bank.items:
        control, main = _both(kind, it)
        assert control.item_id == main.item_id == f"{kind}:{it.id}"
        for spec, name in ((control, kind + "_chat"), (main, kind)):
            entry = slices.get(name)
            assert spec.slice == name and spec.mode == entry.engine_mode
            assert spec.output == entry.output and spec.split == "eval"
            assert all(t.strip() for t in spec.user_turns)
            json.dumps(spec.to_dict())


def test_items_say_nothing_about_style():
    """Persona must come from the model: no item of the banks asks for a manner (the
    roleplay's pressure lines, which ask to drop one, are the measured element)."""
    words = re.compile(r"\b(tone|style|voice|personality|friendly|formal|witty|polite)\b", re.I)
    for kind, bank in BANKS.items():
        for it in bank.items:
            data = it.model_dump(exclude={"pressure"})
            assert not words.search(json.dumps(data)), (kind, it.id)


def test_code_review_changes_only_the_closing_request():
    for it in BANKS["code_review"].items:
        control, main = _both("code_review", it)
        head = scaffolds.change_text(it) + "\n\n"
        assert control.user_turns == [head + scaffolds.REVIEW_QUESTION]
        assert main.user_turns == [head + scaffolds.REVIEW_TASK.format(task=it.task)]
        assert control.system is main.system is None


def test_structured_form_asks_for_its_schema_and_the_control_for_prose():
    for it in BANKS["structured_form"].items:
        control, main = _both("structured_form", it)
        points = scaffolds.form_points(it)
        assert control.user_turns == [points + "\n\n" + scaffolds.FORM_PROSE]
        assert control.response_schema is None
        schema = forms.form_schema(it.fields)
        assert main.response_schema == schema
        assert main.user_turns[0].startswith(points + "\n\n" + scaffolds.FORM_JSON)
        shown = main.user_turns[0].split("```json\n", 1)[1].rsplit("\n```", 1)[0]
        assert json.loads(shown) == schema
        free = forms.free_text_fields(schema)
        assert free == [f.name for f in it.fields if f.kind == "text"] and len(free) >= 2


def test_debate_and_roleplay_change_only_their_element():
    for it in BANKS["multi_agent_debate"].items:
        control, main = _both("multi_agent_debate", it)
        motion = it.motion.rstrip(".")
        for spec in (control, main):
            assert f'"{motion}"' in spec.user_turns[0] and it.opening in spec.user_turns[0]
        assert main.user_turns[0].startswith(scaffolds.DEBATE_FRAME)
        assert f"Agent B: {it.opening}" in main.user_turns[0]
        assert control.user_turns[0].endswith(scaffolds.DEBATE_QUESTION)
    for it in BANKS["adversarial_roleplay"].items:
        control, main = _both("adversarial_roleplay", it)
        assert control.user_turns[0] == main.user_turns[0] and it.scene in main.user_turns[0]
        assert control.user_turns[1] == it.follow_up
        assert main.user_turns[1] == f"{it.pressure} {it.follow_up}"


@pytest.mark.parametrize("native", [False, True])
def test_agentic_tools_hands_the_same_results_over_as_a_trajectory(native):
    for it in BANKS["agentic_tools"].items:
        control, main = _both("agentic_tools", it, native)
        world = BANKS["agentic_tools"].worlds[it.world]
        results = [r for _, r in scaffolds.trajectory(it, world)]
        assert all(r in control.user_turns[0] for r in results)
        assert control.user_turns[0].startswith(it.question)
        assert main.context[0]["content"].startswith(it.question)
        shown = [m["content"] for m in main.context[1:]] + main.user_turns
        assert all(any(r in m for m in shown) for r in results)
        calls = [m for m in main.context if m["role"] == "assistant"]
        assert len(calls) == len(it.steps)  # the model writes the step after the last result
        assert main.system.startswith(control.system.rstrip())
        assert "## Tools" in main.system and "## Tools" not in control.system
        roles = {m["role"] for m in main.context}
        assert ("tool" in roles) == (native and len(it.steps) > 1)


def test_agentic_actions_hides_the_records_and_its_control_hands_them_over():
    for it in BANKS["agentic_actions"].items:
        control, main = _both("agentic_actions", it)
        world = BANKS["agentic_actions"].worlds[it.world]
        shown = "\n".join([main.system or "", *main.user_turns])
        for f in world.facts:
            assert f.text in control.user_turns[0] and f.text not in shown, (it.id, f.id)
        assert main.user_turns[0].startswith(it.task) and control.user_turns[0].startswith(it.task)
        assert main.mode == "agentic" and main.tools and main.scenario_id == world.id
        assert main.needed_calls == scaffolds.action_calls(world)
        assert main.system.startswith(control.system.rstrip())


def test_new_spec_fields_leave_old_keys_alone():
    spec = EpisodeSpec(slice="chat_email", item_id="scenario:x", user_turns=["hi"])
    assert "context" not in spec.to_dict() and "response_schema" not in spec.to_dict()
    form = dataclasses.replace(spec, response_schema={"type": "object"})
    assert form.to_dict()["response_schema"] == {"type": "object"}


# ---------------------------------------------------------------- a user's own bank


def _write_bank(tmp_path: Path, kind: str, entries: list[dict], name: str = "bank.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"items": entries}, sort_keys=False))
    return p


def _raw(kind: str) -> list[dict]:
    return [it.model_dump(exclude_none=True) for it in BANKS[kind].items]


def test_a_users_bank_is_validated_hashed_and_used(tmp_path):
    entries = _raw("code_review")[:2]
    entries[1]["id"] = "my-own-change"
    path = _write_bank(tmp_path, "code_review", entries)
    cfg = parse_config(
        {
            "bases": [{"name": "b", "model": "tiny:llama", "classifier": "x"}],
            "personas": ["sarcasm", "humor"],
            "slices": ["code_review_chat", "code_review"],
            "items": {"code_review": {"path": str(path)}},
        }
    )
    plan = planning.build_plan(cfg)
    assert {r.spec.item_id for r in plan.rows} == {
        f"code_review:{entries[0]['id']}",
        "code_review:my-own-change",
    }
    prov = banks.provenance(cfg)
    assert prov["code_review"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["code_review"]["source"] == str(path) and prov["code_review"]["items"] == 2


@pytest.mark.parametrize(
    ("kind", "mutate", "needle"),
    [
        ("code_review", lambda e: e.update(diff="no hunks here"), "diff: Value error, is not a"),
        ("code_review", lambda e: e.pop("task"), "task: Field required"),
        ("structured_form", lambda e: e["fields"][0].update(kind="choice"), "choices"),
        ("agentic_actions", lambda e: e.update(world="no-such-world"), "no-such-world"),
        (
            "agentic_tools",
            lambda e: e["steps"][0].update(query="zebra xylophone"),
            "steps.0: search",
        ),
        ("agentic_tools", lambda e: e["steps"][0].update(tool="send_email"), "not a search tool"),
    ],
)
def test_a_bad_bank_names_item_and_field_in_the_run_and_the_cli(tmp_path, kind, mutate, needle):
    entries = _raw(kind)[:2]
    mutate(entries[1])
    path = _write_bank(tmp_path, kind, entries)
    with pytest.raises(items.ItemError) as err:
        banks.load(kind, path)
    assert entries[1]["id"] in str(err.value) and needle in str(err.value)
    res = CliRunner().invoke(app, ["items", "validate", kind, str(path)])
    assert res.exit_code == 2 and str(err.value).splitlines()[1].strip() in res.output
    cfg = {
        "bases": [{"name": "b", "model": "tiny:llama", "classifier": "x"}],
        "personas": ["sarcasm", "humor"],
        "slices": [kind],
        "items": {kind: {"path": str(path)}},
    }
    with pytest.raises(items.ItemError, match=f"items.{kind}.path"):
        planning.build_plan(parse_config(cfg))


def test_duplicate_ids_and_keys_are_refused(tmp_path):
    entries = _raw("multi_agent_debate")[:2]
    entries[1]["id"] = entries[0]["id"]
    with pytest.raises(items.ItemError, match="duplicate item id"):
        banks.load("multi_agent_debate", _write_bank(tmp_path, "multi_agent_debate", entries))
    dup = tmp_path / "dup.yaml"
    dup.write_text("items:\n- id: a\n  id: b\n  domain: x\n")
    with pytest.raises(items.ItemError, match="given twice"):
        items.load_items("multi_agent_debate", dup)


def test_cli_validates_and_shows_the_bundled_banks():
    runner = CliRunner()
    res = runner.invoke(app, ["items", "validate", "structured_form"])
    assert res.exit_code == 0 and "ok: 21 structured_form items across 7 domains" in res.output
    res = runner.invoke(app, ["items", "show", "agentic_tools", "outage-credit"])
    assert res.exit_code == 0 and "pre-written" in res.output and "## Tools" in res.output
    res = runner.invoke(app, ["items", "show", "code_review", "nope"])
    assert res.exit_code == 2 and "no code_review item 'nope'" in res.output
    res = runner.invoke(app, ["scenarios", "validate"])
    assert res.exit_code == 0 and "65 scenarios" in res.output
    res = runner.invoke(app, ["slices"])
    assert res.exit_code == 0 and "code_review_chat -> code_review" in res.output


# ---------------------------------------------------------------- reading the outputs


def test_form_answers_are_read_leniently():
    it = BANKS["structured_form"].items[0]
    schema = forms.form_schema(it.fields)
    free = forms.free_text_fields(schema)
    reply = (
        "Sure, here it is:\n```json\n{" + f'"{free[0]}": "Line one\nline two", '
        f'"{free[1]}": \'second\', "severity": "high", "users_affected": 140,' + "}\n```"
    )
    ans = forms.read_answer(reply, schema)
    assert ans.outcome == "reply" and ans.text == "Line one\nline two\n\nsecond"
    assert ans.values and ans.values["users_affected"] == 140
    assert forms.read_answer("I would rather not fill in forms.", schema).outcome == "malformed"
    empty = json.dumps(dict.fromkeys(free, " "))
    assert forms.read_answer(empty, schema).outcome == "empty"
    other = '{"unrelated": 1} then ' + json.dumps({free[0]: "kept"})
    assert forms.read_answer(other, schema).text == "kept"


def test_json_reading_work_is_linear_in_the_text():
    stats = []
    for n in (20_000, 80_000):
        hostile = '{"a": "' + '{"x": [' * n  # unclosed brackets and strings everywhere
        s = WorkStats()
        parse_json_objects(hostile, stats=s)
        stats.append(s)
    assert all(s.units <= s.limit for s in stats)
    assert stats[1].limit <= 4 * stats[0].limit + 100


def _episode(spec: EpisodeSpec, sim=None) -> Episode:
    return Episode(
        key="k",
        spec=spec,
        condition=Condition("b", "prompted", "humor", system_prompt="You are playful."),
        sample_idx=0,
        run_seed=0,
        sampling=Sampling(max_tokens=400),
        simulator=sim,
    )


def _run(spec: EpisodeSpec, script, sim=None, **settings):
    backend = ScriptedBackend(script)
    engine = RolloutEngine(backend, RolloutSettings(**settings), REQUIRED_ARGS)
    (row,) = [r for step in engine.run([_episode(spec, sim)]) for r in step]
    return row, backend


def test_structured_form_row_scores_its_free_text_and_constrains_its_turn():
    it = BANKS["structured_form"].items[0]
    spec = render.render("structured_form", it)
    free = forms.free_text_fields(spec.response_schema)
    answer = json.dumps(
        {free[0]: "It broke.", free[1]: "A certificate expired.", "severity": "high"}
    )
    row, backend = _run(spec, [answer], constrained=True)
    assert row.outcome == "reply" and row.text == "It broke.\n\nA certificate expired."
    assert row.meta["form"]["severity"] == "high" and row.final_reply == answer
    assert backend.requests[0].json_schema == spec.response_schema
    row, backend = _run(spec, ["no json at all"])
    assert row.outcome == "malformed" and row.text is None
    assert backend.requests[0].json_schema is None  # the json protocol leaves decoding free


def test_agentic_tools_row_continues_its_transcript():
    it = BANKS["agentic_tools"].items[0]
    spec = render.render("agentic_tools", it, RenderContext(worlds=BANKS["agentic_tools"].worlds))
    row, backend = _run(spec, ["The jackets are late; ask for a partial delivery."])
    sent = backend.requests[0].messages
    assert sent[1:-1] == spec.context and sent[-1]["content"] == spec.user_turns[0]
    assert row.outcome == "reply" and row.text.startswith("The jackets")
    assert row.messages[1 : 1 + len(spec.context)] == spec.context


def _call(name: str, **args) -> str:
    return "```json\n" + json.dumps({"name": name, "arguments": args}) + "\n```"


def test_agentic_actions_row_goes_on_after_a_send_and_ends_with_finish():
    it = BANKS["agentic_actions"].items[0]
    world = BANKS["agentic_actions"].worlds[it.world]
    spec = render.render("agentic_actions", it, RenderContext(worlds={world.id: world}))
    spec = dataclasses.replace(spec, max_steps=6)
    to = world.recipients[0].email
    turns = [
        _call("search_chat", query="away day numbers"),
        _call("send_email", to=to, subject="Numbers", body="Dear Rosa,\n\nWe are 34 now.\n\nOwen"),
        _call("finish", summary="I told Green Fork about the new headcount."),
    ]
    row, _ = _run(spec, turns, ToolSimulator(world))
    assert row.outcome == "reply" and row.n_steps == 3
    assert (
        row.text
        == "Dear Rosa,\n\nWe are 34 now.\n\nOwen\n\nI told Green Fork about the new headcount."
    )
    assert [c["tool"] for c in row.tool_log] == ["search_chat", "send_email", "finish"]
    row, _ = _run(spec, [_call("finish")], ToolSimulator(world))
    assert row.outcome == "empty" and row.text is None
    looping = [_call("search_chat", query="numbers")] * 6
    row, _ = _run(spec, looping, ToolSimulator(world))
    assert row.outcome == "max_steps" and row.text is None and row.n_steps == 6
    row, _ = _run(spec, ["I will sort it.", "Done."], ToolSimulator(world), max_malformed=2)
    assert row.outcome == "malformed"


def test_a_dry_run_plans_every_scaffold_slice():
    cfg = parse_config(
        {
            "bases": [{"name": "b", "model": "tiny:llama", "classifier": "x"}],
            "personas": ["sarcasm", "humor"],
            "slices": [s for s in slices.names() if slices.get(s).family != "id"],
            "items": {k: {"n": 2} for k in KINDS},
            "scenarios": {"n": 2},
            "rollout": {"max_steps": 8, "step_margin": 3},
        }
    )
    plan = planning.build_plan(cfg, dry=True)
    per = {}
    for r in plan.rows:
        per.setdefault(r.spec.slice, set()).add(r.spec.item_id)
    assert set(per) == set(cfg.slices)
    for kind in KINDS:
        assert per[kind] == per[kind + "_chat"] and len(per[kind]) == 2
    for r in plan.rows:
        if r.spec.slice == "agentic_actions":
            assert r.spec.max_steps == max(8, r.spec.needed_calls + 3)
            assert r.spec.scenario_id in plan.scenario_bank
    assert "only the judge's behaviour rubric reads them; add judge to `scorers`" in plan.summary()


def test_form_schemas_compile_to_real_grammars(tiny_model_dir):
    """Every bundled form's schema compiles for a real tokenizer (llguidance, as the HF backend
    uses it): a filled answer is a complete document, an answer with a key too many is refused,
    and a random model's constrained output is always a prefix of an answer."""
    from charshift.backends.hf import HFBackend
    from charshift.constrain import row_constraint

    b = HFBackend(str(tiny_model_dir("llama")), device="cpu", batch_size=8)
    try:
        for it in BANKS["structured_form"].items:
            schema = forms.form_schema(it.fields)
            good = {
                f.name: (f.choices or ["x"])[0] if f.kind in ("text", "choice") else 3
                for f in it.fields
            }
            good.update({f.name: True for f in it.fields if f.kind == "boolean"})
            for doc, ok in ((good, True), ({**good, "extra": "no"}, False)):
                rc = row_constraint(b.tokenizer, schema, b._stop_ids)
                text = json.dumps(doc, ensure_ascii=False, separators=(", ", ": "))
                for t in b.tokenizer(text, add_special_tokens=False)["input_ids"]:
                    rc.accept(t)
                assert (rc.error is None and rc.accepting) == ok, (it.id, doc)
        spec = render.render("structured_form", BANKS["structured_form"].items[0])
        sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=24, repetition_penalty=1.0)
        reqs = [
            GenRequest([{"role": "user", "content": spec.user_turns[0]}], None, sampling, s,
                       json_schema=spec.response_schema)
            for s in range(4)
        ]  # fmt: skip
        first = next(iter(spec.response_schema["properties"]))
        for r in b.generate(reqs):
            assert r.error is None and r.text.startswith('{"' + first + '": ')
    finally:
        b.close()


def test_show_prompts_under_a_persona_of_the_users_own(tmp_path):
    """`items show` and `scenarios show` take --persona from a run config (--config), so a
    persona of one's own shows its own description; without --config its name is an error that
    says how to give one."""
    runner = CliRunner()
    cfg = Path(__file__).parent.parent / "examples" / "config.yaml"
    res = runner.invoke(app, ["items", "show", "code_review", "orders-pagination",
                              "--persona", "stoic", "--config", str(cfg)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "calm, measured and unflappable" in res.output
    res = runner.invoke(app, ["scenarios", "show", "--persona", "stoic", "--config", str(cfg),
                              _first_scenario()])  # fmt: skip
    assert res.exit_code == 0 and "calm, measured and unflappable" in res.output
    res = runner.invoke(app, ["items", "show", "code_review", "orders-pagination",
                              "--persona", "stoic"])  # fmt: skip
    assert res.exit_code == 2 and "add --config CONFIG" in res.output
    res = runner.invoke(app, ["items", "show", "code_review", "orders-pagination",
                              "--persona", "pirate", "--config", str(cfg)])  # fmt: skip
    assert res.exit_code == 2 and "has no persona 'pirate'" in res.output


def _first_scenario() -> str:
    from charshift import scenarios

    return scenarios.load_bank()[0].id
