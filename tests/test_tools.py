"""The tool registry: one entry per tool, read by formats, the simulator, the engine and the
parser's diagnosis."""

from __future__ import annotations

import json

import pytest

from charshift import formats, scenarios, tools
from charshift.backends.scripted import ScriptedBackend
from charshift.rollout import Episode, RolloutEngine, RolloutSettings
from charshift.schema import Condition, Sampling
from charshift.toolcalls import ToolCall, diagnose_tool_turn
from charshift.toolsim import ToolSimulator

BANK = scenarios.load_bank()


def test_registry_is_the_one_source_of_tool_facts():
    assert formats.TOOL_SPECS == tools.tool_specs()
    assert formats.REQUIRED_ARGS == tools.required_args()
    assert formats.TOOL_NAMES == tools.tool_names() == tuple(tools.REGISTRY)
    # every scenario fact source has exactly one tool that reads it
    assert sorted(tools.source_tool()) == sorted(scenarios.TOOL_NAMES)
    for t in tools.TOOLS:
        spec = t.spec()["function"]
        assert spec["name"] == t.name and spec["parameters"]["required"] == list(t.required)
        assert set(t.required) <= set(t.properties)
        assert t.signature in formats.tool_protocol_text()
    assert tools.get_tool("send_email").signature == "send_email(to, subject, body, cc?)"
    assert tools.get_tool("finish").signature == "finish(summary?)"
    assert tools.get_tool("nope") is None


def _weather(sim, name, args):
    return tools.ToolResult(name, args, True, f"Sunny in {args['city']} at {sim.scenario.date}.")


WEATHER = tools.Tool(
    "check_weather",
    "Look up the weather forecast for a city.",
    {"city": {"type": "string", "description": "A city name."}},
    ("city",),
    _weather,
)


def test_adding_a_tool_is_one_entry(monkeypatch):
    monkeypatch.setitem(tools.REGISTRY, WEATHER.name, WEATHER)
    sc = BANK[0]
    ep = formats.render_email("agentic_email", sc)
    assert "check_weather" in [t["function"]["name"] for t in ep.tools]
    assert "- check_weather(city): Look up the weather" in ep.system
    sim = ToolSimulator(sc)
    res = sim.call(ToolCall("check_weather", {"city": "Leeds"}))
    assert res.ok and res.content.startswith("Sunny in Leeds")
    missing = sim.call(ToolCall("check_weather", {}))
    assert not missing.ok and "'city'" in missing.content
    # the parser's diagnosis and the engine see its required argument
    msg = diagnose_tool_turn(
        '{"name": "check_weather", "arguments": {}}', tools.tool_names(), tools.required_args()
    )
    assert msg and "city" in msg
    call = "```json\n" + json.dumps({"name": "check_weather", "arguments": {"town": "x"}}) + "\n```"
    eng = RolloutEngine(ScriptedBackend(lambda req: call), RolloutSettings(max_steps=1))
    assert eng.required_args["check_weather"] == ["city"]
    epi = Episode("k", ep, Condition("b", "base", None), 0, 0, Sampling(), ToolSimulator(sc))
    row = [r for step in eng.run([epi]) for r in step][0]
    assert row.tool_log[0]["tool"] == "check_weather" and row.tool_log[0]["ok"] is False


@pytest.mark.parametrize("name", [t.name for t in tools.TOOLS if t.source])
def test_search_tools_read_their_own_source(name):
    sc = BANK[0]
    sim = ToolSimulator(sc)
    source = tools.get_tool(name).source
    facts = [f for f in sc.facts if f.tool == source]
    for f in facts:
        res = sim.call(ToolCall(name, {"query": f.title}))
        assert res.ok and f.text in res.content
