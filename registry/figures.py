"""Dashboard charts in two steps: a pure function shapes the data, another turns it into a Plotly
figure (a plain dict in Plotly's JSON schema, which the page hands to `Plotly.newPlot`).

Figures are built as dicts rather than through `plotly.graph_objects`: the schema is the same,
building is ~50× faster (a device page stays well inside its server-time budget) and tests read
them without a browser.  Every axis names its unit, every hover names the variant and its numbers
with their provenance, and every series differs by marker symbol or dash as well as by colour.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BIG_POINT_COUNT",
    "PRECISION_BITS",
    "exit_rate_data",
    "exit_rate_figure",
    "front_data",
    "front_figure",
    "precision_heatmap_data",
    "precision_heatmap_figure",
    "predicted_vs_measured_data",
    "predicted_vs_measured_figure",
    "sensitivity_data",
    "sensitivity_figure",
]

#: Above this many points a series is drawn with WebGL (scattergl): SVG slows down past it.
BIG_POINT_COUNT = 1000
PRECISION_BITS: dict[str, int] = {
    "fp32": 32,
    "fp16": 16,
    "bf16": 16,
    "fp8": 8,
    "int8": 8,
    "int4": 4,
    "int3": 3,
    "int2": 2,
}
_MIB = 2**20
_MARGIN = {"l": 70, "r": 20, "t": 50, "b": 60}


def _scatter_type(n: int) -> str:
    return "scattergl" if n > BIG_POINT_COUNT else "scatter"


def _layout(title: str, x_title: str, y_title: str, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "title": {"text": title},
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}},
        "margin": dict(_MARGIN),
        "legend": {"orientation": "h", "y": -0.25},
        "height": 440,
    }
    for key, value in extra.items():
        if key in ("xaxis", "yaxis"):
            layout[key].update(value)
        else:
            layout[key] = value
    return layout


# --------------------------------------------------------------------------- Pareto front of a device


def front_data(
    trials: list[dict[str, Any]],
    candidates: list[dict[str, Any]],
    front_keys: list[str],
    chosen_key: str | None,
    feasible_keys: set[str],
) -> dict[str, Any]:
    """Split a device's points for its Pareto chart.

    `trials`: search trials (accuracy estimated by the proxy, latency/memory predicted) with a
    `feasible` flag; `candidates`: confirmed variants (accuracy measured) with a key; the front
    and the recommended key come from the recommendation; `feasible_keys` are the candidates
    meeting every constraint of the policy.
    """
    by_key = {c["key"]: c for c in candidates}
    front = sorted((by_key[k] for k in front_keys if k in by_key), key=lambda c: c["latency_ms"])
    return {
        "trials_feasible": [t for t in trials if t.get("feasible", True)],
        "trials_infeasible": [t for t in trials if not t.get("feasible", True)],
        "feasible": [c for c in candidates if c["key"] in feasible_keys and c["key"] not in front_keys],
        "infeasible": [c for c in candidates if c["key"] not in feasible_keys],
        "front": front,
        "chosen": by_key.get(chosen_key) if chosen_key else None,
        "max_memory": max((c["memory_bytes"] for c in candidates), default=1) or 1,
    }


def _trial_trace(points: list[dict[str, Any]], name: str, color: str, symbol: str) -> dict[str, Any]:
    return {
        "type": _scatter_type(len(points)),
        "mode": "markers",
        "name": f"{name} ({len(points):,})",
        # rounded far below what a pixel or the hover shows: a 10,000-point page stays small
        "x": [round(p["latency_ms"], 4) for p in points],
        "y": [round(p["accuracy"] * 100, 3) for p in points],
        "customdata": [[p.get("trial", i), round(p["memory_bytes"] / _MIB, 1)] for i, p in enumerate(points)],
        "marker": {"color": color, "symbol": symbol, "size": 5},
        "hovertemplate": (
            "trial %{customdata[0]}<br>accuracy %{y:.2f} % (estimated)<br>"
            "latency %{x:.3f} ms (predicted)<br>memory %{customdata[1]:.1f} MiB (predicted)"
            f"<extra>{name}</extra>"
        ),
    }


def _candidate_hover(c: dict[str, Any]) -> str:
    return (
        f"{c.get('label') or c['key']}<br>accuracy {c['accuracy'] * 100:.2f} %"
        f" ({c.get('accuracy_source', 'measured')})"
        f"<br>latency {c['latency_ms']:.3f} ms ({c.get('latency_source', 'predicted')})"
        f"<br>memory {c['memory_bytes'] / _MIB:.1f} MiB (predicted)"
    )


def _sizes(points: list[dict[str, Any]], max_memory: float) -> list[float]:
    return [7 + 13 * p["memory_bytes"] / max_memory for p in points]


def front_figure(data: dict[str, Any], title: str) -> dict[str, Any]:
    traces: list[dict[str, Any]] = []
    if data["trials_infeasible"]:
        traces.append(
            _trial_trace(data["trials_infeasible"], "infeasible trials", "rgba(150,150,150,0.45)", "x")
        )
    if data["trials_feasible"]:
        traces.append(
            _trial_trace(data["trials_feasible"], "feasible trials", "rgba(31,95,191,0.35)", "circle-open")
        )
    for key, name, color, symbol in (
        ("infeasible", "variant breaking a constraint", "rgba(140,140,140,0.8)", "x-thin-open"),
        ("feasible", "feasible variant", "#1f5fbf", "square"),
    ):
        points = data[key]
        if not points:
            continue
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": f"{name} (accuracy measured)",
                "x": [p["latency_ms"] for p in points],
                "y": [p["accuracy"] * 100 for p in points],
                "text": [_candidate_hover(p) for p in points],
                "hoverinfo": "text",
                "marker": {
                    "color": color,
                    "symbol": symbol,
                    "size": _sizes(points, data["max_memory"]),
                    "line": {"width": 1, "color": color},
                },
            }
        )
    front = data["front"]
    traces.append(
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "Pareto front (marker size = memory)",
            "x": [p["latency_ms"] for p in front],
            "y": [p["accuracy"] * 100 for p in front],
            "text": [_candidate_hover(p) for p in front],
            "hoverinfo": "text",
            "line": {"shape": "hv", "color": "#1d2330", "dash": "dot"},
            "marker": {
                "symbol": "diamond",
                "color": "#e07b00",
                "size": _sizes(front, data["max_memory"]),
                "line": {"color": "#1d2330", "width": 1},
            },
        }
    )
    chosen = data["chosen"]
    if chosen:
        traces.append(
            {
                "type": "scatter",
                "mode": "markers+text",
                "name": "recommended",
                "x": [chosen["latency_ms"]],
                "y": [chosen["accuracy"] * 100],
                "text": ["recommended"],
                "textposition": "top center",
                "hovertext": [_candidate_hover(chosen)],
                "hoverinfo": "text",
                "marker": {
                    "symbol": "star",
                    "size": 20,
                    "color": "#2d8a2d",
                    "line": {"color": "#111", "width": 1},
                },
            }
        )
    return {
        "data": traces,
        "layout": _layout(
            title,
            "latency per request (ms, predicted for this device unless marked measured)",
            "accuracy on the held-out split (%)",
        ),
    }


# --------------------------------------------------------------------------- precision heatmap


def precision_heatmap_data(tensors: list[dict[str, Any]], variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows = variants, columns = tensors in model order; each cell the tensor's precision.

    `tensors`: the spec's tensors ({"name", "block", "kind"}); `variants`: {"id", "name",
    "plan"} with the plan's "schemes" (tensors not named are fp32)."""
    names = [t["name"] for t in tensors]
    rows = []
    for v in variants:
        schemes = (v.get("plan") or {}).get("schemes") or {}
        precisions = [(schemes.get(n) or {}).get("precision", "fp32") for n in names]
        rows.append(
            {
                "id": v["id"],
                "label": f"#{v['id']} {v['name']}"[:60],
                "precisions": precisions,
                "bits": [PRECISION_BITS.get(p, 32) for p in precisions],
            }
        )
    return {"tensors": names, "short": [_short_tensor(n) for n in names], "rows": rows}


def _short_tensor(name: str) -> str:
    """encoder.layer.3.attention.self.query.weight → L3 query; embeddings.word_… → emb word."""
    parts = name.replace(".weight", "").split(".")
    if "layer" in parts:
        i = parts.index("layer")
        block = parts[i + 1] if i + 1 < len(parts) else "?"
        rest = [p for p in parts[i + 2 :] if p not in {"attention", "self", "dense"}] or parts[-1:]
        return f"L{block} {'.'.join(rest)}"
    if parts and parts[0] == "embeddings":
        return "emb " + (parts[1].replace("_embeddings", "") if len(parts) > 1 else "")
    return ".".join(parts[-2:])


def precision_heatmap_figure(data: dict[str, Any]) -> dict[str, Any]:
    rows = data["rows"]
    # A discrete scale over log2(bits): 2 … 32 bits; the cell text names the precision so the
    # chart reads without colour.
    import math

    z = [[math.log2(b) for b in r["bits"]] for r in rows]
    colorscale = [
        [0.0, "#7b1f1f"],
        [0.25, "#d6604d"],
        [0.5, "#f4a582"],
        [0.75, "#92c5de"],
        [1.0, "#2166ac"],
    ]
    trace = {
        "type": "heatmap",
        "x": data["short"],
        "y": [r["label"] for r in rows],
        "z": z,
        "zmin": 1,
        "zmax": 5,
        "colorscale": colorscale,
        "text": [[p.replace("int", "i").replace("fp", "f") for p in r["precisions"]] for r in rows],
        "texttemplate": "%{text}",
        "textfont": {"size": 9},
        "customdata": [
            [[full, bits] for full, bits in zip(r["precisions"], r["bits"], strict=True)] for r in rows
        ],
        "hovertemplate": "%{y}<br>tensor %{x}<br>%{customdata[0]} (%{customdata[1]} bits)<extra></extra>",
        "colorbar": {
            "title": {"text": "bits per weight"},
            "tickvals": [1, 2, 3, 4, 5],
            "ticktext": ["2", "4", "8", "16", "32"],
        },
        "xgap": 1,
        "ygap": 1,
    }
    height = max(260, 90 + 26 * len(rows))
    return {
        "data": [trace],
        "layout": _layout(
            "Precision per tensor (i4 = int4, f16 = fp16, …)",
            "tensor (model order: embeddings, then block by block)",
            "variant",
            height=height,
            xaxis={"tickangle": -60, "tickfont": {"size": 9}},
            yaxis={"automargin": True, "autorange": "reversed"},
            margin={"l": 220, "r": 20, "t": 50, "b": 110},
        ),
    }


# --------------------------------------------------------------------------- sensitivity


def sensitivity_data(sensitivity: dict[str, Any] | None, metric: str = "kl") -> dict[str, Any] | None:
    """Per tensor and precision, the fidelity loss measured with only that tensor quantized."""
    if not sensitivity or metric not in (sensitivity.get("losses") or {}):
        return None
    precisions = list(sensitivity["precisions"])
    losses = sensitivity["losses"][metric]
    tensors = list(sensitivity["tensors"])
    series = []
    for j, precision in enumerate(precisions):
        if precision == "fp32":
            continue  # the reference: zero loss by definition
        series.append({"precision": precision, "values": [float(row[j]) for row in losses]})
    return {
        "metric": metric,
        "tensors": tensors,
        "short": [_short_tensor(t) for t in tensors],
        "series": series,
        "split": sensitivity.get("split", ""),
        "n_examples": sensitivity.get("n_examples", 0),
        "provenance": sensitivity.get("provenance", ""),
    }


_METRIC_TITLES = {
    "kl": "KL divergence from FP32 (nats, log scale)",
    "disagreement": "top-1 disagreement with FP32 (fraction, log scale)",
    "cosine": "1 − cosine of embeddings with FP32 (log scale)",
}
_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "x", "star", "hexagon"]
_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


def sensitivity_figure(data: dict[str, Any]) -> dict[str, Any]:
    traces = []
    floor = 1e-7  # log axis: a zero loss is drawn at the floor, the hover says 0
    for i, s in enumerate(data["series"]):
        traces.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": s["precision"],
                "x": data["short"],
                "y": [max(v, floor) for v in s["values"]],
                "customdata": [[t, v] for t, v in zip(data["tensors"], s["values"], strict=True)],
                "marker": {"symbol": _SYMBOLS[i % len(_SYMBOLS)], "size": 7},
                "line": {"dash": _DASHES[i % len(_DASHES)], "width": 1.5},
                "hovertemplate": (
                    f"{s['precision']}<br>%{{customdata[0]}}<br>{data['metric']} %{{customdata[1]:.3g}}"
                    "<extra>measured, one tensor quantized</extra>"
                ),
            }
        )
    return {
        "data": traces,
        "layout": _layout(
            f"Loss with one tensor quantized (measured, {data['n_examples']} {data['split']} examples)",
            "tensor (model order)",
            _METRIC_TITLES.get(data["metric"], data["metric"]),
            yaxis={"type": "log"},
            xaxis={"tickangle": -60, "tickfont": {"size": 9}},
            margin={"l": 70, "r": 20, "t": 50, "b": 110},
        ),
    }


# --------------------------------------------------------------------------- exit rates


def exit_rate_data(exit_points: list[int], variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of examples answered at each exit for variants that may stop early.

    `exit_points`: blocks after which the model may stop (0-based; the last one is the full
    model); `variants`: {"id", "name", "exit_fraction", "exit_threshold", "mean_layers"}."""
    rows = []
    for v in variants:
        fractions = v.get("exit_fraction")
        if not fractions or len(fractions) != len(exit_points):
            continue
        rows.append(
            {
                "id": v["id"],
                "label": f"#{v['id']} {v['name']}"[:50],
                "fractions": [float(f) for f in fractions],
                "threshold": v.get("exit_threshold"),
                "mean_layers": v.get("mean_layers"),
            }
        )
    return {"layers": [f"after layer {b + 1}" for b in exit_points], "rows": rows}


_PATTERNS = ["", "/", ".", "x", "-", "|", "+", "\\"]


def exit_rate_figure(data: dict[str, Any]) -> dict[str, Any]:
    traces = []
    for i, r in enumerate(data["rows"]):
        threshold = (
            "no early exit" if r["threshold"] is None else f"exit at confidence ≥ {r['threshold']:.2f}"
        )
        traces.append(
            {
                "type": "bar",
                "name": r["label"],
                "x": data["layers"],
                "y": [f * 100 for f in r["fractions"]],
                "marker": {"pattern": {"shape": _PATTERNS[i % len(_PATTERNS)]}},
                "hovertemplate": (
                    f"{r['label']}<br>{threshold}<br>%{{x}}: %{{y:.1f}} % of examples answered"
                    f"<br>mean layers run {r['mean_layers'] or 0:.2f}<extra>measured</extra>"
                ),
            }
        )
    return {
        "data": traces,
        "layout": _layout(
            "Where examples leave the model (early exit; held-out split, measured)",
            "exit point",
            "examples answered there (%)",
            barmode="group",
            height=380,
        ),
    }


# --------------------------------------------------------------------------- predicted vs measured


def predicted_vs_measured_data(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`rows`: {"label", "predicted_ms", "measured_ms", "error_pct", "calibrated"} per measured
    variant (`registry.calibration.predicted_vs_measured`); rows are not modified."""
    needed = ("predicted_ms", "measured_ms", "error_pct")
    points = [r for r in rows if all(r.get(k) is not None for k in needed)]
    top = max([p["predicted_ms"] for p in points] + [p["measured_ms"] for p in points], default=1.0)
    return {"points": points, "top": top}


def predicted_vs_measured_figure(data: dict[str, Any], title: str) -> dict[str, Any]:
    traces: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "prediction = measurement",
            "x": [0, data["top"] * 1.1],
            "y": [0, data["top"] * 1.1],
            "line": {"dash": "dash", "color": "#888"},
            "hoverinfo": "skip",
        }
    ]
    for calibrated, name, symbol in (
        (False, "default cost model", "circle-open"),
        (True, "calibrated", "diamond"),
    ):
        points = [p for p in data["points"] if bool(p.get("calibrated")) == calibrated]
        if not points:
            continue
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": f"{name} ({len(points)})",
                "x": [p["measured_ms"] for p in points],
                "y": [p["predicted_ms"] for p in points],
                "text": [
                    f"{p['label']}<br>measured {p['measured_ms']:.3f} ms"
                    f"<br>predicted {p['predicted_ms']:.3f} ms"
                    f" ({name})<br>error {p['error_pct']:+.1f} %"
                    for p in points
                ],
                "hoverinfo": "text",
                "marker": {"symbol": symbol, "size": 10},
            }
        )
    return {
        "data": traces,
        "layout": _layout(
            title,
            "measured latency on the device (ms, p50)",
            "predicted latency (ms)",
            height=380,
        ),
    }
