"""Tests of the classifier scorer (charshift.scoring: loading, scoring, the fine-tune recipe and
the held-out report) on tiny ModernBERT models built from config (no hub access)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from charshift.schema import stable_hash
from charshift.scoring.base import (
    ClassifierError,
    ClassifierLabelError,
    Prediction,
    ScoreInput,
    Scorer,
)
from charshift.scoring.classifier import load_classifier
from charshift.scoring.finetune import loss_warning, train_finetune
from charshift.scoring.heldout import heldout_evaluation, split_by_group
from charshift.scoring.hf_classifier import Classifier
from charshift.scoring.settings import TrainData, TrainSettings
from charshift.scoring.sources import packaged_minilm_dir
from charshift.scoring.tiny_classifier import build_tiny_modernbert, tiny_modernbert_config

SHUFFLED = ["poeticism", "sarcasm", "misalignment", "humor", "goodness"]

MIXED_TEXTS = [
    "A short one.",
    "",
    "word " * 300,
    "Dear team, the quarterly report is attached. Please review it by Friday. " * 5,
    "ok",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Hmm?",
    "medium length sentence with a few more words in it than the short ones",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clf_cache")


@pytest.fixture(scope="module")
def tiny(cache) -> Classifier:
    return load_classifier("tiny:modernbert:" + ",".join(SHUFFLED), device="cpu", cache_dir=cache)


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))


# ---------------------------------------------------------------------------- labels


def test_labels_follow_config_order(tiny):
    assert tiny.labels == SHUFFLED
    assert tiny.labels != sorted(SHUFFLED)
    # the label attached to each probability is the one the config puts at that logit index
    tok = tiny.tokenizer
    text = "some text to score"
    enc = tok([text], return_tensors="pt")
    with torch.inference_mode():
        logits = tiny.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    probs = torch.softmax(logits, -1)[0].tolist()
    pred, got = tiny.predict([text])[0]
    for i, p in enumerate(probs):
        assert got[tiny.model.config.id2label[i]] == pytest.approx(p, abs=1e-6)
    assert pred == tiny.model.config.id2label[int(torch.argmax(logits))]


def test_labels_read_from_a_hand_written_config(tmp_path):
    from transformers import ModernBertForSequenceClassification

    tok = _tokenizer()
    cfg = tiny_modernbert_config(["x", "y", "z"], tok)
    # JSON keys arrive as strings and in arbitrary order; the index decides, not the dict order
    cfg.id2label = {"2": "humor", "0": "remorse", "1": "loving"}
    cfg.label2id = {"remorse": 0, "loving": 1, "humor": 2}
    ModernBertForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    clf = load_classifier(str(tmp_path), device="cpu")
    assert clf.labels == ["remorse", "loving", "humor"]
    assert clf.provenance["kind"] == "local"
    assert len(clf.provenance["weights_sha256"]) == 64


def test_generic_labels_raise(tmp_path):
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    tok = _tokenizer()
    cfg = ModernBertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        layer_types=["full_attention"],
        pad_token_id=tok.pad_token_id,
        num_labels=3,
    )
    ModernBertForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ClassifierError, match="no label names"):
        load_classifier(str(tmp_path), device="cpu")


def test_check_personas_names_missing(tiny):
    tiny.check_personas(["sarcasm", "humor"])  # a subset; extra labels are fine
    with pytest.raises(ClassifierLabelError) as err:
        tiny.check_personas(["sarcasm", "remorse", "loving"])
    msg = str(err.value)
    assert "remorse" in msg and "loving" in msg
    assert "poeticism" in msg  # the classifier's labels are listed too


def test_packaged_encoder_is_not_a_classifier(cache):
    with pytest.raises(ClassifierError, match="train"):
        load_classifier("packaged:minilm", cache_dir=cache)


def _offline(monkeypatch) -> None:
    """Hub offline mode for this test (the hub reads the variable once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_missing_hub_id_is_a_clear_error(cache, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(ClassifierError, match="cannot load classifier"):
        load_classifier("nobody/no-such-classifier-xyz", cache_dir=cache)


def test_hub_id_from_cache_records_commit(tmp_path, monkeypatch):
    """A hub id resolves through the HF cache layout; the identity pins the snapshot commit."""
    _offline(monkeypatch)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--persona-clf"
    build_tiny_modernbert(["loving", "remorse"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    clf = load_classifier("someone/persona-clf", cache_dir=tmp_path, device="cpu")
    assert clf.labels == ["loving", "remorse"]
    assert clf.provenance["kind"] == "hub"
    assert clf.provenance["revision"] == commit
    assert clf.key == f"someone/persona-clf@{commit}"
    assert len(clf.provenance["weights_sha256"]) == 64


# ---------------------------------------------------------------------------- tiny builder


def test_tiny_is_deterministic_and_cached(tmp_path, tiny):
    other = load_classifier("tiny:modernbert:" + ",".join(SHUFFLED), cache_dir=tmp_path)
    assert other.weights_sha256 == tiny.weights_sha256
    assert other.folder != tiny.folder
    again = load_classifier("tiny:modernbert:" + ",".join(SHUFFLED), cache_dir=tmp_path)
    assert again.folder == other.folder
    reseeded = load_classifier("tiny:modernbert:" + ",".join(SHUFFLED) + ":7", cache_dir=tmp_path)
    assert reseeded.weights_sha256 != tiny.weights_sha256
    assert reseeded.provenance["seed"] == 7


def test_tiny_builder_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_modernbert(["a", "b"], tmp_path / "t", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_default_labels_and_bad_specs(tmp_path):
    clf = load_classifier("tiny:modernbert", cache_dir=tmp_path)
    assert clf.labels[0] == "sarcasm" and len(clf.labels) == 11
    with pytest.raises(ClassifierError):
        load_classifier("tiny:modernbert:onlyone", cache_dir=tmp_path)
    with pytest.raises(ClassifierError):
        load_classifier("tiny:modernbert:a,b:notaseed", cache_dir=tmp_path)


# ---------------------------------------------------------------------------- predict


def test_predict_keeps_input_order_and_sums_to_one(tiny):
    batched = tiny.predict(MIXED_TEXTS, batch_size=3)
    assert len(batched) == len(MIXED_TEXTS)
    singles = [tiny.predict([t])[0] for t in MIXED_TEXTS]
    for (lab_b, pb), (lab_s, ps) in zip(batched, singles, strict=True):
        assert set(pb) == set(SHUFFLED)
        assert sum(pb.values()) == pytest.approx(1.0, abs=1e-5)
        assert lab_b == max(pb, key=pb.get)
        for k in SHUFFLED:
            assert pb[k] == pytest.approx(ps[k], abs=1e-5)
        assert lab_b == lab_s
    # the texts are not all alike to the model: order errors would be visible
    distinct = {round(p[SHUFFLED[0]], 6) for _, p in batched}
    assert len(distinct) > 3


def test_predict_batch_size_invariance(tiny):
    one = tiny.predict(MIXED_TEXTS, batch_size=1)
    seven = tiny.predict(MIXED_TEXTS, batch_size=7)
    for (_, a), (_, b) in zip(one, seven, strict=True):
        assert max(abs(a[k] - b[k]) for k in SHUFFLED) < 1e-5


def test_predict_progress_callback_and_empty(tiny):
    seen: list[tuple[int, int]] = []
    tiny.predict(MIXED_TEXTS, batch_size=3, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (len(MIXED_TEXTS), len(MIXED_TEXTS))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert tiny.predict([]) == []


def test_predict_truncates_to_max_length(tiny):
    long = "word " * 5000
    short = tiny.predict([long], max_length=32)[0][1]
    same = tiny.predict(["word " * 200], max_length=32)[0][1]
    for k in SHUFFLED:
        assert short[k] == pytest.approx(same[k], abs=1e-5)


def test_classifier_is_a_scorer_that_scores_each_distinct_text_once(tiny):
    assert isinstance(tiny, Scorer)
    assert tiny.identity == stable_hash(tiny.provenance, 12)  # the id of every stored score
    texts = [MIXED_TEXTS[0], MIXED_TEXTS[3], MIXED_TEXTS[0], ""]
    inputs = [texts[0], ScoreInput(texts[1], unit="chat_email"), ScoreInput(texts[2]), texts[3]]
    totals: list[int] = []
    got = tiny.score(inputs, progress=lambda done, total: totals.append(total))
    assert set(totals) == {3}  # the repeated text was classified once
    want = tiny.predict(texts)
    assert len(got) == len(inputs)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, Prediction) and g.label == w.label
        assert g.probs == pytest.approx(w.probs, abs=1e-6)
    assert got[0] == got[2]


# ---------------------------------------------------------------------------- split


def test_split_by_group_deterministic_disjoint():
    groups = [f"p{i}" for i in range(50) for _ in range(3)]
    train, held = split_by_group(groups, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(groups)
    assert split_by_group(list(reversed(groups)), 0.2, seed=3) == (train, held)
    assert split_by_group(groups, 0.2, seed=4) != (train, held)
    assert split_by_group(groups, 0.0, seed=3) == (sorted(set(groups)), [])
    with pytest.raises(ValueError):
        split_by_group(["only"], 0.5, seed=0)


# ---------------------------------------------------------------------------- training


LABELS = ["gamma", "alpha", "beta"]  # deliberately not sorted
NOISE = (
    "the a of to and in is it you that was for on are with as be at one have this from or had by"
).split()


def _synthetic(n_groups: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Each group (prompt) has one text per label; the label word hides among noise words."""
    rng = random.Random(seed)
    texts, labels, groups = [], [], []
    for g in range(n_groups):
        for lab in LABELS:
            words = [rng.choice(NOISE) for _ in range(rng.randint(3, 25))]
            words.insert(rng.randrange(len(words) + 1), lab)
            texts.append(" ".join(words))
            labels.append(lab)
            groups.append(f"prompt{g}")
    return texts, labels, groups


def _finetune(texts, labels, groups, out_dir: Path, **settings):
    """`train_finetune` on LABELS with the settings given, early stopping off unless asked (the
    fine-tune function's own default before it took a TrainSettings)."""
    settings.setdefault("early_stopping_fraction", 0.0)
    data = TrainData(texts, labels, groups, LABELS)
    return train_finetune(data, TrainSettings(**settings), out_dir, progress=False, device="cpu")


def _tiny_encoder(folder: Path) -> Path:
    """A randomly initialised tiny ModernBERT encoder (no head) with the MiniLM tokenizer."""
    from transformers import ModernBertModel

    tok = _tokenizer()
    cfg = tiny_modernbert_config(["x", "y"], tok)
    torch.manual_seed(0)
    ModernBertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    enc = _tiny_encoder(root / "encoder")
    texts, labels, groups = _synthetic(40, seed=0)
    report = _finetune(
        texts, labels, groups, root / "out", encoder=str(enc), epochs=10, lr=5e-3,
        batch_size=8, grad_accum=1, warmup_ratio=0.1, heldout_fraction=0.25, seed=0,
    )  # fmt: skip
    return report, root, texts, labels, groups


def test_training_learns_a_separable_task(trained):
    report, *_ = trained
    assert report.n_train == 90 and report.n_heldout == 30
    assert report.accuracy is not None and report.accuracy >= 0.7  # chance is 1/3
    assert report.macro_f1 is not None and report.macro_f1 >= 0.6
    assert report.confusion_labels == LABELS
    assert sum(map(sum, report.confusion)) == report.n_heldout
    assert report.train_losses[-1] < report.train_losses[0]


def test_training_reports_interval_chance_and_baseline(trained):
    report, root, *_ = trained
    lo, hi = report.macro_f1_interval
    assert lo <= report.macro_f1 <= hi
    assert report.chance == pytest.approx(1 / 3)
    assert report.above_chance is (lo > 1 / 3) and report.above_chance
    assert report.interval["n_clusters"] == len(report.heldout_groups)
    assert report.interval["clusters"] == "prompt id"
    base = report.baseline
    assert base["heldout_groups"] == report.heldout_groups
    assert base["n_heldout"] == report.n_heldout
    assert base["macro_f1_interval"][0] <= base["macro_f1"] <= base["macro_f1_interval"][1]
    assert not any("loss did not fall" in w for w in report.warnings)  # it learned
    assert report.summary.startswith("Above chance")
    saved = json.loads((root / "out" / "train_report.json").read_text())
    assert saved["baseline"] == base and saved["mode"] == "finetune"


def test_training_heldout_groups_disjoint(trained):
    report, _, _, _, groups = trained
    assert report.heldout_groups and report.train_groups
    assert not set(report.heldout_groups) & set(report.train_groups)
    assert set(report.heldout_groups) | set(report.train_groups) == set(groups)
    assert report.n_heldout == sum(g in set(report.heldout_groups) for g in groups)


def test_trained_folder_loads_with_same_labels(trained):
    report, root, texts, labels, groups = trained
    saved = json.loads((root / "out" / "train_report.json").read_text())
    assert saved["accuracy"] == report.accuracy
    assert saved["label_names"] == LABELS
    assert saved["hyperparameters"]["lr"] == 5e-3
    assert saved["encoder"]["kind"] == "local" and saved["encoder"]["weights_sha256"]
    clf = load_classifier(str(root / "out"), device="cpu")
    assert clf.labels == LABELS
    held = set(report.heldout_groups)
    idx = [i for i, g in enumerate(groups) if g in held]
    preds = clf.predict([texts[i] for i in idx])
    acc = sum(p == labels[i] for (p, _), i in zip(preds, idx, strict=True)) / len(idx)
    assert acc == pytest.approx(report.accuracy)


def test_training_without_heldout_says_so(tmp_path):
    enc = _tiny_encoder(tmp_path / "encoder")
    texts, labels, groups = _synthetic(5, seed=1)
    report = _finetune(
        texts, labels, groups, tmp_path / "out", encoder=str(enc), epochs=0.5,
        heldout_fraction=0.0,
    )  # fmt: skip
    assert report.n_heldout == 0 and report.accuracy is None and report.confusion is None
    assert "no held-out" in report.heldout_note
    assert report.n_steps == 1  # 15 texts / batch 8 = 2 batches; half an epoch = 1; accum 2
    assert json.loads((tmp_path / "out" / "train_report.json").read_text())["macro_f1"] is None


def test_training_is_seeded(tmp_path):
    enc = _tiny_encoder(tmp_path / "encoder")
    texts, labels, groups = _synthetic(6, seed=2)
    kw = dict(encoder=str(enc), epochs=1.0, seed=1)
    a = _finetune(texts, labels, groups, tmp_path / "a", **kw)
    b = _finetune(texts, labels, groups, tmp_path / "b", **kw)
    assert a.train_losses == b.train_losses
    assert a.heldout_groups == b.heldout_groups


def test_training_data_is_checked_when_made():
    with pytest.raises(ValueError, match="not in label_names"):
        TrainData(["x", "y"], ["a", "zzz"], ["g1", "g2"], ["a", "b"])
    with pytest.raises(ValueError, match="length"):
        TrainData(["x"], ["a", "b"], ["g1"], ["a", "b"])
    with pytest.raises(ValueError, match="reserved"):
        TrainData(["x", "y"], ["a", "-"], ["g1", "g2"], ["a", "-"])
    with pytest.raises(ValueError, match="no training examples"):
        TrainData([], [], [], ["a", "b"])
    with pytest.raises(ValueError, match="lr"):
        TrainSettings(lr=-1.0)


@pytest.mark.slow
def test_packaged_minilm_trains_and_scores(tmp_path, monkeypatch):
    _offline(monkeypatch)
    texts, labels, groups = _synthetic(14, seed=3)  # 42 texts
    report = _finetune(
        texts, labels, groups, tmp_path / "minilm", encoder="packaged:minilm", epochs=1.0,
        lr=5e-5, batch_size=8, grad_accum=1, max_length=64, heldout_fraction=0.2,
    )  # fmt: skip
    assert report.encoder["kind"] == "packaged"
    assert report.hyperparameters["effective_max_length"] == 64
    assert report.n_heldout > 0 and report.accuracy is not None
    clf = load_classifier(str(tmp_path / "minilm"), device="cpu")
    assert clf.labels == LABELS
    assert clf.model.config.model_type == "bert"
    scored = clf.predict(texts, batch_size=16)
    assert len(scored) == len(texts)
    assert all(lab in LABELS and sum(p.values()) == pytest.approx(1, abs=1e-5) for lab, p in scored)


# ---------------------------------------------------------------------------- held-out figures


def test_heldout_evaluation_against_known_truths():
    names = ["a", "b", "c"]
    groups = [f"p{i // 3}" for i in range(60)]
    truth = [names[i % 3] for i in range(60)]
    perfect = heldout_evaluation(truth, truth, groups, names, n_boot=200)
    assert perfect["macro_f1"] == 1.0 and perfect["macro_f1_interval"] == [1.0, 1.0]
    assert perfect["above_chance"] and perfect["n_clusters"] == 20
    assert perfect["confusion"] == [[20, 0, 0], [0, 20, 0], [0, 0, 20]]
    rng = random.Random(0)
    guess = [rng.choice(names) for _ in truth]
    null = heldout_evaluation(truth, guess, groups, names, n_boot=500)
    lo, hi = null["macro_f1_interval"]
    assert lo <= 1 / 3 <= hi and not null["above_chance"]
    # the same rows give the same resamples (a classifier and its baseline are compared fairly)
    assert heldout_evaluation(truth, guess, groups, names, n_boot=500) == null


def test_loss_warning_both_directions():
    falling = [1.1 - 0.01 * i for i in range(100)]
    assert loss_warning(falling, 3) is None
    flat = [1.0 + 0.01 * ((-1) ** i) for i in range(100)]
    assert "did not fall" in loss_warning(flat, 3)
    at_chance = [math.log(6) + 0.1 - 0.0015 * i for i in range(100)]  # falls 8%, ends at ln 6
    assert "did not fall" in loss_warning(at_chance, 6)
    assert "cannot be judged" in loss_warning([1.0], 3)
    # lr = 0 on a tiny model: batch-to-batch noise makes the last steps 12% lower by chance
    lr_zero = [1.4, 1.332, 1.125, 1.222, 1.397, 1.315, 1.343, 1.125, 1.315, 1.61, 1.332, 1.066]
    assert "did not fall" in loss_warning(lr_zero, 3)
    rng = random.Random(0)
    noisy_but_learning = [1.3 - 0.05 * i + rng.gauss(0, 0.05) for i in range(12)]
    assert loss_warning(noisy_but_learning, 3) is None


def test_no_learning_warning_fires_for_lr_zero(tmp_path, caplog):
    enc = _tiny_encoder(tmp_path / "encoder")
    texts, labels, groups = _synthetic(20, seed=4)
    with caplog.at_level("WARNING", logger="charshift.scoring.heldout"):
        report = _finetune(
            texts, labels, groups, tmp_path / "out", encoder=str(enc), epochs=2, lr=0.0,
            batch_size=8, grad_accum=1,
        )  # fmt: skip
    assert any("loss did not fall" in w for w in report.warnings)
    assert "loss did not fall" in caplog.text
    assert "loss did not fall" in report.summary
    saved = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert saved["warnings"] == report.warnings


def test_early_stopping_keeps_the_best_state(tmp_path):
    enc = _tiny_encoder(tmp_path / "encoder")
    texts, labels, groups = _synthetic(30, seed=5)
    report = _finetune(
        texts, labels, groups, tmp_path / "out", encoder=str(enc), epochs=6, lr=5e-3,
        batch_size=8, grad_accum=1, early_stopping_fraction=0.25, eval_every=3,
        early_stopping_patience=2,
    )  # fmt: skip
    es = report.early_stopping
    val = set(es["val_groups"])
    assert val and not val & set(report.heldout_groups) and val <= set(report.train_groups)
    assert es["n_fit"] + es["n_val"] == report.n_train
    steps = [s for s, _ in es["evals"]]
    assert steps == sorted(steps) and all(s % 3 == 0 or s == report.n_steps for s in steps)
    assert es["best_inner_macro_f1"] == max(f for _, f in es["evals"])
    # the saved model is the best state: it scores the best figure on the inner split again
    clf = load_classifier(str(tmp_path / "out"), device="cpu")
    idx = [i for i, g in enumerate(groups) if g in val]
    preds = [p for p, _ in clf.predict([texts[i] for i in idx], batch_size=16)]
    from charshift.stats import score_labels

    again = score_labels([labels[i] for i in idx], preds, LABELS)["macro_f1"]
    assert again == pytest.approx(es["best_inner_macro_f1"], abs=1e-9)
    if es["stopped_early_at"] is not None:
        assert report.n_steps == es["stopped_early_at"] < 6 * math.ceil(es["n_fit"] / 8)
