"""A frozen encoder's sentence embeddings, and `ProbeModel`: that encoder with a linear head.

Embedding: the encoder's last hidden states averaged over the attention mask, then L2-normalised
(the all-MiniLM-L6-v2 sentence-embedding recipe). The probe's logistic regression sees
standardised embeddings; the standardisation is folded into the saved weights, so the stored head
is exactly `logits = e @ coef.T + intercept` on the normalised embedding `e`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from charshift.scoring.base import ClassifierError
from charshift.scoring.tokens import ProgressBar, collate, encode_texts, forward_keys, pad_id


def mean_pool(encoder: Any, keys: tuple[str, ...], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2-normalised mean of the last hidden states over the attention mask, in float32."""
    hidden = encoder(**{k: v for k, v in batch.items() if k in keys}).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(mean, dim=-1)


class ProbeModel(torch.nn.Module):
    """Frozen encoder + linear head, with the forward signature `Classifier.predict` expects.

    The head runs in float64 on the float32 embedding, so a reloaded head (read back from JSON,
    where floats round-trip exactly) gives the same probabilities as the one just fitted.
    """

    def __init__(self, encoder: Any, coef: np.ndarray, intercept: np.ndarray) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # max_position_embeddings, model_type
        self.register_buffer("coef", torch.as_tensor(np.asarray(coef, dtype=np.float64)))
        self.register_buffer("intercept", torch.as_tensor(np.asarray(intercept, dtype=np.float64)))
        self._keys = forward_keys(encoder)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        emb = mean_pool(self.encoder, self._keys, batch).double()
        return SequenceClassifierOutput(logits=emb @ self.coef.T + self.intercept)


@torch.inference_mode()
def embed_texts(
    encoder: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 32,
    device: torch.device | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(N, D) float64 array of normalised mean-pooled embeddings, in input order."""
    if not texts:
        raise ValueError("no texts to embed")
    dev = device or next(encoder.parameters()).device
    keys, pad = forward_keys(encoder), pad_id(tokenizer)
    ids = encode_texts(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    out: list[np.ndarray | None] = [None] * len(ids)
    bar = ProgressBar(progress, len(ids), "embed")
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(dev) for k, v in collate([ids[i] for i in idx], pad, keys).items()}
            emb = mean_pool(encoder, keys, batch).cpu().numpy()
            for i, row in zip(idx, emb, strict=True):
                out[i] = row
            bar.update(len(idx))
    finally:
        bar.close()
    return np.stack([x for x in out if x is not None]).astype(np.float64)


def load_encoder(ref: str, kw: dict[str, Any]) -> tuple[Any, Any]:
    """(tokenizer, encoder) of a `from_pretrained` reference, the encoder in float32."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, **kw)
        encoder = AutoModel.from_pretrained(ref, dtype=torch.float32, **kw)
    except Exception as err:
        raise ClassifierError(f"cannot load the encoder {ref!r}: {err}") from None
    return tokenizer, encoder
