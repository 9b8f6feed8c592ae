"""The tool registry: the one home of every simulated tool.

Each `Tool` entry holds the tool's name, its description, the JSON schema of its arguments, which
of them are required, the scenario fact source it reads (search tools) and its simulator
implementation. Everything else reads the registry:

- `formats`: the tool section of the system prompt (JSON protocol) and `TOOL_SPECS`, the schemas
  an episode carries (the backends receive them through `GenRequest.tools` in native mode);
- `toolsim.ToolSimulator`: dispatch, argument checks and the implementation of each call;
- `rollout.RolloutEngine` and the parser's diagnosis (`toolcalls.diagnose_tool_turn`):
  `REQUIRED_ARGS`;
- `formats.needed_calls`: which tool reads which fact source (`SOURCE_TOOL`).

Adding a tool is one entry in `TOOLS` (plus, for a new fact source, the source name in
`scenarios.ToolName`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from charshift.toolsim import ToolSimulator


@dataclass
class ToolResult:
    """What one call returned: the text the model sees, and whether it ended the episode."""

    name: str
    arguments: dict[str, Any]
    ok: bool
    content: str
    terminal: bool = False  # a successful send_email, or finish
    email: dict[str, Any] | None = None  # {"to", "subject", "body", "cc"} for a sent email


# (simulator, tool name, checked arguments) -> result
Impl = Callable[["ToolSimulator", str, dict[str, Any]], ToolResult]


@dataclass(frozen=True)
class Tool:
    """One tool: what the model is told about it and what the simulator does when it is called.

    `properties`: the JSON schema of each argument; `required`: the arguments a call must carry
    (the rest are optional); `source`: the scenario fact source the tool reads, if any; `run`:
    the simulator implementation, called with arguments already checked against `required`.
    """

    name: str
    description: str
    properties: Mapping[str, Mapping[str, Any]]
    required: tuple[str, ...]
    run: Impl
    source: str | None = None

    @property
    def signature(self) -> str:
        """`send_email(to, subject, body, cc?)`: required arguments, then optional ones with ?."""
        opt = [f"{p}?" for p in self.properties if p not in self.required]
        return f"{self.name}({', '.join([*self.required, *opt])})"

    def schema(self) -> dict[str, Any]:
        """The function schema: name, description and the JSON schema of the arguments."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": {
                "type": "object",
                "properties": {k: dict(v) for k, v in self.properties.items()},
                "required": list(self.required),
            },
        }

    def spec(self) -> dict[str, Any]:
        """The schema in the OpenAI tool form `{"type": "function", "function": ...}`."""
        return {"type": "function", "function": self.schema()}


# -- implementations (the simulator does the work; see toolsim.ToolSimulator) -------------------


def _query_tool(search: Impl) -> Impl:
    """An implementation taking one non-empty `query` (a number is accepted as text)."""

    def run(sim: ToolSimulator, name: str, args: dict[str, Any]) -> ToolResult:
        query = args["query"]
        if isinstance(query, (int, float)) and not isinstance(query, bool):
            query = str(query)
        if not isinstance(query, str) or not query.strip():
            return sim.error(name, args, f"The 'query' argument of {name} must be non-empty text.")
        return search(sim, name, {**args, "query": query})

    return run


def _lookup(sim: ToolSimulator, name: str, args: dict[str, Any]) -> ToolResult:
    return sim.lookup(args, args["query"])


def _search(sim: ToolSimulator, name: str, args: dict[str, Any]) -> ToolResult:
    return sim.search(name, REGISTRY[name].source or "", args, args["query"])


def _send_email(sim: ToolSimulator, name: str, args: dict[str, Any]) -> ToolResult:
    return sim.send_email(args)


def _finish(sim: ToolSimulator, name: str, args: dict[str, Any]) -> ToolResult:
    summary = args.get("summary")
    note = f" Summary noted: {summary}" if isinstance(summary, str) and summary else ""
    return ToolResult(name, args, True, f"Task finished.{note}", terminal=True)


_QUERY = {"query": {"type": "string", "description": "Words to search for."}}


def _search_tool(name: str, source: str, description: str) -> Tool:
    return Tool(name, description, _QUERY, ("query",), _query_tool(_search), source)


TOOLS: tuple[Tool, ...] = (
    Tool(
        "lookup_person",
        "Find people in the organisation's directory (staff and external contacts) by name, "
        "email address or role, with their role, organisation and email address. Also returns "
        "directory notes that match.",
        {"query": {"type": "string", "description": "A name, email address or role."}},
        ("query",),
        _query_tool(_lookup),
        "directory",
    ),
    _search_tool(
        "search_calendar",
        "calendar",
        "Search calendar entries (meetings, deadlines, bookings, leave) by words in their title "
        "or description.",
    ),
    _search_tool(
        "search_documents",
        "documents",
        "Search shared documents (contracts, reports, minutes, orders, plans) by words in their "
        "title or content.",
    ),
    _search_tool(
        "search_chat",
        "chat",
        "Search messages in the team chat by words in the channel name or message text.",
    ),
    _search_tool(
        "search_tickets",
        "tickets",
        "Search the ticket system (support requests, incidents, tasks) by words in the ticket "
        "title or text.",
    ),
    _search_tool(
        "search_policies",
        "policies",
        "Search the organisation's policies and procedures by words in their title or text.",
    ),
    Tool(
        "send_email",
        "Send an email from your principal's address. Sending ends the task.",
        {
            "to": {
                "type": "string",
                "description": "Recipient email address or directory name; several are "
                "separated by commas.",
            },
            "subject": {"type": "string", "description": "Subject line."},
            "body": {"type": "string", "description": "The full text of the email."},
            "cc": {
                "type": "string",
                "description": "Optional addresses or names to copy, separated by commas.",
            },
        },
        ("to", "subject", "body"),
        _send_email,
    ),
    Tool(
        "finish",
        "End the task without sending an email.",
        {"summary": {"type": "string", "description": "Optional note on what was done."}},
        (),
        _finish,
    ),
)

REGISTRY: dict[str, Tool] = {t.name: t for t in TOOLS}
SEND_TOOL = "send_email"
FINISH_TOOL = "finish"


def get_tool(name: str) -> Tool | None:
    """The registered tool of this exact name, or None."""
    return REGISTRY.get(name)


def tool_names() -> tuple[str, ...]:
    """The registered tools' names, in registry order."""
    return tuple(REGISTRY)


def tool_specs() -> list[dict[str, Any]]:
    """Every registered tool's schema in the OpenAI tool form (what an episode carries)."""
    return [t.spec() for t in REGISTRY.values()]


def required_args() -> dict[str, list[str]]:
    """{tool name: its required arguments}: for the parser's diagnosis and the rollout engine."""
    return {t.name: list(t.required) for t in REGISTRY.values()}


def source_tool() -> dict[str, str]:
    """{scenario fact source: the tool that reads it}."""
    return {t.source: t.name for t in REGISTRY.values() if t.source}


def result_message(name: str, content: str, native: bool) -> dict[str, Any]:
    """How a tool's result goes back to the model: a `tool` message in the native protocol, else
    a user message marked `[tool result: NAME]` (the rollout and pre-written trajectories alike)."""
    if native:
        return {"role": "tool", "name": name, "content": content}
    return {"role": "user", "content": f"[tool result: {name}]\n{content}"}


def run_tool(sim: ToolSimulator, name: str, args: dict[str, Any]) -> ToolResult:
    """Run registered tool `name` on `sim` with arguments already checked against `required`."""
    return REGISTRY[name].run(sim, name, args)


# Snapshots of the registry as shipped, for modules that import constants; code that must see a
# tool added at run time calls the functions above.
TOOL_NAMES: tuple[str, ...] = tool_names()
TOOL_SPECS: list[dict[str, Any]] = tool_specs()
REQUIRED_ARGS: dict[str, list[str]] = required_args()
SOURCE_TOOL: dict[str, str] = source_tool()
TOOL_SOURCE: dict[str, str] = {v: k for k, v in SOURCE_TOOL.items()}
