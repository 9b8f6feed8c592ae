"""TF-IDF word features: the lexical probe, and the folds of the held-out report's baseline.

A probe's features are chosen by `classifier_training.probe_features`: `embedding` (a frozen
encoder's sentence embeddings, `scoring.embeddings`), `lexical` (this module) or `auto` (the one
with the better prompt-grouped cross-validated macro-F1 on the training rows; the held-out rows
take no part in the choice). A small model's persona often lives in its word choice (a
mathematical persona's symbols, a loving persona's endearments) while a sentence embedding is
dominated by the topic; on a few hundred replies the lexical features can then be the better
classifier, and `auto` measures that instead of assuming it.

The saved state is plain JSON (no pickle): `probe_lexical.json` holds the TF-IDF settings, the
vocabulary (term -> column) and the idf weights; `probe_head.json` the logistic regression's
`coef` (K x V) and `intercept` (K). A lexical probe folder loads as a `LexicalClassifier`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charshift.scoring.base import ClassifierError, Prediction, Progress
from charshift.scoring.files import file_sha256, write_json_atomic
from charshift.scoring.hf_classifier import Classifier
from charshift.scoring.logreg import MAX_ITER, FitPredict, one_blas_thread
from charshift.scoring.tokens import ProgressBar

LEXICAL_FILE = "probe_lexical.json"
# word unigrams and bigrams, one-letter words kept, sublinear tf (the lexical baseline's too)
TFIDF_PARAMS: dict[str, Any] = {
    "lowercase": True,
    "ngram_range": (1, 2),
    "sublinear_tf": True,
    "min_df": 1,
    "token_pattern": r"(?u)\b\w+\b",
}


def fit_vectorizer(texts: Sequence[str]) -> Any:
    """A TF-IDF vectorizer (`TFIDF_PARAMS`) fitted on `texts`."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(**TFIDF_PARAMS).fit(list(texts))


def tfidf_fit_predict(texts: Sequence[str], y: np.ndarray, k: int) -> FitPredict:
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
        with one_blas_thread():
            lr = LogisticRegression(C=c, max_iter=MAX_ITER).fit(x_tr, y[tr])
        probs = np.zeros((len(te), k))
        probs[:, lr.classes_] = lr.predict_proba(vec.transform(arr[te]))  # classes_ == present
        return probs

    return fit_predict


def save_lexical(out_dir: Path, vectorizer: Any) -> dict[str, Any]:
    """Write the TF-IDF state; return what the probe config records about it."""
    data = {
        "params": {**TFIDF_PARAMS, "ngram_range": list(TFIDF_PARAMS["ngram_range"])},
        "vocabulary": {t: int(i) for t, i in sorted(vectorizer.vocabulary_.items())},
        "idf": [float(x) for x in vectorizer.idf_],
    }
    write_json_atomic(Path(out_dir) / LEXICAL_FILE, data)
    return {
        "lexical_file": LEXICAL_FILE,
        "lexical_sha256": file_sha256(Path(out_dir) / LEXICAL_FILE),
        "vocabulary_size": len(data["idf"]),
    }


def load_vectorizer(folder: Path, config: dict[str, Any]) -> Any:
    """The fitted TF-IDF vectorizer of a lexical probe, checked against its recorded hash."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    path = Path(folder) / LEXICAL_FILE
    if not path.is_file():
        raise ClassifierError(f"lexical probe {folder} has no {LEXICAL_FILE}")
    if file_sha256(path) != config.get("lexical_sha256"):
        raise ClassifierError(f"{path}: sha256 differs from the one recorded in its config")
    try:
        data = json.loads(path.read_text())
        params = dict(data["params"])
        params["ngram_range"] = tuple(params["ngram_range"])
        vocab = {str(t): int(i) for t, i in data["vocabulary"].items()}
        idf = np.asarray(data["idf"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise ClassifierError(f"{path}: malformed lexical state ({err})") from None
    if sorted(vocab.values()) != list(range(len(idf))):
        raise ClassifierError(f"{path}: vocabulary and idf disagree")
    vec = TfidfVectorizer(**params, vocabulary=vocab)
    vec.idf_ = idf
    return vec


@dataclass
class LexicalClassifier(Classifier):
    """A `Classifier` whose model is a TF-IDF vectorizer and a linear head (no torch model, no
    tokenizer: texts are never truncated)."""

    vectorizer: Any = None
    coef: np.ndarray | None = None
    intercept: np.ndarray | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "revision": None,
            "weights_sha256": self.weights_sha256,
            "model_type": "tfidf-logistic-regression",
            "labels": list(self.labels),
            **self.extra,
        }

    @torch.inference_mode()
    def predict(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 16,
        max_length: int = 8192,
        progress: Progress = None,
    ) -> list[Prediction]:
        """(label, softmax probabilities over all labels) per text; `max_length` is unused."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        assert self.vectorizer is not None and self.coef is not None
        out: list[Prediction] = []
        bar = ProgressBar(progress, len(texts), "classify")
        try:
            for start in range(0, len(texts), max(batch_size, 256)):
                part = list(texts[start : start + max(batch_size, 256)])
                logits = np.asarray(self.vectorizer.transform(part) @ self.coef.T) + self.intercept
                logits -= logits.max(axis=1, keepdims=True)
                probs = np.exp(logits)
                probs /= probs.sum(axis=1, keepdims=True)
                out += [self._prediction(row) for row in probs.tolist()]
                bar.update(len(part))
        finally:
            bar.close()
        return out


def lexical_classifier(
    folder: Path,
    config: dict[str, Any],
    coef: np.ndarray,
    intercept: np.ndarray,
    source: str,
    combined_sha: str,
) -> LexicalClassifier:
    """The `LexicalClassifier` of a lexical probe folder whose config and head are read."""
    vec = load_vectorizer(folder, config)
    if coef.shape[1] != len(vec.idf_):
        raise ClassifierError(
            f"lexical probe {folder}: head width {coef.shape[1]} != vocabulary {len(vec.idf_)}"
        )
    extra = {
        "mode": "probe",
        "features": "lexical",
        "head_sha256": config["head_sha256"],
        "lexical_sha256": config["lexical_sha256"],
    }
    return LexicalClassifier(
        model=None,
        tokenizer=None,
        labels=list(config["labels"]),
        source=source,
        device=torch.device("cpu"),
        kind="local",
        revision=None,
        folder=folder,
        extra=extra,
        _sha=combined_sha,
        vectorizer=vec,
        coef=coef,
        intercept=intercept,
    )
