"""Write docs/config.md: every field of a run config, from the config models themselves.

    python scripts/make_config_docs.py          # rewrite docs/config.md
    python scripts/make_config_docs.py --check  # exit 1 if it is out of date

Each section is one settings model reachable from `RunConfig` (its docstring, then a table of
its fields: name, type, default, and the comment the source gives the field), so the reference
cannot drift from the code: tests/test_config_docs.py fails when the file is not current.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from charshift.config import RunConfig

OUT = Path(__file__).resolve().parent.parent / "docs" / "config.md"
_FIELD = re.compile(r"^\s{4}(\w+)\s*:")


def models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """`root` and every settings model its fields hold, in first-seen order."""
    seen: list[type[BaseModel]] = []

    def visit(tp: object) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp not in seen:
                seen.append(tp)
                for f in tp.model_fields.values():
                    visit(f.annotation)
            return
        for arg in typing.get_args(tp):
            visit(arg)

    visit(root)
    return seen


def comments(cls: type[BaseModel]) -> dict[str, str]:
    """field -> the comment lines above it and the comment at its line's end, in the source."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = _FIELD.match(line)
        if m and m.group(1) in cls.model_fields:
            tail = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[m.group(1)] = " ".join([*above, tail]).strip()
        above = []
    return out


def type_text(tp: object) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if not isinstance(a, typing.Any.__class__)]
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in typing.get_args(tp))
    name = getattr(origin, "__name__", str(origin))
    return f"{name}[{', '.join(type_text(a) for a in typing.get_args(tp))}]"


def default_text(field: object) -> str:
    default = getattr(field, "default", PydanticUndefined)
    factory = getattr(field, "default_factory", None)
    value = factory() if factory is not None else default
    if isinstance(value, BaseModel):
        return f"its section's defaults (`{type(value).__name__}`)"
    if factory is not None:
        return f"`{value!r}`"
    if default is PydanticUndefined:
        return "required" if field.is_required() else "(section default)"  # type: ignore[attr-defined]
    return f"`{default!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section(cls: type[BaseModel]) -> list[str]:
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = [f"## `{cls.__name__}`", ""]
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += [doc, ""]
    lines += ["| field | type | default | notes |", "|---|---|---|---|"]
    notes = comments(cls)
    for name, f in cls.model_fields.items():
        shown = f.alias or name
        lines.append(
            f"| `{shown}` | {_cell(type_text(f.annotation))} | {_cell(default_text(f))} | "
            f"{_cell(notes.get(name, ''))} |"
        )
    return [*lines, ""]


def render() -> str:
    head = [
        "# The run config, field by field",
        "",
        "Generated from the config models by `python scripts/make_config_docs.py` (do not edit "
        "by hand; tests/test_config_docs.py checks it is current). `examples/config.yaml` is an "
        "annotated example; `charshift run CONFIG --dry-run` checks a config and plans it without "
        "loading a model. Sections appear in the order `RunConfig` first holds them.",
        "",
    ]
    body = [line for cls in models(RunConfig) for line in section(cls)]
    return "\n".join(head + body).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is stale")
    args = ap.parse_args()
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/make_config_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
