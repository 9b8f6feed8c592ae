"""Typed records at the seams of the pipeline.

scenarios/prompts -> formats (EpisodeSpec) -> rollout (GenRequest/GenResult via a Backend)
-> store (GenerationRow) -> classifier (ScoreRow) -> stats (PredictionRecord) -> report.

Everything here is plain data: dataclasses that serialise to JSON with `to_dict` and are read
back, checked, with `from_dict` (the store, the predictions loader and every reader between
modules use the typed records, never raw dicts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Message = dict[str, Any]  # {"role": "system"|"user"|"assistant"|"tool", "content": str, ...}

BASE_STAGE = "base"
PROMPTED_STAGE = "prompted"
# Bootstrap resamples: a (n_boot x clusters) draw is held in memory per interval, so the
# config, the classifier's held-out report and `report --n-boot` are bounded by this.
MAX_N_BOOT = 100_000
# The most shards a run may be split into (`--shard I/N`, N <= MAX_SHARDS); a table file or a
# manifest event that names a larger count is not one of the run's.
MAX_SHARDS = 1024

# The persona prompt plus an explicit instruction to keep the voice in every form of writing: an
# instruction being followed, not a property being measured; never a default stage.
PROMPTED_EXPLICIT_STAGE = "prompted_explicit"
# The true label of a base-stage output: the base stage carries no persona (a null condition,
# generated once per item and sample). `stats.expand_base_null` pairs it with every persona.
NULL_PERSONA = "__null__"
NULL_PERSONA_MARKERS = (NULL_PERSONA, "-", "", None)  # what readers accept as "no persona"

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
# The prediction of a score that names no persona: a Likert judge (its figure is a number), or a
# judge whose every answer stayed unparseable (`ScoreRow.judge_outcome` says which).
NO_LABEL = ""
# What a judge's answer may be besides a persona: it names none of them (identify mode).
JUDGE_NONE = "none"
JUDGE_OUTCOMES = ("ok", "unparseable", "error")
# The backend failed (an error, or the prompt did not fit the context): says nothing about the
# persona, so such a row is not a persona miss; statistics leave it out and count it on its own.
FAILED_OUTCOMES = ("error", "context_overflow")


class RecordError(ValueError):
    """A stored or supplied record that does not fit its type, naming the field."""


# Annotation (as written in this module) -> the JSON types it admits. `from_dict` checks these.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "Any": (object,),
    "list": (list,),
    "dict": (dict,),
    "tuple": (list, tuple),
}


def _admits(annotation: str, value: Any) -> bool:
    for alt in (a.strip() for a in annotation.split("|")):
        if alt == "None":
            if value is None:
                return True
            continue
        head = alt.split("[", 1)[0]
        if head == "Message":
            head = "dict"
        if head in ("FinishReason", "Literal"):
            head = "str"
        kinds = _JSON_TYPES.get(head, (object,))
        if isinstance(value, bool) and bool not in kinds and object not in kinds:
            continue  # JSON true/false is not a number here
        if isinstance(value, kinds):
            return True
    return False


def record_from_dict(cls: type, data: Any, where: str = "record") -> Any:
    """Build dataclass `cls` from a JSON object, checking required fields, unknown fields and the
    JSON type of every field; RecordError names `where` and the field."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecordError(f"{where}: unknown field(s) {unknown} for {cls.__name__}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            no_default = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            if no_default:
                raise RecordError(f"{where}: missing required field {name!r}")
            continue
        value = data[name]
        if not _admits(str(f.type), value):
            raise RecordError(
                f"{where}: field {name!r} must be {f.type}, got {type(value).__name__}"
            )
        kwargs[name] = tuple(value) if str(f.type).startswith("tuple") else value
    return cls(**kwargs)


def canonical_json(obj: Any) -> str:
    """The JSON `stable_hash` hashes: sorted keys, ASCII, no spaces."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of the canonical JSON of `obj` (sorted keys): the same value -> the same key."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


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


# Why a generation ended. "stop": end of turn; "length": max_tokens or the context was used up;
# "context_overflow": the prompt did not fit, nothing was generated; "error": the backend failed
# this request; "abort": the engine aborted it (vLLM's `abort`, a server that cancelled it);
# "repetition": the engine cut a degenerate repetition short (vLLM's `repetition`). The rollout
# treats "abort" like "error" and "repetition" like "length" (see rollout._advance).
FinishReason = Literal["stop", "length", "context_overflow", "error", "abort", "repetition"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)


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
    `output`: what the row's scored text is: "reply" (the final reply as is), "email" (an email
    extracted from the final reply, or the body sent with send_email), "fields" (the free-text
    fields of a JSON answer to `response_schema`, see charshift.forms) or "final" (a tool loop's
    free text: the bodies it sent and its `finish` message).
    `context`: pre-written messages (a transcript, a ReAct trajectory) that come before the
    first user turn as if already said; never generated, shown in the row's messages.
    `response_schema`: the JSON schema a structured answer must match (enforced during decoding
    under `rollout.tool_protocol: constrained`).
    `needed_calls`: tool slices: the model turns a perfect agent needs (see formats.needed_calls);
    `max_steps`: the episode's step budget (set by planning from needed_calls and the config;
    None: the engine's default).
    """

    slice: str
    item_id: str
    user_turns: list[str]
    system: str | None = None
    mode: Literal["chat", "tool_oneshot", "agentic"] = "chat"
    output: Literal["reply", "email", "fields", "final"] = "reply"
    base_turns: tuple[int, ...] = ()
    scenario_id: str | None = None
    tools: list[dict[str, Any]] | None = None  # tool schemas (name, description, parameters)
    split: str = "eval"  # "train" rows feed classifier training only; "eval" rows are measured
    needed_calls: int | None = None
    max_steps: int | None = None
    context: list[Message] = field(default_factory=list)
    response_schema: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON (part of a row's key). The fields added for the scaffolds are left
        out where unused, so the keys of rows rendered before they existed do not change."""
        out = dataclasses.asdict(self)
        for name in _SCAFFOLD_SPEC_FIELDS:
            if not out[name]:
                del out[name]
        return out


_SCAFFOLD_SPEC_FIELDS = ("context", "response_schema")


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

    @classmethod
    def from_dict(cls, data: Any, where: str = "GenerationRow") -> GenerationRow:
        return record_from_dict(cls, data, where)


@dataclass
class ScoreRow:
    """One scorer's verdict in scores.jsonl, keyed by (generation key, scorer id, unit, hash of
    the scored text): a unit whose text changes (the `id_chat.short` cut after more chat_email
    rows arrive) is scored again, never reused. `unit` is the slice or `SLICE.VARIANT` scored (see
    charshift.units); rows written before units existed have unit "" and are not reused.
    `length`: the scored text's length and the counter it was counted in (the scorer's tokenizer,
    or words), and for a length control its target and how it was cut (`units.UnitText`)."""

    key: str  # the GenerationRow.key
    classifier: str  # the scorer's identity (a classifier's id or folder hash, a judge's, ...)
    text_field: str  # "text" (extracted, default) or "final_reply" (raw): the default unit's rule
    prediction: str
    probs: dict[str, float]
    unit: str = ""
    text_hash: str = ""
    length: dict[str, Any] | None = None
    # Scorers that give numbers (charshift.scoring: the LLM judge, persona vectors); None for a
    # classifier, and on rows written before they existed. `scores`: persona -> number (a Likert
    # median, a projection) for every persona the unit was scored against. `prediction` is
    # NO_LABEL where the scorer names no persona (a Likert judge; a judge left unparseable).
    scores: dict[str, float] | None = None
    # The judge (JudgeRecord fields): the median Likert score for the row's own persona; every
    # sample's verdict and the kept verdict's rationale per target (a persona, or "identify");
    # the outcome ("ok", "unparseable", "error").
    judge_score: float | None = None
    judge_scores: dict[str, list[Any]] | None = None
    judge_rationale: dict[str, str | None] | None = None
    judge_outcome: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "ScoreRow") -> ScoreRow:
        return record_from_dict(cls, data, where)


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
    # the numbers and the judge's record of scorers that give them (see ScoreRow)
    scores: dict[str, float] | None = None
    judge_score: float | None = None
    judge_scores: dict[str, list[Any]] | None = None
    judge_rationale: dict[str, str | None] | None = None
    judge_outcome: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "PredictionRecord") -> PredictionRecord:
        return record_from_dict(cls, data, where)


@dataclass
class Sample:
    """One entry of the report's sample browser: a scored unit of a row, as shown to a reader
    (the conversation or trajectory, the scored text, the verdict and its probabilities)."""

    key: str
    base: str
    stage: str
    persona: str  # the condition's persona, or "(base: none)"
    slice: str  # the unit
    item_id: str
    sample_idx: int
    outcome: str
    text: str | None = None
    prediction: str | None = None
    probs: dict[str, float] | None = None
    messages: list[Message] = field(default_factory=list)
    email: dict[str, Any] | None = None
    tool_log: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, r: PredictionRecord, key: str) -> Sample:
        """A minimal sample from a prediction record (no conversation at hand)."""
        return cls(
            key=key,
            base=r.base,
            stage=r.stage,
            persona="(base: none)" if r.persona in NULL_PERSONA_MARKERS else r.persona,
            slice=r.slice,
            item_id=r.item_id,
            sample_idx=r.sample_idx,
            outcome=r.outcome,
            text=r.text,
            prediction=r.prediction,
            probs=r.probs,
        )
