"""HF backend throughput against `transformers` generate, without and with LoRA adapters, one run.

    python scripts/bench_hf.py                           # CPU: a random tiny-ish Llama, r8 adapters
    python scripts/bench_hf.py --model packaged:smollm2  # the real SmolLM2-135M, random r16 adapters
    python scripts/bench_hf.py --device cpu --tiny       # bench_gpu.py's code paths, small, on CPU

Every path decodes the same prompts greedily, in batches of the same size, with end-of-sequence
ignored so that each produces exactly `--new-tokens` per prompt; output tok/s counts generated
tokens over wall time (prefill included). Paths:

  generate        `model.generate` on the bare model (before any adapter is loaded)
  hf-none         HFBackend, no adapter
  hf-one          HFBackend, every row on adapter 0
  hf-mixed        HFBackend, rows cycling over all adapters within each batch
  peft-one/-mixed the same through PEFT's own `adapter_names` forward (lora_impl="peft")

The paths run interleaved `--repeats` times after a warm-up; each reports its best round (the
machine may be shared). Ratios: hf-none / generate (goal >= 1), hf-mixed / hf-one (goal >= 0.8).
bench_gpu.py imports the builders and the measuring code from here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from charshift.backends.base import AdapterSource
from charshift.backends.hf import HFBackend
from charshift.schema import GenRequest, Sampling
from charshift.tiny import default_corpus, train_tiny_tokenizer

# Llama shapes: (hidden, layers, heads, kv heads, intermediate, vocab)
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (512, 8, 8, 4, 1376, 32000),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),  # Llama-3.1-8B
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATHS = ("generate", "hf-none", "hf-one", "hf-mixed", "peft-one", "peft-mixed")


# ---- building a random model and adapters -----------------------------------------------------


def build_random_llama(
    folder: Path, shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> Path:
    """A Llama of `shape` with random weights (std 0.02) and the tiny ChatML tokenizer, saved
    to `folder` (kept and reused when it is already there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    tok = train_tiny_tokenizer(folder)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # no memory, no init: the weights are drawn below
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)  # (non-persistent buffers are rebuilt on loading)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(folder)
    del model
    return folder


def _lora_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    return {
        "self_attn.q_proj": (hidden, q),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (q, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }


def build_random_loras(
    model_dir: Path, out_root: Path, n: int, rank: int, dtype: torch.dtype
) -> list[Path]:
    """`n` LoRA adapters of rank `rank` on every attention and MLP projection of a Llama-shaped
    model, random A and B (so each changes the output), saved in PEFT's format."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = json.loads((Path(model_dir) / "config.json").read_text())
    shapes = _lora_shapes(config)
    folders = []
    for i in range(n):
        folder = out_root / f"lora{i}-r{rank}"
        folders.append(folder)
        if (folder / "adapter_model.safetensors").is_file():
            continue
        gen = torch.Generator().manual_seed(1000 + i)
        weights = {}
        for layer in range(config["num_hidden_layers"]):
            for module, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{module}"
                a = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
                b = torch.randn(fan_out, rank, generator=gen) * 0.02
                weights[f"{key}.lora_A.weight"] = a.to(dtype).contiguous()
                weights[f"{key}.lora_B.weight"] = b.to(dtype).contiguous()
        cfg = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"
        )
        cfg.save_pretrained(str(folder))
        save_file(weights, str(folder / "adapter_model.safetensors"))
    return folders


# ---- requests and timing ----------------------------------------------------------------------


def make_prompts(tokenizer: Any, n: int, prompt_tokens: int) -> list[str]:
    """`n` distinct user messages of about `prompt_tokens` tokens each, from the tiny corpus."""
    corpus = default_corpus()
    prompts = []
    for i in range(n):
        words: list[str] = []
        j = i * 7
        while len(tokenizer(" ".join(words))["input_ids"]) < prompt_tokens:
            words.append(corpus[j % len(corpus)])
            j += 1
        prompts.append(" ".join(words))
    return prompts


@contextlib.contextmanager
def no_stop(backend: HFBackend) -> Iterator[None]:
    """Every row runs its full token budget (as `min_new_tokens` makes generate do)."""
    saved = backend._stop_ids
    backend._stop_ids = set()
    try:
        yield
    finally:
        backend._stop_ids = saved


def backend_path(
    backend: HFBackend, prompts: list[str], new_tokens: int, adapter_of: Callable[[int], Any]
) -> Callable[[], int]:
    """A callable that runs the backend once over all prompts and returns the tokens made."""
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=new_tokens, repetition_penalty=1.0)
    requests = [
        GenRequest([{"role": "user", "content": p}], adapter_of(i), greedy, seed=i)
        for i, p in enumerate(prompts)
    ]

    def run() -> int:
        with no_stop(backend):
            out = backend.generate(requests)
        assert all(r.finish_reason == "length" for r in out), [r.error for r in out][:3]
        return sum(r.completion_tokens for r in out)

    return run


def render(backend: HFBackend, prompt: str) -> str:
    return backend.render(GenRequest([{"role": "user", "content": prompt}]))


def generate_path(backend: HFBackend, prompts: list[str], new_tokens: int) -> Callable[[], int]:
    """`model.generate` (greedy, left-padded batches of the backend's batch size), prompts in
    the backend's order (sorted by length)."""
    tok = backend.tokenizer
    texts = [render(backend, p) for p in prompts]
    texts.sort(key=lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    tok.padding_side = "left"
    batches = [
        tok(
            texts[i : i + backend.batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        for i in range(0, len(texts), backend.batch_size)
    ]
    for b in batches:
        b.pop("token_type_ids", None)

    def run() -> int:
        made = 0
        with torch.inference_mode():
            for enc in batches:
                enc = {k: v.to(backend.device) for k, v in enc.items()}
                out = backend.model.generate(
                    **enc,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=backend._pad_id,
                )
                made += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        return made

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    name: str
    rates: list[float] = field(default_factory=list)  # tok/s of each round

    @property
    def best(self) -> float:
        return max(self.rates) if self.rates else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


def measure(
    paths: dict[str, Callable[[], int]], repeats: int, device: torch.device
) -> dict[str, Timing]:
    """Warm every path up once, then run them interleaved `repeats` times."""
    for run in paths.values():
        run()
    timings = {name: Timing(name) for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            sync(device)
            t0 = time.perf_counter()
            made = run()
            sync(device)
            timings[name].rates.append(made / (time.perf_counter() - t0))
    return timings


def run_paths(
    backend: HFBackend,
    adapters: list[Path],
    prompts: list[str],
    new_tokens: int,
    repeats: int,
    wanted: tuple[str, ...] = PATHS,
) -> dict[str, Timing]:
    """Time `generate` and the no-adapter path on the bare model, then load the adapters and
    time the adapter paths (grouped LoRA, then PEFT's forward)."""
    bare = {"generate": generate_path(backend, prompts, new_tokens)}
    bare["hf-none"] = backend_path(backend, prompts, new_tokens, lambda i: None)
    timings = measure({k: v for k, v in bare.items() if k in wanted}, repeats, backend.device)
    names = [f"lora{i}" for i in range(len(adapters))]
    errors = backend.load_adapters(
        [AdapterSource(n, path=str(p)) for n, p in zip(names, adapters, strict=True)]
    )
    if errors:
        raise SystemExit(f"adapters failed to load: {errors}")
    one = backend_path(backend, prompts, new_tokens, lambda i: names[0])
    mixed = backend_path(backend, prompts, new_tokens, lambda i: names[i % len(names)])
    for impl in ("grouped", "peft"):
        prefix = "hf" if impl == "grouped" else "peft"
        lora_paths = {f"{prefix}-one": one, f"{prefix}-mixed": mixed}
        lora_paths = {k: v for k, v in lora_paths.items() if k in wanted}
        if lora_paths:
            backend.lora_impl = impl
            timings.update(measure(lora_paths, repeats, backend.device))
    backend.lora_impl = "grouped"
    return timings


# ---- the memory-bandwidth bound ---------------------------------------------------------------


def bandwidth_gbs(device: torch.device, mib: int = 0, rounds: int = 10) -> float:
    """Measured memory bandwidth in GB/s: a large device-to-device copy (bytes read + written)."""
    mib = mib or (2048 if device.type == "cuda" else 256)
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * rounds / (time.perf_counter() - t0) / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding table
    (a step looks up one row per sequence), unless it is tied to the output layer."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - emb.numel() * emb.element_size()


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one cached token holds: 2 x layers x KV heads x head size."""
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    size = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * heads * head_dim * size


def bandwidth_bound(
    model: torch.nn.Module, gbs: float, batch: int, prompt_tokens: int = 0, new_tokens: int = 0
) -> float:
    """Output tok/s if each decode step at batch `batch` only had to read the weights once and
    each sequence's cached keys and values once (on average the prompt plus half the reply)."""
    context = prompt_tokens + new_tokens / 2
    step_bytes = weight_bytes(model) + batch * context * kv_bytes_per_token(model)
    return batch * gbs * 1e9 / step_bytes


def ratio(timings: dict[str, Timing], a: str, b: str) -> str:
    if a not in timings or b not in timings:
        return "n/a"
    return f"{timings[a].best / timings[b].best:.2f}x"


def print_table(
    timings: dict[str, Timing], bound_gbs: float | None = None, bound_tok_s: float | None = None
) -> None:
    print(f"{'path':<14}{'best tok/s':>12}{'median':>10}   vs generate   vs bound")
    for name, t in timings.items():
        vs_bound = f"{t.best / bound_tok_s:.3f}" if bound_tok_s else "n/a"
        print(
            f"{name:<14}{t.best:>12.1f}{t.median:>10.1f}   "
            f"{ratio(timings, name, 'generate'):>11}   {vs_bound:>8}"
        )
    if bound_tok_s:
        print(f"{'bound':<14}{bound_tok_s:>12.1f}   (memory bandwidth {bound_gbs:.0f} GB/s)")
    print(
        f"hf-none / generate = {ratio(timings, 'hf-none', 'generate')}   (goal >= 1.00)\n"
        f"hf-mixed / hf-one  = {ratio(timings, 'hf-mixed', 'hf-one')}   (goal >= 0.80)\n"
        f"hf-one / peft-one  = {ratio(timings, 'hf-one', 'peft-one')}   "
        f"hf-mixed / peft-mixed = {ratio(timings, 'hf-mixed', 'peft-mixed')}"
    )


# The path a run of each engine is planned with: a run mixes its adapters in each batch.
ENGINE_PATHS = {"hf": "hf-mixed", "vllm": "vllm-mixed"}


def write_json(
    path: Path, timings: dict[str, Timing], device: str, describe_text: str, bound: float | None
) -> None:
    """`{"device", "setup", "paths": {NAME: {"tok_per_s", "median_tok_per_s"}}, "engines":
    {ENGINE: PATH}, "bound_tok_per_s"}` (best round as tok_per_s), written atomically. `engines`
    names each engine's figure for `charshift run --dry-run --throughput-from` (ENGINE_PATHS)."""
    data = {
        "device": device,
        "setup": describe_text,
        "paths": {
            name: {"tok_per_s": round(t.best, 2), "median_tok_per_s": round(t.median, 2)}
            for name, t in timings.items()
        },
        "engines": {e: p for e, p in ENGINE_PATHS.items() if p in timings},
        "bound_tok_per_s": None if bound is None else round(bound, 2),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    print(f"figures written to {path}")


def parse_args(argv: list[str] | None = None, gpu: bool = False) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a model spec; default: a random Llama")
    ap.add_argument("--shape", default="8b" if gpu else "tiny", choices=sorted(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="--shape tiny (and small defaults)")
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    ap.add_argument("--requests", type=int, default=128 if gpu else 32)
    ap.add_argument("--batch-size", type=int, default=64 if gpu else 16)
    ap.add_argument("--prompt-tokens", type=int, default=300 if gpu else 64)
    ap.add_argument("--new-tokens", type=int, default=128 if gpu else 32)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64 if gpu else 8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--workdir", type=Path, default=None, help="where models are built (kept)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="default: measured")
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the figures as JSON (what `charshift run --dry-run --throughput-from` reads)",
    )
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
        if gpu:
            args.rank, args.prompt_tokens, args.new_tokens = 8, 64, 32
    return args


def setup(args: argparse.Namespace) -> tuple[HFBackend, list[Path], list[str]]:
    """Build (or reuse) the model and adapters, and make the backend and prompts."""
    from charshift.backends.hf import pick_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = pick_dtype(args.dtype, device)
    work = args.workdir or Path(tempfile.gettempdir()) / "charshift_bench"
    if args.model is None:
        model_dir = build_random_llama(work / f"llama-{args.shape}", args.shape, dtype, device)
        spec = str(model_dir)
    else:
        spec = args.model
    backend = HFBackend(
        spec,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_batch_tokens=10**9,
    )
    model_dir = Path(backend.resolved.path)
    tag = model_dir.name if args.model is None else spec.replace(":", "_").replace("/", "_")
    adapters = build_random_loras(model_dir, work / f"loras-{tag}", args.adapters, args.rank, dtype)
    prompts = make_prompts(backend.tokenizer, args.requests, args.prompt_tokens)
    return backend, adapters, prompts


def describe(args: argparse.Namespace, backend: HFBackend) -> str:
    n_params = sum(p.numel() for p in backend.model.parameters())
    return (
        f"model {args.model or 'random Llama ' + args.shape} ({n_params / 1e6:.0f}M params, "
        f"{backend.dtype}) on {backend.device}, torch threads {torch.get_num_threads()}: "
        f"{args.requests} requests of ~{args.prompt_tokens} prompt tokens, {args.new_tokens} "
        f"new tokens, batch {args.batch_size}, {args.adapters} LoRA r{args.rank} adapters"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    backend, adapters, prompts = setup(args)
    print(describe(args, backend))
    bw = args.bandwidth_gbs or bandwidth_gbs(backend.device)
    bound = bandwidth_bound(backend.model, bw, args.batch_size, args.prompt_tokens, args.new_tokens)
    timings = run_paths(
        backend, adapters, prompts, args.new_tokens, args.repeats, tuple(args.paths.split(","))
    )
    print_table(timings, bw, bound)
    if args.json:
        write_json(args.json, timings, str(backend.device), describe(args, backend), bound)
    backend.close()


if __name__ == "__main__":
    sys.exit(main())
