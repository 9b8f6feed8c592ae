"""Multinomial logistic-regression heads, and the choice of their regularisation C by
prompt-grouped cross-validation: what the probe (embedding or TF-IDF features) and the held-out
report's lexical baseline share.

C is chosen by the out-of-fold log-loss (the mean negative log-probability of the true label),
folds by prompt (GroupKFold), so a prompt's rows never sit on both sides of a fold. Not by
macro-F1: it depends only on the argmax, which a strongly regularised model often gets as right
as a weaker one, so on a tie the smallest C won and the saved probabilities were almost uniform
(every p(true) about 1/K). The out-of-fold macro-F1 per C is still computed and reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

MAX_ITER = 5000  # lbfgs iterations; a fit records when it hit this limit
# fit_predict(train_rows, test_rows, C) -> (len(test_rows), K) class probabilities, label order
FitPredict = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
# the log-loss's floor on a probability (a confident miss costs -ln 1e-12 = 27.6, not infinity),
# and the margin within which two values of C count as tied (the smaller one is then kept)
_PROB_FLOOR = 1e-12
_LOG_LOSS_TIE = 1e-9
C_CRITERION = "out-of-fold log-loss (prompt-grouped CV; ties to the smaller C)"


def one_blas_thread() -> Any:
    """Single-threaded BLAS for the small logistic-regression fits: on a few shared cores a
    multi-threaded BLAS spends most of their time synchronising (10x slower measured here)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def fit_sparse_head(
    X: Any, y: np.ndarray, k: int, c: float, max_iter: int = MAX_ITER
) -> tuple[np.ndarray, np.ndarray, int]:
    """Multinomial logistic regression on TF-IDF rows (or any feature rows: `fit_head` calls it
    on standardised embeddings): (coef (k, V), intercept (k), iterations).

    A class absent from `y` gets intercept -inf (never predicted); with one class present the
    head always predicts it; sklearn's binary form (one row) is written as two rows that give the
    same probabilities under a softmax."""
    from sklearn.linear_model import LogisticRegression

    coef = np.zeros((k, X.shape[1]))
    intercept = np.full(k, -np.inf)
    present = np.unique(y)
    if len(present) == 1:
        intercept[present[0]] = 0.0
        return coef, intercept, 0
    with one_blas_thread():
        lr = LogisticRegression(C=c, max_iter=max_iter).fit(X, y)
    w, b = lr.coef_, lr.intercept_
    if len(present) == 2:
        w = np.vstack([np.zeros_like(w[0]), w[0]])
        b = np.array([0.0, b[0]])
    coef[lr.classes_] = w
    intercept[lr.classes_] = b
    return coef, intercept, int(np.max(lr.n_iter_))


def fit_head(X: np.ndarray, y: np.ndarray, k: int, c: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Multinomial logistic regression on standardised X, folded back onto X.

    Returns (coef (k, D), intercept (k), lbfgs iterations). A class absent from `y` gets
    intercept -inf (never predicted); with one class present the head always predicts it.
    """
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    w, b, n_iter = fit_sparse_head(scaler.transform(X), y, k, c, max_iter=MAX_ITER)
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

    def record(self) -> dict[str, Any]:
        """The train report's account of the choice (JSON: C values as string keys)."""
        f1, losses = self.cv_macro_f1, self.cv_log_loss
        return {
            "C": self.c,
            "C_chosen_by": C_CRITERION if losses is not None else "the one value given",
            "cv_macro_f1": None if f1 is None else {str(k): v for k, v in f1.items()},
            "cv_log_loss": None if losses is None else {str(k): v for k, v in losses.items()},
        }


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
