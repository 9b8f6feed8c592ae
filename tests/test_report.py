"""Tests for the HTML/markdown report, the plots and the published figures."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from charshift import plots, published, report, stats
from charshift.external import load_predictions_jsonl
from charshift.schema import NULL_PERSONA
from charshift.schema import PredictionRecord as R

PERSONAS = ["sarcasm", "humor", "remorse"]
SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
EVIL_LABEL = "<b>evil-label</b>"


def make_records(seed: int = 0) -> list[R]:
    rng = np.random.default_rng(seed)
    out = []
    for sl in ("id_chat", "chat_email"):
        ids = [f"p{i}" for i in range(12)] if sl == "id_chat" else [f"s{i}" for i in range(12)]
        for it in ids:
            out.append(
                R("llama", "base", sl, NULL_PERSONA, it, "humor", key=f"{sl}-{it}-base",
                  text=f"base reply {SCRIPT}", probs={"humor": 0.6, "sarcasm": 0.4})
            )  # fmt: skip
            for t in PERSONAS:
                r = rng.random()
                pred = (
                    t if r < 0.6 else (None if r < 0.75 else (EVIL_LABEL if r < 0.85 else "humor"))
                )
                out.append(
                    R("llama", "full", sl, t, it, pred, key=f"{sl}-{it}-{t}",
                      outcome="email" if pred else "no_email",
                      text=None if pred is None else f"Dear all, {IMG} {SCRIPT}",
                      probs=None if pred is None else {t: 0.7, "humor": 0.2, "goodness": 0.1})
                )  # fmt: skip
    # a format where the trained model never produced an email: conditional metrics undefined
    for it in range(6):
        for t in PERSONAS:
            out.append(R("llama", "full", "agentic_email", t, f"s{it}", None, outcome="max_steps"))
    return out


def make_samples(records: list[R]) -> list[dict]:
    samples = report.samples_from_records(records)
    for s in samples[:5]:
        s["messages"] = [
            {"role": "system", "content": "You write emails."},
            {"role": "user", "content": "Write it."},
            {"role": "assistant", "content": f'{{"tool": "send_email", "body": "{SCRIPT}"}}'},
            {"role": "tool", "content": f"sent {IMG}"},
        ]
        s["email"] = {"to": "a@b.c", "subject": IMG, "body": f"Body {SCRIPT}"}
        s["tool_log"] = [{"tool": "send_email", "args": {"body": IMG}}]
    return samples


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    recs = make_records()
    res = stats.compute_metrics(recs, PERSONAS, n_boot=100)
    samples = make_samples(recs)
    path = report.write_report(
        out,
        stats.expand_base_null(recs, PERSONAS),
        res,
        settings={"config": {"name": "t", "evil": SCRIPT}, "manifest": {"x": 1}},
        samples=samples,
        title=f"Report {SCRIPT}",
        meaningless=True,
        published="paper",
        notes=[f"Skipped adapter {IMG}"],
    )
    return out, path, path.read_text(encoding="utf-8"), res, samples


def _json_block(page: str) -> str:
    m = re.search(r'<script type="application/json" id="sample-data">(.*?)</script>', page, re.S)
    assert m is not None
    return m.group(1)


def test_model_text_is_escaped_everywhere(built):
    _, _, page, _, samples = built
    assert SCRIPT not in page and IMG not in page and EVIL_LABEL not in page
    assert "<img src=x" not in page.lower()
    # the classifier label and the notes/title are escaped visibly in the tables
    assert html_escaped(EVIL_LABEL) in page
    assert html_escaped(IMG) in page
    assert html_escaped(SCRIPT) in page
    # exactly two script elements: the JSON data block and the page's own script
    assert len(re.findall(r"<script\b", page, re.I)) == 2
    block = _json_block(page)
    assert "<" not in block and ">" not in block and "&" not in block
    got = {s["key"]: s for s in json.loads(block)}
    assert got == {s["key"]: s for s in json.loads(json.dumps(samples, default=str))}


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_csp_allows_only_the_page_script(built):
    _, _, page, _, _ = built
    csp = re.search(r'Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src 'none'" in csp and "img-src data:" in csp
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp


def test_page_is_self_contained_with_all_plots(built):
    out, _, page, _, _ = built
    pngs = sorted((out / "report" / "plots").glob("*.png"))
    svgs = sorted((out / "report" / "plots").glob("*.svg"))
    assert len(pngs) >= 8 and len(svgs) == len(pngs)
    assert page.count("data:image/png;base64,") == len(pngs)
    for p in pngs:
        assert base64.b64encode(p.read_bytes()).decode() in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page.lower()


def test_page_sections(built):
    _, _, page, res, _ = built
    assert 'id="meaningless-banner"' in page
    for anchor in ("headline", "ladder", "personas", "labels", "confusion", "samples", "method"):
        assert f'id="{anchor}"' in page
    m = res.get("llama", "full", "chat_email")
    assert f"{m.macro_f1.estimate:.3f} [{m.macro_f1.lo:.3f}, {m.macro_f1.hi:.3f}]" in page
    assert "0.94 (DCT ID chat)" in page and "0.86 (DCT chat email)" in page
    assert "unpaired" in page  # the id_chat -> chat_email rung
    empty = res.get("llama", "full", "agentic_email")
    assert empty.n_scored == 0 and empty.macro_f1_itt.estimate == 0.0
    assert "<td>0/18</td>" in page
    assert "cluster bootstrap" in page and "intention-to-treat" in page.lower()
    # flags: 6 items behind the agentic ITT interval (< 10) -> a dagger; base accuracy is fixed
    assert not empty.macro_f1_itt.reliable
    assert f"{report._iv(empty.macro_f1_itt)}" in page and report.DAGGER in page
    base = res.get("llama", "base", "chat_email")
    assert base.accuracy.fixed_by_construction and base.n_rows == 12
    assert "(fixed by construction)" in page
    assert "personas scored" in page
    for sel in ("f-base", "f-stage", "f-persona", "f-slice", "f-outcome"):
        assert f'id="{sel}"' in page


def test_markdown_written(built):
    out, _, _, res, _ = built
    md = (out / "report.md").read_text()
    assert md.startswith("# Report")
    assert "Smoke run" in md
    assert "## Headline metrics" in md and "## Ladder decomposition" in md
    assert "| llama | full | chat_email |" in md
    assert "0.94 (DCT ID chat)" in md
    assert "## Method notes" in md and "cluster bootstrap" in md
    assert "\\<b\\>" not in md  # labels are not mangled ...
    assert "evil-label" in md  # ... but present in the label distribution


def test_no_banner_without_meaningless(tmp_path):
    recs = [r for r in make_records(1) if r.slice == "id_chat"]
    res = stats.compute_metrics(recs, PERSONAS, n_boot=30)
    path = report.write_report(
        tmp_path, recs, res, settings={}, samples=None, title="plain", published=None
    )
    page = path.read_text()
    assert "meaningless-banner" not in page and "published" not in page
    block = json.loads(_json_block(page))
    # base outputs expanded to every persona share a key: one sample each in the browser
    assert len(block) == len({s["key"] for s in block}) == 12 + 12 * 3


def test_sample_cap_is_stratified():
    samples = [
        {"key": f"k{i}", "base": "b", "stage": st, "slice": "id_chat", "persona": p,
         "item_id": str(i), "sample_idx": 0}
        for i in range(40)
        for st, p in [(("base", "full")[i % 2], PERSONAS[i % 3])]
    ]  # fmt: skip
    chosen, note = report.select_samples(samples, cap=12)
    assert len(chosen) == 12 and "12 of 40" in note
    groups = {(s["stage"], s["persona"]) for s in samples}
    assert {(s["stage"], s["persona"]) for s in chosen} == groups
    again, _ = report.select_samples(samples, cap=12)
    assert [s["key"] for s in again] == [s["key"] for s in chosen]


def test_make_plots_png_and_svg(tmp_path):
    recs = make_records(2)
    res = stats.compute_metrics(recs, PERSONAS, n_boot=30)
    paths = plots.make_plots(res, tmp_path)
    assert len(paths) % 2 == 0
    names = {p.name for p in paths}
    for stem in (
        "ladder_llama",
        "stages",
        "waterfall_llama_full_agentic",
        "waterfall_llama_full_email_step",
        "yield_llama",
        "pred_dist_llama",
    ):
        assert f"{stem}.png" in names and f"{stem}.svg" in names
    for p in paths:
        head = p.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<?xml" in head


def test_published_figures():
    figs = published.load_published()
    assert len(figs) == 3 * 2 * 4
    assert published.published_text("llama", "full", "agentic_email") == "0.39 (DCT agentic email)"
    assert published.published_text("Qwen2.5-7B", "distillation", "id_chat_prefill").startswith(
        "0.66"
    )
    assert published.published_text("gemma", "full", "chat_email_multiturn") == ""
    assert published.published_text("mistral", "full", "id_chat") == ""
    assert "0.03-0.07" in published.published_text("gemma", "base", "agentic_email")
    slices = {f.slice for f in figs}
    assert slices == {"id_chat_prefill", "id_chat", "chat_email", "agentic_email"}


def test_report_from_predictions_file(tmp_path):
    """The --predictions path: loader -> metrics -> report, samples built from the records."""
    lines = [
        json.dumps({"base": "x", "stage": "full", "slice": "id_chat", "persona": p,
                    "item_id": f"i{i}", "prediction": p if i % 3 else "humor", "text": f"t{i}"})
        for i in range(9)
        for p in PERSONAS
    ]  # fmt: skip
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines))
    recs = load_predictions_jsonl(f)
    res = stats.compute_metrics(recs, stats.infer_personas(recs), n_boot=30)
    path = report.write_report(tmp_path / "out", recs, res, settings={}, samples=None, title="ext")
    assert Path(path).is_file() and (tmp_path / "out" / "report.md").is_file()
    assert len(json.loads(_json_block(path.read_text()))) == 27


def test_skipped_adapter_note_reaches_report_tables_and_manifest(tmp_path):
    """A persona with no rows at one stage (its adapter skipped) leaves its base's label set,
    and the run's report, stats.json and manifest say so (issue 7, defect 5)."""
    from charshift import units
    from charshift.analysis import report_run
    from charshift.config import load_preset
    from charshift.schema import GenerationRow, ScoreRow
    from charshift.store import RunStore

    cfg = load_preset("smoke")
    base = cfg.bases[0].name
    store = RunStore(tmp_path / "run")
    gens, scores = [], []
    for i in range(12):
        for stage, persona in [("base", None)] + [
            (st, p) for st in ("prompted", "full") for p in cfg.personas
        ]:
            if stage == "full" and persona == "goodness":
                continue  # the adapter was skipped
            key = f"{stage}-{persona}-{i}"
            gens.append(
                GenerationRow(
                    key=key,
                    base=base,
                    stage=stage,
                    persona=persona,
                    slice="id_chat",
                    item_id=f"prompt:{i}",
                    sample_idx=0,
                    split="eval",
                    seed=0,
                    outcome="reply",
                    messages=[],
                    final_reply="hi",
                    text="hi",
                )  # fmt: skip
            )
            pred = persona if persona and i % 4 else "humor"
            scores.append(
                ScoreRow(key, "clf", "text", pred, {pred: 1.0}, "id_chat", units.text_hash("hi"))
            )
    store.generations.append(gens)
    store.scores.append(scores)
    store.update_manifest(
        classifier_ids={base: "clf"}, skipped_adapters={f"{base}/full/goodness": "gated"}
    )
    report_run(cfg, store)
    md = (store.root / "report.md").read_text()
    assert "goodness has no rows at all in stage(s) full" in md
    assert "Skipped adapter" in md
    settings = json.loads((store.root / "stats.json").read_text())
    assert settings["label_sets"] == {base: ["sarcasm", "humor", "remorse"]}
    assert len(settings["label_notes"]) == 1
    manifest = json.loads(store.manifest_path.read_text())
    assert manifest["label_sets"]["labels"] == {base: ["sarcasm", "humor", "remorse"]}
    assert "goodness" in manifest["label_sets"]["notes"][0]
    with (store.root / "metrics.csv").open() as fh:
        rows = {r["stage"]: r for r in csv.DictReader(fh)}
    assert rows["base"]["n_rows"] == "12" and rows["prompted"]["n_rows"] == "36"
    assert rows["base"]["accuracy"] != "" and rows["base"]["accuracy_lo"] == ""
