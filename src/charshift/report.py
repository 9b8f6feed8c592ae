"""The run report: one self-contained `report/index.html` and a `report.md` for a paper draft.

Safety: model output is untrusted text. Every string that reaches the HTML goes through
`html.escape`; the sample browser's data sits in a `<script type="application/json">` block in
which every `<`, `>` and `&` is written as a JSON unicode escape (so neither `</script>` nor
`<!--` can occur inside it), and the page's script renders it with `textContent` only. A
Content-Security-Policy allows no network access and runs only the page's own script (by hash),
so even a missed escape could not load or execute anything.

Layout written by `write_report(out_dir, ...)`:
  out_dir/report/index.html   the page (plots inlined as base64 PNG; CSS and JS inline)
  out_dir/report/plots/       every figure as PNG and SVG
  out_dir/report.md           the tables in markdown, with method notes
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from charshift.plots import make_figures
from charshift.published import published_for, published_text
from charshift.schema import NULL_PERSONA, PredictionRecord, stable_hash
from charshift.stats import CellMetrics, ChainDecomposition, Difference, Interval, MetricsResult

MAX_SAMPLES = 2000
SAMPLE_FIELDS = (
    "key", "base", "stage", "persona", "slice", "item_id", "sample_idx", "outcome",
    "messages", "text", "email", "prediction", "probs", "tool_log",
)  # fmt: skip


# --------------------------------------------------------------------------- formatting


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or x != x:  # None or NaN
        return "–"
    return f"{x:.{digits}f}"


DAGGER = "\u2020"  # marks an interval flagged as not to be trusted (see the method notes)
FIXED = "(fixed by construction)"


def _iv(i: Interval, digits: int = 3) -> str:
    if i.estimate != i.estimate:
        return "–"
    if i.fixed_by_construction:
        return f"{_num(i.estimate, digits)} {FIXED}"
    dagger = "" if i.reliable else DAGGER
    return f"{_num(i.estimate, digits)} [{_num(i.lo, digits)}, {_num(i.hi, digits)}]{dagger}"


def _diff_text(d: Difference) -> str:
    if d.estimate != d.estimate:
        return "–"
    if d.fixed_by_construction:
        return f"{d.estimate:+.3f} {FIXED}"
    dagger = "" if d.reliable else DAGGER
    return f"{d.estimate:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]{dagger}"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def method_notes(result: MetricsResult) -> list[str]:
    """How every figure in the report is formed (shown in both the HTML and the markdown)."""
    k = len(result.personas)
    return [
        f"Label set: the run's {k} personas ({', '.join(result.personas)}), less, per base, any "
        "persona with no rows at all in one of its stages (a skipped adapter; listed in the notes "
        "above). A classifier prediction outside the label set counts as wrong. Chance level is "
        f"about 1/K = {1 / k:.3f} for K = {k}.",
        "Conditional metrics use only rows with an output (a reply, an extracted or sent email); "
        "conditional macro-F1 averages per-persona F1 over the personas with at least one scored "
        "output in the cell (how many of K is shown), in the estimate and in every resample. "
        "Intention-to-treat (ITT) metrics use every attempted row, count a missing output as a "
        "wrong prediction and average over all K personas (scikit-learn `f1_score(..., "
        "labels=personas, average='macro', zero_division=0)`). Yield = rows with an output / rows "
        "attempted, also given per persona: missing outputs are not random, so read the two views "
        "together.",
        f"Intervals: {result.ci:.0%} {result.method} cluster bootstrap with {result.n_boot} "
        "resamples. The cluster is the item (an ID prompt or an email scenario): all rows of an "
        "item (every persona and sample) are resampled together. Each cell has its own random "
        f"stream, seeded from (seed={result.seed}, base, stage, slice), so a figure does not "
        "depend on what else was computed."
        + (
            " BCa uses a jackknife over clusters for the acceleration."
            if result.method == "bca"
            else ""
        ),
        f"{DAGGER} marks an interval not to be trusted: fewer than {result.min_clusters} clusters "
        "carry it (for conditional figures, items with a scored output; for a difference, the "
        "fewer of its two sides), or some resamples had nothing scored (counted, and left out of "
        "the interval); the tables (CSV) give the reason in their `flag` column.",
        "Chains: every unit of a chain is estimated on the items common to all the chain's units "
        "of the same kind (prompts or scenarios), so the rungs add up exactly to the total; the "
        "size of that set and the items left out are stated with each chain. One bootstrap draw "
        "per item kind serves every unit, so the rungs are paired, except a rung from prompt "
        "items to scenario items, which is an independent (unpaired) bootstrap, marked as such. "
        "Rungs and contrasts are closer-to-home minus further unit (positive = persona lost); "
        "stage differences are later minus earlier stage (positive = persona gained), paired on "
        "the shared items.",
        "The base stage (no adapter, no persona prompt) is an explicit null: it is generated once "
        "per item and sample, and each output is paired with every persona of the label set as "
        "its true label for F1. Its per-persona recall is the share of base outputs the "
        "classifier gives that persona; its macro-F1 is what the classifier scores when nothing "
        "carries a persona. Its counts (n, confusion, label shares) count each output once. Its "
        f"accuracy is {FIXED}: 1/K times the share of outputs predicted inside the label set, "
        "shown without an interval.",
        "The predicted-label distribution shows what the classifier says per format, including "
        "labels outside the run's personas: a label that dominates a format in every stage "
        "(e.g. 'goodness' for neutral business prose) is a format prior, not persona expression.",
    ]


# --------------------------------------------------------------------------- table model
# Tables are built once as (headers, rows of plain strings) and rendered to HTML or markdown.

Table = tuple[list[str], list[list[str]]]


def _headline(result: MetricsResult, paper: bool) -> Table:
    head = [
        "base", "stage", "slice", "n", "yield", "macro-F1", "personas scored", "macro-F1 ITT",
        "accuracy", "accuracy ITT", "mean p(true)",
    ]  # fmt: skip
    if paper:
        head.append("published")
    rows = []
    for m in result.cells.values():
        row = [
            *m.cell,
            f"{m.n_scored}/{m.n_rows}",
            _iv(m.yield_, 2),
            _iv(m.macro_f1),
            f"{m.n_personas_scored}/{m.n_personas}",
            _iv(m.macro_f1_itt),
            _iv(m.accuracy),
            _iv(m.accuracy_itt),
            _num(m.mean_p_true),
        ]
        if paper:
            row.append(published_text(*m.cell))
        rows.append(row)
    return head, rows


def _published_table(result: MetricsResult) -> Table:
    head = ["base", "stage", "slice", "ours: macro-F1 [CI]", "published", "value", "inside our CI"]
    rows = []
    for m in result.cells.values():
        for f in published_for(*m.cell):
            inside = m.macro_f1.lo <= f.value <= m.macro_f1.hi
            rows.append(
                [*m.cell, _iv(m.macro_f1), f.label, f"{f.value:.2f}", "yes" if inside else "no"]
            )
    return head, rows


def _rung_row(
    label: str, ref: Difference, cond: Difference | None, itt: Difference | None
) -> list[str]:
    flags = [
        f"{view}: {d.flag}" for view, d in (("conditional", cond), ("ITT", itt)) if d and d.flag
    ]
    return [
        label,
        ref.changes,
        _diff_text(cond) if cond else "",
        _diff_text(itt) if itt else "",
        "yes" if ref.paired else "no",
        str(ref.n_clusters),
        "; ".join([ref.note, *flags]),
    ]


def _ladder_tables(result: MetricsResult) -> list[tuple[str, Table]]:
    """One table per chain and (base, stage): macro-F1 lost per rung, and the total."""
    out = []
    groups: dict[tuple[str, str, str], dict[bool, ChainDecomposition]] = {}
    for dec in result.chains:
        if dec.metric == "macro_f1":
            groups.setdefault((dec.base, dec.stage, dec.chain), {})[dec.itt] = dec
    head = [
        "rung",
        "what it changes",
        "loss, conditional",
        "loss, ITT",
        "paired",
        "clusters",
        "note",
    ]
    for (base, stage, _), by_itt in groups.items():
        cond, itt = by_itt.get(False), by_itt.get(True)
        ref = cond or itt
        assert ref is not None
        rows = [
            _rung_row(
                f"{r.a.slice} -> {r.b.slice}",
                r,
                cond.rungs[j] if cond else None,
                itt.rungs[j] if itt else None,
            )
            for j, r in enumerate(ref.rungs)
        ]
        t = ref.total
        rows.append(
            _rung_row(
                f"total: {t.a.slice} -> {t.b.slice}",
                t,
                cond.total if cond else None,
                itt.total if itt else None,
            )
        )
        cap = f"{base} / {stage}: {ref.title} (macro-F1 lost; {ref.note})"
        out.append((cap, (head, rows)))
    contrasts = _contrast_table(result)
    if contrasts[1]:
        out.append(("Contrasts (macro-F1 lost, paired on shared items)", contrasts))
    return out


def _contrast_table(result: MetricsResult) -> Table:
    head = ["base", "stage", "contrast", "what it changes", "conditional", "ITT", "paired",
            "clusters"]  # fmt: skip
    rows: dict[tuple, list[str]] = {}
    for d in result.differences:
        if d.kind != "contrast" or d.metric != "macro_f1":
            continue
        key = (d.a.base, d.a.stage, f"{d.a.slice} -> {d.b.slice}")
        row = rows.setdefault(
            key, [*key, d.changes, "", "", "yes" if d.paired else "no", str(d.n_clusters)]
        )
        row[5 if d.itt else 4] = _diff_text(d)
    return head, list(rows.values())


def _stage_table(result: MetricsResult) -> Table:
    head = ["base", "slice", "stage", "minus stage", "metric", "conditional", "ITT", "clusters"]
    rows: dict[tuple, list[str]] = {}
    for d in result.differences:
        if d.kind != "stage":
            continue
        key = (d.a.base, d.a.slice, d.a.stage, d.b.stage, d.metric)
        row = rows.setdefault(key, [*key, "", "", str(d.n_clusters)])
        row[6 if d.itt else 5] = _diff_text(d)
    return head, list(rows.values())


def _per_persona_pivot(result: MetricsResult, slice_: str) -> Table:
    head = ["base/stage", *result.personas]
    rows = []
    for b in result.bases:
        for st in result.stages:
            m = result.get(b, st, slice_)
            if m is not None:
                by = {p.persona: p for p in m.per_persona}
                vals = [_num(by[p].f1.estimate, 2) if p in by else "n/a" for p in result.personas]
                rows.append([f"{b}/{st}", *vals])
    return head, rows


def _per_persona_detail(m: CellMetrics) -> Table:
    head = ["persona", "precision", "recall", "F1 [CI]", "F1 ITT [CI]", "n", "scored", "yield"]
    rows = [
        [
            p.persona,
            _num(p.precision),
            _num(p.recall),
            _iv(p.f1),
            _iv(p.f1_itt),
            str(p.n),
            str(p.n_scored),
            _num(p.yield_, 2),
        ]
        for p in m.per_persona
    ]
    return head, rows


def _pred_dist_table(result: MetricsResult) -> Table:
    labels: list[str] = list(result.personas)
    for m in result.cells.values():
        labels += [lab for lab in m.pred_distribution if lab not in labels]
    head = ["base", "stage", "slice", *labels, "(no output, of attempted)"]
    rows = []
    for m in result.cells.values():
        shares = [
            _num(m.pred_distribution.get(lab, 0) / m.n_scored, 2) if m.n_scored else "–"
            for lab in labels
        ]
        rows.append([*m.cell, *shares, _num(m.n_none / m.n_rows, 2) if m.n_rows else "–"])
    return head, rows


def _confusion_table(m: CellMetrics) -> Table:
    head = ["true \\ predicted", *m.confusion_cols]
    rows = [[p, *(str(int(v)) for v in m.confusion[i])] for i, p in enumerate(m.confusion_rows)]
    return head, rows


# --------------------------------------------------------------------------- renderers


def _html_table(t: Table, cls: str = "") -> str:
    head, rows = t
    ths = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    c = f' class="{_e(cls)}"' if cls else ""
    return f"<table{c}><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table>"


def _md_cell(x: str) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    head, rows = t
    lines = [
        "| " + " | ".join(_md_cell(h) for h in head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- samples


def samples_from_records(records: Iterable[PredictionRecord]) -> list[dict[str, Any]]:
    """Minimal browser samples when no generation rows are at hand (e.g. --predictions).

    Records sharing a key (a base output expanded to every persona) give one sample.
    """
    out = []
    seen: set[str] = set()
    for i, r in enumerate(records):
        if r.key is not None:
            if r.key in seen:
                continue
            seen.add(r.key)
        out.append(
            {
                "key": r.key or f"row{i}",
                "base": r.base,
                "stage": r.stage,
                "persona": "(base: none)" if r.persona == NULL_PERSONA else r.persona,
                "slice": r.slice,
                "item_id": r.item_id,
                "sample_idx": r.sample_idx,
                "outcome": r.outcome,
                "messages": [],
                "text": r.text,
                "email": None,
                "prediction": r.prediction,
                "probs": r.probs,
                "tool_log": [],
            }
        )
    return out


def select_samples(
    samples: Sequence[dict[str, Any]], cap: int = MAX_SAMPLES
) -> tuple[list[dict[str, Any]], str]:
    """At most `cap` samples, stratified: round-robin over (base, stage, slice, persona) groups,
    a deterministic pseudo-random order within each group. Returns (samples, note)."""
    clean = [{f: s.get(f) for f in SAMPLE_FIELDS} for s in samples]
    for i, s in enumerate(clean):
        if s["key"] is None:
            s["key"] = f"sample{i}"
    if len(clean) <= cap:
        chosen = clean
        note = f"All {len(clean)} samples are shown."
    else:
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for s in clean:
            g = (s["base"], s["stage"], s["slice"], s["persona"])
            groups.setdefault(tuple(str(x) for x in g), []).append(s)
        for g in groups.values():
            g.sort(key=lambda s: stable_hash(["sample-order", s["key"]]))
        chosen, depth = [], 0
        while len(chosen) < cap:
            for g in groups.values():
                if depth < len(g) and len(chosen) < cap:
                    chosen.append(g[depth])
            depth += 1
        note = (
            f"{len(chosen)} of {len(clean)} samples are embedded, stratified: taken in turn from "
            "every (base, stage, slice, persona) group. The full data is in the run directory."
        )

    def order(s: dict[str, Any]) -> tuple:
        return tuple(str(s[f]) for f in ("base", "stage", "slice", "persona", "item_id")) + (
            s["sample_idx"] if isinstance(s["sample_idx"], int) else 0,
        )

    return sorted(chosen, key=order), note


def _json_for_script(obj: Any) -> str:
    """JSON that is inert inside a <script> element: no '<', '>' or '&' appear literally."""
    text = json.dumps(obj, ensure_ascii=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# --------------------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1300px;
padding:0 1.2em 3em;color:#222;line-height:1.4}
h1{margin-top:.8em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
.banner{background:#b00020;color:#fff;padding:.8em 1em;font-weight:bold;margin:1em 0}
.notes li{margin:.2em 0}.fig{margin:1em 0}.fig img{max-width:100%;border:1px solid #eee}
.fig figcaption{font-size:.85em;color:#555}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:.4em;margin:.2em 0;
font-size:.85em}
.filters label{margin-right:1em}.sample{border:1px solid #ccc;margin:.8em 0;padding:.5em}
.sample .meta{font-weight:bold;font-size:.9em}.msg{margin:.3em 0 .3em .5em}
.role{font-size:.75em;text-transform:uppercase;color:#666}.role-user pre{background:#eef4ff}
.role-assistant pre{background:#f1fbef}.role-tool pre{background:#fff7e6}
.role-system pre{background:#f0f0f0}.email{border-left:4px solid #4C72B0;padding-left:.5em}
.prob{display:flex;align-items:center;font-size:.8em;margin:1px 0}
.prob .lab{width:10em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.prob .track{display:inline-block;width:20em;height:.8em;background:#eee;margin-right:.4em}
.prob .bar{display:block;height:100%;background:#4C72B0}
.ok{color:#1b7f2a}.bad{color:#b00020}nav a{margin-right:.8em}
"""

_JS = """
(function () {
  "use strict";
  var PAGE = 50;
  var data = JSON.parse(document.getElementById("sample-data").textContent);
  var fields = ["base", "stage", "persona", "slice", "outcome"];
  var selects = {};
  var shown = PAGE;
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function asText(v) {
    if (v === null || v === undefined) { return ""; }
    return typeof v === "string" ? v : JSON.stringify(v, null, 2);
  }
  function messageBox(m) {
    var role = String(m.role || "?");
    var box = el("div", "msg role-" + role.replace(/[^a-z]/g, ""));
    var label = role + (m.name ? " (" + m.name + ")" : "");
    box.appendChild(el("div", "role", label));
    if (m.content !== undefined && m.content !== null && m.content !== "") {
      box.appendChild(el("pre", "", asText(m.content)));
    }
    if (m.tool_calls) { box.appendChild(el("pre", "", "tool calls: " + asText(m.tool_calls))); }
    return box;
  }
  function probBars(probs) {
    var wrap = el("div", "probs");
    var items = Object.keys(probs).map(function (k) { return [k, Number(probs[k])]; });
    items.sort(function (a, b) { return b[1] - a[1]; });
    items.slice(0, 5).forEach(function (kv) {
      var row = el("div", "prob");
      var lab = el("span", "lab", kv[0]);
      lab.setAttribute("title", kv[0]);
      row.appendChild(lab);
      var track = el("span", "track");
      var bar = el("span", "bar");
      bar.style.width = Math.max(0, Math.min(100, kv[1] * 100)).toFixed(1) + "%";
      track.appendChild(bar);
      row.appendChild(track);
      row.appendChild(el("span", "val", kv[1].toFixed(3)));
      wrap.appendChild(row);
    });
    return wrap;
  }
  function card(s) {
    var c = el("div", "sample");
    c.setAttribute("data-key", String(s.key));
    c.appendChild(el("div", "meta", [s.base, s.stage, s.persona, s.slice].join(" / ") +
      "  item " + s.item_id + "  sample " + s.sample_idx + "  outcome " + s.outcome));
    var pred = el("div", "");
    var ok = s.prediction !== null && s.prediction === s.persona;
    pred.appendChild(el("span", ok ? "ok" : "bad",
      "prediction: " + (s.prediction === null ? "(no output)" : s.prediction)));
    c.appendChild(pred);
    if (s.probs && typeof s.probs === "object") { c.appendChild(probBars(s.probs)); }
    if (s.email && typeof s.email === "object") {
      var em = el("div", "email");
      em.appendChild(el("div", "role", "extracted email"));
      em.appendChild(el("div", "", "To: " + asText(s.email.to)));
      em.appendChild(el("div", "", "Subject: " + asText(s.email.subject)));
      em.appendChild(el("pre", "", asText(s.email.body)));
      c.appendChild(em);
    } else if (s.text !== null && s.text !== undefined) {
      c.appendChild(el("div", "role", "scored text"));
      c.appendChild(el("pre", "scored", asText(s.text)));
    }
    var msgs = Array.isArray(s.messages) ? s.messages : [];
    if (msgs.length) {
      var conv = el("details", "");
      conv.appendChild(el("summary", "", "conversation (" + msgs.length + " messages)"));
      msgs.forEach(function (m) { conv.appendChild(messageBox(m || {})); });
      conv.open = true;
      c.appendChild(conv);
    }
    var log = Array.isArray(s.tool_log) ? s.tool_log : [];
    if (log.length) {
      var tl = el("details", "");
      tl.appendChild(el("summary", "", "tool log (" + log.length + " calls)"));
      log.forEach(function (t) { tl.appendChild(el("pre", "", asText(t))); });
      c.appendChild(tl);
    }
    return c;
  }
  function matches(s) {
    return fields.every(function (f) {
      var v = selects[f].value;
      return v === "__all__" || String(s[f]) === v;
    });
  }
  function render() {
    var list = document.getElementById("sample-list");
    while (list.firstChild) { list.removeChild(list.firstChild); }
    var hits = data.filter(matches);
    document.getElementById("sample-count").textContent = String(hits.length);
    hits.slice(0, shown).forEach(function (s) { list.appendChild(card(s)); });
    var more = document.getElementById("sample-more");
    more.hidden = hits.length <= shown;
  }
  fields.forEach(function (f) {
    var sel = document.getElementById("f-" + f);
    var seen = {};
    data.forEach(function (s) { seen[String(s[f])] = true; });
    Object.keys(seen).sort().forEach(function (v) {
      var o = el("option", "", v);
      o.value = v;
      sel.appendChild(o);
    });
    sel.addEventListener("change", function () { shown = PAGE; render(); });
    selects[f] = sel;
  });
  document.getElementById("sample-more").addEventListener("click", function () {
    shown += PAGE; render();
  });
  render();
})();
"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def _sample_browser(samples: list[dict[str, Any]], note: str) -> str:
    filters = "".join(
        f'<label>{f} <select id="f-{f}"><option value="__all__">all</option></select></label>'
        for f in ("base", "stage", "persona", "slice", "outcome")
    )
    return (
        f'<p>{_e(note)} Showing <span id="sample-count">0</span> matching samples '
        "(50 at a time). Model text is shown verbatim as plain text.</p>"
        f'<div class="filters">{filters}</div>'
        '<div id="sample-list"></div><button id="sample-more" type="button" hidden>show more'
        "</button>"
        f'<script type="application/json" id="sample-data">{_json_for_script(samples)}</script>'
    )


def _figure_html(caption: str, png: Path) -> str:
    b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    return (
        f'<figure class="fig"><img alt="{_e(caption)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{_e(caption)} ({_e(png.stem)}.png / .svg in report/plots)</figcaption>"
        "</figure>"
    )


def write_report(
    out_dir: str | Path,
    records: Sequence[PredictionRecord],
    result: MetricsResult,
    *,
    settings: dict[str, Any],
    samples: list[dict[str, Any]] | None,
    title: str,
    meaningless: bool = False,
    published: str | None = None,
    notes: Sequence[str] = (),
    max_samples: int = MAX_SAMPLES,
) -> Path:
    """Write report/index.html (self-contained), report/plots/* and report.md; return the HTML path.

    `samples`: dicts with the SAMPLE_FIELDS keys for the sample browser; None builds minimal ones
    from `records` (text, prediction, probabilities). `published="paper"` sets the published
    OCT/DCT figures beside the run's own.
    """
    root = Path(out_dir)
    rep = root / "report"
    rep.mkdir(parents=True, exist_ok=True)
    figures = make_figures(result, rep / "plots")
    paper = published == "paper"
    notes = list(notes)
    if published and not paper:
        notes.append(f"Unknown published set {published!r}: only 'paper' is known.")
    if samples is None:
        samples = samples_from_records(records)
    shown, sample_note = select_samples(samples, max_samples)
    mnotes = method_notes(result)

    parts: list[str] = []
    add = parts.append
    add(f"<h1>{_e(title)}</h1>")
    if meaningless:
        add(
            '<div class="banner" id="meaningless-banner">Smoke run: these numbers mean nothing. '
            "The models and classifier are tiny or untrained; this report only shows that the "
            "pipeline works.</div>"
        )
    add(
        "<nav>"
        + "".join(
            f'<a href="#{a}">{t}</a>'
            for a, t in (
                ("headline", "Headline"),
                ("ladder", "Ladder"),
                ("stages", "Stages"),
                ("personas", "Per persona"),
                ("labels", "Predicted labels"),
                ("confusion", "Confusion"),
                ("figures", "Figures"),
                ("samples", "Samples"),
                ("method", "Method"),
                ("settings", "Settings"),
            )
        )
        + "</nav>"
    )
    if notes:
        add('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    add('<h2 id="headline">Headline metrics</h2>')
    add(
        f"<p>{len(result.personas)} personas; {result.ci:.0%} cluster-bootstrap intervals in "
        "brackets. n = rows with an output / rows attempted.</p>"
    )
    add(_html_table(_headline(result, paper)))
    if paper:
        add("<h3>Against the published figures</h3>")
        add(_html_table(_published_table(result)))
    add('<h2 id="ladder">Ladder decomposition</h2>')
    lad = _ladder_tables(result)
    if not lad:
        add("<p>Fewer than two units of any chain in this run: no decomposition.</p>")
    for cap, t in lad:
        add(f"<h3>{_e(cap)}</h3>{_html_table(t)}")
    add('<h2 id="stages">Stage differences</h2>')
    add(_html_table(_stage_table(result)))
    add('<h2 id="personas">Per persona</h2><p>F1 (conditional) per persona; details below.</p>')
    for sl in result.slices:
        add(f"<h3>{_e(sl)}</h3>{_html_table(_per_persona_pivot(result, sl))}")
    for m in result.cells.values():
        add(
            f"<details><summary>{_e(m.cell.label())}: per-persona details</summary>"
            f"{_html_table(_per_persona_detail(m))}</details>"
        )
    add('<h2 id="labels">Predicted-label distribution</h2>')
    add("<p>Share of scored rows per predicted label (labels outside the run included).</p>")
    add(_html_table(_pred_dist_table(result)))
    add('<h2 id="confusion">Confusion matrices</h2>')
    for m in result.cells.values():
        add(
            f"<details><summary>{_e(m.cell.label())}</summary>"
            f"{_html_table(_confusion_table(m))}</details>"
        )
    add('<h2 id="figures">Figures</h2>')
    for cap, png, _svg in figures:
        add(_figure_html(cap, png))
    add('<h2 id="samples">Sample browser</h2>')
    add(_sample_browser(shown, sample_note))
    add('<h2 id="method">Method notes</h2>')
    add("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in mnotes) + "</ul>")
    add('<h2 id="settings">Settings</h2>')
    add(f"<pre>{_e(json.dumps(settings, indent=2, sort_keys=True, default=str))}</pre>")

    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{_csp()}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + f"<script>{_JS}</script></body></html>\n"
    )
    index = rep / "index.html"
    index.write_text(page, encoding="utf-8")
    (root / "report.md").write_text(
        _markdown(result, title, meaningless, paper, notes, mnotes, settings, figures),
        encoding="utf-8",
    )
    return index


def _markdown(
    result: MetricsResult,
    title: str,
    meaningless: bool,
    paper: bool,
    notes: list[str],
    mnotes: list[str],
    settings: dict[str, Any],
    figures: list[tuple[str, Path, Path]],
) -> str:
    out = [f"# {title}", ""]
    if meaningless:
        out += ["> **Smoke run: these numbers mean nothing.**", ""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    out += ["## Headline metrics", "", _md_table(_headline(result, paper)), ""]
    if paper:
        out += ["### Against the published figures", "", _md_table(_published_table(result)), ""]
    out += ["## Ladder decomposition", ""]
    for cap, t in _ladder_tables(result):
        out += [f"### {cap}", "", _md_table(t), ""]
    out += ["## Stage differences", "", _md_table(_stage_table(result)), ""]
    out += ["## Per-persona F1 (conditional)", ""]
    for sl in result.slices:
        out += [f"### {sl}", "", _md_table(_per_persona_pivot(result, sl)), ""]
    out += ["## Predicted-label distribution (share of scored rows)", ""]
    out += [_md_table(_pred_dist_table(result)), ""]
    out += ["## Figures", ""]
    out += [
        f"- {cap}: `report/plots/{png.name}`, `report/plots/{svg.name}`"
        for cap, png, svg in figures
    ]
    out += ["", "## Method notes", ""] + [f"- {n}" for n in mnotes]
    out += [
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    return "\n".join(out)
