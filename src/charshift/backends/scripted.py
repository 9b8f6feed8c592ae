"""A deterministic fake backend for unit tests of the rollout engine and the pipeline.

It never touches a model: each request's text comes from a script, and every request is recorded
(`requests`, and `calls` grouped per `generate` call) so tests can assert what the engine sent,
how it batched, and which adapter and seed each row carried. It honours the same contract as the
real backends (tests/test_backend_contract.py runs it): results in request order, the same
request and seed give the same text, `max_tokens` caps the output, an over-long prompt gives
`context_overflow`, an adapter that cannot load is an error entry.

"Tokens" here are whitespace-separated words: crude, but deterministic and easy to reason about in
tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from charshift.backends.base import AdapterSource, Backend, BackendInfo, report_progress
from charshift.schema import GenRequest, GenResult, stable_hash

ScriptOutput = str | GenResult
Script = Callable[[GenRequest], ScriptOutput] | list[ScriptOutput] | dict[str, ScriptOutput]

DEFAULT_KEY = "*"


class ScriptExhausted(RuntimeError):
    """A list script ran out of texts: the test asked for more turns than it scripted."""


class NoScriptMatch(KeyError):
    """A dict script has no entry for the request's last message (and no "*" default)."""


def count_words(text: str) -> int:
    return len(text.split())


def request_tokens(req: GenRequest) -> int:
    """The scripted backend's prompt length: words over all messages, plus the tool schemas."""
    n = sum(count_words(str(m.get("content") or "")) for m in req.messages)
    if req.tools:
        n += count_words(json.dumps(req.tools))
    return n


def echo_text(req: GenRequest) -> str:
    """The default script: a deterministic reply naming adapter, seed and the last user turn.

    At temperature 0 the seed is left out, as a greedy decoder ignores it.
    """
    last_user = next(
        (str(m.get("content") or "") for m in reversed(req.messages) if m.get("role") == "user"),
        "",
    )
    tag = req.adapter or "base"
    if req.sampling.temperature > 0:
        tag += f" seed={req.seed}"
    return f"[{tag}] {last_user}"


class ScriptedBackend(Backend):
    """A fake backend whose replies come from `script`.

    `script` is one of:
      - None: `echo_text` (adapter, seed and the last user turn, so rows are tellable apart);
      - a callable `GenRequest -> str | GenResult`;
      - a list of texts (or GenResults) handed out one per request, in order, across calls;
        `ScriptExhausted` when they run out;
      - a dict keyed by message text: the content of the request's last message is looked up
        exactly, then as a substring of the content (keys in insertion order), then "*".
    A `GenResult` from the script is returned as is (to script errors or finish reasons); a text
    is cut to `max_tokens` words with finish_reason "length" where it is longer.

    Adapters: `load_adapters` accepts an adapter unless its name is in `unavailable` or its
    `path` does not exist; `adapters` pre-registers names. A request for an adapter that is not
    loaded gets an error result, as with the real backends.
    """

    kind = "scripted"

    def __init__(
        self,
        script: Script | None = None,
        *,
        context_length: int = 8192,
        adapters: Iterable[str] = (),
        unavailable: Iterable[str] = (),
    ) -> None:
        self.script = script
        self._context_length = context_length
        self._list_pos = 0
        self.loaded: dict[str, AdapterSource] = {n: AdapterSource(name=n) for n in adapters}
        self.unavailable = set(unavailable)
        self.requests: list[GenRequest] = []
        self.calls: list[list[GenRequest]] = []

    def load_adapters(self, adapters: list[AdapterSource]) -> dict[str, str]:
        errors: dict[str, str] = {}
        for src in adapters:
            if src.name in self.unavailable:
                errors[src.name] = f"adapter {src.name!r} is unavailable (scripted)"
            elif src.path is not None and not os.path.exists(src.path):
                errors[src.name] = f"adapter {src.name!r}: no such folder {src.path!r}"
            else:
                self.loaded[src.name] = src
        return errors

    def generate(self, requests: list[GenRequest], progress: Any = None) -> list[GenResult]:
        self.calls.append(list(requests))
        self.requests.extend(requests)
        results = [self._one(req) for req in requests]
        report_progress(progress, len(requests))
        return results

    def _one(self, req: GenRequest) -> GenResult:
        n_prompt = request_tokens(req)
        if n_prompt >= self._context_length:
            return GenResult(
                text="",
                finish_reason="context_overflow",
                prompt_tokens=n_prompt,
                error=f"prompt of {n_prompt} words >= context length {self._context_length}",
            )
        if req.adapter is not None and req.adapter not in self.loaded:
            return GenResult(
                "", "error", prompt_tokens=n_prompt, error=f"adapter {req.adapter!r} not loaded"
            )
        out = self._script_output(req)
        if isinstance(out, GenResult):
            return out
        words = out.split()
        if len(words) > req.sampling.max_tokens:
            text = " ".join(words[: req.sampling.max_tokens])
            return GenResult(text, "length", n_prompt, req.sampling.max_tokens)
        return GenResult(out, "stop", n_prompt, len(words))

    def _script_output(self, req: GenRequest) -> ScriptOutput:
        script = self.script
        if script is None:
            return echo_text(req)
        if callable(script):
            return script(req)
        if isinstance(script, list):
            if self._list_pos >= len(script):
                raise ScriptExhausted(
                    f"script has {len(script)} entries; request {self._list_pos + 1} asked for more"
                )
            out = script[self._list_pos]
            self._list_pos += 1
            return out
        last = str(req.messages[-1].get("content") or "") if req.messages else ""
        if last in script:
            return script[last]
        for key, out in script.items():
            if key != DEFAULT_KEY and key and key in last:
                return out
        if DEFAULT_KEY in script:
            return script[DEFAULT_KEY]
        raise NoScriptMatch(f"no scripted reply for last message {last[:80]!r}")

    def context_length(self) -> int:
        return self._context_length

    def info(self) -> BackendInfo:
        kind = "echo" if self.script is None else type(self.script).__name__
        return BackendInfo(
            kind=self.kind,
            model=f"scripted:{kind}",
            adapters={n: {"path": s.path} for n, s in self.loaded.items()},
            extra={
                "script_hash": stable_hash(self.script)
                if isinstance(self.script, list | dict)
                else None
            },
        )
