"""The report's sample browser in headless Chromium: filters work, model text cannot run.

Needs selenium (dev extra) and Debian's `chromium` + `chromium-driver` at /usr/bin; skipped with
a reason where they are absent (CI installs them).
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import pytest

from charshift import report, stats
from charshift.schema import NULL_PERSONA, Sample
from charshift.schema import PredictionRecord as R

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAYLOADS = [
    "<script>window.__pwned=1;document.title='pwned'</script>",
    "<img src=x onerror=\"window.__pwned=1;document.title='pwned'\">",
    "</script><script>window.__pwned=1</script><!--",
]
PERSONAS = ["sarcasm", "humor", "remorse"]
HOSTILE_KEY = 'k0 <é>"&/😀#'
SYSTEM = "You are a helpful assistant. Tools: send_email(to, subject, body), search_inbox(query)."
WARNINGS = [f"Incomplete run: 4 rows not scored {PAYLOADS[1]}", "A persona left a label set"]


def _samples() -> tuple[list[dict], list[R]]:
    samples, recs = [], []
    i = 0
    for stage in ("base", "full"):
        for sl in ("id_chat", "chat_email", "agentic_email"):
            for item in range(8):
                for persona in ["(base: none)"] if stage == "base" else PERSONAS:
                    outcome = "no_email" if (sl == "agentic_email" and item % 4 == 0) else "email"
                    pred = None if outcome == "no_email" else PERSONAS[item % 3]
                    body = PAYLOADS[i % 3]
                    key = HOSTILE_KEY if i == 0 else f"k{i}"
                    ask = f"Write the email. {PAYLOADS[0]}" + (" Zebra-MARKER" if item == 5 else "")
                    weights = [1 + (i * 7 + j * 3) % 5 for j in range(3)]
                    samples.append(
                        {
                            "key": key, "base": "llama", "stage": stage, "persona": persona,
                            "slice": sl, "item_id": f"it{item}", "sample_idx": 0,
                            "outcome": outcome,
                            "messages": [
                                {"role": "system", "content": SYSTEM},
                                {"role": "user", "content": ask},
                                {"role": "assistant", "content": body},
                                {"role": "tool", "content": PAYLOADS[1]},
                            ],
                            "text": body if pred else None,
                            "email": {"to": "x@y.z", "subject": PAYLOADS[2], "body": body}
                            if pred else None,
                            "prediction": pred,
                            "probs": {p: w / sum(weights) for p, w in zip(PERSONAS, weights, strict=True)}
                            | {PAYLOADS[1]: 0.5} if pred else None,
                            "tool_log": [
                                {"tool": "search_inbox", "arguments": {"query": "mine"},
                                 "ok": True, "result": "3 emails"},
                                {"tool": "send_email", "args": {"body": body}},
                            ],
                        }
                    )  # fmt: skip
                    truth = NULL_PERSONA if stage == "base" else persona
                    recs.append(R("llama", stage, sl, truth, f"it{item}", pred, key=key))
                    i += 1
    return samples, recs


def _chrome(profile: Path, javascript: bool = True):
    """A headless Chromium driver (skips the test where Chromium or selenium is absent)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="needs selenium (pip install selenium)"
    )
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    if not javascript:
        opts.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    samples, recs = _samples()
    out = tmp_path_factory.mktemp("browser")
    res = stats.compute_metrics(recs, PERSONAS, n_boot=30)
    path = report.write_report(
        out, recs, res, settings={"x": PAYLOADS[0]}, samples=[Sample(**x) for x in samples],
        title="browser test",
        warnings=WARNINGS,
    )  # fmt: skip
    plain = report.write_report(
        out / "plain",
        recs,
        res,
        settings={},
        samples=[Sample(**x) for x in samples[:5]],
        title="plain",
    )
    return out, samples, path, plain


@pytest.fixture(scope="module")
def page(built):
    out, samples, path, plain = built
    profile = out / "chrome-profile"
    driver = _chrome(profile)
    try:
        driver.get(path.resolve().as_uri())
        yield driver, samples, path, plain
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _count(driver) -> int:
    return int(driver.find_element("id", "sample-count").text)


def _cards(driver) -> int:
    return len(driver.find_elements("css selector", "#sample-list .sample"))


def _select(driver, field: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", f"f-{field}")).select_by_value(value)


def test_page_loads_and_shows_samples(page):
    driver, samples, *_ = page
    assert driver.title == "browser test"
    assert _count(driver) == len(samples)
    assert _cards(driver) == min(50, len(samples))
    driver.find_element("id", "sample-more").click()
    assert _cards(driver) == min(100, len(samples))


def test_filters_change_the_shown_samples(page):
    driver, samples, *_ = page
    cases = [
        {"stage": "full"},
        {"stage": "full", "slice": "agentic_email"},
        {"stage": "full", "slice": "agentic_email", "outcome": "no_email"},
        {"stage": "full", "slice": "agentic_email", "outcome": "no_email", "persona": "humor"},
        {"stage": "base", "slice": "__all__", "outcome": "__all__", "persona": "__all__"},
    ]
    applied: dict[str, str] = {}
    for case in cases:
        for field, value in case.items():
            _select(driver, field, value)
            applied[field] = value
        want = [
            s for s in samples if all(v == "__all__" or str(s[f]) == v for f, v in applied.items())
        ]
        assert want, case
        assert _count(driver) == len(want), case
        assert _cards(driver) == min(50, len(want)), case
        keys = {
            e.get_attribute("data-key")
            for e in driver.find_elements("css selector", "#sample-list .sample")
        }
        assert keys <= {s["key"] for s in want}
    for field in ("stage", "slice", "outcome", "persona"):
        _select(driver, field, "__all__")
    assert _count(driver) == len(samples)


def test_model_text_shows_literally_and_nothing_runs(page):
    driver, *_ = page
    _select(driver, "stage", "full")
    _select(driver, "slice", "chat_email")
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert driver.title == "browser test"
    assert driver.find_elements("css selector", "img[src='x']") == []
    assert driver.find_elements("css selector", "#sample-list script") == []
    pres = [e.text for e in driver.find_elements("css selector", "#sample-list pre")]
    assert any(PAYLOADS[0] in t for t in pres)
    assert any(PAYLOADS[1] in t for t in pres)
    labels = [e.text for e in driver.find_elements("css selector", "#sample-list .prob .lab")]
    assert PAYLOADS[1] in labels  # a hostile probability label is text too
    # the page's own script did run (cards exist), and the figures are inline images
    imgs = driver.find_elements("css selector", "figure img")
    assert imgs and all(i.get_attribute("src").startswith("data:image/png;base64,") for i in imgs)


def _top_children(driver) -> list[str]:
    """The id (or tag) of each element of the page's body, in order, up to the navigation."""
    return driver.execute_script(
        "var out = [];"
        "for (var e of document.body.children) {"
        "  if (e.tagName === 'NAV') { break; }"
        "  out.push(e.id || e.tagName.toLowerCase());"
        "}"
        "return out;"
    )


def test_warning_box_then_answer_then_headline_open_the_page(page):
    driver, *_ = page
    assert _top_children(driver) == ["h1", "warnings", "answer", "figure", "headline"]
    box = driver.find_element("id", "warnings")
    items = [li.text for li in box.find_elements("css selector", "li")]
    assert items == WARNINGS  # shown literally, the payload as text
    answer = driver.find_element("id", "answer")
    head = driver.find_element("id", "headline")
    assert box.is_displayed() and answer.is_displayed() and head.is_displayed()
    assert box.rect["y"] + box.rect["height"] <= answer.rect["y"]
    first = head.find_elements("css selector", "p")[0].text
    assert first.startswith("This run measured 3 personas")
    # the main figure comes right after the answer, the prose after it; nothing else above
    fig = driver.find_element("css selector", "body > figure")
    assert "macro-F1 excess over each cell" in fig.text
    assert fig.rect["y"] >= answer.rect["y"] + answer.rect["height"]
    assert head.rect["y"] >= fig.rect["y"] + fig.rect["height"]
    link = fig.find_element("css selector", "a").get_attribute("href")
    assert link.endswith(".png") and "/report/plots/ladder_" in link  # full size on a click
    later = driver.find_elements(
        "css selector", "nav, h2:not(#headline h2):not(#answer h2), table:not(#answer table)"
    )
    assert later and all(e.rect["y"] >= head.rect["y"] + head.rect["height"] for e in later)
    assert driver.execute_script("return typeof window.__pwned") == "undefined"


def test_the_answer_fits_the_first_screen(page):
    """At 1400x900 (no warnings) the answer's table and the main figure lie wholly within
    the first screen."""
    driver, _, main, plain = page
    try:
        driver.set_window_size(1400, 900)
        driver.get(plain.resolve().as_uri())
        inner = driver.execute_script("return window.innerHeight")
        table = driver.find_element("css selector", "#answer table")
        cells = [c.text for c in table.find_elements("css selector", "tbody td")]
        assert cells[0] == "full" and cells[1].endswith(("detected", "no claim"))
        assert table.rect["y"] + table.rect["height"] <= inner, (table.rect, inner)
        fig = driver.find_element("css selector", "body > figure")  # the main figure too
        assert fig.rect["y"] + fig.rect["height"] <= inner, (fig.rect, inner)
    finally:
        driver.get(main.resolve().as_uri())


def test_without_warnings_the_answer_is_first(page):
    driver, _, main, plain = page
    try:
        driver.get(plain.resolve().as_uri())
        assert driver.find_elements("id", "warnings") == []
        assert _top_children(driver) == ["h1", "answer", "figure", "headline"]
        h1 = driver.find_element("css selector", "h1")
        answer = driver.find_element("id", "answer")
        assert h1.rect["y"] + h1.rect["height"] <= answer.rect["y"]
    finally:
        driver.get(main.resolve().as_uri())


# --------------------------------------------------------------------------- the browser's tools


def _wait(driver, cond, timeout: float = 15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(cond)


def _fresh(driver, path: Path, fragment: str = "") -> None:
    """Load the page anew (every filter back to 'all'), optionally at a fragment."""
    driver.get("about:blank")
    driver.get(path.resolve().as_uri() + fragment)


def _keys(driver) -> list[str]:
    return [
        e.get_attribute("data-key")
        for e in driver.find_elements("css selector", "#sample-list .sample")
    ]


def _search(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", "sample-search")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    if text:
        box.send_keys(text)


def _hay(s: dict) -> str:
    """What the search box looks in, lowercased (the test's own reading of the spec)."""
    parts = [s["text"] or "", s["prediction"] or ""]
    if s["email"]:
        parts += [s["email"]["to"], s["email"]["subject"], s["email"]["body"]]
    parts += [m["content"] for m in s["messages"]]
    return "\0".join(parts).lower()


def _verdict(s: dict) -> str:
    if s["prediction"] is None:
        return "no-output"
    if s["stage"] == "base":
        return "no-label"
    return "correct" if s["prediction"] == s["persona"] else "wrong"


def _p_true(s: dict) -> float | None:
    return None if s["stage"] == "base" or not s["probs"] else s["probs"][s["persona"]]


def _default_order(samples: list[dict]) -> list[str]:
    chosen, _ = report.select_samples([Sample(**x) for x in samples])
    return [s.key for s in chosen]


def test_search_narrows_the_list_as_plain_text(page):
    driver, samples, path, _ = page
    _fresh(driver, path)
    assert driver.find_element("id", "sample-range").text == "1\u201350"
    assert not driver.find_element("id", "sample-nojs").is_displayed()
    # each query's count differs from the one before: the wait is for the debounced search
    for query in ("Zebra-marker", "REMORSE", "<script>window.__pwned", ".*", ""):
        want = [s["key"] for s in samples if query.lower() in _hay(s)]
        n = len(want)
        _search(driver, query)
        _wait(driver, lambda d: _count(d) == n)  # noqa: B023 (called before n changes)
        assert _cards(driver) == min(50, len(want)), query
        assert set(_keys(driver)) <= set(want), query
    # the search and a filter together
    _search(driver, "zebra-MARKER")
    _wait(driver, lambda d: _count(d) == sum("zebra-marker" in _hay(s) for s in samples))
    _select(driver, "stage", "full")
    want = [s for s in samples if "zebra-marker" in _hay(s) and s["stage"] == "full"]
    assert 0 < len(want) < 50 and _count(driver) == len(want)
    assert driver.execute_script("return typeof window.__pwned") == "undefined"


def test_verdict_filter_counts(page):
    driver, samples, path, _ = page
    _fresh(driver, path)
    for v in ("correct", "wrong", "no-label", "no-output"):
        want = {s["key"] for s in samples if _verdict(s) == v}
        assert want, v
        _select(driver, "verdict", v)
        assert _count(driver) == len(want), v
        assert set(_keys(driver)) <= want
        cards = driver.find_elements("css selector", "#sample-list .sample")
        assert {c.get_attribute("data-verdict") for c in cards} == {v}
    _select(driver, "stage", "base")
    _select(driver, "verdict", "wrong")
    assert _count(driver) == 0  # a base-stage sample is never wrong: it has no true label
    _select(driver, "verdict", "no-label")
    assert _count(driver) == sum(
        s["stage"] == "base" and s["prediction"] is not None for s in samples
    )


def test_sort_by_p_true_ascending(page):
    from selenium.webdriver.support.ui import Select

    driver, samples, path, _ = page
    _fresh(driver, path)
    Select(driver.find_element("id", "sample-sort")).select_by_value("ptrue-asc")
    p = {s["key"]: _p_true(s) for s in samples}
    ps = sorted(v for v in p.values() if v is not None)
    assert len(set(ps)) > 3 and 50 < len(ps) < len(samples) <= 100
    assert [p[k] for k in _keys(driver)] == ps[:50]  # most confidently wrong first
    driver.find_element("id", "sample-next").click()
    assert driver.find_element("id", "sample-range").text == f"51\u2013{len(samples)}"
    # then the rest of them, then the samples with no p(true) (base stage, no output)
    assert [p[k] for k in _keys(driver)] == ps[50:] + [None] * (len(samples) - len(ps))
    driver.find_element("id", "sample-prev").click()
    assert [p[k] for k in _keys(driver)] == ps[:50]


def test_system_prompt_collapsed_and_tool_steps_readable(page):
    driver, _, path, _ = page
    _fresh(driver, path)
    card = driver.find_element("css selector", "#sample-list .sample")
    system = card.find_element("css selector", "details.role-system")
    assert system.get_attribute("open") is None
    assert not system.find_element("css selector", "pre").is_displayed()
    assert card.find_element("css selector", ".role-user pre").is_displayed()
    assert card.find_element("css selector", ".role-assistant pre").is_displayed()
    system.find_element("css selector", "summary").click()
    assert system.find_element("css selector", "pre").text == SYSTEM
    steps = card.find_elements("css selector", ".tools .step")
    heads = [s.find_element("css selector", ".step-head").text for s in steps]
    assert heads == ["step 1: search_inbox (ok)", "step 2: send_email"]
    names = [e.text for e in steps[0].find_elements("css selector", ".arg-name")]
    pres = [e.text for e in steps[0].find_elements("css selector", "pre")]
    assert (names, pres) == (["query", "result"], ["mine", "3 emails"])
    assert [e.text for e in steps[1].find_elements("css selector", ".arg-name")] == ["body"]


def _in_view(driver, element) -> bool:
    top, inner = driver.execute_script(
        "return [arguments[0].getBoundingClientRect().top, window.innerHeight];", element
    )
    return 0 <= top < inner


def test_permalink_opens_a_sample_beyond_the_first_page(page):
    driver, samples, path, _ = page
    order = _default_order(samples)
    assert 50 < len(order) <= 100
    key = order[-3]
    anchor = report.sample_anchor(key)
    _fresh(driver, path, "#" + anchor)
    card = _wait(driver, lambda d: d.find_element("id", anchor))
    assert card.get_attribute("data-key") == key and "linked" in card.get_attribute("class")
    assert _in_view(driver, card)
    assert driver.find_element("id", "sample-range").text == f"51\u2013{len(samples)}"
    link = card.find_element("css selector", ".permalink")
    assert link.text == "#" + anchor and link.get_attribute("href").endswith("#" + anchor)
    # a link to a sample the filters hide: the filters are cleared and the sample shown
    other = next(k for k in order[60:] if k != key)
    stage = next(s["stage"] for s in samples if s["key"] == other)
    _select(driver, "stage", "base" if stage != "base" else "full")
    driver.get(path.resolve().as_uri() + "#" + report.sample_anchor(other))
    card = _wait(driver, lambda d: d.find_element("id", report.sample_anchor(other)))
    assert _in_view(driver, card) and _count(driver) == len(samples)
    # an id from a key with any characters is a plain, safe id; the script builds the same
    hostile = report.sample_anchor(HOSTILE_KEY)
    assert re.fullmatch(r"s-[A-Za-z0-9_.-]+", hostile)
    _fresh(driver, path, "#" + hostile)
    card = _wait(driver, lambda d: d.find_element("id", hostile))
    assert card.get_attribute("data-key") == HOSTILE_KEY and _in_view(driver, card)


RED = "rgba(176, 0, 32, 1)"


def test_base_stage_predictions_are_not_styled_as_wrong(page):
    driver, _, path, _ = page
    _fresh(driver, path)
    _select(driver, "stage", "base")
    spans = driver.find_elements("css selector", "#sample-list .sample .verdict")
    predicted = [s for s in spans if "(no output)" not in s.text]
    assert predicted and all("v-no-label" in s.get_attribute("class") for s in predicted)
    assert all(s.value_of_css_property("color") != RED for s in spans)
    _select(driver, "stage", "full")
    _select(driver, "verdict", "wrong")
    wrong = driver.find_elements("css selector", "#sample-list .sample .verdict")
    assert wrong and all(s.value_of_css_property("color") == RED for s in wrong)


@pytest.fixture(scope="module")
def nojs(built):
    out, _, path, _ = built
    profile = out / "chrome-profile-nojs"
    driver = _chrome(profile, javascript=False)
    try:
        driver.get(path.resolve().as_uri())
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_without_javascript_the_first_cards_show_escaped(built, nojs):
    _, samples, path, _ = built
    driver = nojs
    assert _keys(driver) == _default_order(samples)[: report.STATIC_CARDS]
    status = driver.find_element("id", "sample-status").text
    assert f"Showing 1\u2013{report.STATIC_CARDS} of {len(samples)} matching samples" in status
    assert "JavaScript off" in status
    assert not driver.find_element("id", "sample-controls").is_displayed()
    assert driver.title == "browser test"
    assert driver.find_elements("css selector", "img[src='x']") == []
    assert driver.find_elements("css selector", "#sample-list script") == []
    pres = [e.text for e in driver.find_elements("css selector", "#sample-list pre")]
    assert any(PAYLOADS[0] in t for t in pres) and any(PAYLOADS[1] in t for t in pres)
    labels = [e.text for e in driver.find_elements("css selector", "#sample-list .prob .lab")]
    assert PAYLOADS[1] in labels
    card = driver.find_element("id", report.sample_anchor(HOSTILE_KEY))
    assert card.get_attribute("data-key") == HOSTILE_KEY
    system = card.find_element("css selector", "details.role-system")
    assert system.get_attribute("open") is None
    heads = [e.text for e in card.find_elements("css selector", ".tools .step-head")]
    assert heads == ["step 1: search_inbox (ok)", "step 2: send_email"]
    verdicts = driver.find_elements("css selector", "#sample-list .verdict")
    assert {v.get_attribute("class") for v in verdicts} <= {
        "verdict v-no-label",
        "verdict v-no-output",
    }
    text = path.read_text(encoding="utf-8")
    assert html.escape(PAYLOADS[0], quote=True) in text and PAYLOADS[0] not in text


def _big_samples(n: int) -> list[Sample]:
    out = []
    for i in range(n):
        stage = ("base", "full")[i % 2]
        persona = "(base: none)" if stage == "base" else PERSONAS[i % 3]
        out.append(
            Sample(
                key=f"b{i}", base="llama", stage=stage, persona=persona,
                slice=("id_chat", "chat_email")[i // 2 % 2], item_id=f"it{i % 100}",
                sample_idx=0, outcome="email", text=f"reply {i}" + (" needle" if i % 7 == 0 else ""),
                prediction=PERSONAS[i % 5 % 3], probs={p: 1 / 3 for p in PERSONAS},
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": f"reply {i}"}],
            )
        )  # fmt: skip
    return out


def test_a_2500_sample_page_loads_and_filters(page, tmp_path):
    """The browser with 2,500 samples: it loads, searches, filters and follows a permalink
    (whether it is fast enough is for a person to judge, not a timed test)."""
    driver, _, path, _ = page
    big = _big_samples(2500)
    target = tmp_path / "big.html"
    target.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{report._csp()}">'
        f"<style>{report._CSS}</style></head><body>"
        + report._sample_browser(big, "2500 samples.")
        + f"<script>{report._JS}</script></body></html>",
        encoding="utf-8",
    )
    try:
        _fresh(driver, target)
        assert _count(driver) == 2500 and _cards(driver) == 50
        _search(driver, "NEEDLE")
        n = sum(i % 7 == 0 for i in range(2500))
        _wait(driver, lambda d: _count(d) == n)
        _select(driver, "persona", "humor")
        want = [s.key for s in big if "needle" in (s.text or "") and s.persona == "humor"]
        assert _count(driver) == len(want) and set(_keys(driver)) <= set(want)
        _select(driver, "verdict", "correct")
        want = [s.key for s in big if "needle" in (s.text or "") and s.persona == "humor"
                and s.prediction == "humor"]  # fmt: skip
        assert _count(driver) == len(want) and set(_keys(driver)) == set(want)
        driver.get(target.resolve().as_uri() + "#" + report.sample_anchor("b2498"))
        card = _wait(driver, lambda d: d.find_element("id", report.sample_anchor("b2498")))
        assert _in_view(driver, card) and _count(driver) == 2500
    finally:
        driver.get(path.resolve().as_uri())
