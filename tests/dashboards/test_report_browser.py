"""The sweep report in a real browser (Debian's chromium driven by Playwright; `make
test-browser`): it renders offline with no console error, one leaderboard row per trial, every
chart drawn and every mask image loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no chromium on PATH: apt-get install -y chromium (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory, server):
    """The report of a real two-trial quickstart sweep (masks and all)."""
    from dashboards.report import build_report
    from orchestrator.sweep import run_sweep, shutdown_ray

    storage = tmp_path_factory.mktemp("sweeps")
    with pytest.MonkeyPatch.context() as env:  # data and features of its own
        env.setenv("SLOTSWEEP_CACHE", str(tmp_path_factory.mktemp("cache")))
        env.setenv("SLOTSWEEP_FEATURE_CACHE", str(tmp_path_factory.mktemp("features")))
        code = run_sweep(ROOT / "sweeps" / "quickstart.yaml",
                         [f"storage={storage}", "name=web", f"mlflow.tracking_uri={server.uri}",
                          "mlflow.experiment=web", "trials=2", "trainer.max_steps=4"])
        shutdown_ray()
    assert code == 0
    return build_report(storage / "web", tracking_uri=server.uri, top_k=2)


def test_report_renders_offline_with_every_chart_and_mask(chromium, report, tmp_path):
    context = chromium.new_context(viewport={"width": 1400, "height": 900}, offline=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(report.as_uri())
    page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length > 0")
    assert errors == []
    assert page.locator("#leaderboard-table tr.trial-row").count() == 2
    charts = page.locator(".plotly-graph-div")
    assert charts.count() == 4  # effects, parallel coordinates, Pareto, curves (no importance
    # with 2 trials: the page says so)
    for i in range(charts.count()):  # every chart drew its SVG
        assert charts.nth(i).locator(".main-svg").count() > 0, f"chart {i} did not render"
    masks = page.locator("img.mask")
    assert masks.count() == 2
    widths = page.eval_on_selector_all("img.mask", "els => els.map(e => e.naturalWidth)")
    assert all(w >= 2 * 128 for w in widths), widths  # loaded, two frames >= 128 px each
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    context.close()
