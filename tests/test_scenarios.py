"""The scenario bank: schema validation, coverage of the bundled bank, deterministic selection."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from charshift.scenarios import (
    TOOL_NAMES,
    Scenario,
    ScenarioError,
    get_scenario,
    load_bank,
    parse_bank,
    select_scenarios,
)


@pytest.fixture(scope="module")
def bank() -> list[Scenario]:
    return load_bank()


def _raw_bank() -> list[dict]:
    from importlib import resources

    text = (resources.files("charshift") / "data" / "scenarios.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)["scenarios"]


def _one_raw() -> dict:
    return copy.deepcopy(_raw_bank()[0])


def test_bundled_bank_size_and_domains(bank):
    assert len(bank) >= 64
    domains = {s.domain for s in bank}
    assert len(domains) >= 12
    # no domain dominates: every domain has at least 4 scenarios
    for d in domains:
        assert sum(s.domain == d for s in bank) >= 4, d


def test_bundled_bank_ids_unique_and_facts_valid(bank):
    ids = [s.id for s in bank]
    assert len(ids) == len(set(ids))
    for s in bank:
        assert len(s.facts) >= 4
        assert len({f.tool for f in s.facts}) >= 3, s.id
        assert all(f.tool in TOOL_NAMES for f in s.facts)
        assert len(s.must_cover) >= 3
        assert s.recipients


def test_bundled_bank_goal_and_topic_carry_no_fact(bank):
    # the agentic request is built from goal and topic: a fact in them would leak into it
    for s in bank:
        for f in s.facts:
            assert f.text not in s.goal and f.text not in s.topic, (s.id, f.id)


def test_directory_holds_recipients_once(bank):
    for s in bank:
        emails = [p.email.lower() for p in s.directory]
        assert len(emails) == len(set(emails)), s.id
        for r in s.recipients + s.cc:
            assert sum(p.name == r.name for p in s.directory) == 1


def test_broken_fact_tool_names_scenario_and_field():
    raw = _one_raw()
    raw["facts"][1]["tool"] = "fax"
    with pytest.raises(ScenarioError) as err:
        parse_bank([raw])
    msg = str(err.value)
    assert raw["id"] in msg
    assert "facts.1.tool" in msg


def test_bad_email_and_unknown_field_are_named():
    raw = _one_raw()
    raw["recipients"][0]["email"] = "not-an-address"
    raw["mood"] = "cheerful"
    with pytest.raises(ScenarioError) as err:
        parse_bank([raw])
    msg = str(err.value)
    assert "recipients.0.email" in msg and "does not look like an email" in msg
    assert "mood: unknown field" in msg


def test_too_few_facts_and_tools_rejected():
    raw = _one_raw()
    raw["facts"] = raw["facts"][:3]
    with pytest.raises(ScenarioError, match="facts"):
        parse_bank([raw])
    raw = _one_raw()
    for f in raw["facts"]:
        f["tool"] = "documents"
    with pytest.raises(ScenarioError, match="at least 3 different tools"):
        parse_bank([raw])


def test_duplicate_ids_and_unresolvable_recipient():
    a, b = _one_raw(), _one_raw()
    with pytest.raises(ScenarioError, match="duplicate scenario id"):
        parse_bank([a, b])
    raw = _one_raw()
    # a second directory entry with the recipient's exact name makes the name ambiguous
    twin = dict(raw["recipients"][0], email="someone.else@elsewhere.example")
    raw["people"] = [twin]
    with pytest.raises(ScenarioError, match="does not resolve to exactly one"):
        parse_bank([raw])


def test_errors_are_collected_across_scenarios():
    a, b = _one_raw(), copy.deepcopy(_raw_bank()[1])
    a["goal"] = ""
    b["sender"]["email"] = "nobody"
    with pytest.raises(ScenarioError) as err:
        parse_bank([a, b])
    msg = str(err.value)
    assert a["id"] in msg and b["id"] in msg


def test_custom_bank_path(tmp_path: Path):
    raw = _one_raw()
    raw["id"] = "my-own-scenario"
    p = tmp_path / "bank.yaml"
    p.write_text(yaml.safe_dump({"scenarios": [raw]}))
    got = load_bank(p)
    assert [s.id for s in got] == ["my-own-scenario"]
    with pytest.raises(ScenarioError, match="not found"):
        load_bank(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("scenarios: [\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_bank(tmp_path / "bad.yaml")


def test_select_deterministic(bank):
    a = select_scenarios(bank, n=10, seed=3)
    b = select_scenarios(bank, n=10, seed=3)
    c = select_scenarios(bank, n=10, seed=4)
    assert [s.id for s in a] == [s.id for s in b]
    assert len(a) == 10 and [s.id for s in a] != [s.id for s in c]
    # the sample keeps bank order and does not depend on the bank's order
    order = {s.id: i for i, s in enumerate(bank)}
    assert [order[s.id] for s in a] == sorted(order[s.id] for s in a)
    rev = select_scenarios(list(reversed(bank)), n=10, seed=3)
    assert {s.id for s in rev} == {s.id for s in a}


def test_select_by_ids(bank):
    ids = [bank[5].id, bank[2].id]
    assert [s.id for s in select_scenarios(bank, ids=ids)] == ids
    assert len(select_scenarios(bank)) == len(bank)
    with pytest.raises(ScenarioError, match="unknown scenario id"):
        select_scenarios(bank, ids=["nope"])
    with pytest.raises(ScenarioError, match="cannot select"):
        select_scenarios(bank, ids=ids, n=3)
    assert get_scenario(bank, ids[0]).id == ids[0]
    with pytest.raises(ScenarioError, match="unknown scenario id"):
        get_scenario(bank, "nope")
