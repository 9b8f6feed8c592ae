"""The cost estimate `--dry-run` prints: generated tokens (an upper bound and an expected value,
assumed or measured in an earlier run) and GPU-hours at a given or benchmarked throughput."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from charshift import planning
from charshift.cli import app
from charshift.config import config_to_dict, load_preset, parse_config
from charshift.schema import GenerationRow
from charshift.store import RunStore


def _cfg(**over):
    d = {
        "bases": [{"name": "a", "model": "tiny:llama", "classifier": "x"}],
        "personas": ["sarcasm", "humor"],
        "stages": ["base", "prompted"],
        "slices": ["id_chat", "id_chat_prefill", "chat_email_multiturn", "tool_email_oneshot",
                   "agentic_email"],
        "sampling": {"max_tokens": 100, "max_tokens_by_slice": {"agentic_email": 40},
                     "n_samples": 2},
        "id_prompts": {"n_eval": 5},
        "scenarios": {"n": 4},
        "rollout": {"max_steps": 6, "step_margin": 2},
    }  # fmt: skip
    d.update(over)
    return parse_config(d)


def _by_slice(est):
    return {c.slice: c for c in est.cells}


def test_upper_bound_is_every_call_at_its_whole_budget():
    plan = planning.build_plan(_cfg())
    est = planning.estimate_cost(plan)
    cells = _by_slice(est)
    for sl, cell in cells.items():
        rows = [r for r in plan.rows if r.spec.slice == sl]
        calls = sum(
            len(r.spec.user_turns) if r.spec.mode == "chat" else r.spec.max_steps for r in rows
        )
        assert cell.rows == len(rows) and cell.max_calls == calls
        assert cell.max_tokens == calls * (40 if sl == "agentic_email" else 100)
    # the prefill attack generates two turns, the multi-turn email one per user turn
    assert cells["id_chat_prefill"].max_calls == 2 * cells["id_chat"].max_calls
    assert est.max_tokens == sum(c.max_tokens for c in est.cells)
    summary_calls = int(plan.summary().split("at most ")[1].split()[0])
    assert summary_calls == sum(c.max_calls for c in est.cells)


def test_expected_value_states_its_assumption():
    plan = planning.build_plan(_cfg())
    est = planning.estimate_cost(plan, fraction=0.25)
    cells = _by_slice(est)
    agentic = [r for r in plan.rows if r.spec.slice == "agentic_email"]
    assert cells["agentic_email"].expected_calls == sum(r.spec.needed_calls for r in agentic)
    assert cells["agentic_email"].expected_calls < cells["agentic_email"].max_calls
    assert cells["agentic_email"].tokens_per_call == 0.25 * 40
    assert cells["id_chat"].expected_calls == cells["id_chat"].max_calls  # chat: every turn
    assert math.isclose(est.expected_tokens, sum(c.expected_tokens for c in est.cells))
    assert all(c.basis == "assumed" for c in est.cells)
    text = est.text()
    assert "each call generating 0.25 of its budget" in text and "--expected-fraction" in text
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="--expected-fraction"):
            planning.estimate_cost(plan, fraction=bad)


def _gen(key, base, slice_, replies, n_steps=None):
    messages = [{"role": "user", "content": "hi"}]
    for r in replies:
        messages += [{"role": "assistant", "content": r}, {"role": "user", "content": "ok"}]
    return GenerationRow(
        key=key, base=base, stage="base", persona=None, slice=slice_, item_id=f"prompt:{key}",
        sample_idx=0, split="eval", seed=0, outcome="reply", messages=messages,
        final_reply=replies[-1] if replies else None, text=None,
        n_steps=len(replies) if n_steps is None else n_steps,
    )  # fmt: skip


def _words(_model, text):
    return len(text.split())


def test_calibration_recovers_known_means():
    rows = [
        _gen("1", "a", "agentic_email", ["w " * 10, "w " * 20, "w " * 30]),  # 3 calls, 60 tokens
        _gen("2", "a", "agentic_email", ["w " * 5]),  # 1 call, 5 tokens
        _gen("3", "a", "id_chat", ["w " * 7]),
        # a scripted assistant turn before the model's own: only the last n_steps count
        _gen("4", "a", "id_chat", ["scripted " * 50, "w " * 9], n_steps=1),
        _gen("5", "other", "id_chat", ["w " * 100]),  # a base not in model_of: ignored
    ]
    cal = planning.calibrate(rows, {"a": "tiny:llama"}, {"agentic_email": 40}, _words, "RUN")
    ag = cal.cells[("tiny:llama", "agentic_email")]
    assert (ag.rows, ag.calls_per_row, ag.tokens_per_call, ag.budget) == (2, 2.0, 65 / 4, 40)
    chat = cal.cells[("tiny:llama", "id_chat")]
    assert (chat.rows, chat.calls_per_row, chat.tokens_per_call) == (2, 1.0, 8.0)
    assert set(cal.cells) == {("tiny:llama", "agentic_email"), ("tiny:llama", "id_chat")}


def test_measured_cells_replace_the_assumption_where_they_exist():
    plan = planning.build_plan(_cfg())
    cal = planning.Calibration(
        "RUN",
        {
            ("tiny:llama", "agentic_email"): planning.CalibrationCell(10, 2.5, 30.0, 40),
            ("tiny:llama", "id_chat"): planning.CalibrationCell(10, 1.0, 500.0, 50),
            ("other-model", "chat_email_multiturn"): planning.CalibrationCell(10, 3.0, 1.0, 100),
        },
    )
    est = planning.estimate_cost(plan, calibration=cal)
    cells = _by_slice(est)
    ag = cells["agentic_email"]
    assert ag.basis == "measured" and ag.expected_calls == 2.5 * ag.rows
    assert ag.tokens_per_call == 30.0
    chat = cells["id_chat"]
    assert chat.tokens_per_call == 100  # capped at this run's budget
    assert cells["chat_email_multiturn"].basis == "assumed"  # another model's cell is not used
    assert any("id_chat: measured at a budget of 50" in n for n in est.notes)
    assert "measured (basis 'measured')" in est.text() and "RUN" in est.text()


def test_gpu_hours_and_the_largest_shard():
    plan = planning.build_plan(_cfg())
    t = planning.Throughput(250.0, "given")
    est = planning.estimate_cost(plan, throughput=t, n_shards=3)
    assert est.gpu_hours(est.max_tokens) == est.max_tokens / 250 / 3600
    load = [0.0, 0.0, 0.0]
    per_row = {c.slice: c.expected_tokens / c.rows for c in est.cells}
    for r in plan.rows:
        load[planning.shard_of(r.spec.item_id, 3)] += per_row[r.spec.slice]
    assert math.isclose(est.shard_share, max(load) / sum(load))
    assert 1 / 3 <= est.shard_share <= 1
    assert "GPU-hours at 250 output tok/s (given)" in est.text()
    assert "over 3 shards" in est.text()
    assert planning.estimate_cost(plan).gpu_hours(1e6) is None


@pytest.mark.parametrize(
    ("data", "path", "rate", "source"),
    [
        ({"tok_per_s": 512}, None, 512.0, "F"),
        ({"paths": {"hf-mixed": {"tok_per_s": 153.5, "median_tok_per_s": 150}}}, None, 153.5,
         "F, path hf-mixed"),
        ({"device": "H200", "paths": {"generate": 746, "hf-mixed": {"tok_per_s": 153}}},
         "hf-mixed", 153.0, "F, path hf-mixed, H200"),
    ],
)  # fmt: skip
def test_throughput_from_a_benchmark_file(data, path, rate, source):
    t = planning.throughput_from_json(data, "F", path)
    assert (t.tok_per_s, t.source) == (rate, source)


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ([1, 2], None, "expected a JSON object"),
        ({}, None, 'no "tok_per_s" and no "paths"'),
        ({"paths": {"a": 1, "b": 2}}, None, "measured several paths (a, b)"),
        ({"paths": {"a": 1}}, "zz", "--throughput-path: 'zz' is not in F (has a)"),
        ({"tok_per_s": "fast"}, None, "expected a number"),
        ({"tok_per_s": -3}, None, "must be a positive number"),
        ({"paths": {"a": {"tok_per_s": float("inf")}}}, None, "paths.a.tok_per_s"),
        ({"tok_per_s": True}, None, "expected a number"),
    ],
)
def test_bad_throughput_files_name_the_field(data, path, message):
    with pytest.raises(ValueError, match="F|--throughput-path") as err:
        planning.throughput_from_json(data, "F", path)
    assert message in str(err.value)


def test_paper_preset_estimate_is_consistent_with_its_plan():
    cfg = load_preset("paper")
    plan = planning.build_plan(cfg, dry=True)
    est = planning.estimate_cost(plan, throughput=planning.Throughput(153, "issue 10"))
    assert sum(c.rows for c in est.cells) == len(plan.rows)
    assert {c.budget for c in est.cells} == {cfg.sampling.max_tokens}
    assert est.expected_tokens < est.max_tokens
    assert {c.base for c in est.cells} == {b.name for b in cfg.bases}


# -- through the command line ---------------------------------------------------------------------

runner = CliRunner()


def test_dry_run_prints_cost_with_a_benchmark_file(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"paths": {"hf-one": 100.0, "hf-mixed": 80.0}}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(config_to_dict(_cfg())))
    args = ["run", str(cfg), "--dry-run", "--throughput-from", str(bench)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--throughput-path NAME" in res.output
    res = runner.invoke(app, [*args, "--throughput-path", "hf-mixed", "--shards", "2"])
    assert res.exit_code == 0, res.output
    assert "GPU-hours at 80 output tok/s" in res.output and "over 2 shards" in res.output
    res = runner.invoke(app, ["run", str(cfg), "--dry-run", "--throughput", "5", "--throughput-from", str(bench)])  # fmt: skip
    assert res.exit_code == 2 and "not both" in res.output


def test_dry_run_calibrates_from_an_earlier_run(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARSHIFT_CACHE", str(tmp_path / "cache"))
    cfg = _cfg()
    run = tmp_path / "pilot"
    with RunStore(run) as store:
        store.write_config(config_to_dict(cfg))
        store.generations.append(
            [_gen(f"k{i}", "a", "agentic_email", ["hello world"] * (1 + i % 3)) for i in range(6)]
        )
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config_to_dict(cfg)))
    res = runner.invoke(app, ["run", str(path), "--dry-run", "--calibrate-from", str(run)])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.split()[:2] == ["a", "agentic_email"])
    assert line.split()[-1] == "measured"
    rows = int(line.split()[2])
    assert float(line.split()[6]) == pytest.approx(2.0 * rows)  # mean calls per row: (1+2+3)/3
    res = runner.invoke(app, ["run", str(path), "--dry-run", "--calibrate-from", str(tmp_path)])
    assert res.exit_code == 2 and "not a charshift run directory" in res.output


# -- one figure per engine: the benchmark names each engine's path, the dry run takes its own ----

BENCH = {
    "device": "H100",
    "paths": {"generate": 700.0, "hf-mixed": 80.0, "vllm-mixed": {"tok_per_s": 2400.0}},
    "engines": {"hf": "hf-mixed", "vllm": "vllm-mixed"},
}


@pytest.mark.parametrize(
    ("backend", "engine"),
    [
        ({"kind": "hf"}, "hf"),
        ({"kind": "vllm"}, "vllm"),
        ({"kind": "server", "engine": "vllm"}, "vllm"),
        ({"kind": "server", "engine": "sglang"}, "sglang"),
        ({"kind": "server", "engine": "command", "command": "serve {model} {port}"}, None),
        ({"kind": "openai", "base_url": "http://h:1/v1"}, None),
    ],
)
def test_run_engine_names_the_engine_a_benchmark_measures(backend, engine):
    data = load_preset("smoke").model_dump(mode="json")
    data["backend"] = backend
    assert planning.run_engine(parse_config(data)) == engine


def test_a_benchmark_file_gives_each_engine_its_own_figure():
    vllm = planning.throughput_from_json(BENCH, "F", engine="vllm")
    hf = planning.throughput_from_json(BENCH, "F", engine="hf")
    assert (vllm.tok_per_s, vllm.source) == (2400.0, "F, path vllm-mixed, H100")
    assert hf.tok_per_s == 80.0
    assert planning.throughput_from_json(BENCH, "F", "generate", engine="vllm").tok_per_s == 700
    with pytest.raises(ValueError, match=r"none for this run's engine \(sglang\) \(figures for hf, vllm\)"):  # fmt: skip
        planning.throughput_from_json(BENCH, "F", engine="sglang")


def test_the_paper_dry_run_is_planned_with_the_vllm_figure(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    res = runner.invoke(
        app, ["run", "--preset", "paper", "--dry-run", "--throughput-from", str(bench)]
    )
    assert res.exit_code == 0, res.output
    assert "GPU-hours at 2400 output tok/s" in res.output and "vllm-mixed" in res.output


def test_bench_bound_counts_kv_cache_reads_and_the_json_names_engine_paths(tmp_path):
    import sys
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_hf

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    assert bench_hf.kv_bytes_per_token(model) == 2 * 3 * 2 * 8 * 4  # K and V, float32
    weights = bench_hf.weight_bytes(model)
    assert bench_hf.bandwidth_bound(model, 1.0, 8) == 8 * 1e9 / weights  # no context: weights
    with_kv = bench_hf.bandwidth_bound(model, 1.0, 8, prompt_tokens=300, new_tokens=128)
    assert with_kv == 8 * 1e9 / (weights + 8 * 364 * bench_hf.kv_bytes_per_token(model))
    timings = {n: bench_hf.Timing(n, [r]) for n, r in (("hf-mixed", 80.0), ("hf-one", 90.0))}
    bench_hf.write_json(tmp_path / "b.json", timings, "cpu", "setup", None)
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["engines"] == {"hf": "hf-mixed"}  # vLLM not measured: no figure for it
    assert planning.throughput_from_json(data, "b", engine="hf").tok_per_s == 80.0


def test_prompt_tokens_count_every_resent_request():
    """Prompt tokens sent: one call sends its first request; a multi-turn chat resends it with
    every reply and user turn since; the persona prompt is part of it; the dry run prints it."""
    plan = planning.build_plan(_cfg())
    est = planning.estimate_cost(plan, fraction=0.5)
    cells = _by_slice(est)
    chat = [r for r in plan.rows if r.spec.slice == "id_chat"]
    first = sum(planning.first_prompt_chars(r) for r in chat) / planning.CHARS_PER_TOKEN
    assert cells["id_chat"].prompt_tokens == pytest.approx(first)  # one call per row
    prompted = next(r for r in chat if r.condition.system_prompt)
    bare = next(r for r in chat if not r.condition.system_prompt)
    gap = planning.first_prompt_chars(prompted) - planning.first_prompt_chars(bare)
    assert gap >= len(prompted.condition.system_prompt)  # the persona prompt is sent
    multi = next(r for r in plan.rows if r.spec.slice == "chat_email_multiturn")
    turns = len(multi.spec.user_turns)
    later = [len(t) / planning.CHARS_PER_TOKEN for t in multi.spec.user_turns[1:]]
    want = turns * planning.first_prompt_chars(multi) / planning.CHARS_PER_TOKEN + (
        turns * (turns - 1) / 2 * (50.0 + sum(later) / len(later))
    )
    assert planning.prompt_tokens(multi, turns, 50.0) == pytest.approx(want)
    tool = next(r for r in plan.rows if r.spec.slice == "agentic_email")
    assert (
        planning.first_prompt_chars(tool)
        > len(tool.spec.user_turns[0]) + len(json.dumps(tool.spec.tools)) - 1
    )  # tool descriptions are part of the first request
    res = runner.invoke(app, ["run", "--preset", "smoke", "--dry-run"])
    assert res.exit_code == 0 and "prompt~" in res.output and "prompt tokens sent" in res.output
