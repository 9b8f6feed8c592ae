"""Typed records at the seams of the pipeline.

scenarios/prompts -> formats (EpisodeSpec) -> rollout (GenRequest/GenResult via a Backend)
-> store (GenerationRow) -> classifier (ScoreRow) -> stats (PredictionRecord) -> report.

Everything here is plain data: dataclasses that serialise to JSON with `to_dict`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Message = dict[str, Any]  # {"role": "system"|"user"|"assistant"|"tool", "content": str, ...}

BASE_STAGE = "base"
PROMPTED_STAGE = "prompted"

# Outcomes of one generation row. "reply": a chat reply (id slices); "email": an email was produced
# (extracted from a chat reply, or sent with send_email); everything else means "no output".
OUTCOMES = (
    "reply",
    "email",
    "no_email",
    "empty",
    "malformed",
    "max_steps",
    "context_overflow",
    "error",
)
SCORED_OUTCOMES = ("reply", "email")


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of the canonical JSON of `obj` (sorted keys): the same value -> the same key."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed determined only by `parts` (never by batch order or what ran before)."""
    return int(stable_hash(list(parts), 8), 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 1024
    repetition_penalty: float = 1.1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Condition:
    """What a row's model runs under: base, stage, persona, adapter and persona system prompt.

    `persona` is None for the base stage (a null condition generated once per item and sample).
    `adapter` is a key the backend knows (see Backend.load_adapters), or None for the bare model.
    """

    base: str
    stage: str
    persona: str | None
    adapter: str | None = None
    system_prompt: str | None = None

    @property
    def id(self) -> str:
        return f"{self.base}/{self.stage}/{self.persona or '-'}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GenRequest:
    """One chat completion to make. Each request carries its own adapter, sampling and seed."""

    messages: list[Message]
    adapter: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0
    tools: list[dict[str, Any]] | None = None  # native tool mode only (chat template `tools`)
    # Structured generation: when set, the whole reply must be a JSON document matching this JSON
    # schema, enforced during decoding (HF: a grammar logits processor; vLLM / servers: their
    # structured-output options). Used by `rollout.tool_protocol: constrained` for the tool-call
    # envelope; string fields inside it (an email body) stay free text.
    json_schema: dict[str, Any] | None = None
    # A hint, never part of what is generated: the conversation this request continues (the
    # rollout sets the episode key). A backend may keep what it computed for the session's last
    # request and reuse it when the next prompt extends that one (HF: KV reuse); outputs are the
    # same with or without it.
    session: str | None = None


FinishReason = Literal["stop", "length", "context_overflow", "error"]


@dataclass
class GenResult:
    text: str
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class EpisodeSpec:
    """A slice rendered for one item: everything the rollout engine needs, minus the condition.

    mode:
      - "chat": the user turns are sent one by one; the model answers each live. The last reply
        is the output (id slices, chat_email, chat_email_multiturn, email_syscontext).
      - "tool_oneshot": one user turn; the reply must be a single send_email call.
      - "agentic": the model loops over tool calls against the simulated tools until send_email.
    `base_turns`: indices of assistant turns generated under the base condition (no adapter, no
    persona prompt) instead of the row's condition (the prefill attack generates turn 0 this way).
    `output`: what the row's scored text is: "reply" (the final reply as is) or "email" (an email
    extracted from the final reply, or the body sent with send_email).
    """

    slice: str
    item_id: str
    user_turns: list[str]
    system: str | None = None
    mode: Literal["chat", "tool_oneshot", "agentic"] = "chat"
    output: Literal["reply", "email"] = "reply"
    base_turns: tuple[int, ...] = ()
    scenario_id: str | None = None
    tools: list[dict[str, Any]] | None = None  # tool schemas (name, description, parameters)
    split: str = "eval"  # "train" rows feed classifier training only; "eval" rows are measured

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EmailOut:
    to: str | None
    subject: str | None
    body: str


@dataclass
class GenerationRow:
    """One finished row in generations.jsonl."""

    key: str
    base: str
    stage: str
    persona: str | None
    slice: str
    item_id: str
    sample_idx: int
    split: str
    seed: int
    outcome: str
    messages: list[Message]  # the whole conversation or trajectory, system prompt included
    final_reply: str | None  # raw text of the last assistant turn
    # the text to score (reply, extracted email body or sent body); None = no output
    text: str | None
    email: dict[str, Any] | None = None  # {"to","subject","body"} where an email was produced
    tool_log: list[dict[str, Any]] = field(default_factory=list)
    n_steps: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ScoreRow:
    """One classifier verdict in scores.jsonl, keyed by the generation key and the classifier."""

    key: str  # the GenerationRow.key
    classifier: str  # classifier identity (id or folder hash)
    text_field: str  # "text" (extracted, default) or "final_reply" (raw)
    prediction: str
    probs: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PredictionRecord:
    """The one input of the statistics: a row with its true label and the classifier's verdict.

    `prediction` is None when the row has no output (a missing email): conditional metrics drop
    it, intention-to-treat metrics count it as a miss. For the base stage, the pipeline expands
    each base output into one record per persona (see stats.expand_base_null).
    """

    base: str
    stage: str
    slice: str
    persona: str
    item_id: str
    prediction: str | None
    sample_idx: int = 0
    probs: dict[str, float] | None = None
    outcome: str = "reply"
    text: str | None = None
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
