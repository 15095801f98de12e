"""`souverain plan`'s HTML report in Chromium: the Paris site file's plan, as a person reads it.

The page is one self-contained file (it loads nothing else); every plot the plan asks for is
drawn (per model: power and J/token against batch size, TTFT and ITL against load; the site's
growth), each inside its frame with every label legible (the browser's own layout says where
each element landed); it reads on a phone's width; the tables and plots show the JSON plan's
numbers.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import Browser, Page

from conftest import BINARY, REPO_ROOT, screenshot

SITE = REPO_ROOT / "deploy" / "plan" / "paris.toml"
PLOTS_PER_MODEL = 4


@pytest.fixture(scope="module")
def report(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Page, dict, list[str]]]:
    out = tmp_path_factory.mktemp("plan")
    html, plan_json = out / "paris.html", out / "paris.json"
    subprocess.run([str(BINARY), "plan", str(SITE), "--json", str(plan_json), "--html", str(html)],
                   check=True, capture_output=True, timeout=120)
    plan = json.loads(plan_json.read_text())
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    errors: list[str] = []
    context.on("request", lambda r: requests.append(r.url))
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(html.as_uri())
    yield page, plan, requests
    assert errors == [], errors
    context.close()


def test_the_report_is_one_file_with_the_sites_totals(report: tuple[Page, dict, list[str]]) -> None:
    page, plan, requests = report
    # Nothing but the file itself: no script, font or image from anywhere.
    assert len(requests) == 1 and requests[0].startswith("file://"), requests
    assert page.title() == f"Souverain plan: {plan['site']}"
    totals = page.locator("h2:has-text('Site totals') + table tr").nth(1).locator("td")
    assert totals.nth(0).inner_text() == str(plan["totals"]["gpus"])
    assert totals.nth(1).inner_text() == str(plan["totals"]["racks"])
    assert totals.nth(2).inner_text() == f"{plan['totals']['it_mw']:.2f}"
    # One row per model of the demand, in the plan's order, its binding constraint in words.
    rows = page.locator("h2:has-text('Per model') + table tr")
    assert rows.count() == 1 + len(plan["models"])
    names = {"memory": "memory", "slo": "SLO", "batch_grid": "largest batch tried", "power": "power"}
    for i, m in enumerate(plan["models"]):
        cells = rows.nth(i + 1).locator("td")
        assert cells.nth(0).inner_text().startswith(m["model"])
        assert cells.last.inner_text() == names[m["binding"]], m["binding"]
    # Nothing of the program's internals shows (a Rust value printed for debugging).
    text = page.locator("body").inner_text()
    assert "Some(" not in text and "None" not in text
    screenshot(page, "plan-report")


def test_every_plot_is_drawn_inside_its_frame(report: tuple[Page, dict, list[str]]) -> None:
    page, plan, _ = report
    svgs = page.locator("svg")
    assert svgs.count() == PLOTS_PER_MODEL * len(plan["models"]) + 1
    # Every element of every plot, as laid out by the browser, within the plot's viewBox
    # (a label cut at the frame's edge, or a line drawn off it, is outside).
    outside = page.evaluate(
        """() => {
            const bad = [];
            document.querySelectorAll('svg').forEach((svg, i) => {
                const vb = svg.viewBox.baseVal;
                const r = svg.getBoundingClientRect();
                if (r.width < 100 || r.height < 100) bad.push(`plot ${i} is ${r.width}x${r.height}`);
                // From an element's own coordinates (before its transform: the rotated axis
                // label) to the plot's.
                const toSvg = svg.getScreenCTM().inverse();
                svg.querySelectorAll('text, polyline, line').forEach(el => {
                    const b = el.getBBox();
                    const m = toSvg.multiply(el.getScreenCTM());
                    const corners = [[b.x, b.y], [b.x + b.width, b.y], [b.x, b.y + b.height],
                                     [b.x + b.width, b.y + b.height]]
                        .map(([x, y]) => new DOMPoint(x, y).matrixTransform(m));
                    const x0 = Math.min(...corners.map(c => c.x)), x1 = Math.max(...corners.map(c => c.x));
                    const y0 = Math.min(...corners.map(c => c.y)), y1 = Math.max(...corners.map(c => c.y));
                    if (x0 < vb.x - 0.5 || y0 < vb.y - 0.5 || x1 > vb.x + vb.width + 0.5
                        || y1 > vb.y + vb.height + 0.5) {
                        bad.push(`plot ${i}: <${el.tagName}> ${el.textContent || ''} spans `
                                 + `${x0.toFixed(1)}..${x1.toFixed(1)} x ${y0.toFixed(1)}..${y1.toFixed(1)}`);
                    }
                });
                if (svg.querySelectorAll('polyline').length === 0) bad.push(`plot ${i} has no line`);
            });
            return bad;
        }"""
    )
    assert outside == [], outside


def test_the_report_fits_a_phone(report: tuple[Page, dict, list[str]]) -> None:
    """At 360 px the page does not scroll sideways: plots scale down, wide tables scroll
    within themselves."""
    page, _, _ = report
    page.set_viewport_size({"width": 360, "height": 800})
    try:
        page.wait_for_timeout(100)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
        widths = page.evaluate(
            "() => Array.from(document.querySelectorAll('svg'), s => s.getBoundingClientRect().width)")
        assert widths and max(widths) <= 360, widths
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


def test_the_plots_show_the_plans_numbers(report: tuple[Page, dict, list[str]]) -> None:
    """Each model's J/token plot has one point per batch size of the JSON's curve, left to right
    in batch order, and higher on the page where the J/token is higher."""
    page, plan, _ = report
    for k, m in enumerate(plan["models"]):
        curve = [(c["batch"], c["joules_per_token"]) for c in m["batch_curve"]]
        svg = page.locator("svg").nth(k * PLOTS_PER_MODEL + 1)
        assert "Energy per token" in (svg.locator("text").first.text_content() or "")
        points = svg.evaluate(
            "s => Array.from(s.querySelector('polyline').points).map(p => [p.x, p.y])")
        assert len(points) == len(curve), (m["model"], points, curve)
        xs = [p[0] for p in points]
        assert xs == sorted(xs) and len(set(xs)) == len(xs), xs
        # Page y grows downwards: of two points drawn at different heights (more than the
        # 0.1 px the SVG is written to apart), the higher one has the higher J/token.
        for i in range(len(curve)):
            for j in range(len(curve)):
                if points[i][1] < points[j][1] - 0.15:
                    assert curve[i][1] > curve[j][1], (m["model"], curve, points)
