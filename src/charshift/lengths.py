"""The length counters of the scoring step: the scorer's own tokenizer as a `units.LengthCounter`.

The length controls (`SLICE.head`, `id_chat.short`; see `charshift.units`) cut texts to lengths
counted in the tokens the classifier reads. This module owns where that counter comes from:

- `counter_for(clf)`: a loaded classifier's tokenizer as a counter (`TokenCounter`: its fast
  tokenizer's character offsets, special tokens left out, no truncation or padding). A scorer
  without a tokenizer (the TF-IDF lexical probe) or without a fast one counts words
  (`units.WORDS`), and says why.
- `record_counter(store, cid, counter)`: the scoring step writes the tokenizer into the run
  directory (`length_counters/SHA.json`, the tokenizer's own JSON, named by its hash, written
  atomically) and records in the manifest (`length_counters`: classifier id -> counter name,
  file) which counter the scores of that classifier used.
- `run_counters(store, cids)`: a report, which loads no model, reads the same counters back, so
  it cuts the texts the scores were made of.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from charshift.units import WORDS, LengthCounter

COUNTER_DIR = "length_counters"
MANIFEST_FIELD = "length_counters"


class TokenCounter:
    """Counts the tokens of a `tokenizers.Tokenizer` (the backend of a fast HF tokenizer)."""

    def __init__(self, tokenizer: Any, label: str) -> None:
        tokenizer.no_truncation()  # a classifier truncates; a length counts every token
        tokenizer.no_padding()
        self._tok = tokenizer
        self.json = tokenizer.to_str()
        self.sha = hashlib.sha256(self.json.encode()).hexdigest()[:16]
        self.name = f"tokens:{label}@{self.sha}"

    def starts(self, text: str) -> list[int]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return sorted(s for s, e in enc.offsets if e > s)

    @classmethod
    def from_json(cls, text: str, label: str) -> TokenCounter:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text), label)


def _label(tokenizer: Any) -> str:
    """A short name for a tokenizer: a hub id as it is, a folder by its last two parts."""
    ref = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    return "/".join(Path(ref).parts[-2:]) if Path(ref).is_absolute() else ref


def counter_for(clf: Any) -> tuple[LengthCounter, str | None]:
    """The counter of a loaded classifier, and why it counts words where it does (else None)."""
    tok = getattr(clf, "tokenizer", None)
    if tok is None:
        return WORDS, "the scorer has no tokenizer (e.g. the TF-IDF lexical probe)"
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return WORDS, f"the scorer's tokenizer {_label(tok)} gives no character offsets"
    return TokenCounter.from_json(backend.to_str(), _label(tok)), None


def record_counter(store: Any, cid: str, counter: LengthCounter, why: str | None) -> None:
    """Write `counter` into the run (a token counter's JSON, once) and record it in the
    manifest under classifier id `cid`."""
    from charshift.fileio import atomic_write_text

    entry: dict[str, Any] = {"name": counter.name, "file": None}
    if isinstance(counter, TokenCounter):
        rel = f"{COUNTER_DIR}/{counter.sha}.json"
        path = store.root / rel
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, counter.json)
        entry["file"] = rel
    if why:
        entry["why"] = why
    store.update_manifest(**{MANIFEST_FIELD: {cid: entry}})


@functools.lru_cache(maxsize=16)
def _load(path: str, name: str) -> TokenCounter:
    text = Path(path).read_text(encoding="utf-8")
    counter = TokenCounter.from_json(text, "")
    counter.name = name
    return counter


def run_counters(store: Any, cids: dict[str, str]) -> dict[str, LengthCounter]:
    """base -> the counter its scores were cut with (`cids`: base -> classifier id), read from
    the run; `units.WORDS` where the run records none (scored before counters were recorded).
    A recorded file that is gone or damaged is said (`store.warn`) and counts words, so its
    cuts show as not scored rather than as other texts."""
    entries = store.manifest().get(MANIFEST_FIELD)
    entries = entries if isinstance(entries, dict) else {}
    out: dict[str, LengthCounter] = {}
    for base, cid in cids.items():
        entry = entries.get(cid)
        rel = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(rel, str):
            continue
        try:
            out[base] = _load(str(store.root / rel), str(entry.get("name", rel)))
        except Exception as err:  # noqa: BLE001 - any unreadable file: say so, count words
            store.warn(
                f"{store.root / rel}: the token counter of classifier {cid} cannot be read "
                f"({err}); its length controls are read as not scored. Run `charshift score "
                f"--run {store.root}` to write it again"
            )
    return out
