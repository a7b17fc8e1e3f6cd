"""The sweep report: what it computes (short names, Pareto front, coverage, importance, slot
diagnostics) and the page it builds from a sweep's folder and MLflow runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from fake_sweep import make_fake_sweep

from core.names import short_name, short_names
from dashboards.analysis import coverage, param_importance, slot_diagnostics
from dashboards.data import collect
from dashboards.figures import pareto_front
from dashboards.report import build_report


def test_short_names_read_at_a_glance():
    assert short_name("globals.NUM_SLOTS") == "NUM_SLOTS"
    assert short_name("model.losses.loss_ss.temperature") == "tau_ss"
    assert short_name("model.loss_weights.loss_ss") == "w_ss"
    assert short_name("model.loss_weights.loss_featrec") == "w_featrec"
    assert short_name("model.grouper.n_iters") == "n_iters"
    assert short_name("optimizer.lr") == "lr"
    assert short_names(["a.lr", "b.lr", "globals.NUM_SLOTS"]) == {
        "a.lr": "a.lr", "b.lr": "b.lr", "globals.NUM_SLOTS": "NUM_SLOTS"}  # collisions: full


def test_pareto_front_keeps_only_undominated_points():
    points = [(0.1, 0.5), (0.3, 0.4), (0.2, 0.2), (0.3, 0.1), (0.05, 0.5)]
    assert pareto_front(points) == [0, 1]  # (0.2, 0.2), (0.3, 0.1), (0.05, 0.5) are beaten


def test_slot_diagnostics_flag_collapse_and_uniform_masks():
    k, size = 4, 8
    one = np.zeros((2, k, size, size))
    one[:, 2] = 1.0  # slot 3 takes every pixel
    got = slot_diagnostics(one)
    assert got["in_use"] == 1 and got["area"][2] == 1.0
    assert got["collapse"].startswith("slot 3 covers 100%")
    uniform = np.full((2, k, size, size), 1 / k)
    assert "near uniform" in slot_diagnostics(uniform)["collapse"]
    healthy = np.zeros((2, k, size, size))
    for i in range(k):  # each slot owns a quarter of the rows, confidently
        healthy[:, i, i * 2 : i * 2 + 2] = 0.97
    healthy += 0.01
    healthy /= healthy.sum(1, keepdims=True)
    got = slot_diagnostics(healthy)
    assert got["collapse"] is None and got["in_use"] == 4 and got["entropy"] < 0.5


@pytest.fixture(scope="module")
def fake(tmp_path_factory, server):
    return make_fake_sweep(tmp_path_factory.mktemp("storage"), server.uri, trials=12)


def test_collect_reads_states_best_steps_and_curves(fake, server):
    from mlflow import MlflowClient

    data = collect(fake, MlflowClient(server.uri))
    assert len(data.trials) == 12 and data.complete
    states = {t.state for t in data.trials}
    assert {"DONE", "STOPPED", "FAILED"} <= states
    for t in data.trials:
        assert [s for s, _ in t.curves["val/ari"]] == ([4, 8, 12] if t.state == "DONE" else [4])
        assert t.metrics["val/ari"] == max(v for _, v in t.curves["val/ari"])
    assert param_importance(data)  # 12 trials, three varied parameters
    assert sum(param_importance(data).values()) == pytest.approx(1.0)


def test_coverage_names_a_choice_never_tried(fake, server):
    from mlflow import MlflowClient

    data = collect(fake, MlflowClient(server.uri))
    for t in data.trials:
        t.sampled["globals.NUM_SLOTS"] = 3
    assert any("globals.NUM_SLOTS: never tried 4" in w for w in coverage(data))


def _rows(html: str) -> int:
    return len(re.findall(r'<tr class="trial-row', html))


def test_report_of_a_sweep_with_failed_and_stopped_trials(fake, server, tmp_path):
    path = build_report(fake, out=tmp_path / "r.html", tracking_uri=server.uri, masks=False)
    html = path.read_text()
    assert _rows(html) == 12
    assert "stopped by ASHA" in html and "failed" in html and "&#9733;" in html
    for section in ("leaderboard", "effects", "pareto", "curves", "masks", "diagnostics",
                    "lineage"):
        assert f'id="{section}"' in html
    assert html.count('class="plotly-graph-div"') >= 5  # effects, parallel, importance, ...
    assert "<script src=" not in html  # plotly inlined: works offline
    for short in ("NUM_SLOTS", "tau_ss", "w_ss"):
        assert f"<th>{short}</th>" in html


def test_report_while_trials_run_and_with_one_trial(tmp_path, server):
    running = make_fake_sweep(tmp_path / "a", server.uri, trials=5, name="live", running=2,
                              complete=False)
    html = build_report(running, tracking_uri=server.uri, masks=False, log=False).read_text()
    assert _rows(html) == 5 and "2 running" in html and "running</span>" in html
    one = make_fake_sweep(tmp_path / "b", server.uri, trials=1, name="single", seed=3)
    html = build_report(one, tracking_uri=server.uri, masks=False).read_text()
    assert _rows(html) == 1
    assert "Parameter importance needs at least 3 trials" in html


def test_report_of_an_unknown_sweep_lists_the_sweeps(tmp_path, monkeypatch, capsys):
    from dashboards.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sweeps" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "sweeps" / "mine" / "sweep.yaml").write_text("name: mine\n")
    assert main(["report", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no sweep nope" in err and "mine" in err, err


def test_report_written_by_a_real_sweep(tmp_path, server, monkeypatch, capsys):
    """`slotsweep sweep` on the quickstart (real training): the report refreshes while trials
    run and is written whole at the end (masks of the top trials at their best step, every
    trial's slot diagnostics), logged to the parent run, its path printed."""
    from mlflow import MlflowClient

    import dashboards.cli as top
    import orchestrator.sweep as sweeps

    calls = []
    refresh = top._refresh
    monkeypatch.setattr(sweeps, "PROGRESS_EVERY_S", 2.0)
    monkeypatch.setattr(top, "_refresh", lambda d, u, final: (calls.append(final),
                                                              refresh(d, u, final)))
    storage = tmp_path / "sweeps"
    quick = Path(__file__).resolve().parents[2] / "sweeps" / "quickstart.yaml"
    assert top.main(["sweep", str(quick), f"storage={storage}", "name=rep",
                     f"mlflow.tracking_uri={server.uri}", "mlflow.experiment=rep", "trials=2",
                     "trainer.max_steps=4"]) == 0
    out = capsys.readouterr().out
    path = storage / "rep" / "report.html"
    assert f"report: {path}" in out
    assert calls[-1] is True and False in calls  # refreshed during the run, then whole
    html = path.read_text()
    assert _rows(html) == 2 and html.count('class="mask"') == 2
    assert "slot 1" not in html  # row labels are drawn into the images, not the page
    assert re.search(r"<td class=\"num\">\d / \d</td>", html)  # diagnostics: slots in use
    client = MlflowClient(server.uri)
    parent = client.search_runs([client.get_experiment_by_name("rep").experiment_id],
                                filter_string="tags.`slotsweep.kind` = 'sweep'")[0]
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    from orchestrator.registry import promote

    promote(storage / "rep", name="rep-model", tracking_uri=server.uri)
    again = build_report(storage / "rep", tracking_uri=server.uri, top_k=1, log=False).read_text()
    assert again.count('class="mask"') == 1  # kept panels, drawn once
    assert "rep-model v1 @champion" in again  # lineage: the registered version and its alias


def test_leaderboard_order_follows_the_selection_rule_with_its_tie_break(fake, server):
    from mlflow import MlflowClient

    from dashboards.report import _ranked

    data = collect(fake, MlflowClient(server.uri))
    data.tie_break = "val/mbo"
    a, b, c = data.trials[:3]
    a.metrics = {"val/ari": 0.5, "val/mbo": 0.1}
    b.metrics = {"val/ari": 0.5, "val/mbo": 0.3}  # ties with a on val/ari, wins on val/mbo
    c.metrics = {}  # never validated: last
    data.trials = [c, a, b]
    assert [t.trial_id for t in _ranked(data)] == [b.trial_id, a.trial_id, c.trial_id]


def test_log_axes_label_one_two_and_five_of_each_decade():
    from dashboards.figures import _log_ticks

    assert _log_ticks(0.05, 0.3)["tickvals"] == [0.05, 0.1, 0.2]  # not 0.2, 0.25, 0.3 crowded
    assert _log_ticks(0.05, 0.3)["ticktext"] == ["0.05", "0.1", "0.2"]
    assert _log_ticks(1e-5, 1e-1) == {}  # four decades: plotly's decade labels are fine


def test_downstream_columns_have_short_titles():
    from dashboards.report import column_title

    assert column_title("val/mbo") == "val/mbo"
    assert column_title("downstream/4way_classification/accuracy") == "4-way accuracy"
    assert column_title("downstream/few_shot/5shot_accuracy") == "few-shot 5-shot accuracy"
    assert column_title("downstream/linear_probe/backbone/accuracy") == \
        "probe backbone/accuracy"
