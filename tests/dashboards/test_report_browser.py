"""The sweep report and MLflow's UI in a real browser (Debian's chromium driven by Playwright;
`make test-browser`), on a real two-trial quickstart sweep that was promoted: the report renders
offline with no console error, one leaderboard row per trial, every chart drawn and every mask
image loaded; MLflow shows the sweep run's description, its Image grid finds each trial's slot
masks, and the promoted version shows its alias."""

from __future__ import annotations

import json
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
def sweep(tmp_path_factory, server) -> Path:
    """A real two-trial quickstart sweep on ``server``, its best trial promoted (web@champion)."""
    from orchestrator.registry import promote
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
    promote(storage / "web", tracking_uri=server.uri)
    return storage / "web"


@pytest.fixture(scope="module")
def report(sweep, server) -> Path:
    """The sweep's report, masks and all."""
    from dashboards.report import build_report

    return build_report(sweep, tracking_uri=server.uri, top_k=2)


@pytest.fixture()
def page(chromium):
    context = chromium.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


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


def _record(sweep: Path) -> dict:
    return json.loads((sweep / "best.json").read_text())


def test_mlflow_shows_the_sweep_runs_description(page, sweep, server, tmp_path):
    from orchestrator.mlflow_runs import run_link

    record = _record(sweep)
    ids = record["mlflow"]
    page.goto(run_link(server.uri, ids["experiment_id"], ids["parent_run_id"]))
    description = page.get_by_text("Best trial:")
    description.wait_for()
    assert record["best"]["trial_id"] in description.inner_text()
    for t in record["trials"]:  # the leaderboard table of the description, rendered
        assert page.get_by_role("cell", name=t["trial_id"], exact=True).count() == 1
    page.screenshot(path=str(tmp_path / "mlflow-sweep-run.png"))


def test_mlflow_image_grid_finds_every_trials_slot_masks(page, sweep, server, tmp_path):
    """Experiment page, the sweep run's trials expanded, chart view: the "slots" image card
    loads one picture per trial."""
    from orchestrator.mlflow_runs import run_link

    ids = _record(sweep)["mlflow"]
    page.goto(run_link(server.uri, ids["experiment_id"]))
    page.get_by_role("row").filter(has_text="web").get_by_role("button").first.click()
    page.get_by_role("link", name="web-001", exact=True).wait_for()  # trials listed
    page.locator("[role=radiogroup] label").nth(1).click()  # table | chart | artifacts: chart
    search = page.get_by_placeholder("Search metric charts")
    search.wait_for()
    slots = page.locator("img[src*='images%2Fslots']")
    box = search.bounding_box()
    for _ in range(40):  # image cards load when scrolled into view
        if slots.count() >= 2:
            break
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 300)
        page.mouse.wheel(0, 600)
        page.wait_for_timeout(500)
    page.wait_for_function("document.querySelectorAll(\"img[src*='images%2Fslots']\").length >= 2"
                           " && [...document.querySelectorAll(\"img[src*='images%2Fslots']\")]"
                           ".every(e => e.complete && e.naturalWidth > 0)")
    page.screenshot(path=str(tmp_path / "mlflow-image-grid.png"))


def test_mlflow_shows_the_promoted_versions_alias(page, sweep, server, tmp_path):
    from mlflow import MlflowClient

    version = MlflowClient(server.uri).get_model_version_by_alias("web", "champion")
    page.goto(f"{server.uri}/#/models/web/versions/{version.version}")
    page.get_by_text("@\u00a0champion", exact=True).wait_for()  # MLflow's alias tag
    assert page.get_by_text(_record(sweep)["best"]["trial_id"]).count() >= 1  # its description
    page.screenshot(path=str(tmp_path / "mlflow-version.png"))
