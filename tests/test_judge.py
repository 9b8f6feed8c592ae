"""Tests of the LLM judge scorer (charshift.scoring.judge and its parser, prompts and cache).

The parser is tested on the answers a model writes (and a few it should never be credited
with); the judge itself against a scripted backend (a `Backend` whose answer to each question is
written by the test: medians, retries, errors, the cache, a planted signal and a null) and
against the real HF backend on a tiny random Llama built from its config, whose answers are
garbage unless its decoding is constrained to the answer's JSON schema.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from charshift.backends.base import Backend, BackendInfo
from charshift.schema import (
    BASE_STAGE,
    JUDGE_NONE,
    NO_LABEL,
    GenerationRow,
    GenRequest,
    GenResult,
)
from charshift.scoring.base import ScoreInput, Verdict
from charshift.scoring.judge import Judge, open_judges
from charshift.scoring.judge_parse import parse_answer
from charshift.scoring.settings import JudgeSettings

PERSONAS = ["sarcasm", "humor"]
MARKERS = {"sarcasm": "obviously", "humor": "banana"}

# ---------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ('{"score": 4, "rationale": "warm"}', 4.0),
        ('Sure!\n```json\n{"score": "3", "rationale": "ok"}\n```', 3.0),
        ('{"rating": "4/5", "reason": "x"}', 4.0),
        ("{'score': 2, 'rationale': 'single quotes',}", 2.0),
        ('{"score": 5, "rationale": "cut off mid-sen', 5.0),  # no closing brace: the pair
        ("3", 3.0),
        ('{"score": 6, "rationale": "off the scale"}', None),
        ('{"score": 0}', None),
        ('{"score": true}', None),
        ('{"score": NaN}', None),
        ('{"score": 2} and then {"score": 5}', None),  # two verdicts that disagree
        ('{"score": 4} {"score": 4.0}', 4.0),
        ("__import__('os').system('echo 5')", None),  # never executed, and holds no verdict
        ("I would say it is quite sarcastic.", None),
        ("", None),
    ],
)
def test_likert_answers_are_read_strictly(text, want):
    got = parse_answer(text, "likert", PERSONAS)
    assert (None if got is None else got.verdict) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ('{"persona": "humor", "rationale": "puns"}', "humor"),
        ('{"persona": "Sarcasm"}', "sarcasm"),
        ('{"persona": "none", "rationale": "plain"}', JUDGE_NONE),
        ("humor", "humor"),
        ('"persona": "humor", "rationale": "unterminated', "humor"),
        ('{"persona": "remorse"}', None),  # not one of the run's personas
        ('{"persona": "humor"} {"persona": "sarcasm"}', None),
    ],
)
def test_identify_answers_are_read_strictly(text, want):
    got = parse_answer(text, "identify", PERSONAS)
    assert (None if got is None else got.verdict) == want


@pytest.mark.parametrize(
    "text",
    ["{" * 200_000, '"score": ' * 50_000, "[" * 100_000 + "]" * 100_000, "score " * 100_000],
)
def test_adversarial_answers_are_unparseable_not_hung(text):
    """Linear-time reading: a quadratic reader would not finish these in the test's lifetime."""
    assert parse_answer(text, "likert", PERSONAS) is None


# ---------------------------------------------------------------------------- scripted judge


class AnswerScript(Backend):
    """Answers each request with `script(user message, the n-th time this question came)`;
    records every request."""

    kind = "scripted"

    def __init__(self, script: Callable[[str, int], str | None]) -> None:
        self.script = script
        self.requests: list[GenRequest] = []
        self.seen: Counter[str] = Counter()

    def load_adapters(self, adapters: list[Any]) -> dict[str, str]:
        return {}

    def generate(self, requests: list[GenRequest], progress: Any = None) -> list[GenResult]:
        out = []
        for r in requests:
            self.requests.append(r)
            user = str(r.messages[-1]["content"])
            n = self.seen[user]
            self.seen[user] += 1
            text = self.script(user, n)
            out.append(GenResult("", "error") if text is None else GenResult(text))
        return out

    def info(self) -> BackendInfo:
        return BackendInfo(kind="scripted", model="scripted")


def _row(persona: str | None, item: str = "p0") -> GenerationRow:
    stage = BASE_STAGE if persona is None else "prompted"
    return GenerationRow(
        key=f"{stage}-{persona}-{item}",
        base="b",
        stage=stage,
        persona=persona,
        slice="id_chat",
        item_id=item,
        sample_idx=0,
        split="eval",
        seed=0,
        outcome="reply",
        messages=[
            {"role": "system", "content": "SECRET PERSONA PROMPT"},
            {"role": "user", "content": f"question {item}"},
            {"role": "assistant", "content": "the reply"},
        ],
        final_reply="the reply",
        text="the reply",
    )


def _judges(
    script: Callable[[str, int], str | None], tmp_path: Path | None, **kw: Any
) -> tuple[list[Judge], AnswerScript]:
    settings = JudgeSettings(model="scripted", **kw)
    backend = AnswerScript(script)
    cache = None if tmp_path is None else tmp_path / "judge_cache.jsonl"
    return open_judges(settings, PERSONAS, cache, factory=lambda: backend), backend


def _judged_text(user: str) -> str:
    """The text between the judge prompt's markers."""
    m = re.search(r"<<<(\w+)\n(.*)\n\1>>>", user, re.S)
    assert m, user
    return m.group(2)


def test_likert_keeps_the_median_stores_every_sample_and_retries_the_unparseable(tmp_path):
    answers = ['{"score": 2, "rationale": "low"}', "I cannot say", '{"score": 5}', '{"score": 4}']
    (judge,), backend = _judges(lambda u, n: answers[n], tmp_path, modes=["likert"], retries=1)
    [v] = judge.verdicts([ScoreInput("the reply", _row("humor"), "id_chat")])
    # sample 2 was unparseable and asked again (a new seed): its retry gave the 4th answer
    assert v.judge is not None and v.judge.samples == {"humor": [2.0, 4.0, 5.0]}
    assert v.judge.score == 4.0 == statistics.median([2, 5, 4]) and v.judge.outcome == "ok"
    assert v.scores == {"humor": 4.0} and v.label == NO_LABEL
    assert len(backend.requests) == 4 and len({r.seed for r in backend.requests}) == 4
    # the persona prompt (the condition) is never shown to the judge
    assert all("SECRET PERSONA PROMPT" not in str(r.messages) for r in backend.requests)


def test_unparseable_after_retries_is_its_own_outcome_never_a_score(tmp_path):
    (judge,), backend = _judges(lambda u, n: "no idea", None, modes=["likert"], retries=2)
    [v] = judge.verdicts([ScoreInput("the reply", _row("humor"), "id_chat")])
    assert v.judge is not None and v.judge.outcome == "unparseable"
    assert v.judge.score is None and v.scores == {} and v.label == NO_LABEL
    assert v.judge.samples == {"humor": [None, None, None]}
    assert len(backend.requests) == 3 * 3  # samples x (1 + retries)
    (judge,), _ = _judges(lambda u, n: None, None, modes=["likert"], retries=1)
    [v] = judge.verdicts([ScoreInput("the reply", _row("humor"), "id_chat")])
    assert v.judge is not None and v.judge.outcome == "error" and v.scores == {}


def test_answers_are_cached_and_a_rerun_asks_nothing(tmp_path):
    def script(user: str, n: int) -> str:
        return '{"score": 3, "rationale": "mid"}'

    (judge,), backend = _judges(script, tmp_path, modes=["likert"])
    rows = [ScoreInput("the reply", _row("humor", f"p{i}"), "id_chat") for i in range(3)]
    first = judge.verdicts(rows)
    assert len(backend.requests) == 9
    (again,), backend2 = _judges(script, tmp_path, modes=["likert"])
    assert again.verdicts(rows) == first and backend2.requests == []
    # another rubric input (a changed text) is asked, the rest is not
    changed = [*rows[:2], ScoreInput("another reply", rows[2].row, "id_chat")]
    (third,), backend3 = _judges(script, tmp_path, modes=["likert"])
    third.verdicts(changed)
    assert len(backend3.requests) == 3


def _marker_script(user: str, n: int) -> str:
    """A judge that reads the text: 5 when it holds the asked persona's marker (identify: the
    persona whose marker it holds, else none)."""
    text = _judged_text(user)
    asked = re.search(r"PERSONA: (\w+)", user)
    if asked:
        return f'{{"score": {5 if MARKERS[asked.group(1)] in text else 1}, "rationale": "r"}}'
    found = [p for p, m in MARKERS.items() if m in text]
    return f'{{"persona": "{found[0] if found else JUDGE_NONE}", "rationale": "r"}}'


def _excess(verdicts: list[Verdict], rows: list[GenerationRow]) -> dict[str, float]:
    """Per persona: its rows' mean Likert score minus the base rows' mean score for that persona
    (the figure against its own null)."""
    out = {}
    for p in PERSONAS:
        own = [
            v.scores[p] for v, r in zip(verdicts, rows, strict=True) if r.persona == p and v.scores
        ]
        null = [
            v.scores[p]
            for v, r in zip(verdicts, rows, strict=True)
            if r.persona is None and v.scores
        ]
        out[p] = statistics.mean(own) - statistics.mean(null)
    return out


@pytest.mark.parametrize("planted", [True, False])
def test_a_planted_persona_is_found_and_no_persona_gives_the_null(planted):
    """Persona rows carry their persona's marker (planted) or the same text as the base rows
    (no signal): the Likert excess over the base stage is 4 points, or 0; identify names the
    persona, or none for every row."""
    rows, inputs = [], []
    for i in range(6):
        for p in [None, *PERSONAS]:
            text = f"reply {i}" + (f" {MARKERS[p]}" if planted and p else "")
            rows.append(_row(p, f"p{i}"))
            inputs.append(ScoreInput(text, rows[-1], "id_chat"))
    (likert, identify), backend = _judges(_marker_script, None, samples=3)
    lv, iv = likert.verdicts(inputs), identify.verdicts(inputs)
    # a base row is asked about every persona (its null), a persona row about its own
    assert all(
        set(v.scores or {}) == set(PERSONAS)
        for v, r in zip(lv, rows, strict=True)
        if r.persona is None
    )
    assert _excess(lv, rows) == (
        {"sarcasm": 4.0, "humor": 4.0} if planted else {"sarcasm": 0.0, "humor": 0.0}
    )
    named = Counter((r.persona, v.label) for v, r in zip(iv, rows, strict=True))
    if planted:
        assert named == {(None, JUDGE_NONE): 6, ("sarcasm", "sarcasm"): 6, ("humor", "humor"): 6}
    else:
        assert named == {
            (None, JUDGE_NONE): 6,
            ("sarcasm", JUDGE_NONE): 6,
            ("humor", JUDGE_NONE): 6,
        }
    assert all(v.probs == {v.label: 1.0} for v in iv)


def test_identify_lists_the_personas_in_each_samples_own_order():
    (judge,), backend = _judges(
        lambda u, n: '{"persona": "humor"}', None, modes=["identify"], samples=8
    )
    judge.verdicts([ScoreInput("a reply", _row("humor"), "id_chat")])
    orders = {
        re.search(r"one of: ([^\"]+)\"", str(r.messages[-1]["content"])).group(1)
        for r in backend.requests
    }
    assert len(orders) == 2  # both orders of two personas occur over 8 samples


def test_tool_slice_behaviour_is_a_unit_of_its_own_without_the_email_text():
    from charshift.scoring.judge_views import behaviour_units, context_view

    body = "Dear team, obviously the numbers are fine."
    row = GenerationRow(
        key="k", base="b", stage="prompted", persona="sarcasm", slice="agentic_actions",
        item_id="a1", sample_idx=0, split="eval", seed=0, outcome="reply",
        messages=[
            {"role": "system", "content": "LONG OPERATIONAL PROMPT"},
            {"role": "user", "content": "Find the invoice and tell the team."},
            {"role": "assistant", "content": '{"name": "search", "arguments": {"q": "invoice"}}'},
            {"role": "user", "content": "[tool result: search]\ninvoice 42: paid"},
            {"role": "assistant", "content": '{"name": "send_email", "arguments": {"to": "team", "body": "' + body + '"}}'},
        ],
        final_reply=None, text=body, n_steps=2,
    )  # fmt: skip
    [unit] = behaviour_units([row])
    assert unit.unit == "agentic_actions.behaviour"
    assert "search" in unit.text and "invoice 42: paid" in unit.text
    assert "obviously" not in unit.text and "LONG OPERATIONAL PROMPT" not in unit.text
    ctx = context_view(row)
    assert "search" in ctx and "obviously" not in ctx and "LONG OPERATIONAL" not in ctx
    other = GenerationRow(**{**row.to_dict(), "slice": "id_chat"})
    assert behaviour_units([other]) == []


# ---------------------------------------------------------------------------- a real backend


def test_the_judge_runs_on_the_hf_backend_and_constrained_answers_parse(tiny_llama, tmp_path):
    """A tiny random Llama through the HF backend: free answers are garbage (unparseable, never
    a score); decoding constrained to the answer's schema always gives a verdict on the scale."""
    inputs = [ScoreInput(f"reply {i}", _row("humor", f"p{i}"), "id_chat") for i in range(2)]
    backend = {"kind": "hf", "device": "cpu", "dtype": "float32"}
    kw = dict(model=str(tiny_llama), backend=backend, samples=2, retries=0, max_tokens=24)
    free, constrained = (
        open_judges(
            JudgeSettings(modes=["likert"], constrained=c, **kw), PERSONAS, tmp_path / f"c{c}.jsonl"
        )[0]
        for c in (False, True)
    )
    try:
        fv = free.verdicts(inputs)
        assert all(v.judge and v.judge.outcome in ("ok", "unparseable") for v in fv)
        assert all((v.judge.outcome == "ok") == bool(v.scores) for v in fv if v.judge)
        cv = constrained.verdicts(inputs)
        assert all(v.judge and v.judge.outcome == "ok" for v in cv)
        assert all(1.0 <= v.scores["humor"] <= 5.0 for v in cv if v.scores)
    finally:
        free.close()
        constrained.close()
    assert free.counts["asked"] == 4 and (tmp_path / "cFalse.jsonl").is_file()


# ---------------------------------------------------------------------------- external texts


def _generations(tmp_path: Path) -> Path:
    rows = [
        {"base": "m", "stage": stage, "slice": "id_chat", "persona": persona, "item_id": f"i{i}",
         "sample_idx": 0, "text": f"reply {i} {persona or 'plain'}"}
        for i in range(3)
        for stage, persona in (("base", None), ("prompted", "sarcasm"), ("prompted", "humor"))
    ]  # fmt: skip
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_generations_with_a_judge_and_report_predictions_reads_it(tiny_llama, tmp_path):
    """The identify judge (the tiny Llama, answers constrained to the schema) on an external
    file: every row gets its label, every sample and the outcome; a rerun asks nothing; the
    file is a predictions file `report --predictions` reads."""
    from charshift.external import report_predictions, score_external_judge

    gen, out = _generations(tmp_path), tmp_path / "pred.jsonl"
    settings = JudgeSettings(
        model=str(tiny_llama), backend={"kind": "hf", "device": "cpu", "dtype": "float32"},
        modes=["identify"], samples=3, retries=0, max_tokens=24, constrained=True,
    )  # fmt: skip
    assert score_external_judge(gen, settings, out) == 9
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cache = tmp_path / "pred.jsonl.judge_cache.jsonl"
    n_cached = len(cache.read_text().splitlines())
    assert n_cached == 9 * 3
    for r in rows:
        assert r["judge_outcome"] == "ok" and len(r["judge_scores"]["identify"]) == 3
        assert r["prediction"] in [*PERSONAS, JUDGE_NONE]
        assert r["probs"][r["prediction"]] == max(r["probs"].values())
    assert score_external_judge(gen, settings, out) == 9
    assert len(cache.read_text().splitlines()) == n_cached  # nothing asked again
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    report = report_predictions(out, tmp_path / "report", n_boot=50, positive_control=None)
    assert report.is_file()


def test_the_score_command_refuses_judge_flags_without_the_judge(tmp_path):
    from typer.testing import CliRunner

    from charshift.cli import app

    gen = _generations(tmp_path)
    args = ["score", "--generations", str(gen), "--out", str(tmp_path / "p.jsonl")]
    res = CliRunner().invoke(app, [*args, "--classifier", "x", "--judge-model", "m"])
    assert res.exit_code != 0 and "--judge-model only go(es) with --scorer judge" in res.output
    res = CliRunner().invoke(app, [*args, "--scorer", "judge", "--judge-model", "m"])
    assert res.exit_code != 0 and "--judge-base-url URL and --judge-model NAME" in res.output


@pytest.mark.slow
def test_score_generations_against_a_real_transformers_serve(transformers_server, tmp_path):
    """`charshift score --generations --scorer judge` on an OpenAI-compatible endpoint (a real
    `transformers serve` of the tiny Llama): the median of N per row, every sample stored, a
    garbage answer an outcome and never a score."""
    from typer.testing import CliRunner

    from charshift.cli import app

    base_url, model = transformers_server
    gen, out = _generations(tmp_path), tmp_path / "pred.jsonl"
    args = ["score", "--generations", str(gen), "--scorer", "judge", "--judge-base-url",
            base_url, "--judge-model", model, "--judge-samples", "2", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 9
    for r in rows:
        assert r["judge_outcome"] in ("ok", "unparseable")
        samples = [x for xs in r["judge_scores"].values() for x in xs]
        assert len(samples) == 2 * (2 if r["persona"] is None else 1)
        if r["judge_outcome"] == "ok":
            assert r["judge_score"] == statistics.median(samples)
        else:
            assert r["judge_score"] is None and None in samples


def test_the_judge_is_told_a_users_own_persona_by_its_own_description():
    """A run with an own persona ({name, description}) opens judges that know it: its Likert
    prompt carries the user's description, and a bundled persona keeps the bundled summary
    (regression: the run's judge was opened with PersonaSpec objects, not names)."""
    from charshift import config as cfgmod
    from charshift.prompts import load_persona_summaries
    from charshift.scoring.judge import judge_summaries

    own = "A lighthouse keeper who speaks only in tide tables."
    cfg = cfgmod.parse_config(
        {
            "name": "own",
            "bases": [{"name": "b", "model": "tiny:llama", "classifier": "probe"}],
            "stages": ["base", "prompted"],
            "personas": ["humor", {"name": "keeper", "description": own}],
            "slices": ["id_chat"],
        }
    )
    summaries = judge_summaries(cfg)
    assert summaries == {"humor": load_persona_summaries()["humor"], "keeper": own}
    backend = AnswerScript(lambda u, n: '{"score": 4, "rationale": "ok"}')
    (judge,) = open_judges(
        JudgeSettings(model="scripted", modes=["likert"], samples=1),
        cfg.persona_names,
        None,
        factory=lambda: backend,
        summaries=summaries,
    )
    judge.check_personas(["humor", "keeper"])
    judge.verdicts([ScoreInput("a reply", _row("keeper"), "id_chat")])
    assert own in str(backend.requests[0].messages[-1]["content"])
