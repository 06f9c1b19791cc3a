"""Charts of a device profile, in two steps: pure data, then a Plotly figure.

The roofline shows, for each precision the device runs, the throughput it can reach at a given
arithmetic intensity (ops per byte of weights read): min(peak, bandwidth × intensity).  A model
layer at batch 1 sits far left (≈2 ops per weight), which is why bandwidth, not TOPS, decides
on-device latency.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["roofline_data", "roofline_figure"]

_PEAKS = (("int4", "int4_tops"), ("int8", "int8_tops"), ("fp16", "fp16_tflops"), ("fp32", "fp32_tflops"))


def roofline_data(profile: Any, points: int = 60) -> dict[str, Any]:
    intensities = [10 ** (-1 + 5 * i / (points - 1)) for i in range(points)]  # 0.1 … 10,000 ops/byte
    lines = []
    for label, field in _PEAKS:
        peak = getattr(profile, field)
        if not peak:
            continue
        peak_ops = peak * 1e12
        attainable = [min(peak_ops, profile.bandwidth_gbs * 1e9 * x) / 1e12 for x in intensities]
        ridge = peak_ops / (profile.bandwidth_gbs * 1e9)
        lines.append({"label": label, "peak": peak, "ridge": ridge, "tops": attainable})
    return {
        "name": profile.name,
        "bandwidth_gbs": profile.bandwidth_gbs,
        "intensity": intensities,
        "lines": lines,
    }


def roofline_figure(data: dict[str, Any]) -> dict[str, Any]:
    import plotly.graph_objects as go  # heavy: only when a chart is drawn

    dashes = ["solid", "dash", "dot", "dashdot"]
    fig = go.Figure()
    for i, line in enumerate(data["lines"]):
        fig.add_trace(
            go.Scatter(
                x=data["intensity"],
                y=line["tops"],
                mode="lines",
                name=f"{line['label']} (peak {line['peak']:g} T/s, ridge {line['ridge']:.0f} ops/B)",
                line={"dash": dashes[i % len(dashes)], "width": 2},
                hovertemplate=f"{line['label']}<br>%{{x:.1f}} ops/byte → %{{y:.3f}} T ops/s<extra></extra>",
            )
        )
    fig.add_vline(x=2, line_dash="dot", line_color="grey", annotation_text="batch-1 matmul ≈ 2 ops/weight")
    fig.update_layout(
        title=f"Roofline of {data['name']} (from its profile; {data['bandwidth_gbs']:g} GB/s)",
        xaxis={"title": "arithmetic intensity (ops per byte read)", "type": "log"},
        yaxis={"title": "attainable throughput (T ops/s)", "type": "log"},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"orientation": "h", "y": -0.25},
        height=420,
    )
    return json.loads(fig.to_json())  # plain JSON types (plotly may hold numpy arrays)
