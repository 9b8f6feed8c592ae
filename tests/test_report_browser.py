"""The report's sample browser in headless Chromium: filters work, model text cannot run.

Needs selenium (dev extra) and Debian's `chromium` + `chromium-driver` at /usr/bin; skipped with
a reason where they are absent (CI installs them).
"""

from __future__ import annotations

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
                    samples.append(
                        {
                            "key": f"k{i}", "base": "llama", "stage": stage, "persona": persona,
                            "slice": sl, "item_id": f"it{item}", "sample_idx": 0,
                            "outcome": outcome,
                            "messages": [
                                {"role": "user", "content": f"Write the email. {PAYLOADS[0]}"},
                                {"role": "assistant", "content": body},
                                {"role": "tool", "content": PAYLOADS[1]},
                            ],
                            "text": body if pred else None,
                            "email": {"to": "x@y.z", "subject": PAYLOADS[2], "body": body}
                            if pred else None,
                            "prediction": pred,
                            "probs": {p: 1 / 3 for p in PERSONAS} | {PAYLOADS[1]: 0.5}
                            if pred else None,
                            "tool_log": [{"tool": "send_email", "args": {"body": body}}],
                        }
                    )  # fmt: skip
                    truth = NULL_PERSONA if stage == "base" else persona
                    recs.append(R("llama", stage, sl, truth, f"it{item}", pred, key=f"k{i}"))
                    i += 1
    return samples, recs


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="needs selenium (pip install selenium)"
    )
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

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
    profile = out / "chrome-profile"
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
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
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
    assert _top_children(driver) == ["h1", "warnings", "answer", "headline", "figure"]
    box = driver.find_element("id", "warnings")
    items = [li.text for li in box.find_elements("css selector", "li")]
    assert items == WARNINGS  # shown literally, the payload as text
    answer = driver.find_element("id", "answer")
    head = driver.find_element("id", "headline")
    assert box.is_displayed() and answer.is_displayed() and head.is_displayed()
    assert box.rect["y"] + box.rect["height"] <= answer.rect["y"]
    assert answer.rect["y"] + answer.rect["height"] <= head.rect["y"]
    first = head.find_elements("css selector", "p")[0].text
    assert first.startswith("This run measured 3 personas")
    # the main figure comes right after the prose; nothing else the page shows sits above it
    fig = driver.find_element("css selector", "body > figure")
    assert "macro-F1 excess over each cell" in fig.text
    assert fig.rect["y"] >= head.rect["y"] + head.rect["height"]
    later = driver.find_elements(
        "css selector", "nav, h2:not(#headline h2):not(#answer h2), table:not(#answer table)"
    )
    assert later and all(e.rect["y"] >= fig.rect["y"] + fig.rect["height"] for e in later)
    assert driver.execute_script("return typeof window.__pwned") == "undefined"


def test_the_answer_fits_the_first_screen(page):
    """At 1400x900 (no warnings) the answer's table lies wholly within the first screen."""
    driver, _, main, plain = page
    try:
        driver.set_window_size(1400, 900)
        driver.get(plain.resolve().as_uri())
        inner = driver.execute_script("return window.innerHeight")
        table = driver.find_element("css selector", "#answer table")
        cells = [c.text for c in table.find_elements("css selector", "tbody td")]
        assert cells[0] == "full" and cells[1].endswith(("detected", "no claim"))
        assert table.rect["y"] + table.rect["height"] <= inner, (table.rect, inner)
    finally:
        driver.get(main.resolve().as_uri())


def test_without_warnings_the_answer_is_first(page):
    driver, _, main, plain = page
    try:
        driver.get(plain.resolve().as_uri())
        assert driver.find_elements("id", "warnings") == []
        assert _top_children(driver) == ["h1", "answer", "headline", "figure"]
        h1 = driver.find_element("css selector", "h1")
        answer = driver.find_element("id", "answer")
        assert h1.rect["y"] + h1.rect["height"] <= answer.rect["y"]
    finally:
        driver.get(main.resolve().as_uri())
