"""Charts of planning runs, in two steps: pure data from the run/study, then Plotly figures."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["hypervolume_figure", "pareto_data", "pareto_figure"]


def pareto_data(
    trials: list[dict[str, Any]], front: list[dict[str, Any]], chosen_key: str | None
) -> dict[str, Any]:
    """Split trials into feasible / infeasible (estimated accuracy, predicted latency) and the
    measured front, marking the recommended variant."""
    feasible = [t for t in trials if t["feasible"]]
    infeasible = [t for t in trials if not t["feasible"]]
    chosen = [c for c in front if chosen_key and c["key"] == chosen_key]
    return {"feasible": feasible, "infeasible": infeasible, "front": front, "chosen": chosen}


def _hover(points: list[dict[str, Any]], source: str) -> list[str]:
    return [
        f"{p.get('label') or ('trial ' + str(p.get('trial')))}<br>accuracy {p['accuracy']:.4f} ({source})"
        f"<br>latency {p['latency_ms']:.3f} ms (predicted)"
        f"<br>memory {p['memory_bytes'] / 2**20:.1f} MiB (predicted)"
        for p in points
    ]


def pareto_figure(data: dict[str, Any], title: str) -> dict[str, Any]:
    import plotly.graph_objects as go  # heavy: only when a chart is drawn

    fig = go.Figure()
    for key, name, color, symbol in (
        ("infeasible", "infeasible trials (estimated)", "rgba(160,160,160,0.45)", "x"),
        ("feasible", "feasible trials (estimated)", "rgba(31,95,191,0.35)", "circle-open"),
    ):
        points = data[key]
        fig.add_trace(
            go.Scattergl(
                x=[p["latency_ms"] for p in points],
                y=[p["accuracy"] * 100 for p in points],
                mode="markers",
                name=name,
                marker={"color": color, "symbol": symbol, "size": 6},
                hovertext=_hover(points, "estimated"),
                hoverinfo="text",
            )
        )
    front = sorted(data["front"], key=lambda p: p["latency_ms"])
    fig.add_trace(
        go.Scatter(
            x=[p["latency_ms"] for p in front],
            y=[p["accuracy"] * 100 for p in front],
            mode="lines+markers",
            name="Pareto front (accuracy measured)",
            line={"shape": "hv", "color": "#1d2330"},
            marker={
                "size": [6 + 14 * p["memory_bytes"] / max(q["memory_bytes"] for q in front) for p in front]
                if front
                else [],
                "symbol": "diamond",
                "color": "#e07b00",
                "line": {"color": "#1d2330", "width": 1},
            },
            hovertext=_hover(front, "measured"),
            hoverinfo="text",
        )
    )
    if data["chosen"]:
        chosen = data["chosen"][0]
        fig.add_trace(
            go.Scatter(
                x=[chosen["latency_ms"]],
                y=[chosen["accuracy"] * 100],
                mode="markers+text",
                name="recommended",
                text=["recommended"],
                textposition="top center",
                marker={
                    "size": 18,
                    "symbol": "star",
                    "color": "#2d8a2d",
                    "line": {"color": "#111", "width": 1},
                },
                hovertext=_hover([chosen], "measured"),
                hoverinfo="text",
            )
        )
    fig.update_layout(
        title=title,
        xaxis={"title": "latency per request (ms, predicted for this device)"},
        yaxis={"title": "accuracy on the held-out split (%)"},
        legend={"orientation": "h", "y": -0.2},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        height=440,
    )
    return json.loads(fig.to_json())


def hypervolume_figure(history: list[dict[str, Any]], device_names: dict[str, str]) -> dict[str, Any]:
    import plotly.graph_objects as go

    fig = go.Figure()
    by_device: dict[str, list[dict[str, Any]]] = {}
    for point in history:
        by_device.setdefault(str(point["device"]), []).append(point)
    for device, points in by_device.items():
        fig.add_trace(
            go.Scatter(
                x=[p["trials"] for p in points],
                y=[p["hypervolume"] for p in points],
                mode="lines+markers",
                name=device_names.get(device, device),
            )
        )
    fig.update_layout(
        title="Hypervolume of the estimated front per device",
        xaxis={"title": "trials done"},
        yaxis={"title": "hypervolume (normalised, higher is better)"},
        height=320,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
    )
    return json.loads(fig.to_json())
