"""Scoring units: the text each unit scores, outcome-based missingness, and scoring them in a run
(a real tiny classifier), with a changed cut scored again instead of reused."""

from __future__ import annotations

import pytest

from charshift import analysis, pipeline, units
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


def test_cut_words_keeps_whitespace_and_is_deterministic():
    assert units.cut_words("a  b\n\nc d", 3) == "a  b\n\nc"
    assert units.cut_words("  lead  x y", 2) == "lead  x"
    assert units.cut_words("a b", 5) == "a b"
    assert units.cut_words("a b", 0) == ""
    assert units.word_count("a  b\nc") == 3


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


@pytest.mark.parametrize("outcome", ["no_email", "malformed", "max_steps", "empty", "error"])
def test_missing_outcome_is_missing_in_every_unit_even_raw(outcome):
    """Defect 6: under `scoring.text: raw` a row that hit max_steps or was malformed used to be
    scored on its final reply (a JSON call). Missingness is outcome-based."""
    for slice_ in ("chat_email", "agentic_email", "id_chat"):
        row = _row(slice_=slice_, outcome=outcome, final='{"name": "search_chat"}', text=None)
        for raw in (False, True):
            got = units.scored_texts(row, raw=raw, short_len=5)
            assert got and all(v is None for v in got.values()), (slice_, raw, got)


def test_id_chat_short_takes_the_median_chat_email_body_of_its_condition():
    rows = [
        _row("c1", text="one two three four five six seven eight"),
        _row("c2", text=" ".join(["w"] * 12)),
        _row("c3", text=" ".join(["w"] * 20)),
        _row("c4", outcome="no_email", text=None),
        _row("o1", persona="humor", text=" ".join(["w"] * 30)),
        _row("t1", split="train", text=" ".join(["w"] * 99)),
    ]
    lengths = units.short_lengths(rows)
    assert lengths == {("b", "prompted", "sarcasm"): 12, ("b", "prompted", "humor"): 30}
    reply = " ".join(f"x{i}" for i in range(40))
    idr = _row("i1", slice_="id_chat", outcome="reply", final=reply, text=reply)
    got = dict((u, t) for r, u, t in units.row_units([*rows, idr]) if r.key == "i1")
    assert got["id_chat"] == reply and got["id_chat.short"] == " ".join(reply.split()[:12])
    # a condition with no chat_email body has no short unit (absent, not missing)
    other = _row("i2", slice_="id_chat", outcome="reply", persona="loving", final=reply, text=reply)
    assert [u for r, u, _ in units.row_units([*rows, other]) if r.key == "i2"] == ["id_chat"]


# ------------------------------------------------------------------------- scoring in a run


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARSHIFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(raw=False):
    return parse_config(
        {
            "bases": [
                {"name": "b", "model": "tiny:llama", "classifier": "tiny:modernbert:sarcasm,humor"}
            ],
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
    assert recs[("i1", "id_chat.short")].text == " ".join(reply.split()[:12])
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
    assert recs[("i1", "id_chat.short")].text == " ".join(reply.split()[:20])


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
