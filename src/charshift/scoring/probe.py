"""The probe recipe (`classifier_training.mode: probe`): frozen features + multinomial logistic
regression, its C (and with `auto` the features) chosen by prompt-grouped cross-validation.

Why a probe: fine-tuning a 20M-150M parameter encoder on a hundred replies mostly fails to move
(the demo's MiniLM fine-tune ended at the loss of a uniform guess). A linear model on frozen
sentence embeddings (`scoring.embeddings`) or TF-IDF word features (`scoring.lexical`) has a few
thousand parameters, trains in seconds and cannot silently fail to move; its one knob, the L2
regularisation C, is chosen on the training rows only by out-of-fold log-loss with a prompt's rows
always in one fold (`scoring.logreg`). With `probe_features: auto` both kinds are tried and the
one with the better out-of-fold macro-F1 at its chosen C is kept. The folder it writes is
`scoring.probe_folder`'s; the held-out report is `scoring.heldout`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charshift.scoring.base import ClassifierError
from charshift.scoring.embeddings import ProbeModel, embed_texts, load_encoder
from charshift.scoring.heldout import (
    REPORT_FILE,
    RowSplit,
    TrainReport,
    finish_report,
    new_report,
    split_rows,
)
from charshift.scoring.hf_classifier import Classifier
from charshift.scoring.lexical import (
    LEXICAL_FILE,
    fit_vectorizer,
    save_lexical,
    tfidf_fit_predict,
)
from charshift.scoring.logreg import (
    MAX_ITER,
    CChoice,
    FitPredict,
    fit_head,
    fit_sparse_head,
    select_c,
    softmax_rows,
)
from charshift.scoring.probe_folder import (
    PROBE_CONFIG,
    PROBE_HEAD,
    load_probe,
    probe_classifier,
    save_probe,
)
from charshift.scoring.settings import TrainData, TrainSettings
from charshift.scoring.sources import resolve_encoder, weights_sha256
from charshift.scoring.tokens import effective_max_length, resolve_device


def train_probe(
    data: TrainData,
    settings: TrainSettings,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> TrainReport:
    """Fit a probe on the training groups, save it to `out_dir`, report on the held-out groups.

    The held-out split is `heldout.split_rows`'s (as for the fine-tune); C (by out-of-fold
    log-loss), and with `probe_features: auto` the kind of features (by out-of-fold macro-F1 at
    each kind's chosen C), are chosen on the training rows only (grouped CV). Every label must
    have training rows. Embeddings are computed in batches of max(batch_size, 16).
    """
    names = data.names
    split = split_rows(data.groups, settings.heldout_fraction, settings.seed)
    absent = [n for n in names if not any(data.labels[i] == n for i in split.train_idx)]
    if absent:
        raise ValueError(f"labels {absent} have no training rows; a probe cannot learn them")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    dev = resolve_device(device)
    batch_size = max(settings.batch_size, 16)
    texts = [data.texts[i] for i in split.train_idx]
    y = np.array([names.index(data.labels[i]) for i in split.train_idx], dtype=np.int64)
    embed = _Embeddings(settings, texts, cache_dir, dev, batch_size, progress)
    train_groups = [data.groups[i] for i in split.train_idx]
    cands = _candidates(settings, embed, texts, y, train_groups, names)
    chosen = _choose(cands)
    if chosen.features == "lexical":
        clf, info, n_iter = _fit_lexical(out_dir, names, texts, y, chosen.c)
        identity: dict[str, Any] = {"source": "tfidf", "kind": "lexical"}
    else:
        clf, info, n_iter = _fit_embedding(out_dir, names, embed, y, chosen.c, dev)
        identity = embed.identity
    hyper = _probe_hyper(settings, embed.cap, batch_size, dev)
    probe_info = _probe_info(info, chosen, cands, settings, n_iter)
    report = new_report(
        "probe", out_dir, data, split, hyperparameters=hyper, encoder=identity, losses=[],
        warnings=_probe_warnings(chosen.choice, 1.0 / len(names), n_iter), probe=probe_info,
    )  # fmt: skip
    return _finish(report, clf, data, split, settings, embed.cap or 512, batch_size)


def _finish(
    report: TrainReport,
    clf: Classifier,
    data: TrainData,
    split: RowSplit,
    settings: TrainSettings,
    max_length: int,
    batch_size: int,
) -> TrainReport:
    if not split.heldout_idx:
        report.heldout_note = "no held-out split (heldout_fraction=0)"

    def predict(batch: list[str]) -> list[str]:
        return [p for p, _ in clf.predict(batch, batch_size=batch_size, max_length=max_length)]

    return finish_report(report, predict, data, split, settings)


def _prepare_out_dir(out_dir: Path) -> None:
    """Remove what would make an unfinished or older folder look finished or load wrongly."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (REPORT_FILE, PROBE_CONFIG, PROBE_HEAD, LEXICAL_FILE):
        (out_dir / name).unlink(missing_ok=True)


class _Embeddings:
    """The training rows' embeddings, computed on first call (lexical features need none):
    the encoder is loaded and its weights hashed then, and `cap` is its effective max length."""

    def __init__(
        self,
        settings: TrainSettings,
        texts: list[str],
        cache_dir: Path | None,
        dev: torch.device,
        batch_size: int,
        progress: bool,
    ) -> None:
        self.settings, self.texts, self.cache_dir = settings, texts, cache_dir
        self.dev, self.batch_size, self.progress = dev, batch_size, progress
        self.tokenizer: Any = None
        self.model: Any = None
        self.identity: dict[str, Any] = {}
        self.cap = 0
        self.X: np.ndarray | None = None

    def __call__(self) -> np.ndarray:
        if self.X is None:
            self._load_encoder()
            self.cap = effective_max_length(self.model, self.tokenizer, self.settings.max_length)
            self.X = embed_texts(
                self.model, self.tokenizer, self.texts, max_length=self.cap,
                batch_size=self.batch_size, device=self.dev, progress=self.progress,
            )  # fmt: skip
        return self.X

    def _load_encoder(self) -> None:
        encoder = self.settings.encoder
        ref, kw, enc_folder, identity = resolve_encoder(encoder, self.cache_dir)
        self.tokenizer, self.model = load_encoder(ref, kw)
        identity["weights_sha256"] = weights_sha256(enc_folder)
        if identity["weights_sha256"] is None:
            raise ClassifierError(f"encoder {encoder!r}: no weight files to hash in {enc_folder}")
        if identity["kind"] == "local":
            identity["path"] = str(enc_folder)
        self.model.to(self.dev).eval()
        self.identity = identity


def embedding_fit_predict(X: np.ndarray, y: np.ndarray, k: int) -> FitPredict:
    """`fit_head` on the training rows; the test rows' softmax probabilities (absent classes 0)."""

    def fit_predict(tr: np.ndarray, te: np.ndarray, c: float) -> np.ndarray:
        coef, intercept, _ = fit_head(X[tr], y[tr], k, c)
        return softmax_rows(X[te] @ coef.T + intercept)

    return fit_predict


@dataclass
class _Candidate:
    """One kind of probe features, its C chosen by grouped CV on the training rows (`select_c`:
    lowest out-of-fold log-loss)."""

    features: str
    choice: CChoice

    @property
    def c(self) -> float:
        return self.choice.c

    @property
    def best_cv(self) -> float:
        """The out-of-fold macro-F1 at the chosen C (-inf without CV): what `auto` compares.
        The chosen C's, not the best over the grid: that is the model that would be fitted."""
        cv = self.choice.cv_macro_f1
        return cv[self.c] if cv else float("-inf")


def _candidates(
    settings: TrainSettings,
    embed: _Embeddings,
    texts: list[str],
    y: np.ndarray,
    groups: list[str],
    names: list[str],
) -> list[_Candidate]:
    features, k = settings.probe_features, len(names)
    kinds: list[tuple[str, FitPredict]] = []
    if features in ("embedding", "auto"):
        kinds.append(("embedding", embedding_fit_predict(embed(), y, k)))
    if features in ("lexical", "auto"):
        kinds.append(("lexical", tfidf_fit_predict(texts, y, k)))
    grid, folds = settings.probe_c_grid, settings.probe_cv_folds
    return [_Candidate(f, select_c(fp, y, groups, grid, folds, names)) for f, fp in kinds]


def _choose(cands: list[_Candidate]) -> _Candidate:
    """The candidate with the best cross-validated macro-F1 at its chosen C (ties: the first,
    embedding)."""
    best = cands[0]
    for cand in cands[1:]:
        if cand.best_cv > best.best_cv:
            best = cand
    return best


def _fit_lexical(
    out_dir: Path, names: list[str], texts: list[str], y: np.ndarray, c: float
) -> tuple[Classifier, dict[str, Any], int]:
    vec = fit_vectorizer(texts)
    coef, intercept, n_iter = fit_sparse_head(vec.transform(texts), y, len(names), c, MAX_ITER)
    meta = {"features": "lexical", **save_lexical(out_dir, vec), "max_length": 0, "C": c}
    save_probe(out_dir, names, coef, intercept, meta)
    return load_probe(out_dir), {"features": "lexical", "C": c}, n_iter


def _fit_embedding(
    out_dir: Path, names: list[str], embed: _Embeddings, y: np.ndarray, c: float, dev: torch.device
) -> tuple[Classifier, dict[str, Any], int]:
    X = embed()
    coef, intercept, n_iter = fit_head(X, y, len(names), c)
    meta = {"encoder": embed.identity, "pooling": "mean", "normalize": True}
    meta.update(max_length=embed.cap, C=c, features="embedding")
    config = save_probe(out_dir, names, coef, intercept, {**meta, "embedding_dim": X.shape[1]})
    model = ProbeModel(embed.model, coef, intercept)
    clf = probe_classifier(model, embed.tokenizer, config, str(out_dir), out_dir, dev)
    return clf, {"features": "embedding", "embedding_dim": int(X.shape[1])}, n_iter


def _probe_info(
    info: dict[str, Any],
    chosen: _Candidate,
    cands: list[_Candidate],
    settings: TrainSettings,
    n_iter: int,
) -> dict[str, Any]:
    """The report's `probe` record: the features, C and how each was chosen, the fit."""
    grid = settings.probe_c_grid
    return {
        **info,
        **chosen.choice.record(),
        "cv_folds_used": chosen.choice.folds,
        "c_at_grid_edge": len(grid) > 1 and chosen.c in (min(grid), max(grid)),
        "features_cv": {c.features: (c.best_cv if c.choice.cv_macro_f1 else None) for c in cands},
        "features_chosen_by": "grouped CV on the training rows" if len(cands) > 1 else "config",
        "lbfgs_iterations": n_iter,
        "converged": n_iter < MAX_ITER,
    }


def _probe_warnings(choice: CChoice, chance: float, n_iter: int) -> list[str]:
    out = []
    cv = choice.cv_macro_f1
    if cv is not None and max(cv.values()) <= chance:
        out.append(
            f"the probe's cross-validated macro-F1 never exceeded chance ({chance:.3f}) for any C "
            f"(best {max(cv.values()):.3f}): the embeddings may carry no label signal"
        )
    if n_iter >= MAX_ITER:
        out.append(f"the logistic regression did not converge in {MAX_ITER} iterations")
    return out


def _probe_hyper(
    settings: TrainSettings, cap: int, batch_size: int, dev: torch.device
) -> dict[str, Any]:
    from sklearn import __version__ as sklearn_version

    return {
        "mode": "probe",
        "c_grid": sorted(settings.probe_c_grid),
        "cv_folds": settings.probe_cv_folds,
        "max_length": settings.max_length,
        "effective_max_length": cap,
        "heldout_fraction": settings.heldout_fraction,
        "seed": settings.seed,
        "batch_size": batch_size,
        "pooling": "mean, L2-normalised",
        "standardize": True,
        "solver": "lbfgs (multinomial, L2)",
        "max_iter": MAX_ITER,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "sklearn": sklearn_version,
        "device": str(dev),
        "features": settings.probe_features,
    }
