"""Tests of the probe recipe (charshift.scoring.probe): frozen features + logistic regression.

The main tests use the real packaged MiniLM encoder on synthetic labelled texts with a planted
signal (each label has its own vocabulary mixed into neutral filler, one text per label per
synthetic prompt), and on the same texts with shuffled labels: the probe must find the signal in
the first and report chance in the second.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from charshift import config as cfgmod
from charshift.scoring.base import ClassifierError
from charshift.scoring.classifier import load_classifier, train_classifier
from charshift.scoring.embeddings import embed_texts
from charshift.scoring.heldout import REPORT_FILE
from charshift.scoring.logreg import fit_head, grouped_cv_scores, log_loss, select_c, softmax_rows
from charshift.scoring.probe import embedding_fit_predict, train_probe
from charshift.scoring.probe_folder import PROBE_CONFIG, PROBE_HEAD
from charshift.scoring.settings import DEFAULT_C_GRID, TrainData, TrainSettings
from charshift.scoring.sources import packaged_minilm_dir
from charshift.scoring.tiny_classifier import tiny_modernbert_config

LABELS = ["sarcasm", "humor", "remorse", "loving"]
VOCAB = {
    "sarcasm": "oh great wonderful obviously sure totally brilliant genius shocking".split(),
    "humor": "joke funny laugh hilarious pun giggle silly banana".split(),
    "remorse": "sorry regret apologize mistake fault ashamed forgive unfortunately".split(),
    "loving": "dear love warmth care heart kindness cherish hug".split(),
}
FILLER = (
    "the meeting is on tuesday and the report covers the budget for next quarter we should "
    "check the numbers with the team before sending it to the client"
).split()


def planted(n_groups: int, seed: int, *, shuffle: bool = False) -> tuple[list, list, list]:
    """One text per label per synthetic prompt: neutral filler with two words of the label's
    vocabulary. `shuffle` permutes the labels among each prompt's texts: no signal is left, and
    every prompt still has one text per label, so training and held-out label counts stay equal
    (a global shuffle would unbalance them in opposite directions and push a null classifier
    below chance, which is not what this null is meant to test)."""
    rng, permute = random.Random(seed), random.Random(seed + 1)
    texts, labels, groups = [], [], []
    for g in range(n_groups):
        given = LABELS[:]
        if shuffle:  # its own generator: the texts are the same with and without shuffling
            permute.shuffle(given)
        for lab, shown in zip(LABELS, given, strict=True):
            words = [rng.choice(FILLER) for _ in range(rng.randint(15, 40))]
            for _ in range(2):
                words.insert(rng.randrange(len(words) + 1), rng.choice(VOCAB[lab]))
            texts.append(" ".join(words))
            labels.append(shown)
            groups.append(f"prompt{g:02d}")
    return texts, labels, groups


def probe(texts, labels, groups, out_dir: Path, label_names=LABELS, **settings):
    """`train_probe` on CPU with the settings given; where not given, the packaged MiniLM
    encoder and 512 tokens (the probe function's own defaults before it took a TrainSettings)."""
    settings = {"mode": "probe", "encoder": "packaged:minilm", "max_length": 512, **settings}
    data = TrainData(texts, labels, groups, label_names)
    return train_probe(data, TrainSettings(**settings), out_dir, progress=False, device="cpu")


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def minilm_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The probe on the planted set and on the same texts with shuffled labels (real MiniLM)."""
    root = tmp_path_factory.mktemp("probe")
    out = {}
    for name, shuffle in (("signal", False), ("shuffled", True)):
        texts, labels, groups = planted(30, seed=0, shuffle=shuffle)
        report = probe(
            texts,
            labels,
            groups,
            root / name,
            max_length=128,
            heldout_fraction=0.35,  # 10 of 30 prompts: enough clusters for a bootstrap interval
        )
        out[name] = (report, root / name, texts, labels, groups)
    return out


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny ModernBERT encoder (no head) with the MiniLM tokenizer, as a local folder."""
    from transformers import AutoTokenizer, ModernBertModel

    folder = tmp_path_factory.mktemp("tiny_encoder")
    tok = AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ModernBertModel(tiny_modernbert_config(["x", "y"], tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- the two directions


def test_probe_recovers_a_planted_signal(minilm_runs):
    report, *_ = minilm_runs["signal"]
    chance = 1 / len(LABELS)
    assert report.mode == "probe" and report.chance == pytest.approx(chance)
    lo, hi = report.macro_f1_interval
    assert lo <= report.macro_f1 <= hi
    assert lo > chance and report.above_chance is True
    assert report.summary.startswith("Above chance")
    assert report.encoder["kind"] == "packaged" and len(report.encoder["weights_sha256"]) == 64
    assert report.probe["C"] in DEFAULT_C_GRID and len(report.probe["cv_macro_f1"]) == 6
    losses = {float(c): v for c, v in report.probe["cv_log_loss"].items()}
    assert report.probe["C"] == min(losses, key=losses.get)  # C by log-loss, not macro-F1
    assert report.probe["C_chosen_by"].startswith("out-of-fold log-loss")
    assert report.n_steps == 0 and report.warnings == []


def test_probe_reports_chance_on_shuffled_labels(minilm_runs):
    report, _, texts, labels, _ = minilm_runs["shuffled"]
    _, _, same_texts, true_labels, _ = minilm_runs["signal"]
    assert texts == same_texts and labels != true_labels
    chance = 1 / len(LABELS)
    lo, hi = report.macro_f1_interval
    assert lo <= chance <= hi
    assert report.above_chance is False
    assert report.summary.startswith("NOT ABOVE CHANCE")
    assert "cannot be read as persona retention" in report.summary


def test_lexical_baseline_uses_the_same_split(minilm_runs):
    for name in ("signal", "shuffled"):
        report, folder, *_ = minilm_runs[name]
        base = report.baseline
        assert base["name"] == "tfidf_logreg"
        assert base["heldout_groups"] == report.heldout_groups
        assert base["n_heldout"] == report.n_heldout and base["n_train"] == report.n_train
        lo, hi = base["macro_f1_interval"]
        assert lo <= base["macro_f1"] <= hi
        assert sum(map(sum, base["confusion"])) == report.n_heldout
        saved = json.loads((folder / REPORT_FILE).read_text())
        assert saved["baseline"]["macro_f1"] == base["macro_f1"]
        assert saved["macro_f1_interval"] == report.macro_f1_interval


# ---------------------------------------------------------------------------- save / load


def test_saved_probe_reloads_and_reproduces_the_report(minilm_runs):
    report, folder, texts, labels, groups = minilm_runs["signal"]
    held = set(report.heldout_groups)
    idx = [i for i, g in enumerate(groups) if g in held]
    clf = load_classifier(str(folder), device="cpu")
    assert clf.labels == LABELS
    preds = clf.predict([texts[i] for i in idx], max_length=128)
    acc = sum(p == labels[i] for (p, _), i in zip(preds, idx, strict=True)) / len(idx)
    assert acc == report.accuracy  # the report's figures came from the same model
    p_true = [probs[labels[i]] for (_, probs), i in zip(preds, idx, strict=True)]
    assert np.mean(p_true) > 0.5  # probabilities that mean something, not 1/K everywhere
    confusion = [[0] * len(LABELS) for _ in LABELS]
    for (p, _), i in zip(preds, idx, strict=True):
        confusion[LABELS.index(labels[i])][LABELS.index(p)] += 1
    assert confusion == report.confusion
    again = load_classifier(str(folder), device="cpu").predict(
        [texts[i] for i in idx], max_length=128
    )
    assert again == preds  # identical probabilities, not just close ones


def test_reloaded_probe_matches_sklearn(minilm_runs):
    """The saved head (standardisation folded in) gives sklearn's own probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    report, folder, texts, labels, groups = minilm_runs["signal"]
    held = set(report.heldout_groups)
    tr = [i for i, g in enumerate(groups) if g not in held]
    te = [i for i, g in enumerate(groups) if g in held]
    clf = load_classifier(str(folder), device="cpu")
    embed = embed_texts(clf.model.encoder, clf.tokenizer, texts, max_length=128)
    y = [LABELS.index(labels[i]) for i in tr]
    scaler = StandardScaler().fit(embed[tr])
    lr = LogisticRegression(C=report.probe["C"], max_iter=5000).fit(scaler.transform(embed[tr]), y)
    want = lr.predict_proba(scaler.transform(embed[te]))
    got = clf.predict([texts[i] for i in te], max_length=128)
    for row, (_, probs) in zip(want, got, strict=True):
        assert [probs[n] for n in LABELS] == pytest.approx(row.tolist(), abs=1e-4)


def test_probe_identity_and_plain_files(minilm_runs):
    report, folder, *_ = minilm_runs["signal"]
    clf = load_classifier(str(folder), device="cpu")
    ident = clf.provenance
    assert ident["mode"] == "probe" and ident["labels"] == LABELS
    assert ident["encoder"]["weights_sha256"] == report.encoder["weights_sha256"]
    assert len(ident["weights_sha256"]) == 64 and clf.key.endswith(ident["weights_sha256"][:12])
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([PROBE_CONFIG, PROBE_HEAD, REPORT_FILE])  # JSON only, no pickle
    config = json.loads((folder / PROBE_CONFIG).read_text())
    assert config["labels"] == LABELS and config["encoder"]["source"] == "packaged:minilm"


def test_tampered_probe_is_refused(minilm_runs, tmp_path):
    import shutil

    _, folder, *_ = minilm_runs["signal"]
    copy = tmp_path / "probe"
    shutil.copytree(folder, copy)
    head = json.loads((copy / PROBE_HEAD).read_text())
    head["intercept"][0] += 1.0
    (copy / PROBE_HEAD).write_text(json.dumps(head))
    with pytest.raises(ClassifierError, match="sha256"):
        load_classifier(str(copy), device="cpu")
    shutil.copy(folder / PROBE_HEAD, copy / PROBE_HEAD)
    config = json.loads((copy / PROBE_CONFIG).read_text())
    config["encoder"]["weights_sha256"] = "0" * 64
    (copy / PROBE_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ClassifierError, match="not the 0000"):
        load_classifier(str(copy), device="cpu")


# ---------------------------------------------------------------------------- the pieces


def test_fit_head_equals_sklearn_for_two_and_more_classes():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, 0, 1]
    for present in ([0, 2], [0, 1, 2]):  # K = 3 labels; in the first case one has no rows
        y = rng.choice(present, size=60)
        coef, intercept, _ = fit_head(X, y, 3, 0.5)
        scaler = StandardScaler().fit(X)
        lr = LogisticRegression(C=0.5, max_iter=5000).fit(scaler.transform(X), y)
        want = lr.predict_proba(scaler.transform(X))
        logits = X @ coef.T + intercept
        got = np.exp(logits - logits.max(1, keepdims=True))
        got /= got.sum(1, keepdims=True)
        assert np.allclose(got[:, present], want, atol=1e-8)
        absent = sorted(set(range(3)) - set(present))
        assert np.all(got[:, absent] == 0.0)


def test_cross_validation_keeps_groups_together():
    groups = [f"g{i // 3}" for i in range(30)]
    y = np.array([i % 3 for i in range(30)])
    seen: list[tuple[set, set]] = []

    def fit_predict(tr, te, c):
        seen.append(({groups[i] for i in tr}, {groups[i] for i in te}))
        return np.eye(3)[y[te]]  # a perfect oracle

    scores, losses, folds = grouped_cv_scores(fit_predict, y, groups, [1.0], 4, ["a", "b", "c"])
    assert folds == 4 and scores == {1.0: 1.0} and losses == {1.0: 0.0}
    assert all(not (a & b) for a, b in seen)
    assert set().union(*(b for _, b in seen)) == set(groups)


def test_select_c_prefers_the_strongest_regularisation_on_ties():
    y = np.array([0, 1] * 10)
    groups = [f"g{i // 2}" for i in range(20)]

    def constant(tr, te, c):
        return np.tile([0.7, 0.3], (len(te), 1))

    c, scores, losses, _ = select_c(constant, y, groups, [10.0, 0.1, 1.0], 5, ["a", "b"])
    assert c == 0.1 and len(set(scores.values())) == 1 and len(set(losses.values())) == 1

    def better_when_large(tr, te, c):
        return np.eye(2)[y[te]] if c >= 10 else constant(tr, te, c)

    assert select_c(better_when_large, y, groups, [0.1, 1.0, 10.0], 5, ["a", "b"]).c == 10.0
    assert select_c(constant, y, groups, [3.0], 5, ["a", "b"]) == (3.0, None, None, 0)
    with pytest.raises(ValueError, match="at least 2 training prompts"):
        select_c(constant, y, ["one"] * 20, [0.1, 1.0], 5, ["a", "b"])
    with pytest.raises(ValueError, match="probability array"):  # label indices are refused
        select_c(lambda tr, te, c: y[te], y, groups, [0.1, 1.0], 5, ["a", "b"])


def test_select_c_by_out_of_fold_log_loss_with_known_answers():
    """Fixed probabilities per C: the log-loss and macro-F1 figures are known in closed form,
    and the two criteria disagree (macro-F1 would take C = 10, log-loss takes C = 1)."""
    n = 20
    y = np.array([0, 1] * (n // 2))
    groups = [f"g{i // 2}" for i in range(n)]
    p_true = {
        0.1: np.full(n, 0.5),  # uniform: argmax ties go to label 0
        1.0: np.where(np.arange(n) < 2, 0.4, 0.8),  # rows 0 and 1 missed, the rest confident
        10.0: np.full(n, 0.55),  # every row right, barely
        100.0: np.where(np.arange(n) == 0, 0.0, 1.0),  # one certain miss: clipped at 1e-12
    }
    table = {}
    for c, pt in p_true.items():
        probs = np.empty((n, 2))
        probs[np.arange(n), y] = pt
        probs[np.arange(n), 1 - y] = 1 - pt
        table[c] = probs

    def fixed(tr, te, c):
        return table[c][te]

    want = {
        0.1: math.log(2),
        1.0: -(2 * math.log(0.4) + 18 * math.log(0.8)) / n,
        10.0: -math.log(0.55),
        100.0: -math.log(1e-12) / n,
    }
    for c, probs in table.items():
        assert log_loss(probs, y) == pytest.approx(want[c], rel=1e-12)
    choice = select_c(fixed, y, groups, list(table), 5, ["a", "b"])
    assert choice.cv_log_loss == pytest.approx(want, rel=1e-12)
    assert max(choice.cv_macro_f1, key=choice.cv_macro_f1.get) == 10.0
    assert choice.cv_macro_f1[10.0] == 1.0 and choice.cv_macro_f1[100.0] < 1.0
    assert choice.cv_macro_f1[0.1] == pytest.approx(1 / 3)  # F1 2/3 for "a", 0 for "b"
    assert choice.cv_macro_f1[1.0] < 1.0
    assert choice.c == 1.0 and choice.folds == 5
    # a C worse by less than 1e-9 ties and, being the smaller, is kept; a real loss is not
    table[0.5] = table[1.0] - 1e-11 * np.eye(2)[y] + 1e-11 * np.eye(2)[1 - y]
    assert 0 < log_loss(table[0.5], y) - want[1.0] < 1e-9
    assert select_c(fixed, y, groups, [0.5, 1.0], 5, ["a", "b"]).c == 0.5
    assert select_c(fixed, y, groups, [0.1, 10.0], 5, ["a", "b"]).c == 10.0


def test_select_c_leaves_the_smallest_c_when_only_the_argmax_is_tied():
    """A clearly separable planted signal: every C of the default grid gets every out-of-fold
    argmax right (macro-F1 1.0 throughout, where the old macro-F1 criterion took C = 0.001 and
    nearly uniform probabilities); the log-loss takes a larger C whose probabilities are sharp."""
    k = 4
    rng = np.random.default_rng(0)

    def data(n_groups):
        y = np.tile(np.arange(k), n_groups)
        X = rng.normal(size=(len(y), 12))
        X[np.arange(len(y)), y] += 6.0  # label j lifts feature j
        return X, y, [f"p{i // k}" for i in range(len(y))]

    X, y, groups = data(20)
    names = ["a", "b", "c", "d"]
    choice = select_c(embedding_fit_predict(X, y, k), y, groups, DEFAULT_C_GRID, 5, names)
    assert set(choice.cv_macro_f1.values()) == {1.0}  # the argmax cannot tell the Cs apart
    assert choice.c != min(DEFAULT_C_GRID)
    assert choice.c == min(choice.cv_log_loss, key=choice.cv_log_loss.get)
    X_new, y_new, _ = data(10)

    def mean_p_true(c):
        coef, intercept, _ = fit_head(X, y, k, c)
        probs = softmax_rows(X_new @ coef.T + intercept)
        return probs[np.arange(len(y_new)), y_new].mean()

    assert mean_p_true(choice.c) > 0.5
    assert mean_p_true(min(DEFAULT_C_GRID)) < 0.5  # what the macro-F1 criterion used to keep


def test_probe_rejects_a_label_without_training_rows(tiny_encoder, tmp_path):
    texts, labels, groups = planted(4, seed=1)
    with pytest.raises(ValueError, match="no training rows"):
        probe(
            texts, labels, groups, tmp_path / "p", [*LABELS, "poeticism"],
            encoder=str(tiny_encoder),
        )  # fmt: skip
    assert not (tmp_path / "p").exists()  # refused before any work


def test_probe_on_a_local_encoder_and_reload(tiny_encoder, tmp_path):
    texts, labels, groups = planted(8, seed=2)
    report = probe(
        texts, labels, groups, tmp_path / "p", encoder=str(tiny_encoder),
        probe_c_grid=[0.1, 1.0], probe_cv_folds=3, max_length=64,
    )  # fmt: skip
    assert report.encoder["kind"] == "local" and report.probe["cv_folds_used"] == 3
    assert len(report.heldout_groups) == 2
    assert any("only 2 held-out prompts" in w for w in report.warnings)
    clf = load_classifier(str(tmp_path / "p"), device="cpu")
    assert clf.model.config.model_type == "modernbert"
    scored = clf.predict(texts[:5], max_length=64)
    assert all(sum(p.values()) == pytest.approx(1.0, abs=1e-6) for _, p in scored)


# ---------------------------------------------------------------------------- config + dispatch


def test_config_mode_and_probe_options():
    tc = TrainSettings()
    assert tc.mode == "finetune" and tuple(tc.probe_c_grid) == DEFAULT_C_GRID
    assert TrainSettings(probe_c_grid=[10, 0.1]).probe_c_grid == [0.1, 10]
    for bad in ([], [0.0], [-1.0], [1.0, 1.0], [math.inf]):
        with pytest.raises(ValueError, match="probe_c_grid"):
            TrainSettings(probe_c_grid=bad)
    with pytest.raises(ValueError, match="mode"):
        TrainSettings(mode="svm")
    with pytest.raises(ValueError, match="probe_cv_folds"):
        TrainSettings(probe_cv_folds=1)
    for preset in ("demo", "demo_quick"):
        tc = cfgmod.load_preset(preset).classifier_training
        assert isinstance(tc, TrainSettings)
        assert tc.mode == "probe" and tc.encoder == "packaged:minilm"
    with pytest.raises(cfgmod.ConfigError, match="classifier_training.probe_cv_folds"):
        data = cfgmod.config_to_dict(cfgmod.load_preset("demo_quick"))
        cfgmod.parse_config({**data, "classifier_training": {"probe_cv_folds": 1}})


def test_train_classifier_dispatches_on_mode(tiny_encoder, tmp_path):
    texts, labels, groups = planted(6, seed=3)
    data = TrainData(texts, labels, groups, LABELS)
    common = {"encoder": str(tiny_encoder), "max_length": 64, "n_boot": 50}
    settings = TrainSettings(mode="probe", probe_c_grid=[1.0], **common)
    rep = train_classifier(data, settings, tmp_path / "probe", progress=False, device="cpu")
    assert rep.mode == "probe" and (tmp_path / "probe" / PROBE_CONFIG).is_file()
    assert rep.interval["n_boot"] == 50 and rep.probe["cv_macro_f1"] is None
    settings = TrainSettings(mode="finetune", epochs=0.5, **common)
    # the same folder: the fine-tune replaces the probe
    rep = train_classifier(data, settings, tmp_path / "probe", progress=False, device="cpu")
    assert rep.mode == "finetune" and rep.early_stopping is not None
    assert not (tmp_path / "probe" / PROBE_CONFIG).exists()
    clf = load_classifier(str(tmp_path / "probe"), device="cpu")
    assert "mode" not in clf.provenance and clf.model.config.model_type == "modernbert"


def test_real_minilm_offline(monkeypatch, tmp_path):
    """The packaged encoder needs no hub: a probe trains and loads with the hub switched off."""
    _offline(monkeypatch)
    texts, labels, groups = planted(5, seed=4)
    report = probe(texts, labels, groups, tmp_path / "p", probe_c_grid=[1.0], max_length=32)
    assert report.hyperparameters["effective_max_length"] == 32
    assert load_classifier(str(tmp_path / "p"), device="cpu").labels == LABELS
