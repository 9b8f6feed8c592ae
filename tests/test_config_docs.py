"""docs/config.md is generated from the config models and current: every field of every settings
model a run config holds is documented there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_config_docs", ROOT / "scripts" / "make_config_docs.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_config_docs"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_config_reference_is_current_and_names_every_field():
    mod = _script()
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert text == mod.render(), "run python scripts/make_config_docs.py"
    from charshift.config import RunConfig

    for cls in mod.models(RunConfig):
        assert f"## `{cls.__name__}`" in text
        for name, f in cls.model_fields.items():
            assert f"| `{f.alias or name}` |" in text, (cls.__name__, name)
    assert len(mod.models(RunConfig)) >= 10  # the nested sections are found, not just the top
