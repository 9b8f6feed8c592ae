"""`tiny:modernbert[:label1,label2,...[:seed]]`: a tiny random ModernBERT classifier.

Built from a config with the tokenizer of the packaged MiniLM folder, so nothing is downloaded,
and cached under `<cache>/tiny_classifiers/`. Its predictions are meaningless by design; it
exists so the pipeline can run end to end on a laptop (smoke preset, tests). `tiny:modernbert`
alone uses OCT's eleven persona labels, in the OCT classifier's label order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from charshift.config import ALL_PERSONAS
from charshift.schema import stable_hash
from charshift.scoring.base import ClassifierError
from charshift.scoring.sources import packaged_minilm_dir

TINY_PREFIX = "tiny:modernbert"
# Bump when the tiny builder changes, so cached tiny folders from an older builder are not reused.
_TINY_BUILDER_VERSION = 1


def parse_tiny(source: str) -> tuple[list[str], int]:
    """`tiny:modernbert[:a,b,c[:seed]]` -> (labels, seed)."""
    rest = source[len(TINY_PREFIX) :].lstrip(":")
    parts = rest.split(":") if rest else []
    if len(parts) > 2:
        raise ClassifierError(
            f"bad tiny classifier spec {source!r}; use tiny:modernbert:a,b,c[:seed]"
        )
    labels = [x.strip() for x in parts[0].split(",") if x.strip()] if parts else list(ALL_PERSONAS)
    seed = 0
    if len(parts) == 2:
        try:
            seed = int(parts[1])
        except ValueError:
            raise ClassifierError(f"bad seed in tiny classifier spec {source!r}") from None
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ClassifierError(f"tiny classifier {source!r} needs at least two distinct labels")
    return labels, seed


def tiny_modernbert_config(labels: Sequence[str], tokenizer: Any) -> Any:
    """A ModernBERT config small enough to build and run in milliseconds on a CPU.

    Token ids follow the MiniLM (BERT uncased) tokenizer; mean pooling so that a randomly
    initialised model can learn bag-of-words tasks quickly in tests.
    """
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        layer_types=["full_attention", "sliding_attention"],
        local_attention=16,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        cls_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        classifier_pooling="mean",
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


def build_tiny_modernbert(labels: Sequence[str], out_dir: Path, *, seed: int = 0) -> Path:
    """Build a tiny random ModernBERT classifier into `out_dir` (weights + MiniLM tokenizer).

    Deterministic: the same labels and seed give byte-identical weights. The global torch RNG is
    left as it was. Written to a temporary sibling and renamed, so a half-built folder is never
    visible under the final name.
    """
    from transformers import AutoTokenizer, ModernBertForSequenceClassification

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))
    config = tiny_modernbert_config(labels, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModernBertForSequenceClassification(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "charshift_tiny.json").write_text(
            json.dumps({"labels": list(labels), "seed": seed, "builder": _TINY_BUILDER_VERSION})
        )
        if out_dir.exists():  # another process won the race; keep its (identical) folder
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def tiny_folder(source: str, cache_dir: Path | None) -> tuple[Path, list[str], int]:
    """The cached folder of a `tiny:modernbert...` spec, built on first use; its labels, seed."""
    from charshift.models import default_cache_dir

    labels, seed = parse_tiny(source)
    key = stable_hash({"labels": labels, "seed": seed, "builder": _TINY_BUILDER_VERSION}, 12)
    folder = Path(cache_dir or default_cache_dir()) / "tiny_classifiers" / f"modernbert-{key}"
    if not (folder / "config.json").is_file():
        build_tiny_modernbert(labels, folder, seed=seed)
    return folder, labels, seed
