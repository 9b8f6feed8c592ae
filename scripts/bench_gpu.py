"""GPU throughput: an 8B-shaped random Llama (bf16) with r64 LoRA adapters, every path in one run.

    python scripts/bench_gpu.py [--shape 8b] [--requests 128] [--batch-size 64]
                                [--prompt-tokens 300] [--new-tokens 128] [--bandwidth-gbs 4300]

Needs a CUDA GPU; it refuses to start without one. On CPU, `python scripts/bench_hf.py --device
cpu --tiny` runs the same builders and measuring code (this script imports them from there).

Prints output tok/s for: `transformers` generate; HFBackend without adapters, with one, with
`--adapters` mixed in each batch (and the same through PEFT's forward); vLLM offline (without, one,
mixed) when vLLM is importable, with prefix caching off (every round repeats the prompts, so
cached prefixes would drop the prefill a run pays). Ratios are given to generate and to the
memory-bandwidth bound: a decode step reads every weight once and each sequence's cached keys
and values once, so at batch B the bound is B x bandwidth / (weight bytes + B x KV bytes per
token x (prompt + new/2 tokens)); the bandwidth is measured (a device-to-device copy) unless
`--bandwidth-gbs` gives it. `--json FILE` writes every path's figure and, per engine, the path a
run of it is planned with (`charshift run --dry-run --throughput-from FILE` picks the run's
engine's). Weights and adapters are built once under --workdir and kept.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_hf  # noqa: E402 - the shared builders and timing code


def vllm_paths(
    model_dir: Path,
    adapters: list[Path],
    prompt_ids: list[list[int]],
    args: argparse.Namespace,
) -> dict[str, bench_hf.Timing]:
    """vLLM offline (greedy, EOS ignored) on the same prompts: none, one, mixed adapters."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=str(model_dir),
        dtype="bfloat16",
        enable_lora=True,
        max_lora_rank=args.rank,
        max_loras=len(adapters),
        max_cpu_loras=len(adapters),
        max_num_seqs=args.batch_size,
        gpu_memory_utilization=0.85,
        seed=0,
        # every round repeats the same prompts: with prefix caching their prefill would be free
        # from the second round on, and the figure would leave out the prefill a run pays
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    loras = [LoRARequest(f"lora{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
    choices = {
        "vllm-none": [None] * len(prompts),
        "vllm-one": [loras[0]] * len(prompts),
        "vllm-mixed": [loras[i % len(loras)] for i in range(len(prompts))],
    }

    def path(requests: list[LoRARequest | None]) -> Callable[[], int]:
        def run() -> int:
            outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs)

        return run

    return bench_hf.measure(
        {k: path(v) for k, v in choices.items()}, args.repeats, torch.device("cuda")
    )


def main() -> None:
    args = bench_hf.parse_args(gpu=True)
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False here.\n"
            "On CPU, run the same code paths small: python scripts/bench_hf.py --device cpu --tiny"
        )
    if not args.device.startswith("cuda"):
        raise SystemExit(f"bench_gpu.py runs on cuda, not --device {args.device}")
    t0 = time.perf_counter()
    backend, adapters, prompts = bench_hf.setup(args)
    print(bench_hf.describe(args, backend), f"[{torch.cuda.get_device_name()}]")
    print(f"(built and loaded in {time.perf_counter() - t0:.0f} s)")
    bw = args.bandwidth_gbs or bench_hf.bandwidth_gbs(backend.device)
    bound = bench_hf.bandwidth_bound(
        backend.model, bw, args.batch_size, args.prompt_tokens, args.new_tokens
    )
    timings = bench_hf.run_paths(
        backend, adapters, prompts, args.new_tokens, args.repeats, tuple(args.paths.split(","))
    )
    model_dir = Path(backend.resolved.path)
    setup_text = bench_hf.describe(args, backend) + f" [{torch.cuda.get_device_name()}]"
    prompt_ids = [
        backend.tokenizer(bench_hf.render(backend, p), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    backend.close()
    del backend
    gc.collect()
    torch.cuda.empty_cache()
    try:
        timings.update(vllm_paths(model_dir, adapters, prompt_ids, args))
    except ImportError:
        print("vLLM is not importable here: its paths are skipped")
    bench_hf.print_table(timings, bound_gbs=bw, bound_tok_s=bound)
    if args.json:
        bench_hf.write_json(args.json, timings, torch.cuda.get_device_name(), setup_text, bound)


if __name__ == "__main__":
    main()
