"""The interactive HTML report, opened in a real headless Chromium (Debian's, driven by
Playwright): loads offline without console errors, one data-map point per sample, hover
shows the sample, tables sort and filter, a screenshot is not blank."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from pdfcheck import pixel_std
from reporttraces import write_outputs_trace

from samplescope.analysis import open_trace
from samplescope.experiments.demo import DemoResult
from samplescope.reports import render_report
from samplescope.reports.html import MissingHtmlDependencyError

# Shares the session's short demo with test_render.py (one worker trains it once).
pytestmark = [pytest.mark.xdist_group("reports-demo"), pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def html_report(demo: DemoResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("html")
    other = write_outputs_trace(folder / "other.h5", epochs=2)
    return render_report(
        demo.trace, folder / "report.html", fmt="html", progress=False, overlay=[other]
    )


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make test` installs it (Debian package chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, html_report: Path):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, offline=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(html_report.as_uri())
    page.wait_for_function("document.getElementById('datamap')?.data?.length > 0")
    page.errors = errors
    page.requests = requests
    yield page
    context.close()


def test_file_is_self_contained(page, html_report: Path) -> None:
    # plotly.js is inlined: the page asked for nothing but itself (and data: URIs).
    assert page.requests
    assert all(url.startswith(("file:", "data:", "blob:")) for url in page.requests)
    assert "<script src=" not in html_report.read_text(encoding="utf-8")


def test_loads_without_console_errors(page) -> None:
    assert page.errors == []


def test_data_map_has_one_point_per_sample(page, demo: DemoResult) -> None:
    with open_trace(demo.trace) as trace:
        n = trace.samples().drop_nulls(["confidence", "variability"]).height
    shown = page.evaluate(
        "document.getElementById('datamap').data.reduce((n, t) => n + t.x.length, 0)"
    )
    assert shown == n == 1437
    # One legend entry (filterable trace) per class.
    assert page.evaluate("document.getElementById('datamap').data.length") == 10


def test_hovering_a_point_shows_its_id_and_thumbnail(page) -> None:
    # The point furthest right stands apart, so the mouse lands on it and nothing else.
    page.locator("#datamap").scroll_into_view_if_needed()
    target = page.evaluate(
        """() => {
        const gd = document.getElementById('datamap');
        let best = null;
        gd.data.forEach((t, c) => t.x.forEach((x, i) => {
            if (!best || x > best.x) best = {x: x, y: t.y[i], id: t.customdata[i][0]};
        }));
        const l = gd._fullLayout, box = gd.getBoundingClientRect();
        best.px = box.left + l.xaxis._offset + l.xaxis.l2p(best.x);
        best.py = box.top + l.yaxis._offset + l.yaxis.l2p(best.y);
        return best;
    }"""
    )
    page.mouse.move(target["px"] - 30, target["py"])
    page.mouse.move(target["px"], target["py"])
    page.wait_for_function(
        "document.getElementById('thumb').textContent.includes('sample')", timeout=5000
    )
    hover = page.evaluate("document.querySelector('#datamap .hoverlayer').textContent")
    assert f"sample {target['id']}" in hover
    assert f"sample {target['id']}" in page.inner_text("#thumb")
    assert page.locator("#thumb img").count() == 1


def test_candidate_tables_sort_and_search(page) -> None:
    cells = (
        "Array.from(document.querySelectorAll('#mislabeled tbody tr'))"
        ".filter(r => r.style.display !== 'none').map(r => r.cells[0].textContent)"
    )
    before = page.evaluate(cells)
    assert len(before) == 50
    page.click("#mislabeled th[data-col='0']")
    ids = [int(i) for i in page.evaluate(cells)]
    assert ids == sorted(ids)
    page.fill("input[data-table='mislabeled']", str(ids[0]))
    shown = page.evaluate(cells)
    assert str(ids[0]) in shown
    assert len(shown) < 50


def test_curves_overlay_both_runs(page) -> None:
    names = page.evaluate("document.getElementById('curves').data.map(t => t.name)")
    assert any(n.startswith("trace.h5:") for n in names)
    assert any(n.startswith("other.h5:") for n in names)


def test_screenshot_is_not_blank(page, tmp_path: Path) -> None:
    page.locator("#datamap").scroll_into_view_if_needed()
    shot = tmp_path / "datamap.png"
    page.locator("#datamap").screenshot(path=str(shot))
    assert pixel_std(shot) > 0.05


def test_missing_plotly_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_outputs_trace(tmp_path / "t.h5", epochs=2)
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(MissingHtmlDependencyError, match=r"pip install 'samplescope\[html\]'"):
        render_report(path, tmp_path / "r.html", fmt="html", progress=False)
    assert not (tmp_path / "r.html").exists()


def test_one_dimensional_thumbnail_becomes_a_line() -> None:
    from samplescope.reports.html import _image_uri

    assert _image_uri(np.arange(28, dtype=np.uint8)[None, :]).startswith("data:image/svg+xml")
    assert _image_uri(np.zeros((8, 8), dtype=np.uint8)).startswith("data:image/png")
