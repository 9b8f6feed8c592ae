"""The bad-input matrix (issue 9): every bad config, predictions file and generations file is a
clear error (exit 2) whose message names the field, file or line, with no traceback, before any
work starts, and no output file is created or damaged.

Each case builds its inputs in a folder of its own beside pre-existing outputs (an old report, an
old predictions file) and runs the real CLI (typer's CliRunner, in process); the folder must be
exactly as it was afterwards, inputs aside. Config cases run as a dry run, and the ones marked
`real` also as a real run (no --dry-run), where the old code only failed (or did not) once models
loaded. A few end-to-end checks run the CLI as a subprocess.

`scripts/bad_input_matrix.py` runs the same tables against any source tree and counts the
outcomes in the issue's form (tried / clear error / traceback / silent wrong / data lost).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PERSONAS = ("sarcasm", "humor")
OLD_REPORT = "<html>the old report</html>"
OLD_PREDICTIONS = '{"old": "predictions"}\n'


@dataclass(frozen=True)
class Case:
    """One bad input. `make(folder)` writes the inputs and returns the CLI arguments; the message
    must hold every string of `expect`. `real`: a config case also run without --dry-run."""

    id: str
    make: Callable[[Path], list[str]]
    expect: tuple[str, ...]
    real: bool = False


@dataclass
class Outcome:
    exit_code: int
    output: str
    traceback: bool
    changed: list[str]  # pre-existing files (old outputs, the case's inputs) modified or removed
    created: list[str]  # files that appeared besides the case's own inputs
    inputs_changed: list[str]  # of `changed`, the case's own input files

    def problems(self, case: Case) -> list[str]:
        out = []
        if self.exit_code != 2:
            out.append(f"exit code {self.exit_code}, not 2")
        if self.traceback:
            out.append("a traceback")
        missing = [s for s in case.expect if s not in self.output]
        if missing:
            out.append(f"message lacks {missing}")
        if self.changed or self.created:
            out.append(f"files changed {self.changed}, created {self.created}")
        return out


# ------------------------------------------------------------------------------------- configs


def good_config() -> dict[str, Any]:
    return {
        "name": "badinput",
        "bases": [{"name": "b", "model": "tiny:llama", "classifier": "tiny:modernbert:sarcasm,humor"}],
        "stages": ["base", "prompted"],
        "personas": list(PERSONAS),
        "slices": ["id_chat"],
        "sampling": {"max_tokens": 4},
        "backend": {"device": "cpu", "dtype": "float32"},
        "id_prompts": {"n_eval": 2},
        "stats": {"n_boot": 20},
    }  # fmt: skip


def _fake_model(folder: Path, arch: str | None) -> str:
    """A folder with only a config.json naming `arch` (None: no config.json at all)."""
    folder.mkdir(parents=True, exist_ok=True)
    if arch is None:
        (folder / "notes.txt").write_text("not a model\n")
    else:
        (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    return str(folder)


def cfg(change: Callable[[dict[str, Any], Path], Any]) -> Callable[[Path], list[str]]:
    """A config case: the good config, changed by `change(data, folder)`."""

    def make(d: Path) -> list[str]:
        data = good_config()
        change(data, d)
        p = d / "config.yaml"
        p.write_text(yaml.safe_dump(data, allow_unicode=True))
        return ["run", str(p)]

    return make


def raw_cfg(content: bytes) -> Callable[[Path], list[str]]:
    def make(d: Path) -> list[str]:
        p = d / "config.yaml"
        p.write_bytes(content)
        return ["run", str(p)]

    return make


def _set(path: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    """A change that sets `a.b.c` (digits index lists) to `value`."""

    def change(data: dict[str, Any], _: Path) -> None:
        *head, last = path.split(".")
        node: Any = data
        for k in head:
            node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
        node[int(last) if last.isdigit() else last] = value

    return change


def _base(**kw: Any) -> Callable[[dict[str, Any], Path], None]:
    return lambda data, _: data["bases"][0].update(kw)


def _folder_model(key: str, arch: str | None) -> Callable[[dict[str, Any], Path], None]:
    return lambda data, d: data["bases"][0].update({key: _fake_model(d / "m", arch)})


_GOOD_YAML = yaml.safe_dump(good_config()).encode()

CONFIG_CASES = [
    # failure 4 of the issue, item by item
    Case("max_length_0", cfg(_set("scoring.max_length", 0)), ("scoring.max_length",), real=True),
    Case("max_length_negative", cfg(_set("scoring.max_length", -5)), ("scoring.max_length",)),
    Case("max_length_huge", cfg(_set("scoring.max_length", 10**12)), ("scoring.max_length",)),
    Case("name_absolute", cfg(lambda c, d: c.update(name=str(d / "escaped"))), ("name",), real=True),
    Case("name_dotdot", cfg(_set("name", "../../escaped")), ("run name",), real=True),
    Case("name_slash", cfg(_set("name", "a/b")), ("run name",)),
    Case("name_dot", cfg(_set("name", ".")), ("run name",)),
    Case("name_empty", cfg(_set("name", "")), ("run name",)),
    Case("name_control", cfg(_set("name", "a\x07b")), ("run name",)),
    Case("name_backslash", cfg(_set("name", "a\\b")), ("run name",)),
    Case("base_dotdot", cfg(_set("bases.0.name", "..")), ("bases.0.name",), real=True),
    Case("base_dot", cfg(_set("bases.0.name", ".")), ("bases.0.name",)),
    Case("base_slash", cfg(_set("bases.0.name", "a/b")), ("bases.0.name",)),
    Case("base_newline", cfg(_set("bases.0.name", "a\nb")), ("bases.0.name",)),
    Case("base_empty", cfg(_set("bases.0.name", "")), ("bases.0.name",)),
    Case("base_absolute", cfg(_set("bases.0.name", "/etc")), ("bases.0.name",)),
    Case("temperature_inf", cfg(_set("sampling.temperature", float("inf"))), ("sampling.temperature",), real=True),
    Case("temperature_1e300", cfg(_set("sampling.temperature", 1e300)), ("sampling.temperature",)),
    Case("temperature_nan", cfg(_set("sampling.temperature", float("nan"))), ("sampling.temperature",)),
    Case("temperature_negative", cfg(_set("sampling.temperature", -0.1)), ("sampling.temperature",)),
    Case("top_p_nan", cfg(_set("sampling.top_p", float("nan"))), ("sampling.top_p",)),
    Case("top_p_zero", cfg(_set("sampling.top_p", 0)), ("sampling.top_p",)),
    Case("top_p_above_1", cfg(_set("sampling.top_p", 1.5)), ("sampling.top_p",)),
    Case("rep_penalty_inf", cfg(_set("sampling.repetition_penalty", float("inf"))), ("sampling.repetition_penalty",)),
    Case("rep_penalty_1e300", cfg(_set("sampling.repetition_penalty", 1e300)), ("sampling.repetition_penalty",)),
    Case("rep_penalty_zero", cfg(_set("sampling.repetition_penalty", 0)), ("sampling.repetition_penalty",)),
    Case("published_unknown", cfg(_set("published", "nonsense")), ("published",)),
    Case("bases_empty", cfg(_set("bases", [])), ("bases",)),
    Case("stages_empty", cfg(_set("stages", [])), ("stages",)),
    Case("slices_empty", cfg(_set("slices", [])), ("slices",)),
    Case("personas_empty", cfg(_set("personas", [])), ("personas",)),
    Case("personas_one", cfg(_set("personas", ["sarcasm"])), ("personas",)),
    Case("personas_duplicate", cfg(_set("personas", ["sarcasm", "sarcasm"])), ("personas",)),
    Case("slices_duplicate", cfg(_set("slices", ["id_chat", "id_chat"])), ("slices", "duplicate")),
    Case("stages_duplicate", cfg(_set("stages", ["base", "prompted", "base"])), ("stages", "duplicate")),
    Case("stage_unsafe_name", cfg(lambda c, d: (c.update(stages=["base", "../x"]), c["bases"][0].update(adapters={"../x": {"path": "/a/{persona}"}}))), ("stage",)),
    Case("model_root", cfg(_base(model="/")), ("bases.0.model", "not a model folder"), real=True),
    Case("model_not_a_model_folder", cfg(_folder_model("model", None)), ("bases.0.model", "not a model folder"), real=True),
    Case("model_is_a_file", cfg(lambda c, d: (d.joinpath("w.bin").write_text("x"), _base(model=str(d / "w.bin"))(c, d))), ("bases.0.model", "is a file")),
    Case("model_folder_missing", cfg(lambda c, d: _base(model=str(d / "nowhere"))(c, d)), ("bases.0.model", "not found")),
    Case("model_is_a_classifier", cfg(_folder_model("model", "BertForSequenceClassification")), ("bases.0.model", "not a chat model")),
    Case("model_empty", cfg(_base(model="")), ("bases.0.model",)),
    Case("model_control", cfg(_base(model="tiny:llama\n")), ("bases.0.model",)),
    Case("classifier_root", cfg(_base(classifier="/")), ("bases.0.classifier", "not a model folder"), real=True),
    Case("classifier_causal_lm", cfg(_folder_model("classifier", "LlamaForCausalLM")), ("bases.0.classifier", "not a sequence classifier"), real=True),
    Case("classifier_missing", cfg(lambda c, d: _base(classifier=str(d / "nowhere"))(c, d)), ("bases.0.classifier", "not found")),
    Case("config_not_utf8", raw_cfg(_GOOD_YAML + b"description: caf\xe9\n"), ("not UTF-8", f"line {len(_GOOD_YAML.splitlines()) + 1}")),
    Case("config_a_list", raw_cfg(b"- a\n- b\n"), ("mapping",)),
    Case("config_a_scalar", raw_cfg(b"hello\n"), ("mapping",)),
    Case("config_empty", raw_cfg(b""), ("empty",)),
    Case("config_invalid_yaml", raw_cfg(b"bases: [\n"), ("not valid YAML",)),
    Case("config_duplicate_key", raw_cfg(_GOOD_YAML + b"name: other\n"), ("'name'", "twice")),
    Case("config_deep_nesting", raw_cfg(b"description: " + b"[" * 20000 + b"]" * 20000 + b"\n"), ("nested too deeply",)),
    Case("config_python_tag", raw_cfg(_GOOD_YAML + b"x: !!python/object/apply:os.system ['true']\n"), ("not valid YAML",)),
    Case("config_huge", raw_cfg(_GOOD_YAML + b"description: '" + b"x" * (2 << 20) + b"'\n"), ("larger than",)),
    Case("config_is_a_folder", lambda d: ["run", str(d)], ("is a folder",)),
    Case("config_missing", lambda d: ["run", str(d / "nope.yaml")], ("not found",)),
    Case("device_quantum", cfg(_set("backend.device", "quantum")), ("backend.device",), real=True),
    Case("device_cuda_x", cfg(_set("backend.device", "cuda:x")), ("backend.device",)),
    Case("dtype_unknown", cfg(_set("backend.dtype", "int3")), ("backend.dtype",), real=True),
    Case("backend_kind", cfg(_set("backend.kind", "tgi")), ("backend.kind",)),
    Case("backend_batch_0", cfg(_set("backend.batch_size", 0)), ("backend.batch_size",)),
    Case("max_tokens_0", cfg(_set("sampling.max_tokens", 0)), ("sampling.max_tokens",)),
    Case("max_tokens_1e30", cfg(_set("sampling.max_tokens", 10**30)), ("sampling.max_tokens",)),
    Case("n_samples_0", cfg(_set("sampling.n_samples", 0)), ("sampling.n_samples",)),
    Case("sampling_seed_negative", cfg(_set("sampling.seed", -1)), ("sampling.seed",)),
    Case("stats_seed_negative", cfg(_set("stats.seed", -1)), ("stats.seed",)),
    Case("stats_n_boot_5", cfg(_set("stats.n_boot", 5)), ("stats.n_boot",)),
    Case("stats_ci_1_5", cfg(_set("stats.ci", 1.5)), ("stats.ci",)),
    Case("unknown_field", cfg(_set("sampels", {})), ("sampels", "unknown field")),
    Case("unknown_persona", cfg(_set("personas", ["sarcasm", "grumpiness"])), ("grumpiness",)),
    Case("unknown_slice", cfg(_set("slices", ["id_chat", "emial"])), ("emial",)),
    Case("stage_without_adapters", cfg(_set("stages", ["base", "full"])), ("'full'", "adapters")),
    Case("no_classifier", cfg(lambda c, d: c["bases"][0].pop("classifier")), ("no `classifier`",)),
    Case("adapter_two_sources", cfg(lambda c, d: (c.update(stages=["base", "full"]), c["bases"][0].update(adapters={"full": {"repo": "a/b", "path": "/x"}}))), ("exactly one",)),
    Case("duplicate_base_names", cfg(lambda c, d: c["bases"].append(dict(c["bases"][0]))), ("duplicate base names",)),
    Case("id_prompts_file_no_path", cfg(_set("id_prompts.source", "file")), ("id_prompts.path",)),
    Case("id_prompts_n_eval_0", cfg(_set("id_prompts.n_eval", 0)), ("id_prompts.n_eval",)),
    Case("break_suffix_99", cfg(lambda c, d: (c.update(slices=["id_chat_break"]), c["id_prompts"].update(break_suffixes=[99]))), ("break suffix",)),
    Case("scenario_unknown", cfg(lambda c, d: c.update(slices=["chat_email"], scenarios={"ids": ["nope"]})), ("nope",)),
    Case("max_tokens_by_slice_unknown", cfg(_set("sampling.max_tokens_by_slice", {"chat_emial": 9})), ("max_tokens_by_slice",)),
    Case("rollout_max_steps_0", cfg(_set("rollout.max_steps", 0)), ("rollout.max_steps",)),
    Case("scoring_text_unknown", cfg(_set("scoring.text", "both")), ("scoring.text",)),
    Case("bases_not_a_list", cfg(_set("bases", "b")), ("bases",)),
    Case("sampling_not_a_mapping", cfg(_set("sampling", 5)), ("sampling",)),
    Case("classifier_training_base", cfg(_set("classifier_training", {"stage": "base"})), ("classifier_training.stage",)),
    Case("persona_prompts_no_path", cfg(_set("persona_prompts.source", "constitutions")), ("persona_prompts.path",)),
    Case("id_prompts_option_not_utf8", lambda d: [*cfg(lambda c, _: None)(d), "--id-prompts", str(pred_file(d, [b'{"id": "a", "prompt": "caf\xe9"}'], "p.jsonl"))], ("--id-prompts", "line 1", "UTF-8")),
    Case("id_prompts_option_empty", lambda d: [*cfg(lambda c, _: None)(d), "--id-prompts", str(pred_file(d, [], "p.jsonl"))], ("--id-prompts", "empty")),
    Case("id_prompts_path_not_utf8", cfg(lambda c, d: c.update(id_prompts={"source": "file", "n_eval": 1, "path": str(pred_file(d, [b'{"id": "a", "prompt": "\xff"}'], "p.jsonl"))})), ("id_prompts.path", "line 1", "UTF-8")),
    Case("id_prompts_option_missing", lambda d: [*cfg(lambda c, _: None)(d), "--id-prompts", str(d / "nope.jsonl")], ("--id-prompts",)),
    # issue 18: sampling values the sampler cannot handle, sizes that cannot fit, lists that lose
    # their order or their content, a command template that allocates without bound
    Case("temperature_1e-40", cfg(_set("sampling.temperature", 1e-40)), ("sampling.temperature", "0.01"), real=True),
    Case("temperature_1e-3", cfg(_set("sampling.temperature", 1e-3)), ("sampling.temperature", "greedy")),
    Case("rep_penalty_1e-300", cfg(_set("sampling.repetition_penalty", 1e-300)), ("sampling.repetition_penalty", "0.01"), real=True),
    Case("rep_penalty_1e-5", cfg(_set("sampling.repetition_penalty", 1e-5)), ("sampling.repetition_penalty",)),
    Case("top_p_1e-300", cfg(_set("sampling.top_p", 1e-300)), ("sampling.top_p",)),
    Case("stats_n_boot_1e12", cfg(_set("stats.n_boot", 10**12)), ("stats.n_boot", "100000"), real=True),
    Case("stats_n_boot_yaml_1e12", raw_cfg(_GOOD_YAML.replace(b"n_boot: 20", b"n_boot: 1.0e+12")), ("stats.n_boot", "100000")),
    Case("training_n_boot_huge", cfg(lambda c, d: (c["bases"][0].pop("classifier"), c.update(classifier_training={"mode": "probe", "n_boot": 10**9}))), ("classifier_training.n_boot", "100000")),
    Case("n_samples_huge", cfg(_set("sampling.n_samples", 10**6)), ("sampling.n_samples",)),
    Case("plan_too_large", cfg(lambda c, d: (c["sampling"].update(n_samples=10_000), c["id_prompts"].update(n_eval=100))), ("the plan has 3,000,000 rows", "2,000,000"), real=True),
    Case("scenario_ids_empty", cfg(lambda c, d: c.update(slices=["id_chat", "chat_email"], scenarios={"ids": []})), ("scenarios.ids",), real=True),
    Case("personas_yaml_set", raw_cfg(_GOOD_YAML.replace(b"personas:\n- sarcasm\n- humor\n", b"personas: !!set {sarcasm, humor}\n")), ("line 11", "set", "list")),
    Case("slices_yaml_set", raw_cfg(_GOOD_YAML.replace(b"slices:\n- id_chat\n", b"slices: !!set\n  ? id_chat\n")), ("line 16", "set")),
    Case("command_format_width", cfg(lambda c, d: c.update(backend={"kind": "server", "engine": "command", "command": "serve {model:99999999999} --port {port}"})), ("backend.command", "format spec"), real=True),
    Case("command_conversion", cfg(lambda c, d: c.update(backend={"kind": "server", "engine": "command", "command": "serve {model!r} --port {port}"})), ("backend.command", "format spec")),
]  # fmt: skip


# --------------------------------------------------------------------------------- predictions


def prow(i: int = 0, **kw: Any) -> dict[str, Any]:
    """A good predictions row; `i` varies the key."""
    persona = PERSONAS[i % 2]
    row = {"base": "b", "stage": "full", "slice": "id_chat", "persona": persona,
           "item_id": f"i{i // 2}", "prediction": PERSONAS[(i // 3) % 2]}  # fmt: skip
    row.update(kw)
    return row


GOOD_PRED_LINES: list[Any] = [prow(i) for i in range(8)]


def _line(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    return (x if isinstance(x, str) else json.dumps(x)).encode("utf-8", "surrogatepass")


def pred_file(d: Path, lines: list[Any], name: str = "preds.jsonl", end: bytes = b"\n") -> Path:
    p = d / name
    p.write_bytes(b"\n".join(_line(x) for x in lines) + (end if lines else b""))
    return p


def _old_outputs(d: Path) -> Path:
    """An earlier report in d/out and an earlier predictions file d/old.jsonl (must survive)."""
    (d / "out" / "report").mkdir(parents=True)
    (d / "out" / "report" / "index.html").write_text(OLD_REPORT)
    (d / "old.jsonl").write_text(OLD_PREDICTIONS)
    return d / "out"


def preds(bad: Any, at: int = 2, *extra: str, end: bytes = b"\n") -> Callable[[Path], list[str]]:
    """A predictions case: the good lines with `bad` inserted as line `at + 1`."""

    def make(d: Path) -> list[str]:
        lines = [*GOOD_PRED_LINES[:at], bad, *GOOD_PRED_LINES[at:]]
        p = pred_file(d, lines, end=end)
        return [
            "report",
            "--predictions",
            str(p),
            "--out",
            str(d / "out"),
            "--n-boot",
            "20",
            *extra,
        ]

    return make


def preds_lines(
    lines: list[Any], *extra: str, end: bytes = b"\n", out: str = "out"
) -> Callable[[Path], list[str]]:
    def make(d: Path) -> list[str]:
        p = pred_file(d, lines, end=end)
        return ["report", "--predictions", str(p), "--out", str(d / out), "--n-boot", "20", *extra]

    return make


def _nested(depth: int) -> str:
    return '{"base": "b", "deep": ' + "[" * depth + "]" * depth + "}"


_L3 = ("line 3",)
PREDICTION_CASES = [
    Case("empty_file", preds_lines([]), ("empty",)),
    Case("blank_lines_only", preds_lines(["", "  ", ""]), ("empty",)),
    Case("file_missing", lambda d: ["report", "--predictions", str(d / "nope.jsonl"), "--out", str(d / "out")], ("not found",)),
    Case("file_is_a_folder", lambda d: ["report", "--predictions", str(d / "out"), "--out", str(d / "out2")], ("folder",)),
    Case("not_utf8", preds(b'{"base": "b\xe9"}'), ("line 3", "UTF-8")),
    Case("invalid_json", preds('{"base": "b",'), ("line 3", "JSON")),
    Case("truncated_last_line", preds_lines([*GOOD_PRED_LINES, json.dumps(prow(9))[:30]], end=b""), ("line 9",)),
    Case("json_array", preds("[1, 2]"), ("line 3", "JSON object")),
    Case("json_null", preds("null"), ("line 3", "JSON object")),
    Case("deep_nesting_100k", preds(_nested(100_000)), ("line 3", "nested too deeply")),
    Case("deep_nesting_50", preds(_nested(50)), ("line 3", "nested too deeply")),
    Case("nan_literal", preds(json.dumps(prow(20, probs={"sarcasm": 0.5, "humor": 0.5})).replace("0.5,", "NaN,")), ("line 3", "NaN")),
    Case("infinity_literal", preds(json.dumps(prow(20, sample_idx=0)).replace('"sample_idx": 0', '"sample_idx": Infinity')), ("line 3", "Infinity")),
    Case("number_1e400", preds(json.dumps(prow(20, probs={"sarcasm": 0.5, "humor": 0.5})).replace("0.5,", "1e400,")), ("line 3", "too large")),
    Case("integer_5000_digits", preds(json.dumps(prow(20)).replace('"i10"', "1" * 5000)), _L3),
    Case("duplicate_json_key", preds(json.dumps(prow(20))[:-1] + ', "persona": "humor"}'), ("line 3", "'persona'", "twice")),
    Case("missing_base", preds({k: v for k, v in prow(20).items() if k != "base"}), ("line 3", "'base'")),
    Case("missing_prediction", preds({k: v for k, v in prow(20).items() if k != "prediction"}), ("line 3", "'prediction'")),
    Case("prediction_a_number", preds(prow(20, prediction=3)), ("line 3", "'prediction'")),
    Case("prediction_empty", preds(prow(20, prediction="")), ("line 3", "'prediction'")),
    Case("persona_null_not_base", preds(prow(20, persona=None)), ("line 3", "'persona'")),
    Case("persona_dash_not_base", preds(prow(20, persona="-")), ("line 3", "'persona'")),
    Case("persona_trailing_space", preds(prow(20, persona="sarcasm ")), ("line 3", "'persona'")),
    Case("item_id_bool", preds(prow(20, item_id=True)), ("line 3", "'item_id'")),
    Case("item_id_list", preds(prow(20, item_id=["a"])), ("line 3", "'item_id'")),
    Case("sample_idx_negative", preds(prow(20, sample_idx=-1)), ("line 3", "'sample_idx'")),
    Case("sample_idx_string", preds(prow(20, sample_idx="1")), ("line 3", "'sample_idx'")),
    Case("sample_idx_float", preds(prow(20, sample_idx=1.5)), ("line 3", "'sample_idx'")),
    Case("probs_a_list", preds(prow(20, probs=[0.5, 0.5])), ("line 3", "'probs'")),
    Case("probs_empty", preds(prow(20, probs={})), ("line 3", "'probs'")),
    Case("probs_string_value", preds(prow(20, probs={"sarcasm": "high", "humor": 0.5})), ("line 3", "'probs'")),
    Case("probs_bool_value", preds(prow(20, probs={"sarcasm": True, "humor": 0.0})), ("line 3", "'probs'")),
    Case("probs_above_1", preds(prow(20, probs={"sarcasm": 1.7, "humor": -0.7})), ("line 3", "'probs'")),
    Case("probs_negative", preds(prow(20, probs={"sarcasm": -0.2, "humor": 1.2})), ("line 3", "'probs'")),
    Case("probs_sum_not_1", preds(prow(20, probs={"sarcasm": 0.3, "humor": 0.3})), ("line 3", "sums to")),
    Case("duplicate_identical", preds(prow(0)), ("lines 1 and 3", "duplicate")),
    Case("duplicate_conflicting", preds(prow(0, prediction="humor" if prow(0)["prediction"] != "humor" else "sarcasm")), ("lines 1 and 3", "conflicting")),
    Case("control_char_base", preds(prow(20, base="b\u0007")), ("line 3", "'base'", "control")),
    Case("newline_in_slice", preds(prow(20, slice="id\nchat")), ("line 3", "'slice'")),
    Case("bidi_override_persona", preds(prow(20, persona="\u202esarcasm")), ("line 3", "'persona'")),
    Case("lone_surrogate_text", preds(prow(20, text="an email \ud800 here")), ("line 3", "'text'", "surrogate")),
    Case("lone_surrogate_label", preds(prow(20, prediction="sarc\udc00")), ("line 3", "'prediction'")),
    Case("text_a_number", preds(prow(20, text=5)), ("line 3", "'text'")),
    Case("outcome_a_number", preds(prow(20, outcome=1)), ("line 3", "'outcome'")),
    Case("prediction_on_no_email", preds(prow(20, outcome="no_email")), ("line 3", "'prediction'", "'no_email'", "no output")),
    Case("no_prediction_on_an_email", preds(prow(20, prediction=None, outcome="email")), ("line 3", "'prediction'", "'email'")),
    Case("key_a_number", preds(prow(20, key=1)), ("line 3", "'key'")),
    Case("label_too_long", preds(prow(20, base="b" * 500)), ("line 3", "'base'")),
    Case("one_persona_only", preds_lines([prow(0), prow(2), prow(4)]), ("two distinct",)),
    Case("huge_line", preds(prow(20, text="x" * (65 << 20))), ("line 3", "longer than")),
    Case("out_is_a_file", preds_lines(GOOD_PRED_LINES, out="old.jsonl"), ("--out", "not a folder")),
    Case("out_under_a_file", preds_lines(GOOD_PRED_LINES, out="old.jsonl/sub"), ("--out",)),
    Case("out_unwritable", preds_lines(GOOD_PRED_LINES, out="/proc/charshift-out"), ("--out",)),
    Case("n_boot_zero", lambda d: [*preds_lines(GOOD_PRED_LINES)(d)[:-1], "0"], ("--n-boot",)),
    # issue 18: labels that look alike but differ, sizes that cannot fit, --out ''
    Case("persona_zero_width_space", preds(prow(20, persona="sarcasm\u200b")), ("line 3", "'persona'", "U+200B")),
    Case("persona_word_joiner", preds(prow(20, persona="hu\u2060mor")), ("line 3", "'persona'", "U+2060")),
    Case("persona_soft_hyphen", preds(prow(20, persona="sar\u00adcasm")), ("line 3", "'persona'", "U+00AD")),
    Case("prediction_bom", preds(prow(20, prediction="\ufeffhumor")), ("line 3", "'prediction'", "U+FEFF")),
    Case("item_id_zero_width_joiner", preds(prow(20, item_id="i0\u200d")), ("line 3", "'item_id'", "U+200D")),
    Case("persona_nfd", preds_lines([*GOOD_PRED_LINES, prow(20, persona="cafe\u0301")]), ("line 9", "'persona'", "NFC")),
    Case("persona_nfc_nfd_pair", preds_lines([*GOOD_PRED_LINES, prow(20, persona="caf\u00e9"), prow(21, persona="cafe\u0301")]), ("line 10", "'persona'", "NFC")),
    Case("persona_fullwidth_lookalike", preds_lines([*GOOD_PRED_LINES, prow(20, persona="\uff53arcasm")]), ("lines 1 and 9", "'persona'", "look alike")),
    Case("stage_ligature_lookalike", preds_lines([*GOOD_PRED_LINES, prow(20, stage="\ufb01ne"), prow(22, stage="fine")]), ("lines 9 and 10", "'stage'", "look alike")),
    Case("personas_thousands", preds_lines([prow(i, persona=f"p{i:04d}", item_id=f"i{i}") for i in range(1000)]), ("1000 distinct personas", "at most 100")),
    Case("predicted_labels_thousands", preds_lines([prow(i, prediction=f"l{i:04d}") for i in range(1000)]), ("1000 distinct predicted labels", "at most 100")),
    Case("n_boot_1e9", lambda d: [*preds_lines(GOOD_PRED_LINES)(d)[:-1], "1000000000"], ("--n-boot", "100000")),
    Case("out_empty", lambda d: [*preds_lines(GOOD_PRED_LINES)(d)[:3], "--out", ""], ("--out", "empty")),
]  # fmt: skip


# --------------------------------------------------------------------------------- generations

TINY_CLF = "tiny:modernbert:sarcasm,humor"


def grow(i: int = 0, **kw: Any) -> dict[str, Any]:
    """A good generations row."""
    row = prow(i, text=f"text number {i}")
    row.pop("prediction")
    row.update(kw)
    return row


GOOD_GEN_LINES: list[Any] = [grow(i) for i in range(4)]


def gens(
    bad: Any = None, *, lines: list[Any] | None = None, clf: str | Callable[[Path], str] = TINY_CLF,
    out: str = "old.jsonl", end: bytes = b"\n",
) -> Callable[[Path], list[str]]:  # fmt: skip
    """A score --generations case: the good lines with `bad` as line 3 (or `lines`)."""

    def make(d: Path) -> list[str]:
        rows = lines if lines is not None else [*GOOD_GEN_LINES[:2], bad, *GOOD_GEN_LINES[2:]]
        p = pred_file(d, rows, "gens.jsonl", end=end)
        c = clf(d) if callable(clf) else clf
        o = str(p) if out == "<input>" else str(d / out)
        return ["score", "--generations", str(p), "--classifier", c, "--out", o]

    return make


GENERATION_CASES = [
    Case("empty_file", gens(lines=[]), ("empty",)),
    Case("truncated_last_line", gens(lines=[*GOOD_GEN_LINES, json.dumps(grow(9))[:25]], end=b""), ("line 5",)),
    Case("not_json", gens("hello"), ("line 3", "JSON")),
    Case("missing_text", gens({k: v for k, v in grow(9).items() if k != "text"}), ("line 3", "'text'")),
    Case("text_a_number", gens(grow(9, text=3)), ("line 3", "'text'")),
    Case("text_a_list", gens(grow(9, text=["a"])), ("line 3", "'text'")),
    Case("text_lone_surrogate", gens(grow(9, text="x\udfffy")), ("line 3", "surrogate")),
    Case("not_utf8", gens(b'{"text": "caf\xe9"}'), ("line 3", "UTF-8")),
    Case("nan_in_a_field", gens(json.dumps(grow(9, score=0.5)).replace("0.5", "NaN")), ("line 3", "NaN")),
    Case("json_array", gens("[]"), ("line 3", "JSON object")),
    Case("deep_nesting", gens(_nested(100_000)), ("line 3", "nested too deeply")),
    Case("duplicate_json_key", gens(json.dumps(grow(9))[:-1] + ', "text": "other"}'), ("line 3", "twice")),
    Case("missing_base", gens({k: v for k, v in grow(9).items() if k != "base"}), ("line 3", "'base'")),
    Case("carries_prediction", gens(grow(9, prediction="humor")), ("line 3", "'prediction'")),
    Case("file_missing", lambda d: ["score", "--generations", str(d / "nope.jsonl"), "--classifier", TINY_CLF, "--out", str(d / "old.jsonl")], ("not found",)),
    Case("file_is_a_folder", lambda d: ["score", "--generations", str(d / "out"), "--classifier", TINY_CLF, "--out", str(d / "p.jsonl")], ("folder",)),
    Case("out_is_a_folder", gens(grow(9), out="out"), ("--out", "folder")),
    Case("out_under_a_file", gens(grow(9), out="old.jsonl/p.jsonl"), ("--out",)),
    Case("out_unwritable", gens(grow(9), out="/proc/charshift.jsonl"), ("--out",)),
    Case("out_is_the_input", gens(grow(9), out="<input>"), ("--out", "generations file itself")),
    Case("out_missing", lambda d: gens(grow(9))(d)[:-2], ("--out",)),
    Case("classifier_missing", gens(grow(9), clf=lambda d: str(d / "no_clf")), ("--classifier", "not found")),
    Case("classifier_not_a_model", gens(grow(9), clf=lambda d: _fake_model(d / "c", None)), ("--classifier", "not a model folder")),
    Case("classifier_causal_lm", gens(grow(9), clf=lambda d: _fake_model(d / "c", "LlamaForCausalLM")), ("--classifier", "not a sequence classifier")),
    Case("classifier_is_a_file", gens(grow(9), clf=lambda d: str(pred_file(d, ["x"], "c.bin"))), ("--classifier", "is a file")),
    Case("classifier_root", gens(grow(9), clf="/"), ("--classifier", "not a model folder")),
    Case("classifier_encoder_only", gens(grow(9), clf="packaged:minilm"), ("packaged:minilm",)),
    Case("persona_not_a_label", gens(grow(9, persona="poeticism")), ("poeticism",)),
    Case("text_on_a_max_steps_row", gens(grow(9, outcome="max_steps")), ("line 3", "'text'", "'max_steps'")),
    # issue 18
    Case("persona_zero_width_space", gens(grow(9, persona="\u200bhumor")), ("line 3", "'persona'", "U+200B")),
    Case("base_nfd", gens(grow(9, base="be\u0301")), ("line 3", "'base'", "NFC")),
    Case("out_empty", lambda d: [*gens(grow(9))(d)[:-1], ""], ("--out", "empty")),
]  # fmt: skip


# ------------------------------------------------------------------------------- other commands


def _scenario_id() -> str:
    from charshift.scenarios import load_bank

    return load_bank()[0].id


def bank_file(content: bytes) -> Callable[[Path], list[str]]:
    """A `scenarios validate` case: a scenario bank file holding `content`."""

    def make(d: Path) -> list[str]:
        p = d / "bank.yaml"
        p.write_bytes(content)
        return ["scenarios", "validate", str(p)]

    return make


def _two_banks() -> bytes:
    """A bank whose top-level `scenarios` key is given twice (YAML loaders keep the last)."""
    from importlib import resources

    bank = yaml.safe_load((resources.files("charshift") / "data" / "scenarios.yaml").read_text())
    first, second = bank["scenarios"][:2]
    return (
        yaml.safe_dump({"scenarios": [first]}) + yaml.safe_dump({"scenarios": [second]})
    ).encode()


def empty_run(d: Path, **change: Any) -> Path:
    """A run folder as `charshift generate` leaves it before its first row (config, manifest)."""
    from charshift import config, pipeline

    data = good_config()
    data.update(change)
    pipeline.prepare_run(config.parse_config(data), d / "run").close()
    return d / "run"


def finished_run(d: Path) -> Path:
    """A finished run of the good config, built once under $CHARSHIFT_CACHE, copied to d/run
    without its report outputs (so that a report written into it creates, not changes, files)."""
    import shutil

    built = Path(os.environ["CHARSHIFT_CACHE"]) / "bad-inputs-finished-run"
    if not (built / "report.md").is_file():
        shutil.rmtree(built, ignore_errors=True)
        built.parent.mkdir(parents=True, exist_ok=True)
        (built.parent / "bad-inputs.yaml").write_text(yaml.safe_dump(good_config()))
        code, out, tb = cli_invoke(
            ["run", str(built.parent / "bad-inputs.yaml"), "--out", str(built)]
        )
        assert code == 0 and not tb, out[-2000:]
    skip = shutil.ignore_patterns("report", "*.md", "*.csv", "*.lock", "*.lock.info")
    shutil.copytree(built, d / "run", ignore=skip)
    return d / "run"


def _cuda_count() -> int:
    """CUDA devices here: `cuda:N` with N this count never exists."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _has_mps() -> bool:
    import torch

    return bool(torch.backends.mps.is_available())


def _training(c: dict[str, Any], _: Path) -> None:
    """The good config with a probe classifier trained in the run (classifier/<base>)."""
    c["bases"][0].pop("classifier")
    c["id_prompts"]["n_train"] = 4
    c["classifier_training"] = {"mode": "probe", "probe_features": "lexical", "n_boot": 20}


def _default(c: dict[str, Any], _: Path) -> None:
    pass


# Run as given (no --dry-run added): each either refuses before any work or is a dry run itself.
CLI_CASES = [
    Case("scenarios_show_unknown_persona", lambda d: ["scenarios", "show", _scenario_id(), "--persona", "grumpiness"], ("--persona", "grumpiness")),
    Case("scenarios_show_zero_width_persona", lambda d: ["scenarios", "show", _scenario_id(), "--persona", "sarcasm\u200b"], ("--persona",)),
    Case("scenarios_validate_not_utf8", bank_file(b"scenarios:\n  - id: caf\xe9\n"), ("not UTF-8", "line 2")),
    Case("scenarios_validate_deep_nesting", bank_file(b"scenarios: " + b"[" * 5000 + b"]" * 5000 + b"\n"), ("nested too deeply",)),
    Case("scenarios_validate_duplicate_key", bank_file(_two_banks()), ("'scenarios'", "twice")),
    Case("scenarios_validate_python_tag", bank_file(b"scenarios: !!python/object/apply:os.system ['true']\n"), ("not valid YAML",)),
    Case("train_classifier_no_training_stage", lambda d: ["train-classifier", "--run", str(empty_run(d, stages=["base", "prompted_explicit"])), "--out", str(d / "clf")], ("classifier_training", "id_prompts.n_train")),
    Case("train_classifier_no_training_rows", lambda d: ["train-classifier", "--run", str(empty_run(d, classifier_training={"mode": "probe"})), "--out", str(d / "clf")], ("id_prompts.n_train: 0",)),
    Case("train_classifier_out_empty", lambda d: ["train-classifier", "--run", str(empty_run(d)), "--out", ""], ("--out", "empty")),
    Case("run_out_empty", lambda d: [*cfg(_default)(d), "--out", ""], ("--out", "empty")),
    Case("report_run_beside_predictions", lambda d: ["report", "--run", str(finished_run(d)), "--predictions", str(pred_file(d, GOOD_PRED_LINES)), "--out", str(d / "r")], ("--run", "--predictions")),
    Case("report_run_with_n_boot", lambda d: ["report", "--run", str(finished_run(d)), "--n-boot", "50"], ("--n-boot", "--predictions")),
    Case("report_run_with_seed", lambda d: ["report", "--run", str(finished_run(d)), "--seed", "7"], ("--seed", "--predictions")),
    Case("score_run_with_classifier", lambda d: ["score", "--run", str(finished_run(d)), "--classifier", TINY_CLF], ("--classifier", "--generations")),
    Case("score_generations_beside_run", lambda d: [*gens(grow(9), out="p.jsonl")(d), "--run", str(finished_run(d))], ("--run", "--generations")),
    Case("throughput_inf", lambda d: [*cfg(_default)(d), "--dry-run", "--throughput", "inf"], ("--throughput",)),
    Case("throughput_nan", lambda d: [*cfg(_default)(d), "--dry-run", "--throughput", "nan"], ("--throughput",)),
    Case("base_name_too_long_for_the_fs", cfg(lambda c, d: (_training(c, d), _set("bases.0.name", "\U0001d400" * 64)(c, d))), ("bases.0.name", "255 bytes")),
    Case("run_name_too_long_for_the_fs", cfg(_set("name", "\U0001d400" * 64)), ("name", "255 bytes")),
    # devices and packages this machine lacks: named before any model loads (a dry run, which
    # loads none, may plan a GPU run on a laptop)
    Case("device_cuda_absent", cfg(_set("backend.device", f"cuda:{_cuda_count()}")), ("backend.device", "CUDA")),
    *([Case("device_mps_absent", cfg(_set("backend.device", "mps")), ("backend.device", "MPS"))] if not _has_mps() else []),
    *([Case("vllm_not_installed", cfg(_set("backend", {"kind": "vllm"})), ("backend.kind", "pip install"))] if importlib.util.find_spec("vllm") is None else []),
]  # fmt: skip


# ------------------------------------------------------------------------------------- running


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file (its bytes) and folder under `d`."""
    return {
        str(p.relative_to(d)): p.read_bytes() if p.is_file() else b"<dir>" for p in d.rglob("*")
    }


def run_case(case: Case, d: Path, invoke: Callable[[list[str]], tuple[int, str, bool]],
             dry: bool = True) -> Outcome:  # fmt: skip
    """Build the case's inputs in `d` beside old outputs, run it from `d` (so a default run folder
    `runs/NAME`, or a NAME that climbs out with `..`, lands in `d`), and compare the folder."""
    d.mkdir(parents=True, exist_ok=True)
    _old_outputs(d)
    before_outputs = _snapshot(d)
    args = case.make(d)
    if args[0] == "run" and dry:
        args = [*args, "--dry-run"]
    before = _snapshot(d)  # the outputs and the case's own inputs
    cwd = os.getcwd()
    os.chdir(d)
    try:
        code, output, tb = invoke(args)
    finally:
        os.chdir(cwd)
    after = _snapshot(d)
    changed = [k for k, v in before.items() if after.get(k) != v]
    created = sorted(set(after) - set(before))
    return Outcome(
        code, output, tb, changed, created, [k for k in changed if k not in before_outputs]
    )


def cli_invoke(args: list[str]) -> tuple[int, str, bool]:
    """The CLI in process (typer's CliRunner): exit code, stdout+stderr, whether it crashed."""
    from typer.testing import CliRunner

    from charshift.cli import app

    res = CliRunner().invoke(app, args)
    crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
    return res.exit_code, res.output, crashed or "Traceback" in res.output


@pytest.fixture
def case_env(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: Any) -> Path:
    monkeypatch.setenv("CHARSHIFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    return tmp_path / "case"


def _check(case: Case, d: Path, dry: bool = True) -> None:
    outcome = run_case(case, d, cli_invoke, dry=dry)
    assert not outcome.problems(case), (outcome.problems(case), outcome.output[-2000:])


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c.id)
def test_bad_config_dry_run(case: Case, case_env: Path) -> None:
    _check(case, case_env)


@pytest.mark.parametrize("case", [c for c in CONFIG_CASES if c.real], ids=lambda c: c.id)
def test_bad_config_real_run(case: Case, case_env: Path) -> None:
    _check(case, case_env, dry=False)


@pytest.mark.parametrize("case", PREDICTION_CASES, ids=lambda c: c.id)
def test_bad_predictions(case: Case, case_env: Path) -> None:
    _check(case, case_env)


@pytest.mark.parametrize("case", GENERATION_CASES, ids=lambda c: c.id)
def test_bad_generations(case: Case, case_env: Path) -> None:
    _check(case, case_env)


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_bad_command_lines(case: Case, case_env: Path) -> None:
    _check(case, case_env, dry=False)


def test_matrix_size() -> None:
    """The issue asks for ~60 config, ~40 predictions and ~20 generations cases, named uniquely."""
    for cases, least in (
        (CONFIG_CASES, 60),
        (PREDICTION_CASES, 40),
        (GENERATION_CASES, 20),
        (CLI_CASES, 15),
    ):
        assert len(cases) >= least and len({c.id for c in cases}) == len(cases)


# ------------------------------------------------------------------------- what must still work


def _invoke_ok(args: list[str]) -> str:
    code, output, tb = cli_invoke(args)
    assert code == 0 and not tb, output[-2000:]
    return output


def _base_rows() -> list[dict[str, Any]]:
    """Base-stage rows with every spelling of "no persona" the README allows."""
    return [
        prow(i, stage="base", persona=p, item_id=f"i{i}") for i, p in enumerate([None, "-", ""])
    ]


def test_base_rows_may_have_a_null_persona(tmp_path: Path, monkeypatch: Any) -> None:
    from charshift.inputs import load_predictions
    from charshift.schema import NULL_PERSONA

    p = pred_file(tmp_path, [*GOOD_PRED_LINES, *_base_rows()])
    recs = load_predictions(p)
    assert [r.persona for r in recs[-3:]] == [NULL_PERSONA] * 3
    _invoke_ok(["report", "--predictions", str(p), "--out", str(tmp_path / "r"), "--n-boot", "20"])
    metrics = (tmp_path / "r" / "metrics.csv").read_text()
    assert ",base," in metrics and ",full," in metrics


def test_duplicates_refused_unless_allowed_then_first_kept(tmp_path: Path) -> None:
    from charshift.inputs import InputError, load_predictions

    first = GOOD_PRED_LINES[0]
    other = dict(first, prediction="humor" if first["prediction"] != "humor" else "sarcasm")
    p = pred_file(tmp_path, [*GOOD_PRED_LINES, other, first])
    with pytest.raises(InputError, match=r"lines 1 and 9: conflicting duplicate") as err:
        load_predictions(p)
    assert "2 row(s) repeat" in str(err.value) and "1 of them with other values" in str(err.value)
    warnings: list[str] = []
    recs = load_predictions(p, allow_duplicates=True, warn=warnings.append)
    assert len(recs) == len(GOOD_PRED_LINES) and recs[0].prediction == first["prediction"]
    assert len(warnings) == 1 and "kept the first" in warnings[0]
    out = _invoke_ok(
        ["report", "--predictions", str(p), "--out", str(tmp_path / "r"), "--n-boot", "20",
         "--allow-duplicates"]
    )  # fmt: skip
    assert "warning:" in out and "2 row(s) repeat" in out


def test_reader_keeps_line_numbers_and_accepts_bom_crlf_blank_lines(tmp_path: Path) -> None:
    from charshift.inputs import read_jsonl_objects

    p = tmp_path / "x.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n  \n{"b": "\\u00e9"}')
    assert read_jsonl_objects(p) == [(1, {"a": 1}), (4, {"b": "é"})]


def test_score_generations_writes_strict_json_atomically(case_env: Path) -> None:
    d = case_env
    d.mkdir(parents=True)
    rows = [*GOOD_GEN_LINES, grow(7, text=None), grow(8, text="")]
    g = pred_file(d, rows, "gens.jsonl")
    out = d / "preds.jsonl"
    out.write_text(OLD_PREDICTIONS)
    text = _invoke_ok(
        ["score", "--generations", str(g), "--classifier", TINY_CLF, "--out", str(out)]
    )
    assert f"scored {len(GOOD_GEN_LINES)} rows" in text

    def strict(name: str) -> Any:
        raise AssertionError(f"non-strict JSON constant {name}")

    got = [json.loads(x, parse_constant=strict) for x in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in ("prediction", "probs")} for r in got] == rows
    for r in got[: len(GOOD_GEN_LINES)]:
        assert r["prediction"] in PERSONAS and abs(sum(r["probs"].values()) - 1) < 1e-5
    assert [r["prediction"] for r in got[-2:]] == [None, None] and "probs" not in got[-1]
    assert sorted(x.name for x in d.iterdir()) == ["gens.jsonl", "preds.jsonl"]  # no temp left
    _invoke_ok(["report", "--predictions", str(out), "--out", str(d / "r"), "--n-boot", "20"])


@pytest.fixture(scope="module")
def nan_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny classifier whose head outputs NaN: a classifier with broken weights."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from charshift.scoring.tiny_classifier import build_tiny_modernbert

    folder = build_tiny_modernbert(list(PERSONAS), tmp_path_factory.mktemp("nanclf") / "c")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    return folder


def test_score_refuses_non_finite_probabilities(case_env: Path, nan_classifier: Path) -> None:
    case = Case("nan_probs", gens(grow(9), clf=str(nan_classifier)), ("non-finite", "line 1"))
    _check(case, case_env)


def test_not_a_model_folder_is_never_walked(tmp_path: Path) -> None:
    from charshift.models import ModelSpecError, file_hash, resolve_model

    deep = tmp_path / "home" / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "w.safetensors").write_bytes(b"x")
    for call in (
        lambda: file_hash(tmp_path / "home"),
        lambda: resolve_model(str(tmp_path / "home")),
    ):
        with pytest.raises(ModelSpecError, match="not a model folder"):
            call()
    (tmp_path / "home" / "config.json").write_text("{}")
    assert len(file_hash(tmp_path / "home")) == 64  # a model folder is hashed as before


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), CHARSHIFT_CACHE=str(cwd / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "charshift.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        next(c for c in CONFIG_CASES if c.id == "model_root"),
        next(c for c in PREDICTION_CASES if c.id == "lone_surrogate_text"),
        next(c for c in GENERATION_CASES if c.id == "truncated_last_line"),
    ],
    ids=lambda c: c.id,
)
def test_end_to_end_one_line_error(case: Case, tmp_path: Path) -> None:
    """As a user sees it: a process that exits 2 with one `error:` line on stderr."""
    d = tmp_path / "case"
    d.mkdir()
    before = _snapshot(_old_outputs(d).parent)
    args = case.make(d)
    proc = _subprocess(args, d)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(s in lines[0] for s in case.expect) and not proc.stdout.strip()
    after = _snapshot(d)
    assert {k: v for k, v in after.items() if k in before} == before


def test_labels_that_differ_visibly_are_kept(tmp_path: Path) -> None:
    """The look-alike checks refuse invisible characters, non-NFC forms and NFKC twins only:
    accented, non-Latin and case-distinct labels stay distinct labels."""
    from charshift.inputs import load_predictions

    extra = [
        prow(20, persona="caf\u00e9"),
        prow(22, persona="\u65e5\u672c"),
        prow(24, persona="Sarcasm"),
        prow(26, item_id="\u00e9t\u00e9"),
    ]
    recs = load_predictions(pred_file(tmp_path, [*GOOD_PRED_LINES, *extra]))
    assert {r.persona for r in recs} == {*PERSONAS, "caf\u00e9", "\u65e5\u672c", "Sarcasm"}
