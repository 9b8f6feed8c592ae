import re

import pytest
import yaml

from charshift import config as c


def _minimal():
    return {
        "bases": [{"name": "b", "model": "tiny:llama", "classifier": "x"}],
        "personas": ["sarcasm", "humor"],
    }


def test_presets_load_and_are_listed():
    names = c.preset_names()
    assert {"paper", "demo", "demo_quick", "smoke"} <= set(names)
    paper = c.load_preset("paper")
    assert [b.name for b in paper.bases] == ["llama", "qwen", "gemma"]
    assert "misalignment" not in paper.personas and len(paper.personas) == 10
    assert paper.sampling.repetition_penalty == 1.1 and paper.sampling.max_tokens == 1024
    assert paper.bases[2].adapters["full"].repo == "maius/gemma-3-4b-it-personas"
    demo = c.load_preset("demo")
    assert len(demo.personas) >= 6 and demo.classifier_training is not None


def test_minimal_defaults():
    cfg = c.parse_config(_minimal())
    assert cfg.stages == ["base", "prompted"]
    assert cfg.sampling.temperature == 0.7


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.update(sampling={"top_p": 1.5}), "sampling.top_p"),
        (lambda d: d.update(sampling={"temprature": 0.5}), "sampling.temprature: unknown field"),
        (lambda d: d.update(personas=["sarcasm", "grumpiness"]), "grumpiness"),
        (lambda d: d.update(slices=["id_chat", "email"]), "unknown slice"),
        (lambda d: d.update(stages=["base", "full"]), "stage 'full' needs an entry in `adapters`"),
        (lambda d: d["bases"][0].pop("model"), "bases.0.model"),
        (lambda d: d["bases"][0].pop("classifier"), "no `classifier`"),
        (lambda d: d.update(backend={"kind": "tgi"}), "backend.kind"),
        (
            lambda d: d.update(sampling={"max_tokens_by_slice": {"chat_emial": 200}}),
            "sampling.max_tokens_by_slice: Value error, unknown slice(s) ['chat_emial']",
        ),
        (
            lambda d: d.update(sampling={"max_tokens_by_slice": {"id_chat": 0}}),
            "sampling.max_tokens_by_slice: Value error, token budgets must be >= 1",
        ),
        (
            lambda d: d.update(sampling={"max_tokens_by_slice": {"chat_email": 200}}),
            "sampling.max_tokens_by_slice: slice(s) ['chat_email'] are not in the run's slices",
        ),
        (lambda d: d.update(rollout={"step_margin": -1}), "rollout.step_margin"),
    ],
)
def test_bad_fields_are_named(mutate, field):
    d = _minimal()
    mutate(d)
    with pytest.raises(c.ConfigError) as err:
        c.parse_config(d)
    assert field in str(err.value)


def test_adapter_stage_needs_one_source():
    d = _minimal()
    d["stages"] = ["base", "full"]
    d["bases"][0]["adapters"] = {"full": {"repo": "a/b", "path": "/x"}}
    with pytest.raises(c.ConfigError, match="exactly one"):
        c.parse_config(d)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(c.ConfigError, match="not found"):
        c.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("bases: [\n")
    with pytest.raises(c.ConfigError, match="not valid YAML"):
        c.load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_minimal()))
    assert c.load_config(good).personas == ["sarcasm", "humor"]


def test_unknown_preset():
    with pytest.raises(c.ConfigError, match="unknown preset"):
        c.load_preset("nope")


def test_max_tokens_by_slice():
    d = _minimal()
    d["slices"] = ["id_chat", "chat_email"]
    d["sampling"] = {"max_tokens": 64, "max_tokens_by_slice": {"chat_email": 256}}
    cfg = c.parse_config(d)
    assert cfg.sampling.to_sampling("chat_email").max_tokens == 256
    assert cfg.sampling.to_sampling("id_chat").max_tokens == 64
    assert cfg.sampling.to_sampling().max_tokens == 64


def test_presets_budgets():
    paper = c.load_preset("paper")
    assert paper.sampling.max_tokens_by_slice == {}  # OCT's 1024 everywhere
    for name in ("demo", "demo_quick"):
        cfg = c.load_preset(name)
        budgets = cfg.sampling.max_tokens_by_slice
        # every scenario slice of the run has room for an email; scaffolds have their own
        scenario = {s: n for s, n in budgets.items() if s in c.SCENARIO_SLICES}
        assert set(scenario) == set(cfg.slices) & set(c.SCENARIO_SLICES)
        assert min(scenario.values()) >= 160
        assert set(budgets) <= set(cfg.slices)
    for name in ("smoke", "demo", "demo_quick"):
        assert "scenario_chat" in c.load_preset(name).slices


def test_every_chain_unit_is_a_known_slice():
    from charshift import ladder

    assert "chat_email_multiturn" not in ladder.MAIN_CHAIN.units  # a contrast, not a rung
    for chain in ladder.CHAINS:
        for unit in chain.units:
            assert ladder.split_unit(unit)[0] in c.ALL_SLICES


@pytest.mark.parametrize("name", ["llama", "Qwen2.5-7B", "llama_3.1+lora", "_x", "été"])
def test_safe_names_accepted(name):
    d = _minimal()
    d["name"] = name
    d["bases"][0]["name"] = name
    cfg = c.parse_config(d)
    assert cfg.name == cfg.bases[0].name == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", "/abs", "a\\b", "a..b", ".hidden", "-x", "a b", "a\tb",
             "a\x00b", "x" * 65]
)  # fmt: skip
def test_unsafe_names_refused(name):
    for where, path in (("name", ("name",)), ("bases.0.name", ("bases", 0, "name"))):
        d = _minimal()
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = name
        with pytest.raises(c.ConfigError, match=rf"{re.escape(where)}: .*not a safe name"):
            c.parse_config(d)


@pytest.mark.parametrize(
    "section, field, value",
    [
        ("sampling", "temperature", float("inf")),
        ("sampling", "temperature", float("nan")),
        ("sampling", "temperature", 1e300),
        ("sampling", "top_p", float("nan")),
        ("sampling", "repetition_penalty", float("inf")),
        ("sampling", "repetition_penalty", 11.0),
        ("sampling", "max_tokens", 10**30),
        ("sampling", "seed", -1),
        ("scoring", "max_length", 0),
        ("scoring", "max_length", 1),
        ("stats", "seed", 2**40),
        ("backend", "device", "quantum"),
        ("backend", "device", "cuda:"),
        ("backend", "dtype", "int8"),
    ],
)
def test_out_of_range_settings_named(section, field, value):
    d = _minimal()
    d[section] = {field: value}
    with pytest.raises(c.ConfigError, match=rf"{section}\.{field}:"):
        c.parse_config(d)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_known_devices_accepted(device):
    d = _minimal()
    d["backend"] = {"device": device, "dtype": "bfloat16"}
    assert c.parse_config(d).backend.device == device


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("bases", [], "bases:"),
        ("stages", [], "stages:"),
        ("slices", [], "slices:"),
        ("slices", ["id_chat", "chat_email", "id_chat"], "duplicate slice"),
        ("stages", ["base", "prompted", "prompted"], "duplicate stage"),
        ("published", "nonsense", "unknown published set"),
    ],
)
def test_empty_duplicate_and_unknown_lists(key, value, match):
    d = _minimal()
    d[key] = value
    with pytest.raises(c.ConfigError, match=match):
        c.parse_config(d)


def test_config_file_reading_errors(tmp_path):
    p = tmp_path / "c.yaml"
    good = yaml.safe_dump(_minimal())
    cases = [
        (good.encode() + b"description: caf\xe9\n", "not UTF-8"),
        (good.encode() + b"personas: [humor, loving]\n", "'personas' is given twice"),
        (b"", "is empty"),
        (b"- 1\n", "top level must be a mapping, got list"),
        (b"x: " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ]
    for content, match in cases:
        p.write_bytes(content)
        with pytest.raises(c.ConfigError, match=match):
            c.load_config(p)
    with pytest.raises(c.ConfigError, match="is a folder"):
        c.load_config(tmp_path)
    p.write_bytes(b"\xef\xbb\xbf" + good.encode())  # a byte order mark is fine
    assert c.load_config(p).personas == ["sarcasm", "humor"]


def test_whole_config_errors_name_their_field():
    d = _minimal()
    d["bases"][0].pop("classifier")
    with pytest.raises(c.ConfigError) as err:
        c.parse_config(d)
    assert "\n  bases[0] (b): no `classifier`" in str(err.value)  # no "(top level): Value error"


def test_local_model_folders_checked_without_hashing(tmp_path, tiny_llama):
    d = _minimal()
    d["bases"][0]["model"] = str(tiny_llama)
    c.check_local_paths(c.parse_config(d))  # a real model folder passes
    for model, match in [
        ("/", "bases.0.model: / is not a model folder"),
        (str(tmp_path / "missing"), "bases.0.model: folder not found"),
    ]:
        d["bases"][0]["model"] = model
        with pytest.raises(c.ConfigError, match=re.escape(match)):
            c.check_local_paths(c.parse_config(d))
    d["bases"][0]["model"] = "tiny:llama"
    d["bases"][0]["classifier"] = str(tiny_llama)  # a causal LM is not a classifier
    with pytest.raises(c.ConfigError, match="bases.0.classifier: .* not a sequence classifier"):
        c.check_local_paths(c.parse_config(d))
    for name in c.preset_names():  # hub ids, tiny: and packaged: specs are the loaders' business
        c.check_local_paths(c.load_preset(name))


def test_positive_control():
    cfg = c.parse_config(_minimal())
    assert cfg.analysis.positive_control == "prompted_explicit"  # the default, even if absent
    for preset in ("paper", "demo", "demo_quick"):
        p = c.load_preset(preset)
        assert p.analysis.positive_control == "prompted_explicit" in p.stages, preset
        assert p.classifier_training is None or p.classifier_training.stage != "prompted_explicit"
    d = _minimal() | {"analysis": {"positive_control": None}}
    assert c.parse_config(d).analysis.positive_control is None
    d = _minimal() | {"stages": ["base", "prompted"], "analysis": {"positive_control": "prompted"}}
    assert c.parse_config(d).analysis.positive_control == "prompted"
    for bad, match in (("promted_explicit", "analysis.positive_control: 'promted_explicit' is "
                        "not one of the run's stages"), ("base", "base stage carries no persona"),
                       ("../x", "positive_control")):  # fmt: skip
        with pytest.raises(c.ConfigError, match=re.escape(match) if "'" in match else match):
            c.parse_config(_minimal() | {"analysis": {"positive_control": bad}})
    # a resolved config (every default written out) reads back
    again = c.parse_config(c.config_to_dict(cfg))
    assert again.analysis.positive_control == "prompted_explicit"
