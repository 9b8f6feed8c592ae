"""The backend registry: one settings class per kind (a union keyed on `kind`), a lazy dict of
modules with `from_config`, and the migration of configs stored by older versions."""

import importlib
import subprocess
import sys

import pytest
import yaml

from charshift import pipeline
from charshift.backends import settings as S
from charshift.backends.registry import BACKENDS, BackendContext, make_backend
from charshift.config import ConfigError, config_to_dict, load_preset, parse_config

# `backend:` of the smoke and paper presets as charshift stored them before the registry: the flat
# BackendConfig, every kind's fields.
OLD_SMOKE = {
    "kind": "hf", "batch_size": 32, "max_batch_tokens": 16384, "kv_cache_mb": 1024.0,
    "device": "cpu", "dtype": "float32", "base_url": None, "api_key_env": "OPENAI_API_KEY",
    "max_concurrency": 8, "max_model_len": None, "gpu_memory_utilization": 0.85,
    "max_lora_rank": None, "max_loras": 8, "max_cpu_loras": None, "adapter_syntax": "auto",
    "max_in_flight": 256, "engine": None, "command": None, "host": "127.0.0.1", "port": 0,
    "startup_timeout": 900.0, "extra_args": [], "deterministic": True,
}  # fmt: skip
OLD_PAPER = {**OLD_SMOKE, "kind": "vllm", "batch_size": 256, "device": "auto", "dtype": "auto"}


def _with_backend(preset: str, backend: dict) -> dict:
    data = config_to_dict(load_preset(preset))
    data["backend"] = backend
    return data


def test_every_kind_has_a_module_with_its_settings_and_from_config():
    assert list(BACKENDS) == list(S.KINDS)
    for kind, path in BACKENDS.items():
        module = importlib.import_module(path)
        assert module.Settings is S.KINDS[kind] and callable(module.from_config), kind


def test_loading_a_config_imports_no_backend():
    code = (
        "import sys, charshift.config as c; c.load_preset('paper'); c.load_preset('smoke'); "
        "print(sorted(m for m in ('torch', 'httpx', 'vllm', 'charshift.backends.hf') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_each_kind_keeps_only_its_own_fields():
    paper = load_preset("paper").backend
    assert isinstance(paper, S.VLLMSettings) and paper.batch_size == 256
    assert "device" not in config_to_dict(load_preset("paper"))["backend"]
    smoke = config_to_dict(load_preset("smoke"))["backend"]
    assert list(smoke)[:2] == ["kind", "batch_size"] and "max_lora_rank" not in smoke


@pytest.mark.parametrize(
    "backend, message",
    [
        ({"kind": "hf", "max_lora_rank": 64}, "backend.max_lora_rank: not a setting of kind: hf"),
        ({"kind": "hf", "engine": "vllm"}, "backend.engine: not a setting of kind: hf"),
        ({**OLD_SMOKE, "max_in_flight": 32}, "backend.max_in_flight: not a setting of kind: hf"),
        ({**OLD_PAPER, "device": "cuda"}, "backend.device: not a setting of kind: vllm"),
        ({"kind": "vllm", "max_lora_rank": 100}, r"backend.max_lora_rank: .*320"),
        ({"kind": "vllm", "colour": 1}, "backend.colour: unknown field"),
        ({"kind": "tgi"}, "backend.kind: unknown kind 'tgi'"),
        ({"kind": "openai"}, "backend.base_url: Field required"),
        ({"kind": "openai", "base_url": "http://x/v1", "retries": -1}, "backend.retries"),
        ({"kind": "server", "engine": "vllm", "timeout_s": 0}, "backend.timeout_s"),
    ],
)
def test_a_field_that_does_not_belong_is_named(backend, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_with_backend("smoke", backend))


def test_an_old_flat_dump_migrates_to_its_kind():
    """A stored config of an older run: the fields of other kinds at their old defaults go."""
    hf = parse_config(_with_backend("smoke", OLD_SMOKE)).backend
    assert hf == load_preset("smoke").backend
    vllm = parse_config(_with_backend("paper", OLD_PAPER)).backend
    assert vllm == load_preset("paper").backend
    served = {**OLD_SMOKE, "kind": "openai", "base_url": "http://h:8000/v1", "device": "auto"}
    ai = parse_config(_with_backend("smoke", {**served, "dtype": "auto"})).backend
    assert isinstance(ai, S.OpenAISettings) and (ai.retries, ai.timeout_s) == (3, 120.0)


def test_true_is_not_taken_for_one():
    with pytest.raises(ConfigError, match="backend.deterministic"):
        parse_config(_with_backend("smoke", {"kind": "hf", "deterministic": 1}))


def test_an_older_run_resumes_and_its_config_is_rewritten(tmp_path):
    cfg = load_preset("smoke")
    old = _with_backend("smoke", OLD_SMOKE)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with pipeline.prepare_run(cfg, tmp_path / "run") as store:
        assert store.read_config() == config_to_dict(cfg)
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert "max_lora_rank" not in stored["backend"]


def test_an_older_run_with_a_foreign_setting_is_refused_not_resumed(tmp_path):
    """A flat dump whose vLLM field was set in an hf run: the stored config cannot be re-read,
    so it differs from the config given, and the run is refused rather than silently changed."""
    (tmp_path / "run").mkdir()
    old = _with_backend("smoke", {**OLD_SMOKE, "max_lora_rank": 64})
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(Exception, match="different config"):
        pipeline.prepare_run(load_preset("smoke"), tmp_path / "run")


def test_make_backend_builds_the_kind_from_its_settings(tmp_path):
    """The openai client gets its retries, backoff and timeout from `backend:`."""
    data = _with_backend(
        "smoke",
        {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "retries": 7, "backoff_s": 0.25,
         "timeout_s": 600, "max_in_flight": 3},
    )  # fmt: skip
    cfg = parse_config(data)
    ctx = BackendContext("m", None, "b", 0, tmp_path)
    backend = make_backend(cfg.backend, ctx)
    try:
        assert backend.kind == "openai" and backend.model == "m"
        assert (backend.retries, backend.backoff, backend.timeout) == (7, 0.25, 600)
        assert backend.max_in_flight == 3
    finally:
        backend.close()
    via_pipeline = pipeline.make_backend(cfg, cfg.bases[0])
    assert via_pipeline.retries == 7 and via_pipeline.model == cfg.bases[0].model
    via_pipeline.close()
