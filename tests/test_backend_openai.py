"""OpenAIBackend against a tiny stdlib HTTP stub: retries, error mapping, tool calls, order.

The stub runs in a thread on 127.0.0.1; each test installs a `reply(body, n)` function that
decides the status and JSON for the n-th chat request. No network beyond loopback.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import warnings
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from charshift.backends.base import AdapterSource
from charshift.backends.openai import OpenAIBackend, is_context_error, tool_calls_to_text
from charshift.schema import GenRequest, Sampling

BASE = "base-model"
VLLM_CONTEXT_ERROR = (
    "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
    "(4000 in the messages, 1000 in the completion). Please reduce the length of the messages "
    "or completion."
)

Reply = Callable[[dict[str, Any], int], tuple[int, dict[str, Any]]]


def completion(text: str | None, finish: str = "stop", tool_calls: list | None = None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


def echo(body: dict[str, Any], n: int) -> tuple[int, dict[str, Any]]:
    return 200, completion(f"{body['model']}: {body['messages'][-1]['content']}")


class Stub:
    def __init__(self) -> None:
        self.reply: Reply = echo
        self.models: list[dict[str, Any]] = [{"id": BASE, "object": "model", "max_model_len": 4096}]
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the client gave up (a timeout test)
                    pass

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": stub.models})
                else:
                    self._send(404, {"detail": "not found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                with stub.lock:
                    stub.bodies.append(body)
                    stub.headers.append(dict(self.headers))
                    n = len(stub.bodies)
                status, payload = stub.reply(body, n)
                self._send(status, payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def backend(stub: Stub, **kw: Any) -> OpenAIBackend:
    kw.setdefault("backoff", 0.001)
    return OpenAIBackend(stub.url, BASE, **kw)


def req(text: str, **kw: Any) -> GenRequest:
    return GenRequest(messages=[{"role": "user", "content": text}], **kw)


def test_body_carries_sampling_seed_and_auth(stub):
    b = backend(stub, api_key="sk-test")
    s = Sampling(temperature=0.3, top_p=0.8, max_tokens=17, repetition_penalty=1.2)
    [res] = b.generate([req("hi", sampling=s, seed=42)])
    assert res.finish_reason == "stop" and res.text == f"{BASE}: hi"
    assert (res.prompt_tokens, res.completion_tokens) == (7, 3)
    body = stub.bodies[0]
    assert body["model"] == BASE
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (
        0.3,
        0.8,
        17,
        42,
    )
    assert body["repetition_penalty"] == 1.2
    assert "tools" not in body
    assert stub.headers[0]["Authorization"] == "Bearer sk-test"


def test_extra_sampling_off_sends_no_repetition_penalty(stub):
    b = backend(stub, extra_sampling=False)
    b.generate([req("hi")])
    assert "repetition_penalty" not in stub.bodies[0]
    assert b.info().extra["repetition_penalty_applied"] is False


def test_rejected_repetition_penalty_is_dropped_and_recorded(stub):
    # transformers serve answers 422 "Unexpected fields in the request: {'repetition_penalty'}".
    def reply(body, n):
        if "repetition_penalty" in body:
            return 422, {"detail": "Unexpected fields in the request: {'repetition_penalty'}"}
        return echo(body, n)

    stub.reply = reply
    b = backend(stub, retries=0)
    assert b.info().extra["repetition_penalty_applied"] is True
    with pytest.warns(RuntimeWarning, match="repetition_penalty"):
        first = b.generate([req("a")])
    assert first[0].text == f"{BASE}: a"  # resent without the field even with retries=0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        second = b.generate([req("b"), req("c")])
    assert [r.text for r in second] == [f"{BASE}: b", f"{BASE}: c"]
    assert [("repetition_penalty" in body) for body in stub.bodies] == [True, False, False, False]
    assert b.info().extra["repetition_penalty_applied"] is False


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retries_transient_errors_then_succeeds(stub, status):
    stub.reply = lambda body, n: (
        (status, {"error": {"message": "busy"}}) if n <= 2 else echo(body, n)
    )
    [res] = backend(stub, retries=3).generate([req("x")])
    assert res.finish_reason == "stop" and res.text == f"{BASE}: x"
    assert len(stub.bodies) == 3


def test_persistent_server_error_becomes_error_result(stub):
    stub.reply = lambda body, n: (500, {"error": {"message": "CUDA out of memory"}})
    [res] = backend(stub, retries=2).generate([req("x")])
    assert res.finish_reason == "error" and res.text == ""
    assert "HTTP 500" in res.error and "CUDA out of memory" in res.error
    assert len(stub.bodies) == 3  # one try + two retries


def _from_settings(stub: Stub, **settings: Any) -> OpenAIBackend:
    """The backend a run config builds (`backend: {kind: openai, ...}`), through the registry."""
    from charshift.backends.registry import BackendContext, make_backend
    from charshift.backends.settings import OpenAISettings

    cfg = OpenAISettings(base_url=stub.url, **settings)
    return make_backend(cfg, BackendContext(BASE, None, "b", 0, Path(".")))  # type: ignore[return-value]


def test_timeout_retries_and_backoff_come_from_the_config(stub):
    """A reply slower than `backend.timeout_s` is a timeout, retried `backend.retries` times
    after `backend.backoff_s`; a long enough timeout lets the same reply through."""
    slow = {1, 2, 3}  # these requests answer after 1.5 s

    def reply(body, n):
        if n in slow:
            time.sleep(1.5)
        return echo(body, n)

    stub.reply = reply
    b = _from_settings(stub, timeout_s=0.3, retries=1, backoff_s=0.2)
    t0 = time.monotonic()
    [res] = b.generate([req("x")])
    b.close()
    assert res.finish_reason == "error" and "ReadTimeout" in res.error
    assert len(stub.bodies) == 2 and time.monotonic() - t0 >= 0.8  # 2 x 0.3 s + 0.2 s backoff
    b = _from_settings(stub, timeout_s=0.3, retries=2, backoff_s=0.0)
    [res] = b.generate([req("x")])  # the 3rd request: retried once, then answered
    b.close()
    assert res.finish_reason == "stop" and len(stub.bodies) == 4
    b = _from_settings(stub, timeout_s=5)
    slow.add(5)
    [res] = b.generate([req("x")])
    b.close()
    assert res.finish_reason == "stop" and len(stub.bodies) == 5


def test_connection_refused_is_an_error_result_not_an_exception():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    b = OpenAIBackend(f"http://127.0.0.1:{port}/v1", BASE, retries=1, backoff=0.001, timeout=5)
    results = b.generate([req("a"), req("b")])
    assert [r.finish_reason for r in results] == ["error", "error"]
    assert all("Connect" in r.error for r in results)


@pytest.mark.parametrize(
    "status,payload",
    [
        (400, {"object": "error", "message": VLLM_CONTEXT_ERROR, "code": 400}),
        (400, {"error": {"message": "context_length_exceeded", "type": "invalid_request_error"}}),
        (400, {"detail": "Prompt is too long for this model"}),
    ],
)
def test_context_length_error_maps_to_context_overflow(stub, status, payload):
    stub.reply = lambda body, n: (
        (status, payload) if "long" in body["messages"][-1]["content"] else echo(body, n)
    )
    results = backend(stub, retries=3).generate([req("short"), req("a long one"), req("short 2")])
    assert [r.finish_reason for r in results] == ["stop", "context_overflow", "stop"]
    assert results[1].text == ""
    assert len(stub.bodies) == 3  # the overflow is not retried


def test_other_client_error_is_not_retried(stub):
    stub.reply = lambda body, n: (400, {"error": {"message": "messages: field required"}})
    [res] = backend(stub, retries=3).generate([req("x")])
    assert res.finish_reason == "error" and "field required" in res.error
    assert len(stub.bodies) == 1


def test_is_context_error_phrases():
    assert is_context_error(VLLM_CONTEXT_ERROR)
    assert is_context_error(
        "The decoder prompt (length 9000) is longer than the maximum model length of 8192."
    )
    assert not is_context_error("Invalid value for temperature")


def test_tool_calls_become_json_fenced_text(stub):
    calls = [
        {
            "id": "c1",
            "type": "function",
            "function": {
                "name": "send_email",
                "arguments": json.dumps({"to": "a@b.com", "body": "Hi\nthere"}),
            },
        },
        {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": "{}"}},
    ]
    stub.reply = lambda body, n: (200, completion(None, "tool_calls", calls))
    tools = [{"name": "send_email", "description": "Send it", "parameters": {"type": "object"}}]
    [res] = backend(stub).generate([req("write", tools=tools)])
    assert stub.bodies[0]["tools"] == [{"type": "function", "function": tools[0]}]
    assert res.finish_reason == "stop"
    fences = res.text.split("```json\n")[1:]
    parsed = [json.loads(f.split("\n```")[0]) for f in fences]
    assert parsed == [
        {"name": "send_email", "arguments": {"to": "a@b.com", "body": "Hi\nthere"}},
        {"name": "lookup", "arguments": {}},
    ]


def test_tool_call_text_keeps_content_and_broken_arguments():
    text = tool_calls_to_text(
        [{"function": {"name": "send_email", "arguments": '{"to": "x", body: oops}'}}]
    )
    assert text == '```json\n{"name": "send_email", "arguments": {"to": "x", body: oops}}\n```'
    wrapped = {"type": "function", "function": {"name": "f", "parameters": {}}}
    assert OpenAIBackend._parse(
        completion("Sure.", "tool_calls", [{"function": {"name": "f", "arguments": {}}}])
    ).text == ('Sure.\n```json\n{"name": "f", "arguments": {}}\n```')
    from charshift.backends.openai import as_openai_tool

    assert as_openai_tool(wrapped) is wrapped


def test_order_preserved_when_requests_finish_out_of_order(stub):
    # Request "0" is held until request "7" has arrived, so "0" finishes last: this only
    # completes quickly, and in order, if requests really run concurrently.
    last_arrived = threading.Event()

    def reply(body, n):
        prompt = body["messages"][-1]["content"]
        if prompt == "7":
            last_arrived.set()
        if prompt == "0":
            last_arrived.wait(timeout=10)
        return echo(body, n)

    stub.reply = reply
    ticks: list[int] = []
    results = backend(stub, max_concurrency=8).generate(
        [req(str(i)) for i in range(8)], progress=ticks.append
    )
    assert last_arrived.is_set()
    assert [r.text for r in results] == [f"{BASE}: {i}" for i in range(8)]
    assert sum(ticks) == 8


def test_adapters_map_to_served_names_and_unlisted_ones_are_errors(stub):
    stub.models.append(
        {"id": "full/sarcasm", "object": "model", "parent": BASE, "root": "/ad/sarcasm"}
    )
    stub.models.append({"id": "served-humor", "object": "model", "parent": BASE})
    b = backend(stub, served_names={"full/humor": "served-humor"})
    errors = b.load_adapters(
        [
            AdapterSource(name="full/sarcasm", repo="maius/x", subfolder="sarcasm"),
            AdapterSource(name="full/humor"),
            AdapterSource(name="full/misalignment", repo="maius/x", subfolder="misalignment"),
        ]
    )
    assert list(errors) == ["full/misalignment"]
    assert (
        "full/misalignment" in errors["full/misalignment"]
        and "--lora-modules" in errors["full/misalignment"]
    )
    results = b.generate(
        [
            req("a", adapter="full/sarcasm"),
            req("b"),
            req("c", adapter="full/humor"),
            req("d", adapter="full/misalignment"),
        ]
    )
    assert [r.text for r in results[:3]] == ["full/sarcasm: a", f"{BASE}: b", "served-humor: c"]
    assert results[3].finish_reason == "error" and "not loaded" in results[3].error
    assert sorted(body["model"] for body in stub.bodies) == [BASE, "full/sarcasm", "served-humor"]
    info = b.info()
    assert info.adapters["full/sarcasm"]["served_model"] == "full/sarcasm"
    assert info.adapters["full/sarcasm"]["listing"]["root"] == "/ad/sarcasm"


def test_adapter_path_is_the_served_name(stub):
    stub.models.append({"id": "/models/sarcasm", "object": "model"})
    b = backend(stub)
    assert b.load_adapters([AdapterSource(name="full/sarcasm", path="/models/sarcasm")]) == {}
    b.generate([req("a", adapter="full/sarcasm")])
    assert stub.bodies[0]["model"] == "/models/sarcasm"


def test_unreachable_server_gives_adapter_errors_not_exceptions():
    b = OpenAIBackend("http://127.0.0.1:9/v1", BASE, timeout=2)
    errors = b.load_adapters([AdapterSource(name="full/sarcasm")])
    assert "cannot list models" in errors["full/sarcasm"]


def test_context_length_from_models_listing(stub):
    assert backend(stub).context_length() == 4096
    stub.models[0].pop("max_model_len")
    assert backend(stub).context_length() == 8192  # the Backend default


def test_length_finish_reason_and_info(stub):
    stub.reply = lambda body, n: (200, completion("abc", "length"))
    b = backend(stub)
    [res] = b.generate([req("x")])
    assert res.finish_reason == "length"
    info = b.info()
    assert info.kind == "openai" and info.model == BASE
    assert info.extra["base_url"] == stub.url
    assert b.generate([]) == []


def test_server_without_tool_parser_gets_tool_choice_none(stub):
    # vLLM started without --enable-auto-tool-choice refuses requests that carry tools.
    def reply(body, n):
        if "tools" in body and body.get("tool_choice") != "none":
            msg = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            return 400, {"object": "error", "message": msg, "code": 400}
        return 200, completion('<tool_call>{"name": "send_email", "arguments": {}}</tool_call>')

    stub.reply = reply
    tools = [{"name": "send_email", "description": "Send it", "parameters": {"type": "object"}}]
    b = backend(stub, retries=0)
    with pytest.warns(RuntimeWarning, match="tool calls"):
        [res] = b.generate([req("write", tools=tools)])
    assert res.finish_reason == "stop" and "<tool_call>" in res.text  # raw text for the parser
    assert [body.get("tool_choice") for body in stub.bodies] == [None, "none"]
    assert stub.bodies[1]["tools"] == [{"type": "function", "function": tools[0]}]
    assert b.info().extra["server_tool_parsing"] is False
    b.generate([req("plain")])
    assert "tool_choice" not in stub.bodies[-1]  # requests without tools are unchanged


# ----- adapter selection, sampling fields and finish reasons against engine-like fakes ----------


@pytest.fixture
def model_folder(tmp_path):
    """A model folder whose generation_config.json recommends non-neutral sampling (as many do)."""
    folder = tmp_path / "base-model"
    folder.mkdir()
    (folder / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05})
    )
    return str(folder)


@pytest.fixture
def fake_engine(model_folder):
    from fake_lora_server import FakeLoraServer

    servers = []

    def start(flavor: str, **kw: Any) -> FakeLoraServer:
        loras = {"full/sarcasm": "/adapters/sarcasm", "full/humor": "/adapters/humor"}
        server = FakeLoraServer(flavor, model_folder, loras, **kw).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.close()


def test_fake_sglang_runs_the_base_model_for_a_bare_adapter_name(fake_engine, model_folder):
    # What the source reading found: SGLang parses `model` as BASE[:ADAPTER]; a bare adapter name
    # has no colon, so the base model runs and nothing says so.
    import httpx

    server = fake_engine("sglang")
    msgs = [{"role": "user", "content": "hi"}]
    for model, ran in [
        ("full/sarcasm", "[base]"),
        (f"{model_folder}:full/sarcasm", "[full/sarcasm]"),
        ("anything:full/humor", "[full/humor]"),
    ]:
        reply = httpx.post(
            f"{server.url}/chat/completions", json={"model": model, "messages": msgs}
        )
        assert reply.json()["choices"][0]["message"]["content"].startswith(ran)
    bad = httpx.post(f"{server.url}/chat/completions", json={"model": "x:ghost", "messages": msgs})
    assert bad.status_code == 400 and "not loaded" in bad.text


@pytest.mark.parametrize(
    "flavor,syntax,used,sent,ran",
    [
        ("sglang", "auto", "base:adapter", "{base}:full/sarcasm", "full/sarcasm"),
        ("sglang", "base:adapter", "base:adapter", "{base}:full/sarcasm", "full/sarcasm"),
        ("sglang", "model", "model", "full/sarcasm", None),  # the silent failure of a bare name
        ("vllm", "auto", "model", "full/sarcasm", "full/sarcasm"),
        ("vllm", "model", "model", "full/sarcasm", "full/sarcasm"),
    ],
)
def test_adapter_selection_per_engine(fake_engine, model_folder, flavor, syntax, used, sent, ran):
    server = fake_engine(flavor)
    b = OpenAIBackend(server.url, model_folder, adapter_syntax=syntax, backoff=0.001)
    assert b.load_adapters([AdapterSource(name="full/sarcasm")]) == {}
    results = b.generate([req("a", adapter="full/sarcasm"), req("b")])
    assert sorted(body["model"] for body in server.bodies) == sorted(
        [sent.format(base=model_folder), model_folder]
    )
    assert results[0].text.startswith(f"[{ran or 'base'}]")
    assert results[1].text.startswith("[base]")
    assert b.info().extra["adapter_syntax"] == used
    b.close()


def test_every_sampling_field_is_sent_so_server_defaults_never_apply(fake_engine, model_folder):
    # A vLLM server started WITHOUT --generation-config vllm fills unsent fields from the model's
    # generation_config.json (top_k=20, min_p=0.05 here). The backend sends every field, so the
    # server samples exactly as vLLM offline would (top_k off, min_p 0).
    server = fake_engine("vllm", generation_config_defaults=True)
    s = Sampling(temperature=0.7, top_p=0.95, max_tokens=5, repetition_penalty=1.1)
    b = OpenAIBackend(server.url, model_folder, backoff=0.001)
    b.generate([req("x", sampling=s, seed=3)])
    body = server.bodies[-1]
    assert {k: body[k] for k in ("temperature", "top_p", "max_tokens", "seed")} == {
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 5,
        "seed": 3,
    }
    assert (body["top_k"], body["min_p"], body["repetition_penalty"]) == (-1, 0.0, 1.1)
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.0, 0.0)
    # Without the extra fields the same server would have sampled with the model's defaults:
    b2 = OpenAIBackend(server.url, model_folder, extra_sampling=False, backoff=0.001)
    b2.generate([req("x", sampling=s, seed=3)])
    assert server.effective_sampling(server.bodies[-1])["top_k"] == 20
    assert server.effective_sampling(body)["top_k"] == -1
    b.close()
    b2.close()


def test_all_extra_fields_dropped_when_a_server_refuses_them(stub):
    # transformers serve: 422 "Unexpected fields in the request: {'top_k', 'min_p', ...}".
    def reply(body, n):
        extra = sorted(k for k in ("repetition_penalty", "top_k", "min_p") if k in body)
        if extra:
            return 422, {"detail": f"Unexpected fields in the request: {set(extra)}"}
        return echo(body, n)

    stub.reply = reply
    b = backend(stub, retries=0)
    with pytest.warns(RuntimeWarning, match="top_k"):
        [res] = b.generate([req("a")])
    assert res.text == f"{BASE}: a"
    assert not any(k in stub.bodies[-1] for k in ("repetition_penalty", "top_k", "min_p"))
    assert b.info().extra["repetition_penalty_applied"] is False


@pytest.mark.parametrize(
    "server_reason,ours,has_error",
    [
        ("stop", "stop", False),
        ("tool_calls", "stop", False),
        ("length", "length", False),
        ("abort", "abort", False),
        ("error", "error", False),
        ("repetition", "repetition", False),
        ("content_filter", "abort", False),
        ("something_new", "error", True),
    ],
)
def test_finish_reasons_are_kept(stub, server_reason, ours, has_error):
    stub.reply = lambda body, n: (200, completion("text", server_reason))
    [res] = backend(stub).generate([req("x")])
    assert res.finish_reason == ours
    assert (res.error is not None) == has_error
    if has_error:
        assert "something_new" in res.error


def test_submit_returns_at_once_and_bounds_requests_in_flight(stub):
    gate = threading.Event()
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def reply(body, n):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        gate.wait(timeout=10)
        with lock:
            state["now"] -= 1
        return echo(body, n)

    stub.reply = reply
    b = backend(stub, max_in_flight=3)
    futures = [b.submit(req(str(i))) for i in range(10)]  # returns before any reply
    deadline = time.monotonic() + 10
    while state["now"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # room for a 4th request to arrive, were the bound not kept
    assert state["now"] == 3 and not any(f.done() for f in futures)
    gate.set()
    assert [f.result(timeout=20).text for f in futures] == [f"{BASE}: {i}" for i in range(10)]
    assert state["peak"] == 3
    assert b.async_capable
    b.close()


def test_json_schema_is_sent_as_response_format(stub):
    from charshift.constrain import tool_call_schema
    from charshift.formats import TOOL_SPECS

    schema = tool_call_schema(TOOL_SPECS)
    call = '{"name": "finish", "arguments": {}}'
    stub.reply = lambda body, n: (200, completion(call if "response_format" in body else "prose"))
    b = backend(stub, max_concurrency=1)
    free, tool = b.generate([req("hi"), req("call a tool", json_schema=schema)])
    assert "response_format" not in stub.bodies[0]
    assert stub.bodies[1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "tool_call", "schema": schema},
    }
    assert (free.text, tool.text, tool.finish_reason) == ("prose", call, "stop")


def test_server_that_ignores_response_format_gives_an_error_not_free_text(stub):
    stub.reply = lambda body, n: (200, completion("Sure! Here is the email: ..."))
    [res] = backend(stub).generate([req("x", json_schema={"type": "object"})])
    assert res.finish_reason == "error" and "response_format" in res.error
