"""The report's charts, drawn with plotly (its JavaScript is inlined once by the page): each
function takes a :class:`dashboards.data.SweepData` and returns a figure, or None when the
sweep has nothing to draw yet."""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.names import METRIC_ARI, METRIC_MBO
from dashboards.data import CURVES, SweepData, Trial
from orchestrator.progress import STOPPED

CATEGORICAL = ("choice", "grid")  # search kinds drawn on a categorical axis
STATE_COLOURS = {"DONE": "#1f77b4", "STOPPED": "#ff7f0e", "DIVERGED": "#d62728",
                 "FAILED": "#7f7f7f", "RUNNING": "#2ca02c", "INTERRUPTED": "#9467bd"}
LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
          "font": {"size": 13}}


def _scored(data: SweepData) -> list[Trial]:
    return [t for t in data.trials if data.metric in t.metrics]


def _axis_value(value: Any) -> Any:
    return str(value) if isinstance(value, (list, tuple, dict)) else value


def _log_ticks(low: float, high: float) -> dict[str, Any]:
    """Ticks 1, 2 and 5 of each decade in [low, high] (plotly's own label every digit within
    two decades, and 0.2, 0.25, 0.3 overlap); its defaults when the range spans more."""
    if high / low > 100:
        return {}
    values = [m * 10.0 ** e for e in range(math.floor(math.log10(low)),
                                           math.ceil(math.log10(high)) + 1) for m in (1, 2, 5)]
    values = [v for v in values if low <= v <= high]
    return {"tickmode": "array", "tickvals": values, "ticktext": [f"{v:g}" for v in values]}


def effects(data: SweepData) -> go.Figure | None:
    """val/ari (top row) and val/mbo (bottom row) against each searched value, one column per
    parameter; a categorical axis for choice and grid dimensions, a log axis for log ranges."""
    keys = list(data.search)
    trials = [t for t in data.trials if t.metrics]
    if not keys or not trials:
        return None
    fig = make_subplots(rows=2, cols=len(keys), shared_yaxes="rows",
                        subplot_titles=[data.labels[k] for k in keys],
                        horizontal_spacing=min(0.08, 0.5 / len(keys)), vertical_spacing=0.12)
    shown: set[str] = set()
    for col, key in enumerate(keys, start=1):
        dist = data.search[key]
        for row, metric in enumerate(CURVES, start=1):
            for state in sorted({t.state for t in trials}):
                group = [t for t in trials if t.state == state and metric in t.metrics]
                if not group:
                    continue
                fig.add_trace(go.Scatter(
                    x=[_axis_value(t.sampled.get(key)) for t in group],
                    y=[t.metrics[metric] for t in group], mode="markers",
                    marker={"size": 10, "color": STATE_COLOURS.get(state, "#333"),
                            "line": {"width": 1, "color": "white"}},
                    name=state.lower(), legendgroup=state, showlegend=state not in shown,
                    text=[t.trial_id for t in group],
                    hovertemplate=f"%{{text}}<br>{data.labels[key]}=%{{x}}<br>{metric}=%{{y:.4f}}"
                                  "<extra></extra>",
                ), row=row, col=col)
                shown.add(state)
            if dist.kind in CATEGORICAL:
                fig.update_xaxes(type="category", row=row, col=col,
                                 categoryorder="array",
                                 categoryarray=[_axis_value(v) for v in dist.args])
            else:  # the whole searched range, so a reader sees where the draws fell
                low, high = float(dist.args[0]), float(dist.args[1])
                if "log" in dist.kind:
                    fig.update_xaxes(type="log", range=[math.log10(low), math.log10(high)],
                                     row=row, col=col, **_log_ticks(low, high))
                else:
                    pad = (high - low) * 0.05
                    fig.update_xaxes(range=[low - pad, high + pad], row=row, col=col)
    fig.update_yaxes(title_text=METRIC_ARI, row=1, col=1)
    fig.update_yaxes(title_text=METRIC_MBO, row=2, col=1)
    fig.update_layout(height=560, width=max(700, 300 * len(keys)),
                      title="Each searched value against val/ari and val/mbo", **LAYOUT)
    return fig


def parallel(data: SweepData) -> go.Figure | None:
    """Parallel coordinates of every scored trial: its searched values, then val/ari and
    val/mbo; lines coloured by the selection metric."""
    trials = _scored(data)
    if not trials:
        return None
    dims = []
    for key, dist in data.search.items():
        values = [t.sampled.get(key) for t in trials]
        if dist.kind in CATEGORICAL:
            labels = [_axis_value(v) for v in dist.args]
            index = {label: i for i, label in enumerate(labels)}
            dims.append({"label": data.labels[key], "tickvals": list(range(len(labels))),
                         "range": [0, max(1, len(labels) - 1)],
                         "ticktext": [str(v) for v in labels],
                         "values": [index.get(_axis_value(v), -1) for v in values]})
        else:
            dims.append({"label": data.labels[key], "values": [float(v) for v in values]})
    for metric in CURVES:
        dims.append({"label": metric, "values": [t.metrics.get(metric, math.nan) for t in trials]})
    colour = [t.metrics[data.metric] for t in trials]
    fig = go.Figure(go.Parcoords(
        line={"color": colour, "colorscale": "Viridis", "showscale": True,
              "colorbar": {"title": {"text": data.metric}}},
        dimensions=dims))
    fig.update_layout(height=480, title=f"Searched values of each trial, coloured by {data.metric}",
                      **{**LAYOUT, "margin": {"l": 70, "r": 40, "t": 110, "b": 40}})
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (larger is better)."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c >= a and d >= b) and (c > a or d > b) for c, d in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto(data: SweepData) -> go.Figure | None:
    """val/ari against val/mbo at each trial's best step; the Pareto front joined by a line."""
    trials = [t for t in data.trials if METRIC_ARI in t.metrics and METRIC_MBO in t.metrics]
    if not trials:
        return None
    points = [(t.metrics[METRIC_ARI], t.metrics[METRIC_MBO]) for t in trials]
    front = pareto_front(points)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", name="trial",
        marker={"size": 10, "color": [STATE_COLOURS.get(t.state, "#333") for t in trials]},
        text=[t.trial_id for t in trials],
        hovertemplate="%{text}<br>val/ari=%{x:.4f}<br>val/mbo=%{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(
        x=[points[i][0] for i in front], y=[points[i][1] for i in front], mode="lines+markers",
        name="Pareto front", line={"color": "#d62728", "width": 2},
        marker={"size": 14, "symbol": "circle-open", "color": "#d62728"},
        text=[trials[i].trial_id for i in front], hoverinfo="text"))
    fig.update_layout(height=460, xaxis_title=METRIC_ARI, yaxis_title=METRIC_MBO,
                      title="val/ari against val/mbo (best step of each trial)", **LAYOUT)
    return fig


def curves(data: SweepData) -> go.Figure | None:
    """val/ari and val/mbo over steps for every trial; a star at the best step, a cross where
    the scheduler stopped a trial."""
    trials = [t for t in data.trials if any(t.curves.get(m) for m in CURVES)]
    if not trials:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=list(CURVES), horizontal_spacing=0.08)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf"]
    for i, t in enumerate(trials):
        colour = palette[i % len(palette)]
        for col, metric in enumerate(CURVES, start=1):
            points = t.curves.get(metric) or []
            if not points:
                continue
            fig.add_trace(go.Scatter(
                x=[s for s, _ in points], y=[v for _, v in points], mode="lines+markers",
                line={"color": colour, "width": 1.5}, marker={"size": 5}, name=t.trial_id,
                legendgroup=t.trial_id, showlegend=col == 1,
                hovertemplate=f"{t.trial_id}<br>step %{{x}}<br>{metric}=%{{y:.4f}}<extra></extra>",
            ), row=1, col=col)
            best = [(s, v) for s, v in points if s == t.step]
            if best:
                fig.add_trace(go.Scatter(
                    x=[best[0][0]], y=[best[0][1]], mode="markers", showlegend=False,
                    legendgroup=t.trial_id, hovertemplate=f"{t.trial_id}: best step %{{x}}"
                                                          "<extra></extra>",
                    marker={"symbol": "star", "size": 15, "color": colour,
                            "line": {"width": 1, "color": "black"}}), row=1, col=col)
            if t.state == STOPPED:
                s, v = points[-1]
                fig.add_trace(go.Scatter(
                    x=[s], y=[v], mode="markers", showlegend=False, legendgroup=t.trial_id,
                    hovertemplate=f"{t.trial_id}: stopped by the scheduler at step %{{x}}"
                                  "<extra></extra>",
                    marker={"symbol": "x", "size": 13, "color": "black"}), row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=460, title="Validation over training (star: best step; "
                                        "x: stopped by the scheduler)", **LAYOUT)
    return fig


def importance(values: dict[str, float], metric: str,
               labels: dict[str, str]) -> go.Figure | None:
    """A bar per searched parameter: its importance for ``metric`` (fANOVA, sums to 1)."""
    if not values:
        return None
    keys = sorted(values, key=values.get)
    fig = go.Figure(go.Bar(x=[values[k] for k in keys], y=[labels[k] for k in keys],
                           orientation="h", marker={"color": "#1f77b4"},
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(height=120 + 40 * len(keys), xaxis_title=f"importance for {metric}",
                      title=f"Which parameter moves {metric} (Optuna, fANOVA)", **LAYOUT)
    return fig
