"""Keys and values an episode has already computed, kept between the steps of a rollout.

In a multi-turn or agentic rollout each step's prompt is the previous prompt, the model's reply
and a new turn. HFBackend keeps, per session (`GenRequest.session`, the episode key), the token ids
it processed and their per-layer keys and values, and the next request of that session prefills
only what follows the longest common token prefix. Matching on token ids (not on text) keeps it
correct whatever the chat template or the tokenizer does to the reply when it is rendered again.

An entry is valid only for the adapter that computed it. Entries are bounded by a byte budget,
least recently used first out; an entry is taken out of the store when its session asks for it,
and a session's new entry replaces it when the step ends.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# Layer types whose per-token keys/values can be sliced per row and stored in full: full
# attention, and sliding-window attention (stored in full here, the window applied by the mask).
PLAIN_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


@dataclass
class KVEntry:
    """One session's processed tokens and, per layer, their (keys, values): [heads, len, dim]."""

    adapter: str
    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    nbytes: int = 0

    def __post_init__(self) -> None:
        if not self.nbytes:
            self.nbytes = sum(
                k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers
            )


@dataclass
class KVStats:
    """Counters since the backend was made: what was prefilled, what was reused."""

    prefill_tokens: int = 0  # prompt tokens run through the model (real tokens, not padding)
    reused_tokens: int = 0  # prompt tokens whose keys/values came from a session's entry
    hits: int = 0  # requests that reused at least one token
    misses: int = 0  # requests with a session but nothing reusable
    stored: int = 0
    evicted: int = 0
    too_big: int = 0  # entries larger than the whole budget (not stored)

    def to_dict(self) -> dict[str, int]:
        return {
            "prefill_tokens": self.prefill_tokens,
            "reused_tokens": self.reused_tokens,
            "hits": self.hits,
            "misses": self.misses,
            "stored": self.stored,
            "evicted": self.evicted,
            "too_big": self.too_big,
        }


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SessionKV:
    """Per-session KV entries under a byte budget, least recently used evicted first."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(0, int(budget_bytes))
        self._entries: OrderedDict[str, KVEntry] = OrderedDict()
        self.bytes = 0
        self.stats = KVStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session: str) -> bool:
        return session in self._entries

    def take(self, session: str, adapter: str) -> KVEntry | None:
        """Remove and return the session's entry if it was computed under `adapter`."""
        entry = self._entries.pop(session, None)
        if entry is None:
            return None
        self.bytes -= entry.nbytes
        return entry if entry.adapter == adapter else None

    def put(self, session: str, entry: KVEntry) -> None:
        """Store an entry (replacing the session's old one), evicting the oldest to fit."""
        self.drop(session)
        if entry.nbytes > self.budget:
            self.stats.too_big += 1
            return
        while self._entries and self.bytes + entry.nbytes > self.budget:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.stats.evicted += 1
        self._entries[session] = entry
        self.bytes += entry.nbytes
        self.stats.stored += 1

    def drop(self, session: str) -> None:
        entry = self._entries.pop(session, None)
        if entry is not None:
            self.bytes -= entry.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


__all__ = ["PLAIN_LAYER_TYPES", "KVEntry", "KVStats", "SessionKV", "common_prefix"]
