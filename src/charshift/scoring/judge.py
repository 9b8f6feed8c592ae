"""The `judge` scorer: an LLM asked about the persona in each text, on any backend charshift has.

One `Judge` per mode (`judge.modes`), each a scorer of its own (`judge_likert`,
`judge_identify`), sharing one lazily opened backend (`backends.build.backend_for` of `judge.backend`:
a local HF model, vLLM offline, an OpenAI-compatible server (the API key read from the
environment variable `api_key_env` names, never stored), or a managed server).

- Likert: for a row of persona P, "how strongly does this text express P" (1-5, rubric in
  `judge_prompts`). A base-stage row carries no persona, so it is asked once per persona of the
  run: its `scores` hold every persona's median, the null against which a persona's score is
  read. The verdict names no persona (`schema.NO_LABEL`); its figure is the number
  (`ScoreRow.judge_score`: the median for the row's own persona; `scores`: per persona).
- Identify: "which of these personas wrote this, or none". The label is the majority answer
  (ties: the one a sample gave first), `probs` the share of samples per answer. "none" is a
  label outside the run's personas: in the macro-F1 machinery it is an output that names no
  persona, wrong for every true persona and counted in no persona's precision, so a judge that
  answers "none" to everything scores zero, and on the base stage it lowers no persona's null.

Each question is asked `samples` times (seeds drawn from the question), each unparseable answer
again up to `retries` times with a new seed; the median (Likert) or majority (identify) of the
parsed answers is kept and every answer stored (`JudgeRecord`). A question with no parsed
answer is the outcome "unparseable" (or "error" where the backend failed every attempt), never
a score. Answers are cached by judge model, rubric version and the whole question
(`judge_cache`), so a rerun asks only what is missing.

Tool slices: the judge sees the trajectory (`judge_views.context_view`), and their behaviour is
a unit of its own, `SLICE.behaviour` (`extra_units`), judged with the behaviour rubric.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charshift.backends.base import Backend
from charshift.config import RunConfig
from charshift.schema import (
    JUDGE_NONE,
    NO_LABEL,
    NULL_PERSONA_MARKERS,
    GenerationRow,
    GenRequest,
    Message,
    Sampling,
    derive_seed,
    stable_hash,
)
from charshift.scoring import judge_prompts as jp
from charshift.scoring.base import (
    JudgeRecord,
    Prediction,
    Progress,
    ScoreInput,
    ScorerContext,
    ScorerError,
    Verdict,
)
from charshift.scoring.judge_cache import CACHE_NAME, JudgeCache
from charshift.scoring.judge_parse import Answer, parse_answer
from charshift.scoring.judge_views import behaviour_units, context_view, is_behaviour
from charshift.scoring.settings import JudgeSettings
from charshift.units import UnitText

IDENTIFY = "identify"  # the target of an identify question
REQUEST_CHUNK = 256  # questions sent to the backend in one call (progress between calls)


class JudgeBackend:
    """The judge's backend, opened on first use (a run whose answers are all cached loads no
    model) and shared by the judge's modes; `close` frees it (a managed server is stopped)."""

    def __init__(self, factory: Callable[[], Backend]) -> None:
        self._factory = factory
        self._backend: Backend | None = None

    def get(self) -> Backend:
        if self._backend is None:
            self._backend = self._factory()
        return self._backend

    @property
    def opened(self) -> bool:
        return self._backend is not None

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


@dataclass(frozen=True)
class _Ask:
    """One sample of one question about input `index`."""

    index: int
    target: str
    messages: list[Message]
    seed: int
    schema: dict[str, Any] | None


@dataclass
class _Result:
    answer: Answer | None = None
    errored: bool = False  # the last attempt was a backend error, not an unparseable answer


def judge_provenance(settings: JudgeSettings, mode: str) -> dict[str, Any]:
    """What a judge's scores depend on (its identity is a hash of it, less where it is served);
    the API key's variable is named, the key never appears."""
    backend = {k: v for k, v in settings.backend.items() if k in ("kind", "base_url", "engine")}
    return {
        "kind": "judge",
        "mode": mode,
        "model": settings.model,
        "revision": settings.revision,
        "rubric_version": jp.RUBRIC_VERSION,
        "backend": backend,
        "api_key_env": settings.backend.get("api_key_env"),
        **settings.model_dump(
            include={"samples", "temperature", "top_p", "max_tokens", "retries"}
            | {"context_chars", "constrained", "seed", "behaviour"}
        ),
    }


class Judge:
    """The `judge` scorer in one mode (see the module doc); a `base.VerdictScorer`."""

    def __init__(
        self,
        settings: JudgeSettings,
        mode: str,
        personas: Sequence[str],
        backend: JudgeBackend,
        cache: JudgeCache,
        summaries: Mapping[str, str] | None = None,
    ) -> None:
        from charshift.prompts import load_persona_summaries

        if mode not in ("likert", IDENTIFY):
            raise ScorerError(f"judge: unknown mode {mode!r} (likert or identify)")
        self.settings, self.mode, self.personas = settings, mode, list(personas)
        self.backend, self.cache = backend, cache
        self.summaries = dict(summaries or load_persona_summaries())
        self.sampling = Sampling(settings.temperature, settings.top_p, settings.max_tokens, 1.0)
        self.counts: Counter[str] = Counter()  # answers cached, asked, unparseable, errors

    @property
    def name(self) -> str:
        return f"judge_{self.mode}"

    @property
    def labels(self) -> list[str]:
        return list(self.personas)

    @property
    def provenance(self) -> dict[str, Any]:
        return judge_provenance(self.settings, self.mode)

    @property
    def identity(self) -> str:
        where = {k: v for k, v in self.provenance.items() if k not in ("backend", "api_key_env")}
        return f"{self.name}-{stable_hash(where, 12)}"

    def check_personas(self, personas: Sequence[str]) -> None:
        unknown = [p for p in personas if p not in self.personas]
        no_text = [p for p in self.personas if not self.summaries.get(p)]
        if unknown or no_text or JUDGE_NONE in self.personas:
            raise ScorerError(
                f"judge: personas {unknown or no_text or [JUDGE_NONE]} cannot be judged (not "
                f"the judge's, without a description, or named {JUDGE_NONE!r}, its own answer)"
            )

    def extra_units(self, rows: Sequence[GenerationRow]) -> list[UnitText]:
        """`SLICE.behaviour` of every tool-slice row (when `judge.behaviour` is on)."""
        if not self.settings.behaviour:
            return []
        return behaviour_units(rows, self.settings.context_chars)

    def score(
        self, inputs: Sequence[str | ScoreInput], *, progress: Progress = None
    ) -> list[Prediction]:
        return [v.prediction for v in self.verdicts(inputs, progress=progress)]

    def verdicts(
        self, inputs: Sequence[str | ScoreInput], *, progress: Progress = None
    ) -> list[Verdict]:
        items = [x if isinstance(x, ScoreInput) else ScoreInput(x) for x in inputs]
        asks = [a for i, x in enumerate(items) for a in self._asks(i, x)]
        results = self._ask_all(asks, progress)
        by_input: dict[int, list[tuple[_Ask, _Result]]] = {}
        for ask, res in zip(asks, results, strict=True):
            by_input.setdefault(ask.index, []).append((ask, res))
        return [self._verdict(x, by_input.get(i, [])) for i, x in enumerate(items)]

    def close(self) -> None:
        self.backend.close()

    # ---- questions -------------------------------------------------------------------------

    def _targets(self, row: GenerationRow | None) -> list[str]:
        """What a row is asked about: identify once; Likert for its persona, or for every
        persona where it has none (a base-stage row, or a text given without a row)."""
        if self.mode == IDENTIFY:
            return [IDENTIFY]
        persona = None if row is None else row.persona
        return list(self.personas) if persona in NULL_PERSONA_MARKERS else [str(persona)]

    def _asks(self, index: int, item: ScoreInput) -> list[_Ask]:
        behaviour = is_behaviour(item.unit)
        context = "" if behaviour else context_view(item.row, self.settings.context_chars)
        out = []
        for target in self._targets(item.row):
            q = jp.Question(
                self.mode, None if target == IDENTIFY else target, behaviour, context, item.text
            )
            for s in range(self.settings.samples):
                qid = stable_hash(dataclasses.asdict(q))
                seed = derive_seed(self.settings.seed, jp.RUBRIC_VERSION, qid, s)
                out.append(_Ask(index, target, self._messages(q, seed), seed, self._schema()))
        return out

    def _messages(self, q: jp.Question, seed: int) -> list[Message]:
        if self.mode == IDENTIFY:
            return jp.identify_messages(q, self.summaries, jp.identify_order(self.personas, seed))
        return jp.likert_messages(q, self.summaries)

    def _schema(self) -> dict[str, Any] | None:
        return jp.answer_schema(self.mode, self.personas) if self.settings.constrained else None

    def _key(self, ask: _Ask, seed: int) -> str:
        return stable_hash(
            {
                "model": self.settings.model,
                "revision": self.settings.revision,
                "rubric": jp.RUBRIC_VERSION,
                "messages": ask.messages,
                "sampling": self.sampling.to_dict(),
                "seed": seed,
                "schema": ask.schema,
            },
            24,
        )

    # ---- asking ----------------------------------------------------------------------------

    def _ask_all(self, asks: list[_Ask], progress: Progress) -> list[_Result]:
        """Every ask's parsed answer: each unparseable one asked again, up to `retries` times."""
        from charshift.scoring.tokens import ProgressBar

        results = [_Result() for _ in asks]
        pending = list(range(len(asks)))
        bar = ProgressBar(progress, len(asks), f"{self.name}")
        for attempt in range(self.settings.retries + 1):
            if not pending:
                break
            texts = self._answers([asks[j] for j in pending], attempt)
            still = []
            for j, text in zip(pending, texts, strict=True):
                parsed = None if text is None else parse_answer(text, self.mode, self.personas)
                results[j] = _Result(parsed, errored=text is None)
                if parsed is None:
                    still.append(j)
            bar.update(len(pending) - len(still))
            pending = still
        bar.update(len(pending))
        bar.close()
        self.counts.update(unparseable=sum(not r.errored for r in results if r.answer is None))
        self.counts.update(error=sum(r.errored for r in results))
        return results

    def _answers(self, asks: list[_Ask], attempt: int) -> list[str | None]:
        """The raw answer to each ask at `attempt` (cached, else asked); None: a backend error."""
        seeds = [a.seed if attempt == 0 else derive_seed(a.seed, "retry", attempt) for a in asks]
        keys = [self._key(a, s) for a, s in zip(asks, seeds, strict=True)]
        out: list[str | None] = [self.cache.get(k) for k in keys]
        todo = [j for j, text in enumerate(out) if text is None]
        self.counts.update(cached=len(asks) - len(todo), asked=len(todo))
        for start in range(0, len(todo), REQUEST_CHUNK):
            part = todo[start : start + REQUEST_CHUNK]
            requests = [
                GenRequest(
                    asks[j].messages, None, self.sampling, seeds[j], json_schema=asks[j].schema
                )
                for j in part
            ]
            fresh: dict[str, tuple[str, str]] = {}
            for j, res in zip(part, self.backend.get().generate(requests), strict=True):
                if res.finish_reason in ("stop", "length", "repetition"):
                    out[j] = res.text
                    fresh[keys[j]] = (res.text, res.finish_reason)
            self.cache.add(fresh)
        return out

    # ---- verdicts --------------------------------------------------------------------------

    def _verdict(self, item: ScoreInput, answered: list[tuple[_Ask, _Result]]) -> Verdict:
        samples: dict[str, list[Any]] = {}
        rationales: dict[str, list[str | None]] = {}
        errored: dict[str, bool] = {}
        for ask, res in answered:
            answer = res.answer
            samples.setdefault(ask.target, []).append(answer.verdict if answer else None)
            rationales.setdefault(ask.target, []).append(answer.rationale if answer else None)
            errored[ask.target] = errored.get(ask.target, True) and res.errored
        kept = {t: _kept(self.mode, v) for t, v in samples.items()}
        missing = [t for t, k in kept.items() if k is None]
        outcome = (
            "ok" if not missing else "error" if all(errored[t] for t in missing) else "unparseable"
        )
        rationale = {
            t: _rationale_of(samples[t], rationales[t], k) for t, k in kept.items() if k is not None
        }
        if self.mode == IDENTIFY:
            return self._identify_verdict(
                samples.get(IDENTIFY, []), kept.get(IDENTIFY), rationale, outcome
            )
        scores = {t: float(k) for t, k in kept.items() if k is not None}
        persona = None if item.row is None else item.row.persona
        own = None if persona in NULL_PERSONA_MARKERS else scores.get(str(persona))
        record = JudgeRecord(samples, rationale, outcome, own)
        return Verdict(NO_LABEL, {}, scores, record)

    def _identify_verdict(
        self, votes: list[Any], label: Any, rationale: dict[str, str | None], outcome: str
    ) -> Verdict:
        parsed = [v for v in votes if v is not None]
        probs = {lab: n / len(parsed) for lab, n in Counter(parsed).items()} if parsed else {}
        record = JudgeRecord({IDENTIFY: votes}, rationale, outcome)
        return Verdict(label if isinstance(label, str) else NO_LABEL, probs, None, record)


def _kept(mode: str, verdicts: list[Any]) -> float | str | None:
    """The kept verdict of a question's samples: the median (Likert) or the most frequent
    answer, ties going to the one given first (identify); None when none parsed."""
    parsed = [v for v in verdicts if v is not None]
    if not parsed:
        return None
    if mode != IDENTIFY:
        return float(statistics.median(parsed))
    counts = Counter(parsed)
    best = max(counts.values())
    return next(v for v in parsed if counts[v] == best)


def _rationale_of(verdicts: list[Any], rationales: list[str | None], kept: Any) -> str | None:
    """The rationale of the first sample whose verdict is (nearest to) the kept one."""
    scored = [(i, v) for i, v in enumerate(verdicts) if v is not None]
    if isinstance(kept, float):
        i = min(scored, key=lambda iv: (abs(float(iv[1]) - kept), iv[0]))[0]
    else:
        i = next(i for i, v in scored if v == kept)
    return rationales[i]


# -- opening -------------------------------------------------------------------------------------


def open_backend(settings: JudgeSettings, run_dir: Path | None = None, seed: int = 0) -> Backend:
    """The judge's backend: `judge.backend`, built as a run's backend is (`backends.build`)."""
    from charshift.backends.build import backend_for
    from charshift.config import BaseSpec, judge_backend

    base = BaseSpec(name="judge", model=settings.model, revision=settings.revision)
    return backend_for(judge_backend(settings), base, run_dir, seed)


def open_judges(
    settings: JudgeSettings,
    personas: Sequence[str],
    cache_path: Path | None,
    factory: Callable[[], Backend] | None = None,
    summaries: Mapping[str, str] | None = None,
) -> list[Judge]:
    """One `Judge` per mode of `settings`, sharing one backend (`factory`, by default
    `open_backend`) and one answer cache at `cache_path`; `summaries` (persona -> description,
    by default the bundled ones) is what the judge is told about each persona."""
    backend = JudgeBackend(factory or functools.partial(open_backend, settings))
    cache = JudgeCache(cache_path)
    return [Judge(settings, mode, personas, backend, cache, summaries) for mode in settings.modes]


def open_run_judge(context: ScorerContext) -> list[Judge]:
    """The registry's opener: the run's `judge` section, its cache in the run directory."""
    settings = context.cfg.judge
    if settings is None:
        raise ScorerError("judge: the run config has no `judge` section")
    run_dir = context.run_dir
    factory = functools.partial(open_backend, settings, run_dir, context.cfg.sampling.seed)
    cache = None if run_dir is None else Path(run_dir) / CACHE_NAME
    cfg = context.cfg
    return open_judges(settings, cfg.persona_names, cache, factory, judge_summaries(cfg))


def judge_summaries(cfg: RunConfig) -> dict[str, str]:
    """persona -> what the judge is told about it: the bundled summary for a bundled name, the
    user's own description (or constitution text) for their own persona."""
    from charshift.prompts import load_persona_summaries, persona_prompt

    bundled = load_persona_summaries()
    return {
        p.name: bundled[p.name]
        if p.bundled and p.name in bundled
        else persona_prompt(p, cfg.persona_prompts.source, cfg.persona_prompts.path)
        for p in cfg.personas
    }
