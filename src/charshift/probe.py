"""The probe recipe: a frozen encoder's mean-pooled embeddings + multinomial logistic regression.

Why a probe: fine-tuning a 20M-150M parameter encoder on a hundred replies mostly fails to move
(the demo's MiniLM fine-tune ended at the loss of a uniform guess). A linear model on frozen
sentence embeddings has a few thousand parameters, trains in seconds and cannot silently fail to
move; its one knob, the L2 regularisation C, is chosen by cross-validation in which a prompt's
rows always stay together (GroupKFold over prompt ids), with the out-of-fold log-loss (the mean
negative log-probability of the true label) as the criterion. Not macro-F1: it depends only on
the argmax, which a strongly regularised model often gets as right as a weaker one, so on a tie
the smallest C won and the saved probabilities were almost uniform (every p(true) about 1/K).
The out-of-fold macro-F1 per C is still computed and reported, and `auto` features compare it.

Embedding: the encoder's last hidden states averaged over the attention mask, then L2-normalised
(the all-MiniLM-L6-v2 sentence-embedding recipe). The logistic regression sees standardised
embeddings; the standardisation is folded into the saved weights, so the stored head is exactly
`logits = e @ coef.T + intercept` on the normalised embedding `e`.

A probe folder holds no executable or pickled state:
  - `charshift_probe.json`: format, label order, pooling, max length, chosen C, the encoder
    (source, kind, path or hub revision, weights sha256) and the head file's sha256;
  - `probe_head.json`: `labels`, `coef` (K x D) and `intercept` (K) as plain numbers;
  - `train_report.json`: as for every trained classifier.
`Classifier.load(folder)` loads it: it finds the encoder again, checks its weights against the
recorded sha256 and returns a `Classifier` whose `predict` runs encoder + head.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from charshift.classifier import (
    DEFAULT_C_GRID,
    PACKAGED_MINILM,
    REPORT_FILE,
    Classifier,
    ClassifierError,
    TrainReport,
    _Bar,
    _collate,
    _effective_max_length,
    _encode,
    _forward_keys,
    _hub_kwargs,
    _hub_snapshot,
    _pad_id,
    _resolve_encoder,
    check_training_inputs,
    finish_report,
    new_report,
    packaged_minilm_dir,
    resolve_device,
    split_rows,
    weights_sha256,
    write_json_atomic,
)
from charshift.lexical import LEXICAL_FILE, TFIDF_PARAMS, fit_sparse_head, fit_vectorizer

PROBE_CONFIG = "charshift_probe.json"
PROBE_HEAD = "probe_head.json"
PROBE_FORMAT = "charshift-probe"
PROBE_VERSION = 1
# what a probe reads: sentence embeddings of a frozen encoder, TF-IDF word features (see
# charshift.lexical), or whichever of the two cross-validates better on the training rows
FEATURES = ("embedding", "lexical", "auto")
_MAX_ITER = 5000  # lbfgs iterations; the fit records when it hit this limit
# fit_predict(train_rows, test_rows, C) -> (len(test_rows), K) class probabilities, label order
FitPredict = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
# the log-loss's floor on a probability (a confident miss costs -ln 1e-12 = 27.6, not infinity),
# and the margin within which two values of C count as tied (the smaller one is then kept)
_PROB_FLOOR = 1e-12
_LOG_LOSS_TIE = 1e-9
C_CRITERION = "out-of-fold log-loss (prompt-grouped CV; ties to the smaller C)"


# --------------------------------------------------------------------------------------------
# embeddings


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
        self._keys = _forward_keys(encoder)

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
    keys, pad = _forward_keys(encoder), _pad_id(tokenizer)
    ids = _encode(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    out: list[np.ndarray | None] = [None] * len(ids)
    bar = _Bar(progress, len(ids), "embed")
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(dev) for k, v in _collate([ids[i] for i in idx], pad, keys).items()}
            emb = mean_pool(encoder, keys, batch).cpu().numpy()
            for i, row in zip(idx, emb, strict=True):
                out[i] = row
            bar.update(len(idx))
    finally:
        bar.close()
    return np.stack([x for x in out if x is not None]).astype(np.float64)


# --------------------------------------------------------------------------------------------
# logistic regression and the grouped choice of C


def _one_blas_thread() -> Any:
    """Single-threaded BLAS for the small logistic-regression fits: on a few shared cores a
    multi-threaded BLAS spends most of their time synchronising (10x slower measured here)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def fit_head(X: np.ndarray, y: np.ndarray, k: int, c: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Multinomial logistic regression on standardised X, folded back onto X.

    Returns (coef (k, D), intercept (k), lbfgs iterations). A class absent from `y` gets
    intercept -inf (never predicted); with one class present the head always predicts it.
    """
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    w, b, n_iter = fit_sparse_head(scaler.transform(X), y, k, c, max_iter=_MAX_ITER)
    w = w / scaler.scale_  # absent classes keep w = 0 and b = -inf
    return w, b - w @ scaler.mean_, n_iter


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax; a logit of -inf (a class absent from the training rows) gets 0."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true label, each probability clipped at 1e-12."""
    p_true = np.asarray(probs, dtype=np.float64)[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(p_true, _PROB_FLOOR, 1.0))))


def grouped_cv_scores(
    fit_predict: FitPredict,
    y: np.ndarray,
    groups: Sequence[str],
    c_grid: Sequence[float],
    n_folds: int,
    label_names: Sequence[str],
) -> tuple[dict[float, float], dict[float, float], int]:
    """Out-of-fold macro-F1 and log-loss per C, folds by group (GroupKFold), pooled over folds.

    `fit_predict(train_rows, test_rows, C)` returns the test rows' class probabilities, an
    (n_test, K) array with columns in `label_names` order. Returns ({C: macro-F1}, {C: log-loss},
    folds used): macro-F1 is `stats.score_labels`'s on the argmax of the pooled probabilities,
    log-loss is `log_loss`'s on the pooled probabilities themselves.
    """
    from sklearn.model_selection import GroupKFold

    from charshift.stats import score_labels

    n_groups = len(set(groups))
    if n_groups < 2:
        raise ValueError(
            f"choosing C by grouped cross-validation needs at least 2 training prompts; got "
            f"{n_groups}. Give one value of C, or more prompts."
        )
    folds = min(n_folds, n_groups)
    splits = list(GroupKFold(n_splits=folds).split(np.zeros(len(y)), y, list(groups)))
    names = list(label_names)
    truth = [names[i] for i in y]
    macro_f1: dict[float, float] = {}
    losses: dict[float, float] = {}
    for c in c_grid:
        probs = np.zeros((len(y), len(names)))
        for tr, te in splits:
            got = np.asarray(fit_predict(tr, te, c), dtype=np.float64)
            if got.shape != (len(te), len(names)):
                raise ValueError(
                    f"fit_predict must return a ({len(te)}, {len(names)}) probability array for "
                    f"{len(te)} test rows; got shape {got.shape}"
                )
            probs[te] = got
        pred = probs.argmax(axis=1)
        macro_f1[c] = float(score_labels(truth, [names[i] for i in pred], names)["macro_f1"])
        losses[c] = log_loss(probs, y)
    return macro_f1, losses, folds


class CChoice(NamedTuple):
    """`select_c`'s answer: the chosen C, the CV scores per C (None without CV), the folds."""

    c: float
    cv_macro_f1: dict[float, float] | None
    cv_log_loss: dict[float, float] | None
    folds: int


def select_c(
    fit_predict: FitPredict,
    y: np.ndarray,
    groups: Sequence[str],
    c_grid: Sequence[float],
    n_folds: int,
    label_names: Sequence[str],
) -> CChoice:
    """The C with the lowest out-of-fold log-loss (`grouped_cv_scores`); values within 1e-9 of
    each other tie and go to the smaller C (the stronger regularisation). The out-of-fold
    macro-F1 per C comes back too. A one-value grid is used as given, without CV."""
    grid = sorted(c_grid)
    if not grid or any(not (0 < c < float("inf")) for c in grid):
        raise ValueError(f"c_grid must hold finite values > 0; got {list(c_grid)}")
    if len(grid) == 1:
        return CChoice(grid[0], None, None, 0)
    f1, losses, folds = grouped_cv_scores(fit_predict, y, groups, grid, n_folds, label_names)
    best = grid[0]
    for c in grid[1:]:
        if losses[c] < losses[best] - _LOG_LOSS_TIE:
            best = c
    return CChoice(best, f1, losses, folds)


def _embedding_fit_predict(X: np.ndarray, y: np.ndarray, k: int) -> FitPredict:
    """`fit_head` on the training rows; the test rows' softmax probabilities (absent classes 0)."""

    def fit_predict(tr: np.ndarray, te: np.ndarray, c: float) -> np.ndarray:
        coef, intercept, _ = fit_head(X[tr], y[tr], k, c)
        return softmax_rows(X[te] @ coef.T + intercept)

    return fit_predict


# --------------------------------------------------------------------------------------------
# the lexical baseline


def _tfidf_fit_predict(texts: Sequence[str], y: np.ndarray, k: int) -> FitPredict:
    """TF-IDF (fitted on the training rows of each fold) + logistic regression; the test rows'
    class probabilities, 0 for a class without training rows. With one class in the training
    rows, or no word in any of their texts, every test row gets the training rows' class shares.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    arr = np.asarray(list(texts), dtype=object)

    def fit_predict(tr: np.ndarray, te: np.ndarray, c: float) -> np.ndarray:
        present = np.unique(y[tr])
        vec = TfidfVectorizer(**TFIDF_PARAMS)
        try:
            x_tr = vec.fit_transform(arr[tr])
        except ValueError:  # empty vocabulary: no word in any training text
            x_tr = None
        if len(present) == 1 or x_tr is None:
            prior = np.bincount(y[tr], minlength=k) / len(tr)
            return np.tile(prior, (len(te), 1))
        with _one_blas_thread():
            lr = LogisticRegression(C=c, max_iter=_MAX_ITER).fit(x_tr, y[tr])
        probs = np.zeros((len(te), k))
        probs[:, lr.classes_] = lr.predict_proba(vec.transform(arr[te]))  # classes_ == present
        return probs

    return fit_predict


def lexical_baseline(
    texts: Sequence[str],
    labels: Sequence[str],
    groups: Sequence[str],
    split: tuple[list[int], list[int]],
    label_names: Sequence[str],
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    cv_folds: int = 5,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """TF-IDF + logistic regression on the training rows of `split`, scored on its held-out rows.

    C is chosen as for the probe (grouped CV on the training rows, out-of-fold log-loss; the
    out-of-fold macro-F1 per C is recorded beside it); the held-out figures come from
    `classifier.heldout_evaluation` with the same seed, so the interval resamples the same
    prompts as the classifier's.
    """
    from sklearn import __version__ as sklearn_version

    from charshift.classifier import heldout_evaluation

    names = list(label_names)
    train_idx, held_idx = split
    if not train_idx or not held_idx:
        raise ValueError("the lexical baseline needs training and held-out rows")
    index = {n: i for i, n in enumerate(names)}
    y_all = np.array([index[lab] for lab in labels], dtype=np.int64)
    fit_predict = _tfidf_fit_predict(texts, y_all, len(names))
    tr = np.array(train_idx)
    c, scores, losses, folds = select_c(
        lambda a, b, cc: fit_predict(tr[a], tr[b], cc),
        y_all[tr],
        [groups[i] for i in train_idx],
        c_grid,
        cv_folds,
        names,
    )
    pred = fit_predict(tr, np.array(held_idx), c).argmax(axis=1)
    ev = heldout_evaluation(
        [labels[i] for i in held_idx],
        [names[i] for i in pred],
        [groups[i] for i in held_idx],
        names,
        n_boot=n_boot,
        ci=ci,
        seed=seed,
    )
    return {
        "name": "tfidf_logreg",
        "features": {k: list(v) if isinstance(v, tuple) else v for k, v in TFIDF_PARAMS.items()},
        "C": c,
        "C_chosen_by": C_CRITERION if losses is not None else "the one value given",
        "cv_macro_f1": None if scores is None else {str(k): v for k, v in scores.items()},
        "cv_log_loss": None if losses is None else {str(k): v for k, v in losses.items()},
        "cv_folds": folds,
        "n_train": len(train_idx),
        "n_heldout": len(held_idx),
        "heldout_groups": sorted({groups[i] for i in held_idx}),
        "sklearn": sklearn_version,
        **ev,
    }


# --------------------------------------------------------------------------------------------
# saving and loading


def is_probe_folder(folder: Path) -> bool:
    return (Path(folder) / PROBE_CONFIG).is_file()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _combined_sha(head_sha: str, encoder_sha: str) -> str:
    """The probe's weight hash: changes when the head or the encoder's weights change."""
    return hashlib.sha256(f"{PROBE_HEAD}:{head_sha}\nencoder:{encoder_sha}\n".encode()).hexdigest()


def save_probe(
    out_dir: Path,
    labels: Sequence[str],
    coef: np.ndarray,
    intercept: np.ndarray,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write the head and the config (each atomically); return the config as written."""
    if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
        raise ValueError("probe head has non-finite weights (a label without training rows?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    head = {"labels": list(labels), "coef": coef.tolist(), "intercept": intercept.tolist()}
    write_json_atomic(out_dir / PROBE_HEAD, head)
    config = {
        "format": PROBE_FORMAT,
        "version": PROBE_VERSION,
        "labels": list(labels),
        "head_file": PROBE_HEAD,
        "head_sha256": _file_sha256(out_dir / PROBE_HEAD),
        **meta,
    }
    write_json_atomic(out_dir / PROBE_CONFIG, config)
    return config


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ClassifierError(f"cannot read probe file {path}: {err}") from None


def _read_head(folder: Path, config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    path = folder / PROBE_HEAD
    if not path.is_file():
        raise ClassifierError(f"probe folder {folder} has no {PROBE_HEAD}")
    if _file_sha256(path) != config.get("head_sha256"):
        raise ClassifierError(f"{path}: sha256 differs from the one recorded in {PROBE_CONFIG}")
    head = _read_json(path)
    labels = config["labels"]
    try:
        coef = np.asarray(head["coef"], dtype=np.float64)
        intercept = np.asarray(head["intercept"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise ClassifierError(f"{path}: malformed head ({err})") from None
    if head.get("labels") != labels:
        raise ClassifierError(f"{path}: labels {head.get('labels')} differ from {labels}")
    if coef.ndim != 2 or coef.shape[0] != len(labels) or intercept.shape != (len(labels),):
        raise ClassifierError(
            f"{path}: coef must be {len(labels)} x D and intercept {len(labels)}; got "
            f"{coef.shape} and {intercept.shape}"
        )
    if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
        raise ClassifierError(f"{path}: non-finite weights")
    return coef, intercept


def _check_config(folder: Path) -> dict[str, Any]:
    config = _read_json(folder / PROBE_CONFIG)
    if not isinstance(config, dict) or config.get("format") != PROBE_FORMAT:
        raise ClassifierError(f"{folder / PROBE_CONFIG}: not a {PROBE_FORMAT} config")
    if config.get("version") != PROBE_VERSION:
        raise ClassifierError(
            f"{folder / PROBE_CONFIG}: version {config.get('version')!r}; this charshift reads "
            f"version {PROBE_VERSION}"
        )
    labels = config.get("labels")
    ok = isinstance(labels, list) and len(labels) >= 2 and len(set(labels)) == len(labels)
    if not ok or not all(isinstance(x, str) for x in labels):
        raise ClassifierError(f"{folder / PROBE_CONFIG}: labels must be >= 2 distinct names")
    if config.get("features", "embedding") not in FEATURES[:2]:
        raise ClassifierError(f"{folder / PROBE_CONFIG}: unknown features {config['features']!r}")
    if config.get("features") == "lexical":
        return config
    enc = config.get("encoder")
    if not isinstance(enc, dict) or enc.get("kind") not in ("packaged", "local", "hub"):
        raise ClassifierError(f"{folder / PROBE_CONFIG}: missing or unknown encoder")
    if not isinstance(config.get("max_length"), int):
        raise ClassifierError(f"{folder / PROBE_CONFIG}: max_length must be an integer")
    return config


def _find_encoder(enc: dict[str, Any], cache_dir: Path | None) -> tuple[str, dict[str, Any], Path]:
    """(from_pretrained reference, kwargs, folder to hash) for a recorded encoder."""
    if enc["kind"] == "packaged":
        if enc.get("source") != PACKAGED_MINILM:
            raise ClassifierError(f"unknown packaged encoder {enc.get('source')!r}")
        folder = packaged_minilm_dir()
        return str(folder), {}, folder
    if enc["kind"] == "local":
        folder = Path(str(enc.get("path")))
        if not folder.is_dir():
            raise ClassifierError(f"the probe's encoder folder {folder} does not exist")
        return str(folder), {}, folder
    folder, rev = _hub_snapshot(str(enc.get("source")), enc.get("revision"), cache_dir)
    return str(enc["source"]), _hub_kwargs(rev, cache_dir), folder


def _load_encoder(ref: str, kw: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, **kw)
        encoder = AutoModel.from_pretrained(ref, dtype=torch.float32, **kw)
    except Exception as err:
        raise ClassifierError(f"cannot load the encoder {ref!r}: {err}") from None
    return tokenizer, encoder


def _probe_classifier(
    model: ProbeModel,
    tokenizer: Any,
    config: dict[str, Any],
    source: str,
    folder: Path,
    dev: torch.device,
) -> Classifier:
    enc = config["encoder"]
    extra = {
        "mode": "probe",
        "encoder": {k: enc.get(k) for k in ("source", "kind", "revision", "weights_sha256")},
        "head_sha256": config["head_sha256"],
        "max_length": config["max_length"],
    }
    sha = _combined_sha(config["head_sha256"], enc["weights_sha256"])
    model.to(dev).eval()
    labels = list(config["labels"])
    return Classifier(model, tokenizer, labels, source, dev, "local", None, folder, extra, sha)


def load_probe(
    folder: Path, *, source: str | None = None, device: str = "auto", cache_dir: Path | None = None
) -> Classifier:
    """Load a probe folder (see the module doc): the encoder must still have the recorded hash."""
    folder = Path(folder).expanduser().resolve()
    config = _check_config(folder)
    coef, intercept = _read_head(folder, config)
    if config.get("features") == "lexical":
        from charshift.lexical import lexical_classifier

        sha = _combined_sha(config["head_sha256"], config["lexical_sha256"])
        return lexical_classifier(folder, config, coef, intercept, source or str(folder), sha)
    enc = config["encoder"]
    ref, kw, enc_folder = _find_encoder(enc, cache_dir)
    tokenizer, encoder = _load_encoder(ref, kw)
    sha = weights_sha256(enc_folder)
    if sha != enc.get("weights_sha256"):
        raise ClassifierError(
            f"probe {folder}: the encoder {enc.get('source')!r} at {enc_folder} has weights "
            f"sha256 {sha}, not the {enc.get('weights_sha256')} it was trained on"
        )
    if coef.shape[1] != encoder.config.hidden_size:
        raise ClassifierError(
            f"probe {folder}: head width {coef.shape[1]} != encoder hidden size "
            f"{encoder.config.hidden_size}"
        )
    model = ProbeModel(encoder, coef, intercept)
    return _probe_classifier(
        model, tokenizer, config, source or str(folder), folder, resolve_device(device)
    )


# --------------------------------------------------------------------------------------------
# training


def _prepare_out_dir(out_dir: Path) -> None:
    """Remove what would make an unfinished or older folder look finished or load wrongly."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (REPORT_FILE, PROBE_CONFIG, PROBE_HEAD, LEXICAL_FILE):
        (out_dir / name).unlink(missing_ok=True)


def _load_training_encoder(
    encoder: str, cache_dir: Path | None, dev: torch.device
) -> tuple[Any, Any, dict[str, Any]]:
    ref, kw, enc_folder, identity = _resolve_encoder(encoder, cache_dir)
    tokenizer, model = _load_encoder(ref, kw)
    identity["weights_sha256"] = weights_sha256(enc_folder)
    if identity["weights_sha256"] is None:
        raise ClassifierError(f"encoder {encoder!r}: no weight files to hash in {enc_folder}")
    if identity["kind"] == "local":
        identity["path"] = str(enc_folder)
    model.to(dev).eval()
    return tokenizer, model, identity


def _probe_warnings(cv: dict[float, float] | None, chance: float, n_iter: int) -> list[str]:
    out = []
    if cv is not None and max(cv.values()) <= chance:
        out.append(
            f"the probe's cross-validated macro-F1 never exceeded chance ({chance:.3f}) for any C "
            f"(best {max(cv.values()):.3f}): the embeddings may carry no label signal"
        )
    if n_iter >= _MAX_ITER:
        out.append(f"the logistic regression did not converge in {_MAX_ITER} iterations")
    return out


def _probe_hyper(
    c_grid: Sequence[float],
    cv_folds: int,
    max_length: int,
    cap: int,
    heldout_fraction: float,
    seed: int,
    batch_size: int,
) -> dict[str, Any]:
    from sklearn import __version__ as sklearn_version

    return {
        "mode": "probe",
        "c_grid": sorted(c_grid),
        "cv_folds": cv_folds,
        "max_length": max_length,
        "effective_max_length": cap,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "batch_size": batch_size,
        "pooling": "mean, L2-normalised",
        "standardize": True,
        "solver": "lbfgs (multinomial, L2)",
        "max_iter": _MAX_ITER,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "sklearn": sklearn_version,
    }


@dataclass
class _Candidate:
    """One kind of probe features, its C chosen by grouped CV on the training rows (`select_c`:
    lowest out-of-fold log-loss); `cv` and `cv_log_loss` hold the out-of-fold macro-F1 and
    log-loss per C (None when the grid had one value and no CV ran)."""

    features: str
    c: float
    cv: dict[float, float] | None
    cv_log_loss: dict[float, float] | None
    folds: int

    @property
    def best_cv(self) -> float:
        """The out-of-fold macro-F1 at the chosen C (-inf without CV): what `auto` compares.
        The chosen C's, not the best over the grid: that is the model that would be fitted."""
        return self.cv[self.c] if self.cv else float("-inf")


def _candidates(
    features: str,
    embed: Callable[[], np.ndarray],
    train_texts: list[str],
    y: np.ndarray,
    train_groups: list[str],
    c_grid: Sequence[float],
    cv_folds: int,
    names: list[str],
) -> list[_Candidate]:
    out = []
    k = len(names)
    if features in ("embedding", "auto"):
        fp = _embedding_fit_predict(embed(), y, k)
        out.append(_Candidate("embedding", *select_c(fp, y, train_groups, c_grid, cv_folds, names)))
    if features in ("lexical", "auto"):
        fp = _tfidf_fit_predict(train_texts, y, k)
        out.append(_Candidate("lexical", *select_c(fp, y, train_groups, c_grid, cv_folds, names)))
    return out


def _choose(cands: list[_Candidate]) -> _Candidate:
    """The candidate with the best cross-validated macro-F1 at its chosen C (ties: the first,
    embedding)."""
    best = cands[0]
    for cand in cands[1:]:
        if cand.best_cv > best.best_cv:
            best = cand
    return best


def _fit_lexical(
    out_dir: Path, names: list[str], train_texts: list[str], y: np.ndarray, c: float
) -> tuple[Classifier, dict[str, Any], int]:
    from charshift.lexical import save_lexical

    vec = fit_vectorizer(train_texts)
    coef, intercept, n_iter = fit_sparse_head(
        vec.transform(train_texts), y, len(names), c, _MAX_ITER
    )
    meta = {"features": "lexical", **save_lexical(out_dir, vec), "max_length": 0, "C": c}
    save_probe(out_dir, names, coef, intercept, meta)
    return load_probe(out_dir), {"features": "lexical", "C": c}, n_iter


def _fit_embedding(
    out_dir: Path,
    names: list[str],
    X: np.ndarray,
    y: np.ndarray,
    c: float,
    encoder: tuple[Any, Any, dict[str, Any]],
    cap: int,
    dev: torch.device,
) -> tuple[Classifier, dict[str, Any], int]:
    tokenizer, model, identity = encoder
    coef, intercept, n_iter = fit_head(X, y, len(names), c)
    meta = {"encoder": identity, "pooling": "mean", "normalize": True, "max_length": cap, "C": c}
    meta["features"] = "embedding"
    config = save_probe(out_dir, names, coef, intercept, {**meta, "embedding_dim": X.shape[1]})
    clf = _probe_classifier(
        ProbeModel(model, coef, intercept), tokenizer, config, str(out_dir), out_dir, dev
    )
    return clf, {"features": "embedding", "embedding_dim": int(X.shape[1])}, n_iter


def train_probe(
    texts: Sequence[str],
    labels: Sequence[str],
    groups: Sequence[str],
    *,
    label_names: Sequence[str],
    out_dir: Path,
    encoder: str = PACKAGED_MINILM,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    cv_folds: int = 5,
    max_length: int = 512,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    device: str = "auto",
    cache_dir: Path | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    features: str = "embedding",
) -> TrainReport:
    """Fit a probe on the training groups, save it to `out_dir`, report on the held-out groups.

    The held-out split is `classifier.split_by_group`'s (as for the fine-tune); C (by out-of-fold
    log-loss), and with `features="auto"` the kind of features (by out-of-fold macro-F1 at each
    kind's chosen C), are chosen on the training rows only (grouped CV). Every label must have
    training rows.
    """
    names = check_training_inputs(texts, labels, groups, label_names)
    if cv_folds < 2:
        raise ValueError("cv_folds must be >= 2")
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    split = split_rows(groups, heldout_fraction, seed)
    train_idx = split.train_idx
    absent = [n for n in names if not any(labels[i] == n for i in train_idx)]
    if absent:
        raise ValueError(f"labels {absent} have no training rows; a probe cannot learn them")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    dev = resolve_device(device)
    train_texts = [texts[i] for i in train_idx]
    y = np.array([names.index(labels[i]) for i in train_idx], dtype=np.int64)
    state: dict[str, Any] = {}

    def embed() -> np.ndarray:
        if "X" not in state:
            state["encoder"] = enc = _load_training_encoder(encoder, cache_dir, dev)
            state["cap"] = _effective_max_length(enc[1], enc[0], max_length)
            state["X"] = embed_texts(
                enc[1], enc[0], train_texts, max_length=state["cap"],
                batch_size=batch_size, device=dev, progress=progress,
            )  # fmt: skip
        return state["X"]

    train_groups = [groups[i] for i in train_idx]
    cands = _candidates(features, embed, train_texts, y, train_groups, c_grid, cv_folds, names)
    chosen = _choose(cands)
    if chosen.features == "lexical":
        clf, info, n_iter = _fit_lexical(out_dir, names, train_texts, y, chosen.c)
        identity: dict[str, Any] = {"source": "tfidf", "kind": "lexical"}
    else:
        clf, info, n_iter = _fit_embedding(
            out_dir, names, state["X"], y, chosen.c, state["encoder"], state["cap"], dev
        )
        identity = state["encoder"][2]
    cap = state.get("cap", 0)
    hyper = _probe_hyper(c_grid, cv_folds, max_length, cap, heldout_fraction, seed, batch_size)
    hyper.update(device=str(dev), features=features)
    probe_info = {
        **info,
        "C": chosen.c,
        "C_chosen_by": C_CRITERION if chosen.cv_log_loss is not None else "the one value given",
        "cv_macro_f1": None if chosen.cv is None else {str(k): v for k, v in chosen.cv.items()},
        "cv_log_loss": (
            None
            if chosen.cv_log_loss is None
            else {str(k): v for k, v in chosen.cv_log_loss.items()}
        ),
        "cv_folds_used": chosen.folds,
        "c_at_grid_edge": len(c_grid) > 1 and chosen.c in (min(c_grid), max(c_grid)),
        "features_cv": {c.features: (c.best_cv if c.cv else None) for c in cands},
        "features_chosen_by": "grouped CV on the training rows" if len(cands) > 1 else "config",
        "lbfgs_iterations": n_iter,
        "converged": n_iter < _MAX_ITER,
    }
    warnings = _probe_warnings(chosen.cv, 1.0 / len(names), n_iter)
    report = new_report(
        "probe", out_dir, names, labels, split, hyperparameters=hyper, encoder=identity,
        losses=[], warnings=warnings, probe=probe_info,
    )  # fmt: skip
    if not split.heldout_idx:
        report.heldout_note = "no held-out split (heldout_fraction=0)"

    def predict(batch: list[str]) -> list[str]:
        return [p for p, _ in clf.predict(batch, batch_size=batch_size, max_length=cap or 512)]

    return finish_report(
        report,
        predict,
        (texts, labels, groups),
        split,
        n_boot=n_boot,
        ci=ci,
        seed=seed,
        baseline_c_grid=c_grid,
        baseline_cv_folds=cv_folds,
    )


def remove_probe_files(out_dir: Path) -> None:
    """Delete a probe's marker files (a fine-tune writing into a former probe folder)."""
    for name in (PROBE_CONFIG, PROBE_HEAD):
        (Path(out_dir) / name).unlink(missing_ok=True)


__all__ = [
    "C_CRITERION",
    "PROBE_CONFIG",
    "PROBE_HEAD",
    "CChoice",
    "ProbeModel",
    "embed_texts",
    "fit_head",
    "grouped_cv_scores",
    "is_probe_folder",
    "lexical_baseline",
    "load_probe",
    "log_loss",
    "mean_pool",
    "save_probe",
    "select_c",
    "softmax_rows",
    "train_probe",
]
