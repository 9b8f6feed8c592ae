"""Mixed-adapter LoRA for HFBackend's decode loop: rows grouped by adapter, no per-call overhead.

PEFT mixes adapters in one batch through `adapter_names`: on every forward it walks all modules to
install hooks, and every LoRA layer rebuilds per-adapter row-index lists in Python and gathers and
scatters its rows with them. On CPU that Python work is most of a small model's step; on a GPU each
list index is a host-to-device copy.

Here the decode loop orders a batch's rows by adapter, so each adapter's rows are one contiguous
slice of the batch (finished rows leave the batch without reordering, so the slices stay
contiguous). While a batch runs, every LoRA layer's forward is replaced by: the base layer, then
for each adapter present `y[rows] += scale * (x[rows] @ A.T) @ B.T` on contiguous views (no
gathers, no index tensors, the exact FLOPs of the rows' own adapters). A row's delta depends only
on its own adapter's weights and its own input, so mixing adapters in a batch does not change
its numbers beyond what batching the base layer already does.

Only plain LoRA on `torch.nn.Linear` is handled here; a model with anything else (DoRA and other
variants, LoRA bias, embedding LoRA, merged or quantised layers) keeps PEFT's own mixed forward,
and `LoraRunner.why_not` says why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" inside a mixed batch

# (A transposed [in, r], B transposed [r, out], scale)
_Weights = tuple[torch.Tensor, torch.Tensor, float]


def _module_table(module: Any, dtype: torch.dtype) -> dict[str, _Weights] | str:
    """{adapter: (A, B, scale)} for one PEFT LoRA layer, or the reason it cannot run here."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear:
        return f"{type(module).__name__} LoRA layers (only nn.Linear LoRA is batched here)"
    if not isinstance(module.base_layer, torch.nn.Linear):
        return f"LoRA over {type(module.base_layer).__name__} (quantised or wrapped base layers)"
    if module.merged or module.fan_in_fan_out:
        return "merged or fan_in_fan_out LoRA layers"
    table: dict[str, _Weights] = {}
    for name in module.lora_A:
        if getattr(module, "lora_variant", {}).get(name) is not None:
            return f"adapter {name!r} is a LoRA variant (DoRA or similar)"
        if module.lora_B[name].bias is not None:
            return f"adapter {name!r} has a LoRA bias"
        a = module.lora_A[name].weight.detach().to(dtype)
        b = module.lora_B[name].weight.detach().to(dtype)
        table[name] = (a.t(), b.t(), float(module.scaling[name]))
    return table


def row_segments(adapters: list[str]) -> list[tuple[int, int, str]]:
    """(first row, end row, adapter) of each run of rows under one adapter, the bare model's
    rows left out. Each adapter must form one run."""
    segments: list[tuple[int, int, str]] = []
    start = 0
    for i in range(1, len(adapters) + 1):
        if i == len(adapters) or adapters[i] != adapters[start]:
            if adapters[start] != BASE_ADAPTER:
                segments.append((start, i, adapters[start]))
            start = i
    if len({s[2] for s in segments}) != len(segments):
        raise ValueError(f"rows of one adapter must be contiguous in the batch: {adapters}")
    return segments


def _grouped_forward(base: torch.nn.Module, table: dict[str, _Weights], runner: LoraRunner):
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = base(x, *args, **kwargs)
        if not runner.segments:
            return y
        per_row = x.shape[1] if x.dim() == 3 else 1  # tokens per row in this call
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        for lo, hi, name in runner.segments:
            w = table.get(name)
            if w is None:  # this adapter does not touch this module
                continue
            a_t, b_t, scale = w
            rows = slice(lo * per_row, hi * per_row)
            y2[rows].addmm_(x2[rows] @ a_t, b_t, alpha=scale)
        return y

    return forward


class LoraRunner:
    """Every PEFT LoRA layer of a model, with its adapters' weights, ready to run grouped by row."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        from peft.tuners.lora.layer import LoraLayer

        self.why_not: str | None = None
        self.layers: list[tuple[torch.nn.Module, dict[str, _Weights]]] = []
        self.segments: list[tuple[int, int, str]] = []  # (first row, end row, adapter)
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            table = _module_table(module, dtype)
            if isinstance(table, str):
                self.why_not = f"{table} at {name}"
                self.layers = []
                return
            self.layers.append((module, table))

    @property
    def usable(self) -> bool:
        return self.why_not is None and bool(self.layers)

    def set_rows(self, adapters: list[str]) -> None:
        """The adapter of each row of the next forward, in batch order (grouped by adapter)."""
        self.segments = row_segments(adapters)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Run every LoRA layer through the grouped forward until the block ends."""
        installed: list[torch.nn.Module] = []
        try:
            for module, table in self.layers:
                fwd: Callable[..., torch.Tensor] = _grouped_forward(module.base_layer, table, self)
                module.forward = fwd
                installed.append(module)
            yield
        finally:
            for module in installed:
                del module.forward  # back to the class's (PEFT's) forward
            self.segments = []


__all__ = ["BASE_ADAPTER", "LoraRunner", "row_segments"]
