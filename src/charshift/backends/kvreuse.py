"""Keys and values an episode has already computed, kept between the steps of a rollout.

In a multi-turn or agentic rollout each step's prompt is the previous prompt, the model's reply
and a new turn. HFBackend keeps, per session (`GenRequest.session`, the episode key), the token ids
it processed and their per-layer keys and values, and the next request of that session prefills
only what follows the longest common token prefix. Matching on token ids (not on text) keeps it
correct whatever the chat template or the tokenizer does to the reply when it is rendered again.

An entry is valid only for the adapter that computed it. An entry is taken out of the store when
its session asks for it, and the session's new entry goes in when the step ends. Entries are
bounded by a byte budget. To make room, the least recently stored entries of sessions that the
current call does not ask for go first (in a lockstep rollout every live episode asks at every
step, so these are episodes that ended); entries the current call still asks for are never
evicted for a new one: the new one is then not kept. (Plain LRU would be the worst policy for
lockstep steps, which visit every session in the same order: each new entry would evict the one
asked for next.)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

# Layer types whose per-token keys/values can be sliced per row and stored in full: full
# attention, and sliding-window attention (stored in full here, the window applied by the mask).
PLAIN_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def cache_blocker(text_config: Any) -> str | None:
    """Why a model's cache cannot be cut per row and stored (None: it can), from its text config.

    Full- and sliding-attention layers keep one key/value per token; HFBackend gives them a cache
    that stores every token (a sliding layer's window is applied by the mask), so a row's keys and
    values can be cut out and put back. Layers with recurrent, chunked or shared state cannot;
    those models keep the cache the model makes itself, and run without reuse."""
    types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    if not types <= PLAIN_LAYER_TYPES:
        return f"layer types {sorted(types - PLAIN_LAYER_TYPES)} are not per-token attention"
    if getattr(text_config, "attention_chunk_size", None):
        return "chunked attention"
    if getattr(text_config, "num_kv_shared_layers", 0):
        return "layers share keys/values"
    if getattr(text_config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    return None


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
    not_kept: int = 0  # entries not stored: too big, or no room without evicting a live session

    def to_dict(self) -> dict[str, int]:
        return {
            "prefill_tokens": self.prefill_tokens,
            "reused_tokens": self.reused_tokens,
            "hits": self.hits,
            "misses": self.misses,
            "stored": self.stored,
            "evicted": self.evicted,
            "not_kept": self.not_kept,
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
        self.wanted: set[str] = set()  # sessions the current call asks for (never evicted)

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

    def put(self, session: str, entry: KVEntry) -> bool:
        """Store an entry (replacing the session's old one) if room can be made; see the module
        docstring for the order of eviction. Returns whether it was kept."""
        self.drop(session)
        if entry.nbytes > self.budget:
            self.stats.not_kept += 1
            return False
        if self.bytes + entry.nbytes > self.budget:
            for old in [s for s in self._entries if s not in self.wanted]:  # oldest first
                self.drop(old)
                self.stats.evicted += 1
                if self.bytes + entry.nbytes <= self.budget:
                    break
        if self.bytes + entry.nbytes > self.budget:
            self.stats.not_kept += 1
            return False
        self._entries[session] = entry
        self.bytes += entry.nbytes
        self.stats.stored += 1
        return True

    def drop(self, session: str) -> None:
        entry = self._entries.pop(session, None)
        if entry is not None:
            self.bytes -= entry.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


__all__ = [
    "PLAIN_LAYER_TYPES",
    "KVEntry",
    "KVStats",
    "SessionKV",
    "cache_blocker",
    "common_prefix",
]
