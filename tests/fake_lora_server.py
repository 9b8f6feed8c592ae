"""A fake LoRA-serving OpenAI server that behaves like vLLM 0.33.0 or SGLang 0.5.23 where charshift
depends on them (vLLM and SGLang cannot run here). Used in-process (`FakeLoraServer`) by
test_backend_openai.py and test_adapter_probe.py, and as a subprocess (`python
fake_lora_server.py vllm|sglang ARGS`, with the real engines' command-line flags) by
test_server_backend.py, through a fake `vllm` executable and a fake `sglang.launch_server` module.

Behaviour reproduced, read from the engines' sources:
  - vLLM (`vllm serve MODEL --enable-lora --lora-modules NAME=PATH ...`): each adapter is a model
    name of its own; a request for an unknown model is a 404. `--max-lora-rank` must be one of
    1, 8, 16, 32, 64, 128, 256, 320, 512 and `--max-cpu-loras >= --max-loras`; an adapter whose
    rank exceeds `--max-lora-rank` (or a folder without adapter_config.json) makes startup fail.
    Unless started with `--generation-config vllm`, unsent sampling fields are filled from the
    model folder's generation_config.json (`get_diff_sampling_param`). /v1/models cards say
    `owned_by: "vllm"`, the base card carries `max_model_len`.
    With VLLM_ALLOW_RUNTIME_LORA_UPDATING=1|true and --enable-lora, POST /v1/load_lora_adapter
    `{lora_name, lora_path}` loads one adapter: 400 for a missing field, a name taken by the
    base or an adapter already loaded; 404 for a folder without an adapter; 500 for a rank
    above --max-lora-rank or weights that do not load; 200 with a text body on success.
    Without the variable the route does not exist (404).
  - SGLang (`--model-path M --lora-paths NAME=PATH ...`, or `--enable-lora` with no
    `--lora-paths`, which then needs both `--max-lora-rank` and `--lora-target-modules`, else
    startup fails with SGLang's assertion): with LoRA enabled, POST /load_lora_adapter (no /v1)
    `{lora_name, lora_path}` loads one adapter: 200 `{success: true, ...}`; else 400 `{success:
    false, error_message}` for a name already loaded, a folder without an adapter, weights that
    do not load, or an adapter the pool cannot hold (its rank above --max-lora-rank, or target
    modules outside --lora-target-modules unless `all`: "... is incompatible with the current
    LoRA memory pool configuration ..."). The adapter is taken from `model` only
    when it has the form `BASE:NAME` (`_parse_model_parameter`), else from a `lora_path` body
    field; a bare `model: "NAME"` has no colon and runs the BASE model, silently. An adapter name
    that is not loaded is a 400. `--max-loaded-loras` must be >= `--max-loras-per-batch`. With
    `--sampling-defaults model` (its default) unsent fields come from generation_config.json.
    /v1/models cards say `owned_by: "sglang"`.
Log-probabilities (`logprobs: true, top_logprobs: k`, vLLM's chat protocol): `top_logprobs`
without `logprobs` is a 400, as is `k` above `max_logprobs` (20); the reply's
`choices[0].logprobs.content` holds one entry per token with its `k` most likely tokens, from
`lm_logprobs` (a base distribution moved by the adapter's strength, read from its weights file;
an adapter weaker than TEXT_STRENGTH moves the log-probabilities but not the text).
The "model" is a hash: the reply names the adapter that really ran (`[NAME] ...` or `[base] ...`)
followed by words derived from the prompt, the effective sampling fields and (when sampling) the
seed, so tests can see which adapter ran and which sampling the server applied. Each request's
effective sampling and the startup argv are appended as JSON lines to $FAKE_LORA_SERVER_RECORD;
$FAKE_LORA_SERVER_LATENCY (seconds per generated word) slows replies down.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


def record(event: dict[str, Any]) -> None:
    path = os.environ.get("FAKE_LORA_SERVER_RECORD")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(event) + "\n")


LM_VOCAB = 64  # the fake model's tokens: "w00" .. "w63"
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
TEXT_STRENGTH = 0.5  # an adapter this strong or stronger changes the greedy text


def adapter_strength(folder: Path) -> float:
    """How strongly an adapter moves the fake model: the stand-in for its weights' magnitude.
    Test adapters hold a placeholder weights file: `weights...` is a full-strength adapter (1.0),
    `weights scale=S` one whose lora_B is scaled by S (0: a no-op adapter), `broken...` a file
    that cannot be loaded (ValueError, as a corrupt safetensors header is)."""
    data = (Path(folder) / "adapter_model.safetensors").read_bytes()
    if data.startswith(b"broken"):
        raise ValueError("corrupt safetensors header")
    found = re.search(rb"scale=([0-9.eE+-]+)", data)
    return float(found.group(1)) if found else 1.0


def text_adapter(adapter: str | None, strength: float) -> str | None:
    """The adapter whose effect shows in the greedy text: a weak one moves only log-probs."""
    return adapter if adapter is not None and strength >= TEXT_STRENGTH else None


def _normals(*key: Any) -> list[float]:
    rng = random.Random(hashlib.sha256(json.dumps(key).encode()).hexdigest())
    return [rng.gauss(0.0, 1.0) for _ in range(LM_VOCAB)]


def lm_logprobs(
    adapter: str | None, strength: float, prompt: str, noise: float = 0.0, draw: float = 0.0
) -> list[float]:
    """The fake model's next-token log-probabilities: base logits from the prompt, plus the
    adapter's own direction times its strength, plus `noise` (what batching adds on an engine
    that is not batch-invariant; `draw` in [0, 1) picks it), normalised."""
    logits = [2.0 * x for x in _normals("base", prompt)]
    if adapter is not None and strength:
        logits = [z + strength * d for z, d in zip(logits, _normals(adapter, prompt), strict=True)]
    if noise:
        jitter = random.Random(draw)
        logits = [z + noise * (2 * jitter.random() - 1) for z in logits]
    top = max(logits)
    norm = top + math.log(sum(math.exp(z - top) for z in logits))
    return [z - norm for z in logits]


def _error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"message": message, "type": "BadRequestError", "code": status}}


def lm_content(
    adapter: str | None, strength: float, prompt: str, words: list[str], k: int
) -> list[dict[str, Any]]:
    """`choices[0].logprobs.content` of a chat completion (vLLM's ChatCompletionLogProbs): one
    entry per generated token, each with the `k` most likely tokens of that position."""
    content = []
    for i, word in enumerate(words):
        lps = lm_logprobs(adapter, strength, f"{prompt}|{i}" if i else prompt)
        top = sorted(range(LM_VOCAB), key=lambda t: -lps[t])[:k]
        entry = {"token": word, "logprob": max(lps), "bytes": list(word.encode())}
        entry["top_logprobs"] = [
            {"token": f"w{t:02d}", "logprob": lps[t], "bytes": list(f"w{t:02d}".encode())}
            for t in top
        ]
        content.append(entry)
    return content


def fake_reply(adapter: str | None, prompt: str, params: dict[str, Any], seed: Any) -> list[str]:
    """The words the fake model says: a function of what ran and how it was sampled."""
    key = {k: params.get(k) for k in SAMPLING_FIELDS}
    if float(params.get("temperature") or 0) > 0:
        key["seed"] = seed
    digest = hashlib.sha256(json.dumps([adapter, prompt, key], sort_keys=True).encode()).hexdigest()
    n = 2 + int(digest[:2], 16) % 10
    return [f"[{adapter or 'base'}]"] + [digest[2 + 4 * i : 6 + 4 * i] for i in range(n)]


class FakeLoraServer:
    """The fake server in a thread of this process (`start`, `url`, `close`)."""

    def __init__(
        self,
        flavor: str,
        model: str,
        loras: dict[str, str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        generation_config_defaults: bool = True,
        max_model_len: int = 4096,
        latency_per_word: float = 0.0,
        runtime_lora: bool = False,
        max_lora_rank: int | None = None,
        target_modules: list[str] | None = None,
    ) -> None:
        assert flavor in ("vllm", "sglang")
        self.flavor, self.model, self.loras = flavor, model, dict(loras)
        self.runtime_lora, self.max_lora_rank = runtime_lora, max_lora_rank
        self.target_modules = target_modules
        self.use_model_defaults = generation_config_defaults
        self.max_model_len = max_model_len
        self.latency_per_word = latency_per_word
        self.bodies: list[dict[str, Any]] = []
        self.ran: list[str | None] = []  # the adapter each request really ran with
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self.thread: threading.Thread | None = None

    def start(self) -> FakeLoraServer:
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.05)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ----- the engines' behaviour ------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        cards = [
            {
                "id": self.model,
                "object": "model",
                "owned_by": self.flavor,
                "root": self.model,
                "max_model_len": self.max_model_len,
            }
        ]
        for name, path in self.loras.items():
            cards.append(
                {"id": name, "object": "model", "owned_by": self.flavor, "root": path}
                | {"parent": self.model}
            )
        return cards

    def select_adapter(self, body: dict[str, Any]) -> tuple[int, str | None, str]:
        """(status, adapter or None for the base, error message)."""
        model = str(body.get("model", ""))
        if self.flavor == "vllm":
            if model == self.model:
                return 200, None, ""
            if model in self.loras:
                return 200, model, ""
            return 404, None, f"The model `{model}` does not exist."
        adapter = None
        if ":" in model and model != self.model:  # SGLang's _parse_model_parameter
            if model.startswith(f"{self.model}:"):
                adapter = model[len(self.model) + 1 :].strip() or None
            else:
                adapter = model.split(":", 1)[1].strip() or None
        if adapter is None:
            adapter = body.get("lora_path")
        if adapter is not None and adapter not in self.loras:
            loaded = list(self.loras)
            msg = f"The following requested LoRA adapters are not loaded: {adapter}\n"
            return 400, None, msg + f"Loaded adapters: {loaded}."
        return 200, adapter, ""

    def effective_sampling(self, body: dict[str, Any]) -> dict[str, Any]:
        params = dict(NEUTRAL)
        if self.use_model_defaults:
            gen_path = Path(self.model) / "generation_config.json"
            if gen_path.is_file():
                gen = json.loads(gen_path.read_text())
                params.update({k: gen[k] for k in SAMPLING_FIELDS if k in gen})
        params.update({k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None})
        return params

    def strength(self, adapter: str | None) -> float:
        """The adapter's strength from its weights file; 1.0 for a folder without one."""
        if adapter is None:
            return 0.0
        try:
            return adapter_strength(Path(self.loras[adapter]))
        except FileNotFoundError:
            return 1.0

    def load_lora(self, body: dict[str, Any]) -> tuple[int, Any]:
        """vLLM's POST /v1/load_lora_adapter (OpenAIServingModels.load_lora_adapter)."""
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name == self.model:
            return _error(400, f"The lora adapter '{name}' conflicts with a served base model.")
        if name in self.loras:
            return _error(400, f"The lora adapter '{name}' has already been loaded.")
        if not (Path(path) / "adapter_config.json").is_file():
            return _error(404, f"Loading lora {name} failed: No adapter found for {path}")
        rank = json.loads((Path(path) / "adapter_config.json").read_text()).get("r")
        if self.max_lora_rank is not None and isinstance(rank, int) and rank > self.max_lora_rank:
            why = f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}."
            return _error(500, why)
        try:
            adapter_strength(Path(path))
        except (ValueError, FileNotFoundError) as exc:
            return _error(500, f"Loading lora {name} failed: {exc}")
        with self.lock:
            self.loras[name] = path
        record({"event": "load_lora_adapter", "name": name, "path": path})
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def load_lora_sglang(self, body: dict[str, Any]) -> tuple[int, Any]:
        """SGLang's POST /load_lora_adapter (TokenizerManager.load_lora_adapter, then the
        LoRAManager's checks): 200 with success, else 400 with the reason."""
        name, path = body.get("lora_name"), body.get("lora_path")

        def fail(why: str) -> tuple[int, Any]:
            return 400, {"success": False, "error_message": why}

        if not name or not path:
            return fail("lora_name and lora_path are required")
        if name in self.loras:
            return fail(f"Failed to load LoRA adapter {name}: {name} is already loaded")
        config = Path(path) / "adapter_config.json"
        if not config.is_file():
            return fail(f"Failed to load LoRA adapter {name}: no adapter_config.json in {path}")
        cfg = json.loads(config.read_text())
        rank, mods = cfg.get("r"), cfg.get("target_modules") or []
        outside = self.target_modules != ["all"] and not set(mods) <= set(self.target_modules or [])
        if (isinstance(rank, int) and rank > (self.max_lora_rank or 0)) or outside:
            return fail(
                f"Failed to load LoRA adapter {name}: LoRA adapter {name} with rank {rank} is "
                "incompatible with the current LoRA memory pool configuration. Please ensure that "
                "the LoRA adapter's rank is within the configured `--max-lora-rank` and that the "
                "target modules are included in `--lora-target-modules`."
            )
        try:
            adapter_strength(Path(path))
        except (ValueError, FileNotFoundError) as exc:
            return fail(f"Failed to load LoRA adapter {name}: {exc}")
        with self.lock:
            self.loras[name] = path
        record({"event": "load_lora_adapter", "name": name, "path": path})
        return 200, {"success": True, "error_message": "", "loaded_adapters": dict(self.loras)}

    def complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, adapter, error = self.select_adapter(body)
        if status != 200:
            return status, {"error": {"message": error, "type": "BadRequestError", "code": status}}
        params = self.effective_sampling(body)
        prompt = str(body["messages"][-1].get("content"))
        k = body.get("top_logprobs") or 0
        if k and not body.get("logprobs") or k > MAX_LOGPROBS:
            why = "when using `top_logprobs`, `logprobs` must be set to true."
            if k > MAX_LOGPROBS:
                why = f"Requested sample logprobs of {k}, which is greater than max allowed: 20"
            return 400, {"error": {"message": why, "type": "BadRequestError", "code": 400}}
        strength = self.strength(adapter)
        words = fake_reply(text_adapter(adapter, strength), prompt, params, body.get("seed"))
        max_tokens = int(body.get("max_tokens") or 16)
        finish = "length" if len(words) > max_tokens else "stop"
        words = words[:max_tokens]
        if self.latency_per_word:
            time.sleep(self.latency_per_word * len(words))
        with self.lock:
            self.bodies.append(body)
            self.ran.append(adapter)
        record({"event": "request", "model": body.get("model"), "ran": adapter, "params": params})
        message = {"role": "assistant", "content": " ".join(words)}
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words)}
        choice = {"index": 0, "message": message, "finish_reason": finish}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": lm_content(adapter, strength, prompt, words, k)}
        return 200, {"object": "chat.completion", "choices": [choice], "usage": usage}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: Any) -> None:
                text = isinstance(payload, str)
                data = (payload if text else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, {})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": server.models()})
                else:
                    self._send(404, {"detail": "not found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                if server.runtime_lora and server.flavor == "vllm":
                    if self.path == "/v1/load_lora_adapter":
                        self._send(*server.load_lora(body))
                        return
                if server.runtime_lora and server.flavor == "sglang":
                    if self.path == "/load_lora_adapter":
                        self._send(*server.load_lora_sglang(body))
                        return
                if self.path != "/v1/chat/completions":
                    self._send(404, {"detail": "not found"})
                    return
                self._send(*server.complete(body))

        return Handler


# ----- the command lines of the real engines ---------------------------------------------------


def _check_adapter(path: str, max_rank: int | None) -> None:
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        sys.exit(f"ValueError: no adapter_config.json found in {path}")
    rank = json.loads(config.read_text()).get("r")
    if max_rank is not None and isinstance(rank, int) and rank > max_rank:
        sys.exit(f"ValueError: LoRA rank {rank} is greater than max_lora_rank {max_rank}.")


def vllm_main(argv: list[str]) -> FakeLoraServer:
    p = argparse.ArgumentParser(prog="vllm")
    p.add_argument("subcommand", choices=["serve"])
    p.add_argument("model")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generation-config", default="auto")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--lora-modules", nargs="+", default=[])
    p.add_argument("--max-lora-rank", type=int, default=16, choices=VLLM_RANKS)
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-cpu-loras", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--dtype")
    p.add_argument("--revision")
    a = p.parse_args(argv)
    if a.max_cpu_loras is not None and a.max_cpu_loras < a.max_loras:
        sys.exit(f"max_cpu_loras ({a.max_cpu_loras}) must be >= max_loras ({a.max_loras}).")
    if a.lora_modules and not a.enable_lora:
        sys.exit("LoRA modules given without --enable-lora")
    loras = dict(item.split("=", 1) for item in a.lora_modules)
    for path in loras.values():
        _check_adapter(path, a.max_lora_rank)
    use_defaults = a.generation_config != "vllm"
    runtime = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower()
    return FakeLoraServer(
        "vllm",
        a.model,
        loras,
        host=a.host,
        port=a.port,
        generation_config_defaults=use_defaults,
        runtime_lora=runtime in ("1", "true") and a.enable_lora,
        max_lora_rank=a.max_lora_rank,
    )


def sglang_main(argv: list[str]) -> FakeLoraServer:
    p = argparse.ArgumentParser(prog="sglang.launch_server")
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--random-seed", type=int)
    p.add_argument("--sampling-defaults", choices=["openai", "model"], default="model")
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--lora-paths", nargs="*", default=[])
    p.add_argument("--lora-target-modules", nargs="*")
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--max-loras-per-batch", type=int, default=8)
    p.add_argument("--max-loaded-loras", type=int)
    p.add_argument("--enable-deterministic-inference", action="store_true")
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--mem-fraction-static", type=float)
    p.add_argument("--dtype")
    p.add_argument("--revision")
    a = p.parse_args(argv)
    if a.max_loaded_loras is not None and a.max_loaded_loras < a.max_loras_per_batch:
        sys.exit("max_loaded_loras must be >= max_loras_per_batch")
    if a.enable_lora and not a.lora_paths and not (a.max_lora_rank and a.lora_target_modules):
        sys.exit(
            "AssertionError: When no initial --lora-paths is provided, you need to specify both "
            "--max-lora-rank and --lora-target-modules for LoRA initialization."
        )
    loras = dict(item.split("=", 1) for item in a.lora_paths)
    for path in loras.values():
        _check_adapter(path, a.max_lora_rank)
    use_defaults = a.sampling_defaults == "model"
    return FakeLoraServer(
        "sglang",
        a.model_path,
        loras,
        host=a.host,
        port=a.port,
        generation_config_defaults=use_defaults,
        max_model_len=a.context_length,
        runtime_lora=a.enable_lora or bool(a.lora_paths),
        max_lora_rank=a.max_lora_rank,
        target_modules=a.lora_target_modules,
    )


def main(argv: list[str]) -> None:
    flavor, rest = argv[0], argv[1:]
    record(
        {"event": "start", "flavor": flavor, "argv": rest, "env": _engine_env(), "pid": os.getpid()}
    )
    if os.environ.get("FAKE_LORA_SERVER_CHILD"):  # a worker process, as the real engines start
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        record({"event": "child", "pid": child.pid})
    server = vllm_main(rest) if flavor == "vllm" else sglang_main(rest)
    server.latency_per_word = float(os.environ.get("FAKE_LORA_SERVER_LATENCY") or 0)
    print(f"fake {flavor} server listening on {server.url}", flush=True)
    server.serve_forever()


def _engine_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}


if __name__ == "__main__":
    main(sys.argv[1:])
