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
from charshift.schema import NULL_PERSONA, Sample
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


def make_samples(records: list[R]) -> list[Sample]:
    samples = report.samples_from_records(records)
    for s in samples[:5]:
        s.messages = [
            {"role": "system", "content": "You write emails."},
            {"role": "user", "content": "Write it."},
            {"role": "assistant", "content": f'{{"tool": "send_email", "body": "{SCRIPT}"}}'},
            {"role": "tool", "content": f"sent {IMG}"},
        ]
        s.email = {"to": "a@b.c", "subject": IMG, "body": f"Body {SCRIPT}"}
        s.tool_log = [{"tool": "send_email", "args": {"body": IMG}}]
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
    want = [s.to_dict() for s in samples]
    assert got == {s["key"]: s for s in json.loads(json.dumps(want, default=str))}


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
    assert len(pngs) >= 8 and not svgs  # SVG only when asked for (report.svg)
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
    assert "## Metrics per cell" in md and "## Ladder decomposition" in md
    assert md.index("## Headline") < md.index("## Metrics per cell")
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
        Sample(key=f"k{i}", base="b", stage=st, slice="id_chat", persona=p, item_id=str(i),
               sample_idx=0, outcome="reply")
        for i in range(40)
        for st, p in [(("base", "full")[i % 2], PERSONAS[i % 3])]
    ]  # fmt: skip
    chosen, note = report.select_samples(samples, cap=12)
    assert len(chosen) == 12 and "12 of 40" in note
    groups = {(s.stage, s.persona) for s in samples}
    assert {(s.stage, s.persona) for s in chosen} == groups
    again, _ = report.select_samples(samples, cap=12)
    assert [s.key for s in again] == [s.key for s in chosen]


@pytest.mark.parametrize("workers", [1, 2])
def test_make_plots_png_and_svg(tmp_path, workers, monkeypatch):
    """Every figure as PNG and SVG, drawn here or by two spawned worker processes alike."""
    monkeypatch.setenv("CHARSHIFT_FIGURE_WORKERS", str(workers))
    recs = make_records(2)
    res = stats.compute_metrics(recs, PERSONAS, n_boot=30)
    paths = plots.make_plots(res, tmp_path)
    assert len(paths) % 2 == 0
    names = {p.name for p in paths}
    for stem in (
        plots.figure_stem("ladder", "llama"),
        "stages",
        plots.figure_stem("chain", "llama", "agentic"),
        plots.figure_stem("chain", "llama", "email_step"),
        plots.figure_stem("yield", "llama"),
        plots.figure_stem("pred_dist", "llama"),
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
            (st, p) for st in ("prompted", "full") for p in cfg.persona_names
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


# --------------------------------------------------------------------------- helpers (new)


def md_tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of `md` as (header, rows), cells split on unescaped pipes; asserts
    that every row has as many cells as its header (no pipe or newline from the data broke it)."""
    out: list[tuple[list[str], list[list[str]]]] = []
    lines = md.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                row = _cells(lines[i])
                assert len(row) == len(head), (head, lines[i])
                rows.append(row)
                i += 1
            out.append((head, rows))
        else:
            i += 1
    return out


def _cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def table_with(md: str, *columns: str, one: bool = True) -> list[dict[str, str]]:
    """The rows (as dicts) of the table whose header starts with `columns` (`one`: there is
    exactly one such table; else the rows of all of them)."""
    found = [(h, r) for h, r in md_tables(md) if h[: len(columns)] == list(columns)]
    assert len(found) == 1 if one else found, [h for h, _ in md_tables(md)]
    return [dict(zip(head, r, strict=True)) for head, rows in found for r in rows]


def render(recs: list[R], res: stats.MetricsResult, **kw) -> tuple[str, str]:
    kw.setdefault("settings", {})
    kw.setdefault("samples", None)
    kw.setdefault("title", "t")
    return report.render_report(report.prepare_report(recs, res, **kw))


LADDER_HITS = {
    # planted hit rates per unit (full stage): the genre rung of the email step and the agentic
    # rung of the main chain are the largest
    "id_chat": 0.9,
    "id_chat.short": 0.85,
    "scenario_chat": 0.9,
    "chat_email.whole": 0.45,
    "chat_email.head": 0.45,
    "chat_email": 0.45,
    "chat_email_multiturn": 0.4,
    "email_syscontext": 0.4,
    "tool_email_oneshot": 0.4,
    "agentic_email": 0.05,
}


def ladder_records(seed: int = 0, n_items: int = 12) -> list[R]:
    rng = np.random.default_rng(seed)
    out = []
    for unit, hit in LADDER_HITS.items():
        kind = "prompt" if unit.startswith("id_chat") else "scenario"
        outcome = "reply" if kind == "prompt" or unit == "scenario_chat" else "email"
        for i in range(n_items):
            item = f"{kind}:{i}"
            out.append(R("llama", "base", unit, NULL_PERSONA, item, PERSONAS[i % 3],
                         key=f"{unit}-{i}-base", outcome=outcome))  # fmt: skip
            for j, t in enumerate(PERSONAS):
                pred = t if rng.random() < hit else PERSONAS[(j + 1) % 3]
                out.append(R("llama", "full", unit, t, item, pred, key=f"{unit}-{i}-{t}",
                             outcome=outcome))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def ladder():
    recs = ladder_records()
    res = stats.compute_metrics(recs, PERSONAS, n_boot=200)
    return recs, res


@pytest.fixture(scope="module")
def plain():
    recs = make_records()
    return recs, stats.compute_metrics(recs, PERSONAS, n_boot=100)


def trained(f1: float, iv: list[float] | None, **extra) -> dict:
    rep = {"mode": "probe", "macro_f1": f1, "macro_f1_interval": iv, "chance": 1 / 3,
           "n_train": 60, "n_heldout": 30,
           "baseline": {"macro_f1": 0.41, "macro_f1_interval": [0.3, 0.52]}}  # fmt: skip
    rep.update(extra)
    return rep


# --------------------------------------------------------------------------- headline


def test_headline_leads_with_a_classifier_at_chance(plain):
    _, res = plain
    ctx = report.HeadlineContext(
        classifiers={"llama": trained(0.30, [0.21, 0.40], above_chance=False)}
    )
    lines = report.headline_text(res, ctx)
    first = lines[0]
    assert "not above chance" in first and "cannot be read as persona retention" in first
    assert "0.30 [0.21, 0.40]" in first and "1/3 = 0.333" in first
    assert "0.41 [0.30, 0.52]" in first  # the lexical baseline beside it
    assert lines[1].startswith("This run measured")
    assert sum("not above chance" in s for s in lines) == 1


def test_headline_above_chance_does_not_warn(plain):
    _, res = plain
    ctx = report.HeadlineContext(
        classifiers={"llama": trained(0.62, [0.51, 0.72], above_chance=True)}
    )
    lines = report.headline_text(res, ctx)
    assert lines[0].startswith("This run measured")
    assert not any("not above chance" in s or "Read this first" in s for s in lines)
    quality = next(s for s in lines if s.startswith("The classifier trained for llama"))
    assert "0.62 [0.51, 0.72]" in quality and "0.41 [0.30, 0.52]" in quality
    assert "probe" in quality and "chance 1/3" in quality


def test_headline_a_tfidf_probe_is_its_own_lexical_baseline(plain):
    """A probe whose features are TF-IDF is the baseline model: the headline says so instead of
    setting the two side by side as if a second model had matched it."""
    _, res = plain
    rep = trained(0.41, [0.3, 0.52], above_chance=True, probe={"features": "lexical"})
    lines = report.headline_text(res, report.HeadlineContext(classifiers={"llama": rep}))
    quality = next(s for s in lines if s.startswith("The classifier trained for llama"))
    assert "probe on TF-IDF features" in quality and "its own lexical baseline" in quality
    assert "word choice alone" not in quality and "the lexical baseline (TF-IDF" not in quality


def test_headline_reads_older_train_reports_defensively(plain):
    _, res = plain
    # no interval, no chance, no verdict, no baseline (an older run): judged on the estimate
    low = report.headline_text(
        res, report.HeadlineContext(classifiers={"llama": {"macro_f1": 0.2}})
    )
    assert "not above chance" in low[0] and "no interval recorded" in low[0]
    high = report.headline_text(
        res, report.HeadlineContext(classifiers={"llama": {"macro_f1": 0.7}})
    )
    assert high[0].startswith("This run measured")
    assert any("0.70 (no interval recorded)" in s for s in high)
    # an interval that reaches chance, no verdict recorded: computed from the interval
    reach = report.headline_text(
        res, report.HeadlineContext(classifiers={"llama": {"macro_f1": 0.5,
                                                            "macro_f1_interval": [0.3, 0.7]}})
    )  # fmt: skip
    assert "not above chance" in reach[0]


def test_headline_names_what_was_run_and_zero_yield_units(plain):
    _, res = plain
    ctx = report.HeadlineContext(tool_protocol="json", n_samples=2)
    lines = report.headline_text(res, ctx)
    run = lines[0]
    for part in ("3 personas (sarcasm, humor, remorse)", "(llama)", "(base, full)",
                 "(id_chat, chat_email, agentic_email)", "up to 12 prompt items",
                 "up to 12 scenario items", "2 sample(s)", "tool protocol json"):  # fmt: skip
        assert part in run, part
    yields = next(s for s in lines if s.startswith("Yield below 100% in llama/full"))
    assert "No output at all in llama/full: agentic_email (0 of 18); nothing of it" in yields
    assert "; agentic_email" not in yields.split("No output")[0]  # not among the partial ones
    m = res.get("llama", "full", "chat_email")
    assert f"chat_email {report.fmt_iv(m.yield_, 2)} ({m.n_scored} of {m.n_rows})" in yields
    # home ground: the family's excess over the cell's own null, never "full minus base"; it is
    # the answer's table (charshift.summary), and the prose does not repeat it
    from charshift import summary

    d = next(d for d in res.family if d.kind == "excess")
    (table,) = summary.summary_tables(res)
    home = dict(zip(table.head, table.rows[0], strict=True))["home ground (id_chat): excess"]
    assert home == f"{d.estimate:+.2f} [{d.lo_simul:+.2f}, {d.hi_simul:+.2f}] detected"
    assert not any(home.removesuffix(" detected") in s for s in lines)
    assert not any("base stage" in s and "paired difference" in s for s in lines)
    family = next(s for s in lines if s.startswith("The table above is the primary family"))
    assert "declared before looking" in family and "exploratory" in family


def test_headline_caveats(plain):
    _, res = plain
    plain_lines = report.headline_text(res, report.HeadlineContext())
    flagged = next(s for s in plain_lines if "flagged" in s)
    assert report.DAGGER in flagged and f"fewer than {res.min_clusters} clusters" in flagged
    assert "the smallest cell has 6" in flagged
    assert not any("smoke run" in s.lower() for s in plain_lines)
    assert not any("constrained" in s for s in plain_lines)
    lines = report.headline_text(
        res, report.HeadlineContext(tool_protocol="constrained", meaningless=True)
    )
    assert any("smoke run" in s for s in lines)
    assert any("constrained protocol" in s and "enforced" in s for s in lines)
    assert "tool protocol constrained (" in lines[0]


def test_headline_low_yield_shows_conditional_and_itt():
    recs = []
    for i in range(12):
        for t in PERSONAS:
            out = i % 4 == 0  # yield 25%
            recs.append(R("m", "full", "agentic_email", t, f"s{i}", t if out else None,
                          outcome="email" if out else "max_steps"))  # fmt: skip
    res = stats.compute_metrics(recs, PERSONAS, n_boot=50)
    lines = report.headline_text(res)
    low = next(s for s in lines if s.startswith("Where yield is below 50%"))
    c = res.get("m", "full", "agentic_email")
    want = f"conditional {c.macro_f1_excess.estimate:.2f}, ITT {c.macro_f1_excess_itt.estimate:.2f}"
    assert want in low


def test_headline_largest_rung_and_what_it_changes(ladder):
    from charshift import summary
    from charshift.ladder import EMAIL_STEP_CHAIN, MAIN_CHAIN

    _, res = ladder
    lines = report.headline_text(res)
    main = next(s for s in lines if s.startswith("Exploratory, llama/full, from a chat email to"))
    # the largest rung is named as selected after looking, and exploratory
    selected = "the rung largest in size, selected after looking"
    assert f"{selected} (so its interval is not a test), is tool_email_oneshot -> agentic" in main
    assert MAIN_CHAIN.rungs[2].changes in main and "which changes one thing: " in main
    step = next(s for s in lines if "split into topic, genre, length and scored unit" in s)
    assert step.startswith("Exploratory, llama/full, the id_chat -> chat_email loss")
    assert "is scenario_chat -> chat_email.whole" in step and selected in step
    assert EMAIL_STEP_CHAIN.rungs[1].changes in step
    dec = next(d for d in res.chains if d.chain == "agentic" and d.stage == "full"
               and d.metric == "macro_f1_excess" and not d.itt)  # fmt: skip
    # the chain's total is a family member: its simultaneous band is the answer's table, and
    # the prose does not repeat it
    t = dec.total
    band = f"{t.estimate:+.2f} [{t.lo_simul:+.2f}, {t.hi_simul:+.2f}]"
    (table,) = summary.summary_tables(res)
    row = dict(zip(table.head, next(r for r in table.rows if r[0] == "full"), strict=True))
    assert t.family == "primary" and row[f"agentic loss ({t.a.slice} -> {t.b.slice})"] == (
        f"{band} lost"
    )
    assert not any(band in s for s in lines)
    assert not any("llama/base," in s for s in lines)  # no chain sentence for the null


def test_rung_over_a_missing_unit_says_it_in_plain_words():
    from charshift.headline import _changes

    plain = _changes("BUNDLE of 3 changes (a unit between is missing): topic; genre; length")
    assert plain == "3 things at once, as a unit between is missing: topic; genre; length"
    assert "BUNDLE" not in plain and _changes("genre") == "one thing: genre"


def test_context_from_settings_is_defensive():
    ctx = report.context_from_settings(
        {"config": "nonsense", "manifest": {"trained_classifiers": 3}}
    )
    assert ctx.tool_protocol is None and ctx.n_samples is None and not ctx.classifiers
    ctx = report.context_from_settings(
        {
            "config": {"rollout": {"tool_protocol": "native"}, "sampling": {"n_samples": 4},
                       "bases": [{"name": "a", "classifier": "x/y"}, {"name": "b"}, "junk"],
                       "meaningless": True},
            "manifest": {"trained_classifiers": {"b": {"macro_f1": 0.5}, "c": "junk"}},
        }
    )  # fmt: skip
    assert (ctx.tool_protocol, ctx.n_samples, ctx.meaningless) == ("native", 4, True)
    assert dict(ctx.classifier_sources) == {"a": "x/y"} and list(ctx.classifiers) == ["b"]


# --------------------------------------------------------------------------- report sections


def test_ladder_tables_carry_changes_and_pairing(ladder):
    from charshift.ladder import CHAINS, CONTRASTS

    recs, res = ladder
    page, md = render(recs, res)
    for chain in CHAINS:
        for rung in chain.rungs:
            assert html_escaped(rung.changes) in page, rung
    for c in CONTRASTS:
        assert html_escaped(c.changes) in page
    assert "the id_chat -> chat_email loss split into topic, genre, length and scored unit" in md
    rungs = table_with(md, "rung", "what it changes", one=False)
    full_step = [r for r in rungs if r["rung"].startswith(("id_chat ->", "scenario_chat ->",
                                                            "chat_email.whole", "chat_email.head"))]  # fmt: skip
    by = {}
    for r in full_step:
        by.setdefault(r["rung"], set()).add(r["paired"])
    assert by["id_chat -> scenario_chat"] == {"UNPAIRED"}
    assert by["scenario_chat -> chat_email.whole"] == {"paired"}
    assert by["chat_email.head -> chat_email"] == {"paired"}
    # the unit tables: every unit with its estimate on the common items, and the set's size
    units = table_with(md, "unit", "item kind", "common items", one=False)
    assert {"id_chat", "scenario_chat", "agentic_email"} <= {u["unit"] for u in units}
    dec = next(d for d in res.chains if d.chain == "agentic" and d.stage == "full"
               and d.metric == "macro_f1_excess" and not d.itt)  # fmt: skip
    shown = {u["excess on common items"] for u in units if u["unit"] == "agentic_email"}
    assert md_escape_iv(dec.estimates[-1]) in shown
    # every rung says how many personas both sides average over, and the scorer's format bias
    assert {r["personas"] for r in full_step} == {"3 of 3"}
    assert all(" -> " in r["base text: top label (from -> to)"] for r in full_step)
    # the base stage (a null) is not laddered
    assert not any(h.startswith("llama / base:") for h in re.findall(r"### (.*)", md))
    contrasts = table_with(md, "base", "stage", "contrast")
    assert any(r["contrast"] == "chat_email -> chat_email_multiturn" for r in contrasts)


def md_escape_iv(i: stats.Interval) -> str:
    return report.md_escape(report.fmt_iv(i))


def _censoring_records() -> list[R]:
    """Two units: in `agentic_email` sarcasm loses its email on 16 of 20 items while the others
    never do (planted differential censoring); in `tool_email_oneshot` every persona loses it on
    the same 5 items (no dependence on the persona)."""
    out = []
    for i in range(20):
        for t in PERSONAS:
            lost = t == "sarcasm" and i < 16
            out.append(R("m", "full", "agentic_email", t, f"s{i}", None if lost else t,
                         outcome="max_steps" if lost else "email", key=f"a{i}{t}"))  # fmt: skip
            lost = i < 5
            out.append(R("m", "full", "tool_email_oneshot", t, f"s{i}", None if lost else t,
                         outcome="malformed" if lost else "email", key=f"o{i}{t}"))  # fmt: skip
        out.append(R("m", "base", "agentic_email", NULL_PERSONA, f"s{i}", "humor",
                     outcome="no_email" if i < 3 else "email", key=f"b{i}"))  # fmt: skip
    return out


def test_outcomes_and_differential_censoring():
    recs = _censoring_records()
    res = stats.compute_metrics(recs, PERSONAS, n_boot=50)
    # the base outputs expanded to every persona count once, as outputs
    _, md = render(stats.expand_base_null(recs, PERSONAS), res)
    rows = table_with(md, "base", "stage", "persona", "unit", "rows")
    get = {(r["stage"], r["persona"], r["unit"]): r for r in rows}
    base = get[("base", "(base: none)", "agentic_email")]
    assert (base["rows"], base["email"], base["no_email"], base["yield"]) == (
        "20",
        "17",
        "3",
        "0.85",
    )
    sar = get[("full", "sarcasm", "agentic_email")]
    assert (sar["rows"], sar["email"], sar["max_steps"], sar["yield"]) == ("20", "4", "16", "0.20")
    assert get[("full", "humor", "agentic_email")]["max_steps"] == "0"
    assert get[("full", "remorse", "tool_email_oneshot")]["malformed"] == "5"
    assert len(rows) == 1 + 3 * 2
    # in the report's order: base stage first, then personas in the run's order
    assert [r["persona"] for r in rows[:4]] == ["(base: none)", *PERSONAS]
    cells = {(r["stage"], r["unit"]): r for r in table_with(md, "base", "stage", "unit", "rows")}
    assert cells[("base", "agentic_email")]["verdict"] == "no personas to compare"
    assert cells[("base", "agentic_email")]["no_email"] == "3"
    hit = cells[("full", "agentic_email")]
    assert (hit["rows"], hit["max_steps"], hit["email"]) == ("60", "16", "44")
    assert hit["verdict"] == "DIFFERENTIAL CENSORING" and float(hit[report.P_PERM_HEAD]) < 0.01
    assert "sarcasm 0.20" in hit["yield per persona"] and "humor 1.00" in hit["yield per persona"]
    calm = cells[("full", "tool_email_oneshot")]
    assert calm["verdict"] == "no evidence" and float(calm[report.P_PERM_HEAD]) > 0.5
    caveat = next(s for s in md.split("\n\n") if s.startswith("Differential censoring"))
    assert "1 of 2 tested cells" in caveat and "m/full/agentic_email (p = " in caveat


def test_warning_box_comes_first(plain):
    recs, res = plain
    warn = ["Incomplete run: 3 of 12 rows not scored in llama/full/chat_email <b>now</b>"]
    page, md = render(recs, res, warnings=warn, meaningless=True)
    body = page[page.index("<body>") :]
    assert body.index('id="warnings"') < body.index('id="meaningless-banner"')
    assert body.index('id="meaningless-banner"') < body.index('id="headline"')
    assert body.index('id="headline"') < body.index("<nav>") < body.index('id="metrics"')
    assert html_escaped(warn[0]) in page and "<b>now" not in page
    assert md.index("> **Read first**") < md.index("## Headline") < md.index("## Metrics")
    assert report.md_escape(warn[0]) in md
    page, md = render(recs, res)
    assert 'id="warnings"' not in page and "Read first" not in md


def test_settings_and_headline_name_the_tool_protocol(plain):
    recs, res = plain
    settings = {"config": {"rollout": {"tool_protocol": "constrained"},
                           "sampling": {"n_samples": 2}}}  # fmt: skip
    page, md = render(recs, res, settings=settings)
    cond = {r["setting"]: r["value"] for r in table_with(md, "setting", "value")}
    assert cond["tool protocol"].startswith("constrained (the tool-call envelope")
    assert cond["samples per item"] == "2"
    head = page[page.index('id="headline"') : page.index("<nav>")]
    assert "tool protocol constrained" in head


def test_classifier_section_shows_baseline(plain):
    recs, res = plain
    settings = {"manifest": {"trained_classifiers": {"llama": trained(0.3, [0.21, 0.4])}}}
    _, md = render(recs, res, settings=settings)
    row = table_with(md, "base", "mode")[0]
    assert row["held-out macro-F1 [CI]"] == "0.30 [0.21, 0.40]"
    assert row["lexical baseline macro-F1 [CI]"] == "0.41 [0.30, 0.52]"
    assert row["above chance"].startswith("NO")
    assert md.split("## Headline\n\n", 1)[1].startswith("Read this first")


# --------------------------------------------------------------------------- safety

EVIL = "b`|<script>x</script>\n*y*_z_ [l](http://e) #h"


def test_md_escape():
    got = report.md_escape("a|b`c<script>\nd*e_ f_g [x](u) & ~s~")
    assert got == "a\\|b\\`c\\<script> d\\*e\\_ f_g [x\\](u) & \\~s\\~"
    # plain Markdown: no HTML entities; only what could open a tag or an entity is escaped
    assert report.md_escape("a -> b < c & d") == "a -> b < c & d"
    assert report.md_escape("&amp; &#60; <!-- x") == "\\&amp; &\\#60; \\<!-- x"


def test_report_escapes_names_from_the_data():
    recs = [
        R(EVIL, st, sl, p, f"i{i}", p if i % 2 else PERSONAS[0], key=f"{st}{sl}{p}{i}",
          text=f"t {SCRIPT}")
        for st in ("full",)
        for sl in ("id_chat", "s|`<i>`\nq")
        for p in PERSONAS
        for i in range(6)
    ]  # fmt: skip
    res = stats.compute_metrics(recs, PERSONAS, n_boot=30)
    page, md = render(recs, res, title=f"T {SCRIPT}", notes=[EVIL], warnings=[EVIL])
    for raw in ("<script", "<i>", "</script", "[l](http", "`|", "\n*y*"):
        assert not re.search(r"(?<!\\)" + re.escape(raw), md), raw  # only escaped
    assert report.md_escape(EVIL) in md
    md_tables(md)  # every row of every table has its header's number of cells
    assert "s\\|\\`\\<i>\\` q" in md
    assert not re.search(r"&(lt|gt|amp|quot|#\d+);", md)  # plain Markdown: no entities
    assert "<i>" not in page and "<script>x" not in page
    assert len(re.findall(r"<script\b", page, re.I)) == 2


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Bases whose slugs collide (`b c`, `b_c`) and one with mathtext characters."""
    names = ["b c", "b_c", "m$^{x}$|`"]
    recs = []
    for k, b in enumerate(names):
        for i in range(10):
            for p in PERSONAS:
                pred = p if (i + k) % (k + 2) else PERSONAS[(PERSONAS.index(p) + 1) % 3]
                recs.append(R(b, "full", "id_chat", p, f"i{i}", pred, key=f"{b}{i}{p}"))
    res = stats.compute_metrics(recs, PERSONAS, n_boot=30)
    out = tmp_path_factory.mktemp("twins")
    path = report.write_report(out, recs, res, settings={}, samples=None, title="twins")
    return out, path.read_text(encoding="utf-8"), names


def test_plot_files_are_distinct_for_distinct_names(twins):
    out, page, names = twins
    stems = [plots.figure_stem("ladder", n) for n in names]
    assert len(set(stems)) == 3 and stems[0].startswith("ladder_b_c-")
    assert plots.figure_stem("ladder", "b c") != plots.figure_stem("ladder", "b_c")
    files = sorted(p.name for p in (out / "report" / "plots").iterdir())
    assert len(files) == len(set(files))
    for n, stem in zip(names, stems, strict=True):
        png = (out / "report" / "plots" / f"{stem}.png").read_bytes()
        fig = re.search(
            r'<img alt="'
            + re.escape(html_escaped(f"{n}: macro-F1 excess over each cell's own null, per unit "
                                     "and stage"))  # fmt: skip
            + r'" src="data:image/png;base64,([^"]+)"', page)  # fmt: skip
        assert fig is not None and base64.b64decode(fig.group(1)) == png
    pngs = [(out / "report" / "plots" / f"{s}.png").read_bytes() for s in stems]
    assert pngs[0] != pngs[1]  # different data, different pictures


def _small(
    slices: tuple[str, ...] = ("id_chat", "chat_email"),
) -> tuple[list[R], stats.MetricsResult]:
    recs = [r for r in make_records(3) if r.slice in slices]
    return recs, stats.compute_metrics(recs, PERSONAS, n_boot=30)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (p.name == "report.md" or "report" in p.parts[len(root.parts) :][:1])
    }


def test_report_is_replaced_atomically(tmp_path, monkeypatch):
    recs, res = _small()
    report.write_report(tmp_path, recs, res, settings={}, samples=None, title="first")
    before = _snapshot(tmp_path)
    assert "report.md" in before and "report/index.html" in before
    # a lone surrogate in a sample's text: a clear error once the page is built, nothing replaced
    bad = report.samples_from_records(recs)
    bad[0].text = "broken \ud800 text"
    with pytest.raises(report.ReportError, match="not valid Unicode"):
        report.write_report(tmp_path, recs, res, settings={}, samples=bad, title="second")
    assert _snapshot(tmp_path) == before

    # a figure that fails midway (after others were saved)
    def boom(*a, **k):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "_yield_fig", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        report.write_report(tmp_path, recs, res, settings={}, samples=None, title="second")
    assert _snapshot(tmp_path) == before
    monkeypatch.undo()
    assert not list(tmp_path.glob(report.STAGING_PREFIX + "*"))
    # a good write replaces the whole folder: no figure of the old report is left behind
    recs2, res2 = _small(("id_chat",))
    report.write_report(tmp_path, recs2, res2, settings={}, samples=None, title="second")
    assert (tmp_path / "report.md").read_text().startswith("# second")
    assert "<title>second</title>" in (tmp_path / "report" / "index.html").read_text()
    names = {p.stem for p in (tmp_path / "report" / "plots").glob("*.png")}
    assert plots.figure_stem("persona_f1", "id_chat") in names
    assert plots.figure_stem("persona_f1", "chat_email") not in names
    assert not list(tmp_path.glob(report.STAGING_PREFIX + "*"))


def test_report_into_a_file_is_a_clear_error(tmp_path, plain):
    recs, res = plain
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(report.ReportError, match="cannot write the report into"):
        report.write_report(target, recs, res, settings={}, samples=None, title="t")
    assert target.read_text() == "x"


def test_analysis_warnings_reach_the_top_of_the_report(tmp_path):
    from charshift.analysis import AnalysisInput, analyse
    from charshift.config import StatsConfig

    recs, _ = _small(("id_chat",))
    inp = AnalysisInput(
        records=recs, personas=PERSONAS, stats=StatsConfig(n_boot=30), title="w", settings={},
        warnings=["Incomplete: 4 rows not scored"],
    )  # fmt: skip
    page = analyse(inp, tmp_path).read_text()
    body = page[page.index("<body>") :]
    assert body.index("Incomplete: 4 rows not scored") < body.index('id="headline"')
    assert (tmp_path / "report.md").read_text().split("\n")[2] == "> **Read first**"


def test_chain_figure_with_nothing_scored(tmp_path):
    """A chain whose units all lack outputs (the smoke run's tool slices): the conditional
    panels are undefined, the ITT ones zero; the figure still saves."""
    units = ("chat_email", "email_syscontext", "tool_email_oneshot", "agentic_email")
    recs = [
        R("m", st, u, p, f"scenario:{i}", None, outcome="no_email")
        for st in ("prompted", "full")
        for u in units
        for p in PERSONAS
        for i in range(3)
    ]
    res = stats.compute_metrics(recs, PERSONAS, n_boot=30)
    specs = {stem: build for stem, _, build in plots.figure_specs(res)}
    fig = specs[plots.figure_stem("chain", "m", "agentic")]()
    fig.savefig(tmp_path / "chain.png", dpi=110)
    fig.savefig(tmp_path / "chain.svg")
    assert (tmp_path / "chain.png").stat().st_size > 0


def test_report_predictions_uses_control_rows_when_present(tmp_path):
    """`report --predictions`: rows of prompted_explicit are the positive control of the scorer
    check (scorer_check.csv, retention.csv); `--positive-control none` turns it off."""
    from typer.testing import CliRunner

    from charshift.cli import app

    rng = np.random.default_rng(3)
    rows = []
    for stage, hit in (("full", 0.7), ("prompted_explicit", 0.9)):
        for i in range(12):
            for t in PERSONAS:
                pred = t if rng.random() < hit else PERSONAS[rng.integers(3)]
                rows.append({"base": "b", "stage": stage, "slice": "id_chat", "persona": t,
                             "item_id": f"p{i}", "prediction": pred})  # fmt: skip
    rows += [{"base": "b", "stage": "base", "slice": "id_chat", "persona": None,
              "item_id": f"p{i}", "prediction": "humor"} for i in range(12)]  # fmt: skip
    src = tmp_path / "preds.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for extra, control in (([], "prompted_explicit"), (["--positive-control", "none"], "")):
        out = tmp_path / f"out{bool(extra)}"
        res = CliRunner().invoke(app, ["report", "--predictions", str(src), "--out", str(out),
                                       "--n-boot", "50", *extra])  # fmt: skip
        assert res.exit_code == 0, res.output
        with (out / "scorer_check.csv").open() as fh:
            (check,) = list(csv.DictReader(fh))
        assert check["control"] == control and check["null_top_share"] == "1"
        assert check["scorer_blind"] == ("False" if control else "")
        retention = (out / "retention.csv").read_text().splitlines()
        assert len(retention) == (3 if control else 1)  # header, conditional, ITT
        md = (out / "report.md").read_text()
        assert ("Scorer check for b" in md) == bool(control)


def test_a_figure_failing_in_a_worker_process_fails_the_report(tmp_path, monkeypatch):
    """Drawn by two spawned workers, a figure that cannot be drawn is an error in the report's
    own process, and the report folder is left as it was."""
    monkeypatch.setenv("CHARSHIFT_FIGURE_WORKERS", "2")
    recs = make_records(2)
    res = stats.compute_metrics(recs, PERSONAS, n_boot=30)
    cell = next(iter(res.cells.values()))
    cell.confusion = np.zeros(3)  # one axis: its confusion figure cannot be drawn
    with pytest.raises(np.exceptions.AxisError):  # raised in a worker, re-raised here
        report.write_report(tmp_path, recs, res, settings={}, samples=None, title="x")
    assert not (tmp_path / "report").exists()


def test_outcomes_and_the_censoring_test_are_tables_too(tmp_path):
    """outcomes.csv counts every row's outcome once (a base output once, not once per persona)
    and censoring.csv holds the report's differential-censoring tests."""
    import csv

    recs = make_records(2)
    res = stats.compute_metrics(recs, PERSONAS, n_boot=30)
    report.write_report(tmp_path, recs, res, settings={}, samples=None, title="t")
    with (tmp_path / "outcomes.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sum(int(r["n"]) for r in rows) == len(report.outcome_records(recs)) > 0
    with (tmp_path / "censoring.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == report.CENSORING_COLUMNS
        tests = list(reader)
    content = report.prepare_report(recs, res, settings={}, samples=None, title="t")
    assert len(tests) == len(content.censoring)
