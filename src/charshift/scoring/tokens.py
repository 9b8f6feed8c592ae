"""What every torch text scorer shares: the device, token ids, dynamic padding, progress bars.

Texts are tokenised once, truncated to what the model's position table and tokenizer allow, and
batched by the caller; a batch is right-padded to its own longest member and given only the
tokenizer outputs the model's forward accepts by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from charshift.scoring.base import Progress


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> the first CUDA device where one exists, else CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def effective_max_length(model: Any, tokenizer: Any, max_length: int) -> int:
    """Cap the requested length at what the model's position table and tokenizer allow.

    MiniLM has 512 positions, ModernBERT 8192; asking for more would index past the table.
    """
    cap = max_length
    pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(pos, int) and pos > 0:
        cap = min(cap, pos)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # huge values are "unset" sentinels
        cap = min(cap, tok_max)
    return max(cap, 2)


def forward_keys(model: Any) -> tuple[str, ...]:
    """The tokenizer outputs this model's forward accepts by name.

    A BERT tokenizer emits token_type_ids, which ModernBERT does not take (the tiny classifier
    pairs the two), so pass only what the signature names.
    """
    params = inspect.signature(model.forward).parameters
    return tuple(k for k in ("input_ids", "attention_mask", "token_type_ids") if k in params)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, never empty (an empty text still gets the special tokens)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    ids = [list(x) for x in enc["input_ids"]]
    fallback = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    return [x if x else [fallback] for x in ids]


def collate(ids: list[list[int]], pad: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its own longest member (dynamic padding)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if "token_type_ids" in keys:
        batch["token_type_ids"] = torch.zeros_like(input_ids)
    return {k: v for k, v in batch.items() if k in keys}


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else end-of-sequence, else unknown, else 0."""
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if cand is not None:
            return int(cand)
    return 0


class ProgressBar:
    """One progress interface over `Progress` (a tqdm bar for True, a callback, or nothing)."""

    def __init__(self, progress: Progress, total: int, desc: str) -> None:
        self.total, self.done, self.cb, self.bar = total, 0, None, None
        if callable(progress):
            self.cb = progress
        elif progress:
            from charshift.progress import bar

            self.bar = bar(total, desc)

    def update(self, n: int, **postfix: Any) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix)
        if self.cb is not None:
            self.cb(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
