"""A backend for any OpenAI-compatible chat server: vLLM (`vllm serve`), `transformers serve`, OpenAI.

Why a server backend at all: a long run on a GPU box is easiest to operate as one long-lived server
(`vllm serve MODEL --enable-lora --lora-modules full/sarcasm=/path ...`) that several runs share.
Each request is one POST to `{base_url}/chat/completions`; requests run concurrently on a small
thread pool and come back in request order, whatever order they finish in.

Adapters. An OpenAI-compatible server has no standard per-request adapter argument, and the two
LoRA servers select an adapter differently (read from their sources):
  - vLLM (`--lora-modules NAME=PATH`) serves each adapter as a model name of its own: the request
    names the adapter, `model: "NAME"` (`adapter_syntax="model"`);
  - SGLang (`--lora-paths NAME=PATH`, 0.5.x) selects an adapter only by `model: "BASE:NAME"` (or a
    `lora_path` body field); a bare `model: "NAME"` has no colon, so SGLang parses it as a base
    model name and SILENTLY RUNS THE BASE MODEL (`adapter_syntax="base:adapter"`).
`adapter_syntax="auto"` (default) picks "base:adapter" when the server's /models listing says it
is SGLang (`owned_by: "sglang"`), else "model". `load_adapters` records `adapter name -> served
adapter name` (`AdapterSource.path` when given, else `AdapterSource.name`, unless `served_names`
overrides it) and checks that GET `{base_url}/models` lists that name (both servers list their
adapters there); an adapter the server does not serve comes back as an error entry (its cells
are skipped), never as an exception. The adapter probe (charshift.adapter_probe) then checks that
each adapter really changes the output.

Sampling. Every sampling field is sent explicitly, so a server and vLLM offline sample alike: a
field left out is filled from the model's generation_config by vLLM's server (unless started
with `--generation-config vllm`) and by SGLang (unless `--sampling-defaults openai`). Standard
fields: temperature, top_p, max_tokens, seed, presence_penalty=0, frequency_penalty=0. Extra
fields (not OpenAI's; vLLM and SGLang accept them): repetition_penalty, top_k=-1 (off; both
engines accept -1) and min_p=0. OpenAI proper rejects unknown fields (400) and
`transformers serve` (5.x) rejects them too (422 "Unexpected fields"). With `extra_sampling=True`
(default) they are sent; if the server rejects any of them by name, the backend drops them for
the rest of the run, warns once, and records `repetition_penalty_applied: False` in
`info().extra`, so the run manifest says the sampling differed. With `extra_sampling=False` they
are never sent.

Concurrency. Requests run on an asyncio loop in a background thread with one `httpx.AsyncClient`.
`generate` sends a batch with at most `max_concurrency` requests in flight; `submit` sends one
request and returns a `concurrent.futures.Future` at once (at most `max_in_flight` outstanding),
which is what the streaming rollout driver uses (`async_capable = True`).

Finish reasons. "stop", "tool_calls" and "function_call" are "stop"; "length", "abort", "error"
and "repetition" (vLLM's) are kept as they are; "content_filter" (OpenAI) is "abort"; anything
else is an "error" result naming the reason.

Seeds. vLLM seeds each request's sampler from `seed`, independent of concurrency (identical text
across batch mixes also needs `VLLM_BATCH_INVARIANT=1`; SGLang needs
`--enable-deterministic-inference`).
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

import asyncio
import json
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Literal

try:  # httpx is a declared dependency; httpx2 (its successor, pulled in by huggingface_hub) also fits
    import httpx
except ImportError:  # pragma: no cover - depends on the environment
    import httpx2 as httpx  # type: ignore[no-redef]

from charshift.backends.base import AdapterSource, Backend, BackendInfo, report_progress
from charshift.backends.settings import OpenAISettings as Settings
from charshift.constrain import response_format
from charshift.schema import GenRequest, GenResult

if TYPE_CHECKING:
    from charshift.backends.registry import BackendContext

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
# Sampling fields that are not OpenAI's: sent with `extra_sampling`, dropped if the server refuses
# them. top_k=-1 and min_p=0 switch both filters off in vLLM and SGLang alike.
_EXTRA_FIELDS = ("repetition_penalty", "top_k", "min_p")
_FINISH = {
    "stop": "stop",
    "tool_calls": "stop",
    "function_call": "stop",
    None: "stop",
    "length": "length",
    "abort": "abort",
    "error": "error",
    "repetition": "repetition",
    "content_filter": "abort",
}
AdapterSyntax = Literal["auto", "model", "base:adapter"]
ADAPTER_SYNTAXES: tuple[str, ...] = ("auto", "model", "base:adapter")

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


class _LoopThread:
    """An asyncio event loop running in a daemon thread; coroutines are handed to it from any
    thread and come back as `concurrent.futures.Future`s."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class OpenAIBackend(Backend):
    """Generate through an OpenAI-compatible `/chat/completions` endpoint (see the module docstring).

    `base_url` includes the API prefix, e.g. `http://127.0.0.1:8000/v1`. `api_key` is sent as a
    bearer token when given. `served_names` maps adapter names to served adapter names where the
    server was started with names that differ from `AdapterSource.path`/`name`. `adapter_syntax`
    says how a request selects an adapter (see the module docstring). `backoff` is the first retry
    delay in seconds (doubled on each retry). `transport` is for tests (an `httpx.MockTransport`).
    """

    kind = "openai"
    async_capable = True

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_concurrency: int = 8,
        max_in_flight: int = 256,
        timeout: float = 120,
        retries: int = 3,
        extra_sampling: bool = True,
        served_names: dict[str, str] | None = None,
        adapter_syntax: AdapterSyntax = "auto",
        backoff: float = 1.0,
        transport: Any = None,
    ) -> None:
        if max_concurrency < 1 or max_in_flight < 1:
            raise ValueError("max_concurrency and max_in_flight must be >= 1")
        if adapter_syntax not in ADAPTER_SYNTAXES:
            raise ValueError(f"adapter_syntax must be one of {ADAPTER_SYNTAXES}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.retries = max(0, retries)
        self.extra_sampling = extra_sampling
        self.adapter_syntax: str = adapter_syntax
        self.backoff = backoff
        self._served_override = dict(served_names or {})
        self._adapters: dict[str, str] = {}  # adapter name -> served adapter name
        self._models_cache: dict[str, dict[str, Any]] | None = None
        self._extra_rejected = False
        self._tool_choice_none = False
        self._lock = threading.Lock()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        self._client = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=timeout, transport=transport
        )
        self._loop: _LoopThread | None = None
        self._aclient: Any = None  # httpx.AsyncClient, created on the loop thread
        self._in_flight: asyncio.Semaphore | None = None

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
        """Map each adapter to its served name; unlisted names come back as errors."""
        errors: dict[str, str] = {}
        if not adapters:
            return errors
        try:
            listed = self.served_models(refresh=True)
        except (httpx.HTTPError, ValueError) as exc:
            msg = f"cannot list models at {self.base_url}/models: {exc}"
            return {a.name: msg for a in adapters}
        if self.adapter_syntax == "auto":
            self.adapter_syntax = detect_adapter_syntax(listed, self.model)
        for src in adapters:
            served = self._served_override.get(src.name) or src.path or src.name
            if served in listed:
                self._adapters[src.name] = served
                continue
            shown = ", ".join(sorted(listed)) or "none"
            errors[src.name] = (
                f"adapter {src.name!r}: the server at {self.base_url} does not serve a model named "
                f"{served!r} (it serves: {shown}). Start vLLM with --enable-lora --lora-modules "
                f"{served}=<adapter folder>, or SGLang with --lora-paths {served}=<adapter folder>."
            )
        return errors

    def model_field(self, adapter: str | None) -> str | None:
        """The `model` value that selects `adapter` (None: the base) on this server; None when
        the adapter is not loaded."""
        if adapter is None:
            return self.model
        served = self._adapters.get(adapter)
        if served is None:
            return None
        return f"{self.model}:{served}" if self.adapter_syntax == "base:adapter" else served

    def context_length(self) -> int:
        """vLLM's and SGLang's /models entries carry `max_model_len`; others get the default."""
        try:
            entry = self.served_models().get(self.model) or {}
        except (httpx.HTTPError, ValueError):
            entry = {}
        value = entry.get("max_model_len")
        return int(value) if isinstance(value, int) and value > 0 else super().context_length()

    # ----- the event loop ----------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        """Hand a coroutine to the backend's loop thread, starting the loop on first use."""
        with self._lock:
            if self._loop is None:
                self._loop = _LoopThread("charshift-openai")
                self._loop.submit(self._open()).result()
        return self._loop.submit(coro)

    async def _open(self) -> None:
        n = max(self.max_concurrency, self.max_in_flight)
        self._aclient = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            # no pool timeout: a request waiting for a connection is not a slow server
            timeout=httpx.Timeout(self.timeout, pool=None),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            transport=self._transport,
        )
        self._in_flight = asyncio.Semaphore(self.max_in_flight)

    # ----- generation ------------------------------------------------------------------------

    def generate(self, requests: list[GenRequest], progress: Any = None) -> list[GenResult]:
        """Send all requests concurrently (at most `max_concurrency` in flight); results in order."""
        if not requests:
            return []
        return self._run(self._generate_all(requests, progress)).result()

    def submit(self, request: GenRequest) -> Future[GenResult]:
        """Send one request now; the future resolves when its reply arrives."""
        return self._run(self._submitted(request))

    async def _submitted(self, req: GenRequest) -> GenResult:
        assert self._in_flight is not None
        async with self._in_flight:
            return await self._guarded(req)

    async def _generate_all(self, requests: list[GenRequest], progress: Any) -> list[GenResult]:
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(req: GenRequest) -> GenResult:
            async with gate:
                res = await self._guarded(req)
            report_progress(progress)
            return res

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _guarded(self, req: GenRequest) -> GenResult:
        try:
            return await self._one(req)
        except Exception as exc:  # a bug in our own code must not lose the other rows
            log.exception("unexpected error in a chat request")
            return GenResult(text="", finish_reason="error", error=repr(exc))

    def _body(self, req: GenRequest, model: str) -> dict[str, Any]:
        s = req.sampling
        body: dict[str, Any] = {
            "model": model,
            "messages": [{k: v for k, v in m.items() if v is not None} for m in req.messages],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": req.seed,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
        }
        if self.extra_sampling and not self._extra_rejected:
            body.update(repetition_penalty=s.repetition_penalty, top_k=-1, min_p=0.0)
        if req.tools:
            body["tools"] = [as_openai_tool(t) for t in req.tools]
            if self._tool_choice_none:
                body["tool_choice"] = "none"
        if req.json_schema is not None:  # enforced by the server's structured-output backend
            body["response_format"] = response_format(req.json_schema)
        return body

    async def _one(self, req: GenRequest) -> GenResult:
        model = self.model_field(req.adapter)
        if model is None:
            return GenResult(
                text="",
                finish_reason="error",
                error=f"adapter {req.adapter!r} is not loaded (see load_adapters)",
            )
        last_error = "no attempt made"
        attempt = 0
        while attempt <= self.retries:
            body = self._body(req, model)
            try:
                response = await self._aclient.post("/chat/completions", json=body)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                last_error = f"{type(exc).__name__}: {exc}"
                await self._sleep(attempt, None)
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
                await self._sleep(attempt, response.headers.get("retry-after"))
                attempt += 1
                continue
            break  # other 4xx: retrying will not help
        return GenResult(text="", finish_reason="error", error=last_error)

    def _downgrade(self, body: dict[str, Any], message: str) -> bool:
        """Drop a request feature the server refused by name; True when a resend may help."""
        refused = [f for f in _EXTRA_FIELDS if f in body and f in message]
        if refused:
            self._warn_once(
                "_extra_rejected",
                f"rejects the sampling field(s) {refused} ({message[:200]})",
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
            stacklevel=2,
        )

    async def _sleep(self, attempt: int, retry_after: str | None) -> None:
        if attempt >= self.retries:
            return  # no further attempt follows
        delay = self.backoff * (2**attempt)
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), _MAX_RETRY_AFTER_S))
            except ValueError:
                pass
        await asyncio.sleep(delay)

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
        reason = choice.get("finish_reason")
        finish = _FINISH.get(reason)
        return GenResult(
            text=text,
            finish_reason=finish or "error",  # type: ignore[arg-type]
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            error=None if finish else f"unknown finish_reason {reason!r} from the server",
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
                "adapter_syntax": self.adapter_syntax,
                "extra_sampling": self.extra_sampling,
                "repetition_penalty_applied": self.extra_sampling and not self._extra_rejected,
                "server_tool_parsing": not self._tool_choice_none,
                "max_concurrency": self.max_concurrency,
                "max_in_flight": self.max_in_flight,
            },
        )

    def close(self) -> None:
        self._client.close()
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            if self._aclient is not None:
                loop.submit(self._aclient.aclose()).result(timeout=30)
            loop.stop()
            self._aclient = None


def client_options(settings: Any) -> dict[str, Any]:
    """The client's keyword arguments from a kind's settings (openai and server share them)."""
    return {
        "api_key": os.environ.get(settings.api_key_env),
        "max_concurrency": settings.max_concurrency,
        "max_in_flight": settings.max_in_flight,
        "retries": settings.retries,
        "backoff": settings.backoff_s,
        "timeout": settings.timeout_s,
    }


def from_config(settings: Settings, context: BackendContext) -> OpenAIBackend:
    """The backend of `backend: {kind: openai, ...}` for one base of a run (backends/registry.py)."""
    return OpenAIBackend(
        settings.base_url,
        context.model,
        adapter_syntax=settings.adapter_syntax,
        **client_options(settings),
    )


def detect_adapter_syntax(listed: dict[str, dict[str, Any]], model: str) -> str:
    """ "base:adapter" when the /models listing comes from SGLang (its model cards say
    `owned_by: "sglang"`), else "model" (vLLM and the rest name an adapter as its own model)."""
    entry = listed.get(model) or next(iter(listed.values()), {})
    return "base:adapter" if entry.get("owned_by") == "sglang" else "model"
