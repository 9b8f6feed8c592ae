"""charshift: does a character-trained persona survive a change of format?

Public API: `load_results(path) -> Results` (a run directory or a `report --predictions` output
as pandas DataFrames: `.metrics`, `.differences`, `.chains`, `.per_persona`, `.rows`),
`run(config, out=...) -> Results`, and the helpers `parse_tool_calls(text) -> list[ToolCall]`,
`extract_email_body(text) -> str | None`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "Results",
    "ToolCall",
    "extract_email_body",
    "load_results",
    "parse_tool_calls",
    "run",
    "__version__",
]


def __getattr__(
    name: str,
) -> Any:  # imported on first use, so `import charshift.config` stays light
    if name in ("ToolCall", "parse_tool_calls"):
        from charshift import toolcalls

        return getattr(toolcalls, name)
    if name in ("Results", "load_results", "run"):
        from charshift import api

        return getattr(api, name)
    if name == "extract_email_body":
        from charshift.extraction import extract_email_body

        return extract_email_body
    raise AttributeError(name)
