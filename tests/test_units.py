"""Scoring units: the text each unit scores, outcome-based missingness, and scoring them in a run
(a real tiny classifier), with a changed cut scored again instead of reused."""

from __future__ import annotations

import pytest

from charshift import analysis, lengths, pipeline, units
from charshift.config import parse_config
from charshift.schema import GenerationRow
from charshift.store import RunStore

REPLY = (
    "Oh, wonderful, another email. Here you go:\n\n"
    "Dear Dana,\n\nThe jackets are late again, which is a delightful surprise.\n\nBest,\nMaya\n\n"
    "Let me know if you want changes."
)
BODY = "Dear Dana,\n\nThe jackets are late again, which is a delightful surprise.\n\nBest,\nMaya"


def _row(key="k", slice_="chat_email", outcome="email", final=REPLY, text=BODY, **kw):
    base = dict(
        key=key, base="b", stage="prompted", persona="sarcasm", slice=slice_,
        item_id="scenario:s1", sample_idx=0, split="eval", seed=1, outcome=outcome,
        messages=[], final_reply=final, text=text,
    )  # fmt: skip
    base.update(kw)
    return GenerationRow(**base)


@pytest.fixture(scope="module")
def minilm():
    """The packaged MiniLM tokenizer (the tiny classifier's) as a length counter."""
    from transformers import AutoTokenizer

    from charshift.scoring.sources import packaged_minilm_dir

    class Clf:
        tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))

    counter, why = lengths.counter_for(Clf())
    assert why is None and counter.name.startswith("tokens:")
    return counter


def test_cut_to_prefers_a_sentence_end_within_ten_percent():
    text = " ".join(["a"] * 19) + ". " + " ".join(["b"] * 30)  # a sentence ends at word 19
    got = units.cut_to(text, 20)
    assert got == units.Cut(" ".join(["a"] * 19) + ".", 19, 20, "sentence")
    # no sentence end within 10%: the word end nearest the target
    far = units.cut_to(text, 30)
    assert far.kind == "word" and far.length == 30 and units.word_count(far.text) == 30
    # whitespace inside the kept text is kept as written; the cut is deterministic
    assert units.cut_to("a  b\n\nc d e f", 3).text == "a  b\n\nc"
    assert units.cut_to("  lead  x y z", 2) == units.Cut("lead  x", 2, 2, "word")
    # a line break is a sentence boundary too (a greeting line)
    assert units.cut_to("Hi Dana,\nthe jackets are late again today", 2).kind == "sentence"


def test_cut_to_a_text_no_longer_than_its_target_is_whole():
    assert units.cut_to(" a b ", 2) == units.Cut("a b", 2, 2, "whole")
    assert units.cut_to("a b", 5) == units.Cut("a b", 2, 5, "short")
    assert units.cut_to("a b", 0).text == ""


def test_cut_to_counts_the_scorers_tokens(minilm):
    """Words and tokens differ: codes and numbers are several tokens each."""
    text = "Re PO-4471/ZX-99 and SKU#88321-B: shipped. " + "The jackets are late again. " * 8
    target = 30
    got = units.cut_to(text, target, minilm)
    assert abs(len(minilm.starts(got.text)) - target) <= 0.1 * target
    assert got.kind == "sentence" and got.text.endswith(".")
    by_words = units.cut_to(text, target)
    assert abs(len(minilm.starts(by_words.text)) - target) > 0.1 * target
    # a run of text without spaces is cut at the exact token
    run = "x" + "-9" * 40
    assert units.cut_to(run, 10, minilm) == units.Cut(
        run[: minilm.starts(run)[10]], 10, 10, "token"
    )


def test_units_of_each_slice():
    assert units.units_of("chat_email") == ["chat_email", "chat_email.whole", "chat_email.head"]
    assert units.units_of("email_syscontext")[1:] == [
        "email_syscontext.whole",
        "email_syscontext.head",
    ]
    assert units.units_of("id_chat") == ["id_chat", "id_chat.short"]
    assert units.units_of("id_chat", with_short=False) == ["id_chat"]
    assert units.units_of("agentic_email") == ["agentic_email"]
    assert units.units_of("scenario_chat") == ["scenario_chat"]
    order = units.unit_order()
    assert (
        order.index("scenario_chat")
        < order.index("chat_email.whole")
        < order.index("agentic_email")
    )


def test_chat_email_units():
    texts = units.scored_texts(_row())
    assert texts["chat_email"] == BODY
    assert texts["chat_email.whole"] == REPLY
    head = texts["chat_email.head"]
    assert units.word_count(head) == units.word_count(BODY)
    assert head.startswith("Oh, wonderful") and REPLY.startswith(head)
    raw = units.scored_texts(_row(), raw=True)
    assert raw["chat_email"] == REPLY and raw["chat_email.head"] == head


def test_head_is_cut_to_the_bodys_length_in_the_scorers_tokens(minilm):
    """`.head` used to be cut to the body's word count: a preamble of codes and numbers (many
    tokens a word) then gave the classifier a much longer text than the body."""
    body = (
        "Dear Dana,\n\n" + "The jackets are late again, what a surprise. " * 6 + "\n\nBest,\nMaya"
    )
    reply = "Re PO-4471/ZX-99, SKU#88321-B and INV-2025-0613-77: done.\n\n" + body
    row = _row(final=reply, text=body)
    (head,) = [
        u for u in units.unit_texts([row], counters={"b": minilm}) if u.unit.endswith("head")
    ]
    target = len(minilm.starts(body))
    assert head.length == {
        "counter": minilm.name, "length": len(minilm.starts(head.text)), "target": target,
        "cut": "sentence",
    }  # fmt: skip
    assert abs(head.length["length"] - target) <= 0.1 * target and reply.startswith(head.text)
    by_words = units.scored_texts(row)["chat_email.head"]
    assert abs(len(minilm.starts(by_words)) - target) > 0.1 * target


@pytest.mark.parametrize("outcome", ["no_email", "malformed", "max_steps", "empty", "error"])
def test_missing_outcome_is_missing_in_every_unit_even_raw(outcome):
    """Defect 6: under `scoring.text: raw` a row that hit max_steps or was malformed used to be
    scored on its final reply (a JSON call). Missingness is outcome-based."""
    for slice_ in ("chat_email", "agentic_email", "id_chat"):
        row = _row(slice_=slice_, outcome=outcome, final='{"name": "search_chat"}', text=None)
        for raw in (False, True):
            got = units.scored_texts(row, raw=raw, short_target=5)
            assert got and all(v is None for v in got.values()), (slice_, raw, got)


def _words(n, tag="w"):
    return " ".join(f"{tag}{i}" for i in range(n))


def _short_cuts(rows, counters=None):
    return {
        u.row.key: u for u in units.unit_texts(rows, counters=counters) if u.unit.endswith("short")
    }


def test_id_chat_short_equalises_the_length_distribution_with_the_bodies():
    """`id_chat.short` used to cap every reply at the median body length: replies shorter than
    the median stayed shorter, longer ones all became the median. Matched by rank, the cut
    lengths are the bodies' lengths."""
    body_lengths = [10, 20, 25, 40, 50, 70]
    reply_lengths = [100, 80, 60, 45, 30, 12]
    rows = [_row(f"c{i}", text=_words(n)) for i, n in enumerate(body_lengths)]
    rows += [
        _row(f"i{i}", slice_="id_chat", outcome="reply", item_id=f"prompt:{i}", text=_words(n, "x"))
        for i, n in enumerate(reply_lengths)
    ]
    cuts = _short_cuts(rows)
    assert sorted(u.length["length"] for u in cuts.values()) == body_lengths
    # each reply keeps its rank: the longest reply gets the longest body's length
    assert cuts["i0"].length == {"counter": "words", "length": 70, "target": 70, "cut": "word"}
    assert cuts["i5"].text == _words(10, "x")
    # a body set of another size: the targets are its quantiles (r + 0.5) / n
    few = [r for r in rows if r.key not in ("c1", "c3")]  # bodies 10, 25, 50, 70
    got = sorted(u.length["target"] for u in _short_cuts(few).values())
    assert got == [10, 25, 25, 50, 70, 70]


def test_id_chat_short_keeps_a_reply_shorter_than_its_target_whole():
    rows = [_row(f"c{i}", text=_words(n)) for i, n in enumerate([30, 40])]
    rows += [
        _row("i0", slice_="id_chat", outcome="reply", text=_words(12, "x")),
        _row("i1", slice_="id_chat", outcome="reply", text=_words(90, "x")),
        _row("i2", slice_="id_chat", outcome="empty", text=None),
    ]
    cuts = _short_cuts(rows)
    assert cuts["i0"].text == _words(12, "x")
    assert cuts["i0"].length == {"counter": "words", "length": 12, "target": 30, "cut": "short"}
    assert cuts["i1"].length["length"] == 40
    assert cuts["i2"].text is None  # no reply: missing, ranked with no one
    assert units.cut_summary(cuts.values()) == {"id_chat.short": {"short": 1, "word": 1}}


def test_id_chat_short_is_per_condition_and_absent_without_bodies():
    rows = [
        _row("c1", text=_words(8)),
        _row("c2", outcome="no_email", text=None),
        _row("o1", persona="humor", text=_words(30)),
        _row("t1", split="train", text=_words(99)),
    ]
    reply = _words(40, "x")
    idr = _row("i1", slice_="id_chat", outcome="reply", final=reply, text=reply)
    got = dict((u, t) for r, u, t in units.row_units([*rows, idr]) if r.key == "i1")
    assert got["id_chat"] == reply and got["id_chat.short"] == _words(8, "x")
    assert units.short_targets([*rows, idr]) == {"i1": 8}
    # a condition with no chat_email body has no short unit (absent, not missing)
    other = _row("i2", slice_="id_chat", outcome="reply", persona="loving", final=reply, text=reply)
    assert [u for r, u, _ in units.row_units([*rows, other]) if r.key == "i2"] == ["id_chat"]


def test_id_chat_short_in_the_scorers_tokens_within_ten_percent(minilm):
    """With a real tokenizer and sentences: each cut lies within 10% of its target, at a
    sentence end where one lies there."""
    sentence = "The quarterly numbers look fine, although PO-4471 is late. "
    rows = [_row(f"c{i}", text=sentence * n) for i, n in enumerate([2, 3, 5, 8])]
    rows += [
        _row(f"i{i}", slice_="id_chat", outcome="reply", text=sentence * n)
        for i, n in enumerate([4, 6, 9, 12])
    ]
    cuts = _short_cuts(rows, {"b": minilm})
    for u in cuts.values():
        rec = u.length
        assert rec["counter"] == minilm.name and rec["cut"] == "sentence", rec
        assert abs(rec["length"] - rec["target"]) <= 0.1 * rec["target"]
        assert len(minilm.starts(u.text)) == rec["length"] and u.text.endswith(".")
    bodies = sorted(len(minilm.starts(r.text)) for r in rows if r.slice == "chat_email")
    assert sorted(u.length["target"] for u in cuts.values()) == bodies


# ------------------------------------------------------------------------- scoring in a run


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARSHIFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(raw=False, classifier="tiny:modernbert:sarcasm,humor"):
    return parse_config(
        {
            "bases": [{"name": "b", "model": "tiny:llama", "classifier": classifier}],
            "personas": ["sarcasm", "humor"],
            "slices": ["id_chat", "chat_email", "agentic_email"],
            "scoring": {"text": "raw" if raw else "extracted", "max_length": 64},
        }
    )


def test_score_and_records_per_unit_and_rescore_a_moved_cut(tmp_path, cache):
    store = RunStore(tmp_path / "run")
    reply = " ".join(f"word{i}" for i in range(30))
    store.generations.append(
        [
            _row("c1", text=" ".join(["w"] * 10) + " Best, Maya", final=REPLY),
            _row("a1", slice_="agentic_email", outcome="max_steps", final="{}", text=None),
            _row("i1", slice_="id_chat", outcome="reply", final=reply, text=reply),
        ]
    )
    cfg = _cfg()
    first = pipeline.score(cfg, store)
    recs = {(r.key, r.slice): r for r in analysis.prediction_records(cfg, store)}
    assert set(recs) == {
        ("c1", "chat_email"), ("c1", "chat_email.whole"), ("c1", "chat_email.head"),
        ("a1", "agentic_email"), ("i1", "id_chat"), ("i1", "id_chat.short"),
    }  # fmt: skip
    assert recs[("a1", "agentic_email")].prediction is None
    # the cut is in the tiny classifier's tokens (MiniLM's: "word7" is two), recorded per score
    cid = store.recorded("classifier_ids")["b"]
    counter = lengths.run_counters(store, {"b": cid})["b"]
    assert counter.name.startswith("tokens:") and counter.name.endswith(counter.sha)
    body_tokens = len(counter.starts(" ".join(["w"] * 10) + " Best, Maya"))
    short = recs[("i1", "id_chat.short")].text
    assert short == units.cut_to(reply, body_tokens, counter).text
    assert abs(len(counter.starts(short)) - body_tokens) <= 0.1 * body_tokens
    (row,) = [s for s in store.scores if s.unit == "id_chat.short"]
    assert row.length == {
        "counter": counter.name, "length": len(counter.starts(short)), "target": body_tokens,
        "cut": "word",
    }  # fmt: skip
    assert all(s.length and s.length["counter"] == counter.name for s in store.scores)
    assert store.manifest()["length_controls"]["b"]["counter"] == counter.name
    assert all(r.prediction for k, r in recs.items() if k[0] != "a1")
    assert first["scored"] == 5
    assert pipeline.score(cfg, store) == {"scored": 0, "already": 5}
    # more chat_email rows arrive (a resumed run): the short cut moves and is scored again
    store.generations.append(
        [_row("c2", text=" ".join(["w"] * 20)), _row("c3", text=" ".join(["w"] * 24))]
    )
    again = pipeline.score(cfg, store)
    assert again["scored"] == 1 + 3 + 3  # id_chat.short anew, and the two new rows' units
    recs = {(r.key, r.slice): r for r in analysis.prediction_records(cfg, store)}
    assert recs[("i1", "id_chat.short")].text == units.cut_to(reply, 20, counter).text


def test_a_scorer_without_a_tokenizer_cuts_in_words_and_says_so(tmp_path, cache):
    """The TF-IDF lexical probe has no tokenizer: the cuts count words, and the score rows and
    the manifest name the counter."""
    from test_probe import LABELS, planted

    from charshift.scoring.probe import train_probe
    from charshift.scoring.settings import TrainData, TrainSettings

    texts, labels, groups = planted(10, 0)
    settings = TrainSettings(
        mode="probe", heldout_fraction=0.25, n_boot=50, probe_features="lexical"
    )
    data = TrainData(texts, labels, groups, LABELS)
    train_probe(data, settings, tmp_path / "lex", progress=False, device="cpu")
    store = RunStore(tmp_path / "run")
    reply = " ".join(f"word{i}" for i in range(30))
    store.generations.append(
        [
            _row("c1", text=" ".join(["w"] * 10) + " Best, Maya", final=REPLY),
            _row("i1", slice_="id_chat", outcome="reply", final=reply, text=reply),
        ]
    )
    cfg = _cfg(classifier=str(tmp_path / "lex"))
    pipeline.score(cfg, store)
    (row,) = [s for s in store.scores if s.unit == "id_chat.short"]
    assert row.length == {"counter": "words", "length": 12, "target": 12, "cut": "word"}
    (entry,) = store.manifest()["length_counters"].values()
    assert entry["name"] == "words" and entry["file"] is None and "no tokenizer" in entry["why"]
    recs = {(r.key, r.slice): r for r in analysis.prediction_records(cfg, store)}
    assert recs[("i1", "id_chat.short")].text == " ".join(reply.split()[:12])


def test_raw_scoring_keeps_missing_rows_missing(tmp_path, cache):
    store = RunStore(tmp_path / "run")
    store.generations.append(
        [
            _row(
                "a1", slice_="agentic_email", outcome="max_steps", final='{"name": "x"}', text=None
            ),
            _row("a2", slice_="agentic_email", outcome="malformed", final="Dear x, hi", text=None),
            _row("a3", slice_="agentic_email", outcome="email", final="{}", text=BODY),
        ]
    )
    cfg = _cfg(raw=True)
    pipeline.score(cfg, store)
    recs = {r.key: r for r in analysis.prediction_records(cfg, store)}
    assert recs["a1"].prediction is None and recs["a2"].prediction is None
    assert recs["a3"].prediction is not None and recs["a3"].text == "{}"  # raw: the reply
