"""Reading a model's residual stream over a response it is shown (teacher forcing).

A `Read` is a chat context, a response after it and the adapter to run it under. Its context is
rendered with the model's chat template and the generation prompt, exactly as the model saw it
before writing; the response's tokens follow. `response_means` runs the reads through an
`HFBackend` (`hidden_states`: every layer, no sampling) and returns, per read and per requested
layer, the mean hidden state over the response's tokens, or over the tokens of `span` (a
character range of the response) where one is given. Layer l is the output of block l
(1 = the first block; transformers' `hidden_states[l]`). Means are taken in float32 whatever
the model's dtype.

A read longer than the model's context keeps its last tokens (the context's start is dropped
first); `ReadStats` counts how many were cut, so the caller can say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from charshift.schema import Message


@dataclass(frozen=True)
class Read:
    """One teacher-forced read (see the module doc)."""

    context: list[Message]
    response: str
    adapter: str | None = None
    span: tuple[int, int] | None = None


@dataclass
class ReadStats:
    """What reading did: reads run, and reads cut to the model's context length."""

    reads: int = 0
    cut: int = 0


def encode(tokenizer: Any, read: Read, max_len: int) -> tuple[list[int], list[int], bool]:
    """(token ids, positions averaged over, whether the read was cut to `max_len`)."""
    prompt = tokenizer.apply_chat_template(read.context, add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    enc = tokenizer(read.response, add_special_tokens=False, return_offsets_mapping=True)
    r_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    chosen = list(range(len(r_ids)))
    if read.span is not None:
        a, b = read.span
        inside = [j for j, (s, e) in enumerate(offsets) if e > a and s < b]
        chosen = inside or chosen
    ids = list(p_ids) + list(r_ids)
    drop = max(0, len(ids) - max_len)
    positions = [len(p_ids) + j - drop for j in chosen if len(p_ids) + j - drop >= 0]
    if not positions:
        positions = [len(ids) - drop - 1]  # a response wholly cut off: its last token
    return ids[drop:], positions, drop > 0


def _batches(reads: Sequence[Read], batch_size: int) -> list[list[int]]:
    """Indices of `reads` in batches of one adapter each, similar lengths together."""
    groups: dict[str | None, list[int]] = {}
    for i, r in enumerate(reads):
        groups.setdefault(r.adapter, []).append(i)
    out = []
    for idx in groups.values():
        idx.sort(key=lambda i: len(reads[i].response) + sum(len(str(m)) for m in reads[i].context))
        out += [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]
    return out


def response_means(
    backend: Any,
    reads: Sequence[Read],
    layers: Sequence[int],
    batch_size: int = 8,
    stats: ReadStats | None = None,
    progress: Any = None,
) -> np.ndarray:
    """Mean hidden state over each read's response tokens at each of `layers`:
    an array (len(reads), len(layers), hidden size), float32."""
    tok, ctx = backend.tokenizer, backend.context_length()
    encoded = [encode(tok, r, ctx) for r in reads]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0  # masked out: any id does
    out: np.ndarray | None = None
    for batch in _batches(reads, batch_size):
        width = max(len(encoded[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = encoded[i][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        hidden = backend.hidden_states(ids, mask, reads[batch[0]].adapter)
        for row, i in enumerate(batch):
            pos = torch.tensor(encoded[i][1])
            means = [hidden[k][row, pos].float().mean(0).cpu().numpy() for k in layers]
            if out is None:
                out = np.zeros((len(reads), len(layers), means[0].shape[0]), dtype=np.float32)
            out[i] = np.stack(means)
        if progress is not None:
            progress.update(len(batch))
    if stats is not None:
        stats.reads += len(reads)
        stats.cut += sum(e[2] for e in encoded)
    return out if out is not None else np.zeros((0, len(layers), 0), dtype=np.float32)
