"""Tests of the lexical probe (charshift.scoring.lexical) and of the probe's feature choice.

The planted texts are test_probe's: each label has its own vocabulary mixed into neutral filler,
one text per label per synthetic prompt; shuffled labels leave no signal.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_probe
from test_probe import LABELS, planted, probe

from charshift.scoring.base import ClassifierError
from charshift.scoring.classifier import load_classifier
from charshift.scoring.lexical import (
    LEXICAL_FILE,
    TFIDF_PARAMS,
    LexicalClassifier,
    fit_vectorizer,
    tfidf_fit_predict,
)
from charshift.scoring.logreg import fit_sparse_head
from charshift.scoring.probe_folder import PROBE_CONFIG


def _train(tmp_path, texts, labels, groups, features="lexical", name="lex"):
    return probe(
        texts, labels, groups, tmp_path / name, heldout_fraction=0.25, n_boot=300,
        probe_features=features,
    )  # fmt: skip


def test_lexical_probe_finds_a_planted_signal_and_chance_without_one(tmp_path):
    rep = _train(tmp_path, *planted(40, 0))
    assert rep.above_chance and rep.macro_f1_interval[0] > 0.25
    assert rep.probe["features"] == "lexical" and rep.probe["features_cv"]["lexical"] > 0.5
    null = _train(tmp_path, *planted(40, 0, shuffle=True), name="null")
    lo, hi = null.macro_f1_interval
    assert lo <= 0.25 <= hi and not null.above_chance
    assert "NOT ABOVE CHANCE" in null.summary


def test_lexical_probe_reloads_with_the_same_probabilities(tmp_path):
    texts, labels, groups = planted(20, 3)
    _train(tmp_path, texts, labels, groups)
    a = load_classifier(str(tmp_path / "lex"))
    b = load_classifier(str(tmp_path / "lex"))
    assert isinstance(a, LexicalClassifier)
    assert a.provenance["model_type"] == "tfidf-logistic-regression" and a.weights_sha256
    pa, pb = a.predict(texts[:12]), b.predict(texts[:12])
    assert pa == pb
    for _, probs in pa:
        assert set(probs) == set(LABELS) and abs(sum(probs.values()) - 1) < 1e-9
    # the same figures as scikit-learn's own vectorizer + regression on the same rows
    y = np.array([LABELS.index(x) for x in labels])
    vec = fit_vectorizer(texts)
    coef, intercept, _ = fit_sparse_head(vec.transform(texts), y, len(LABELS), 1.0)
    logits = np.asarray(vec.transform(texts[:3]) @ coef.T) + intercept
    assert logits.shape == (3, len(LABELS))
    stored = json.loads((tmp_path / "lex" / PROBE_CONFIG).read_text())
    assert stored["features"] == "lexical" and stored["vocabulary_size"] > 0


def test_tampered_lexical_state_is_refused(tmp_path):
    _train(tmp_path, *planted(12, 1))
    path = tmp_path / "lex" / LEXICAL_FILE
    data = json.loads(path.read_text())
    data["idf"][0] += 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ClassifierError, match="sha256"):
        load_classifier(str(tmp_path / "lex"))


tiny_encoder = test_probe.tiny_encoder  # the module-scoped fixture, shared


def test_auto_keeps_the_features_that_cross_validate_better(tmp_path, tiny_encoder):
    """With a random tiny encoder the embeddings carry little of the planted words; auto must
    take whichever scored better in grouped CV on the training rows, and record both scores."""
    rep = probe(
        *planted(24, 5), tmp_path / "auto", encoder=str(tiny_encoder), heldout_fraction=0.25,
        n_boot=200, probe_features="auto",
    )  # fmt: skip
    cv = rep.probe["features_cv"]
    assert set(cv) == {"embedding", "lexical"}
    assert rep.probe["features"] == max(cv, key=cv.get)
    assert rep.probe["features_chosen_by"].startswith("grouped CV")
    assert load_classifier(str(tmp_path / "auto")).predict(["oh great"])[0][0] in LABELS


def test_tfidf_fold_probabilities_put_zero_on_a_class_without_training_rows():
    """The CV closure returns (n_test, K) probabilities in label order; a label absent from the
    fold's training rows gets a 0 column and the others are scikit-learn's own, aligned."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts, labels, _ = planted(6, 7)
    y = np.array([LABELS.index(x) for x in labels])
    tr = np.array([i for i in range(len(y)) if y[i] != 1])  # no "humor" in the training rows
    te = np.arange(len(y))
    probs = tfidf_fit_predict(texts, y, len(LABELS))(tr, te, 1.0)
    assert probs.shape == (len(te), len(LABELS))
    assert np.all(probs[:, 1] == 0.0) and np.allclose(probs.sum(axis=1), 1.0)
    vec = TfidfVectorizer(**TFIDF_PARAMS)
    lr = LogisticRegression(C=1.0, max_iter=5000).fit(
        vec.fit_transform([texts[i] for i in tr]), y[tr]
    )
    want = lr.predict_proba(vec.transform(texts))
    assert np.allclose(probs[:, [0, 2, 3]], want, atol=1e-12)
    # one class in the training rows: its share, 1, for every test row
    only = np.flatnonzero(y == 2)
    assert np.array_equal(
        tfidf_fit_predict(texts, y, len(LABELS))(only, te, 1.0),
        np.tile(np.eye(4)[2], (len(te), 1)),
    )
