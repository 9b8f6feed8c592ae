"""A backend for any OpenAI-compatible chat server: vLLM (`vllm serve`), `transformers serve`, OpenAI.

Why a server backend at all: a long run on a GPU box is easiest to operate as one long-lived server
(`vllm serve MODEL --enable-lora --lora-modules full/sarcasm=/path ...`) that several runs share.
Each request is one POST to `{base_url}/chat/completions`; requests run concurrently on a small
thread pool and come back in request order, whatever order they finish in.

Adapters. An OpenAI-compatible server has no per-request adapter argument; vLLM instead serves each
LoRA adapter as a model name of its own (`--lora-modules NAME=PATH`). So an adapter here is simply
the model name a request is sent to. `load_adapters` records `adapter name -> served model name`
(`AdapterSource.path` when given, else `AdapterSource.name`, unless `served_names` overrides it)
and checks that GET `{base_url}/models` lists that name; an adapter the server does not serve comes
back as an error entry (its cells are skipped), never as an exception.

Sampling. temperature, top_p, max_tokens and seed are standard fields. `repetition_penalty` is not
an OpenAI field: vLLM honours it as an extra body field, OpenAI proper rejects unknown fields (400)
and `transformers serve` (5.x) rejects them too (422 "Unexpected fields"). With
`extra_sampling=True` (default) it is sent; if the server rejects that field by name, the backend
drops it for the rest of the run, warns once, and records `repetition_penalty_applied: False` in
`info().extra`, so the run manifest says the sampling differed. With `extra_sampling=False` it is
never sent.

Seeds. vLLM seeds each request's sampler from `seed`, independent of concurrency.
`transformers serve` sets the global torch seed when a request arrives, so a seeded request is only
reproducible when requests do not overlap: use `max_concurrency=1` with it. OpenAI treats `seed` as
best effort.

Errors. 429, 5xx and connection errors are retried with exponential backoff. A 4xx that mentions
the context length ("maximum context length", "too long", ...) becomes
`finish_reason="context_overflow"`. Any other persistent error becomes
`GenResult(text="", finish_reason="error", error=...)`: one bad request never kills a run.

Native tools. When a request carries `tools`, they are passed through in the OpenAI
`{"type": "function", "function": {...}}` form, and the `tool_calls` the server returns are turned
back into text: one ```json fence per call holding `{"name": ..., "arguments": {...}}`. The rollout
engine then parses a single format, whichever backend made the text. A vLLM server started
without `--enable-auto-tool-choice --tool-call-parser ...` refuses requests with tools (400);
the backend then resends them with `tool_choice: "none"` (the tools are still rendered into the
prompt by the chat template, and the model's raw text comes back for the tool-call parser), warns
once, and records `server_tool_parsing: False` in `info().extra`.

Structured outputs. A request with `json_schema` sends `response_format: {"type": "json_schema",
"json_schema": {"name": "tool_call", "schema": ...}}` (vLLM and SGLang enforce it with their grammar
backends). A server that ignores the field (`transformers serve` 5.x) returns free text; a finished
reply that is not JSON then becomes an error result, never an unconstrained "constrained" reply.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

try:  # httpx is a declared dependency; httpx2 (its successor, pulled in by huggingface_hub) also fits
    import httpx
except ImportError:  # pragma: no cover - depends on the environment
    import httpx2 as httpx  # type: ignore[no-redef]

from charshift.backends.base import AdapterSource, Backend, BackendInfo, report_progress
from charshift.constrain import response_format
from charshift.schema import GenRequest, GenResult

log = logging.getLogger(__name__)

# Phrases servers use when a prompt does not fit: vLLM ("This model's maximum context length is N
# tokens"), OpenAI ("context_length_exceeded"), llama.cpp / TGI ("exceeds the available context
# size", "Input validation error: ... must be <= ..."), generic "too long".
_CONTEXT_ERROR = re.compile(
    r"context[ _-]?length|maximum context|context (window|size)|too long|max_model_len"
    r"|maximum model length|longer than the maximum|exceeds? the (model'?s? )?(maximum|max|available)",
    re.IGNORECASE,
)
# vLLM without --enable-auto-tool-choice: '"auto" tool choice requires --enable-auto-tool-choice
# and --tool-call-parser to be set'.
_TOOL_CHOICE_ERROR = re.compile(r"auto-tool-choice|tool[ _]choice|tool-call-parser", re.IGNORECASE)
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_MAX_RETRY_AFTER_S = 30.0

ProgressFn = Callable[[int], Any]


def is_context_error(message: str) -> bool:
    """True when a server's error text says the prompt does not fit the model's context."""
    return bool(_CONTEXT_ERROR.search(message or ""))


def as_openai_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """Wrap a bare schema `{"name", "description", "parameters"}` as an OpenAI function tool.

    Schemas already in the `{"type": "function", "function": {...}}` form pass through unchanged.
    """
    if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        return tool
    return {"type": "function", "function": tool}


def tool_calls_to_text(tool_calls: list[dict[str, Any]]) -> str:
    """Render OpenAI `tool_calls` as the JSON protocol text: one ```json fence per call.

    `arguments` arrives as a JSON string. When it parses, the call is re-serialised cleanly; when it
    does not (the model wrote broken JSON), the raw string is kept in place so that the tool-call
    parser downstream sees, and can diagnose, exactly what the model produced.
    """
    blocks: list[str] = []
    for call in tool_calls:
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        name = str(fn.get("name") or "")
        raw = fn.get("arguments")
        if isinstance(raw, dict):
            args: Any = raw
        else:
            raw = "" if raw is None else str(raw)
            try:
                args = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError:
                blocks.append(f'```json\n{{"name": {json.dumps(name)}, "arguments": {raw}}}\n```')
                continue
        payload = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
        blocks.append(f"```json\n{payload}\n```")
    return "\n".join(blocks)


def _check_structured(req: GenRequest, res: GenResult) -> GenResult:
    """A finished reply to a `json_schema` request must be JSON: a server that ignores
    `response_format` (`transformers serve` 5.x only logs a warning) must not pass unconstrained
    text off as constrained."""
    if req.json_schema is None or req.tools or res.finish_reason != "stop":
        return res
    try:
        json.loads(res.text)
    except ValueError:
        res.finish_reason = "error"
        res.error = "the server ignored response_format json_schema: the reply is not JSON"
    return res


def _error_text(response: httpx.Response) -> str:
    """The most informative text of an error response (OpenAI-style JSON or plain text)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:2000]
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            parts = [str(err.get(k)) for k in ("message", "code", "type") if err.get(k)]
            return " | ".join(parts) or json.dumps(err)[:2000]
        if err is not None:
            return str(err)[:2000]
    return json.dumps(data)[:2000]


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying."""


class OpenAIBackend(Backend):
    """Generate through an OpenAI-compatible `/chat/completions` endpoint (see the module docstring).

    `base_url` includes the API prefix, e.g. `http://127.0.0.1:8000/v1`. `api_key` is sent as a
    bearer token when given. `served_names` maps adapter names to served model names where the
    server was started with names that differ from `AdapterSource.path`/`name`. `backoff` is the
    first retry delay in seconds (doubled on each retry). `transport` is for tests (an
    `httpx.MockTransport`).
    """

    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 120,
        retries: int = 3,
        extra_sampling: bool = True,
        served_names: dict[str, str] | None = None,
        backoff: float = 1.0,
        transport: Any = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_concurrency = max_concurrency
        self.retries = max(0, retries)
        self.extra_sampling = extra_sampling
        self.backoff = backoff
        self._served_override = dict(served_names or {})
        self._adapters: dict[str, str] = {}  # adapter name -> served model name
        self._models_cache: dict[str, dict[str, Any]] | None = None
        self._extra_rejected = False
        self._tool_choice_none = False
        self._lock = threading.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=max_concurrency, max_keepalive_connections=max_concurrency
            ),
            transport=transport,
        )

    # ----- models and adapters -------------------------------------------------------------

    def served_models(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """The server's GET /models listing as {id: entry}. Raises httpx errors when unreachable."""
        if self._models_cache is None or refresh:
            response = self._client.get("/models")
            response.raise_for_status()
            entries = response.json().get("data") or []
            self._models_cache = {str(e.get("id")): e for e in entries if isinstance(e, dict)}
        return self._models_cache

    def load_adapters(self, adapters: list[AdapterSource]) -> dict[str, str]:
        """Map each adapter to its served model name; unlisted names come back as errors."""
        errors: dict[str, str] = {}
        if not adapters:
            return errors
        try:
            listed = self.served_models(refresh=True)
        except (httpx.HTTPError, ValueError) as exc:
            msg = f"cannot list models at {self.base_url}/models: {exc}"
            return {a.name: msg for a in adapters}
        for src in adapters:
            served = self._served_override.get(src.name) or src.path or src.name
            if served in listed:
                self._adapters[src.name] = served
                continue
            shown = ", ".join(sorted(listed)) or "none"
            errors[src.name] = (
                f"adapter {src.name!r}: the server at {self.base_url} does not serve a model named "
                f"{served!r} (it serves: {shown}). With vLLM, start the server with "
                f"--enable-lora --lora-modules {served}=<adapter folder>."
            )
        return errors

    def context_length(self) -> int:
        """vLLM's /models entry carries `max_model_len`; other servers fall back to the default."""
        try:
            entry = self.served_models().get(self.model) or {}
        except (httpx.HTTPError, ValueError):
            entry = {}
        value = entry.get("max_model_len")
        return int(value) if isinstance(value, int) and value > 0 else super().context_length()

    # ----- generation ------------------------------------------------------------------------

    def generate(self, requests: list[GenRequest], progress: Any = None) -> list[GenResult]:
        """Send all requests concurrently (at most `max_concurrency` in flight); results in order."""
        results: list[GenResult | None] = [None] * len(requests)
        if not requests:
            return []
        workers = min(self.max_concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="charshift-openai") as pool:
            futures = {pool.submit(self._one, req): i for i, req in enumerate(requests)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except Exception as exc:  # a bug in our own code must not lose the other rows
                    log.exception("unexpected error in request %d", i)
                    results[i] = GenResult(text="", finish_reason="error", error=repr(exc))
                report_progress(progress)
        return [r if r is not None else GenResult("", "error", error="no result") for r in results]

    def _body(self, req: GenRequest, served: str) -> dict[str, Any]:
        s = req.sampling
        body: dict[str, Any] = {
            "model": served,
            "messages": [{k: v for k, v in m.items() if v is not None} for m in req.messages],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": req.seed,
        }
        if self.extra_sampling and not self._extra_rejected:
            body["repetition_penalty"] = s.repetition_penalty
        if req.tools:
            body["tools"] = [as_openai_tool(t) for t in req.tools]
            if self._tool_choice_none:
                body["tool_choice"] = "none"
        if req.json_schema is not None:  # enforced by the server's structured-output backend
            body["response_format"] = response_format(req.json_schema)
        return body

    def _one(self, req: GenRequest) -> GenResult:
        if req.adapter is None:
            served = self.model
        elif req.adapter in self._adapters:
            served = self._adapters[req.adapter]
        else:
            return GenResult(
                text="",
                finish_reason="error",
                error=f"adapter {req.adapter!r} is not loaded (see load_adapters)",
            )
        last_error = "no attempt made"
        attempt = 0
        while attempt <= self.retries:
            body = self._body(req, served)
            try:
                response = self._client.post("/chat/completions", json=body)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                last_error = f"{type(exc).__name__}: {exc}"
                self._sleep(attempt, None)
                attempt += 1
                continue
            if response.status_code == 200:
                try:
                    return _check_structured(req, self._parse(response.json()))
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    return GenResult("", "error", error=f"malformed response: {exc}")
            message = _error_text(response)
            last_error = f"HTTP {response.status_code}: {message}"
            if 400 <= response.status_code < 500 and self._downgrade(body, message):
                continue  # resend in the form the server accepts; not counted as a retry
            if response.status_code in (400, 413, 422) and is_context_error(message):
                return GenResult(text="", finish_reason="context_overflow", error=last_error)
            if response.status_code in _RETRY_STATUS:
                self._sleep(attempt, response.headers.get("retry-after"))
                attempt += 1
                continue
            break  # other 4xx: retrying will not help
        return GenResult(text="", finish_reason="error", error=last_error)

    def _downgrade(self, body: dict[str, Any], message: str) -> bool:
        """Drop a request feature the server refused by name; True when a resend may help."""
        if "repetition_penalty" in body and "repetition_penalty" in message:
            self._warn_once(
                "_extra_rejected", f"rejects the repetition_penalty field ({message[:200]})"
            )
            return True
        if "tools" in body and "tool_choice" not in body and _TOOL_CHOICE_ERROR.search(message):
            self._warn_once("_tool_choice_none", f"cannot parse tool calls ({message[:200]})")
            return True
        return False

    def _warn_once(self, flag: str, what: str) -> None:
        with self._lock:
            if getattr(self, flag):
                return
            setattr(self, flag, True)
        warnings.warn(
            f"{self.base_url} {what}; continuing without it (recorded in the run manifest)",
            RuntimeWarning,
            stacklevel=4,
        )

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        if attempt >= self.retries:
            return  # no further attempt follows
        delay = self.backoff * (2**attempt)
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), _MAX_RETRY_AFTER_S))
            except ValueError:
                pass
        time.sleep(delay)

    @staticmethod
    def _parse(data: dict[str, Any]) -> GenResult:
        choice = data["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") or ""
        calls = message.get("tool_calls") or []
        if calls:
            rendered = tool_calls_to_text(calls)
            text = f"{text}\n{rendered}" if text.strip() else rendered
        usage = data.get("usage") or {}
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return GenResult(
            text=text,
            finish_reason=finish,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )

    # ----- provenance ------------------------------------------------------------------------

    def info(self) -> BackendInfo:
        listed = self._models_cache or {}
        adapters = {
            name: {"served_model": served, "listing": listed.get(served, {})}
            for name, served in self._adapters.items()
        }
        return BackendInfo(
            kind=self.kind,
            model=self.model,
            model_revision=None,
            adapters=adapters,
            extra={
                "base_url": self.base_url,
                "server_model_entry": listed.get(self.model, {}),
                "extra_sampling": self.extra_sampling,
                "repetition_penalty_applied": self.extra_sampling and not self._extra_rejected,
                "server_tool_parsing": not self._tool_choice_none,
                "max_concurrency": self.max_concurrency,
            },
        )

    def close(self) -> None:
        self._client.close()
