"""Dashboard charts are pure functions: data first, then a Plotly figure — no browser needed."""

from __future__ import annotations

import copy
import json

from registry import figures as figs


def _trial(i: int, feasible: bool = True) -> dict:
    return {
        "trial": i,
        "accuracy": 0.7,
        "latency_ms": 10.0 + i,
        "memory_bytes": 30 * 2**20,
        "feasible": feasible,
    }


def _cand(key: str, acc: float, lat: float, mem_mib: float, label: str) -> dict:
    return {
        "key": key,
        "label": label,
        "accuracy": acc,
        "latency_ms": lat,
        "latency_s": lat / 1000,
        "memory_bytes": int(mem_mib * 2**20),
        "accuracy_source": "measured",
        "latency_source": "predicted",
    }


def test_the_front_chart_marks_infeasible_front_and_recommended_points():
    candidates = [
        _cand("a", 0.80, 40, 40, "all int8"),
        _cand("b", 0.79, 20, 30, "mixed"),
        _cand("c", 0.60, 90, 50, "bad"),
    ]
    data = figs.front_data([_trial(0), _trial(1, False)], candidates, ["b", "a"], "a", {"a", "b"})
    assert [c["key"] for c in data["front"]] == ["b", "a"]  # by latency
    assert [c["key"] for c in data["infeasible"]] == ["c"]
    fig = figs.front_figure(data, "Demo on Phone")
    json.dumps(fig)  # plain JSON
    names = [t["name"] for t in fig["data"]]
    assert any(n.startswith("infeasible trials") for n in names)
    assert "recommended" in names
    symbols = {t["name"]: t["marker"]["symbol"] for t in fig["data"]}
    assert len(set(symbols.values())) == len(symbols), "every series has its own marker symbol"
    star = next(t for t in fig["data"] if t["name"] == "recommended")
    assert star["text"] == ["recommended"] and "all int8" in star["hovertext"][0]
    assert "(ms" in fig["layout"]["xaxis"]["title"]["text"]
    assert "(%)" in fig["layout"]["yaxis"]["title"]["text"]
    front = next(t for t in fig["data"] if t["name"].startswith("Pareto front"))
    assert "accuracy 79.00 % (measured)" in front["text"][0] and "MiB" in front["text"][0]
    assert front["marker"]["size"][0] < front["marker"]["size"][1], "marker size follows memory"


def test_many_trial_points_are_drawn_with_webgl_and_few_with_svg():
    few = figs.front_figure(figs.front_data([_trial(i) for i in range(10)], [], [], None, set()), "t")
    many = figs.front_figure(figs.front_data([_trial(i) for i in range(5000)], [], [], None, set()), "t")
    assert few["data"][0]["type"] == "scatter"
    assert many["data"][0]["type"] == "scattergl"
    assert "trial %{customdata[0]}" in many["data"][0]["hovertemplate"]


def test_the_precision_heatmap_names_each_cell():
    tensors = [
        {"name": "embeddings.word_embeddings.weight"},
        {"name": "encoder.layer.2.attention.self.query.weight"},
    ]
    data = figs.precision_heatmap_data(
        tensors,
        [{"id": 7, "name": "mixed", "plan": {"schemes": {tensors[1]["name"]: {"precision": "int4"}}}}],
    )
    assert data["rows"][0]["precisions"] == ["fp32", "int4"]
    assert data["rows"][0]["bits"] == [32, 4]
    assert data["short"] == ["emb word", "L2 query"]
    fig = figs.precision_heatmap_figure(data)
    assert fig["data"][0]["text"] == [["f32", "i4"]]
    assert fig["layout"]["xaxis"]["title"]["text"].startswith("tensor")


def test_the_sensitivity_chart_has_one_series_per_precision_on_a_log_axis():
    sens = {
        "tensors": ["a.weight", "b.weight"],
        "precisions": ["fp32", "int8", "int4"],
        "losses": {"kl": [[0, 0.001, 0.1], [0, 0.0, 0.2]]},
        "split": "calibration",
        "n_examples": 200,
    }
    data = figs.sensitivity_data(sens, "kl")
    assert [s["precision"] for s in data["series"]] == ["int8", "int4"]
    fig = figs.sensitivity_figure(data)
    assert fig["layout"]["yaxis"]["type"] == "log"
    assert "nats" in fig["layout"]["yaxis"]["title"]["text"]
    assert fig["data"][0]["y"][1] > 0, "a zero loss is drawn at the floor of the log axis"
    assert fig["data"][0]["marker"]["symbol"] != fig["data"][1]["marker"]["symbol"]
    assert figs.sensitivity_data(None) is None
    assert figs.sensitivity_data(sens, "nope") is None


def test_the_exit_chart_shows_percent_answered_per_exit_and_skips_variants_without_fractions():
    data = figs.exit_rate_data(
        [0, 5],
        [
            {
                "id": 1,
                "name": "exit 0.9",
                "exit_fraction": [0.25, 0.75],
                "exit_threshold": 0.9,
                "mean_layers": 4.75,
            },
            {"id": 2, "name": "no data", "exit_fraction": None, "exit_threshold": 0.8},
        ],
    )
    assert data["layers"] == ["after layer 1", "after layer 6"]
    assert len(data["rows"]) == 1
    fig = figs.exit_rate_figure(data)
    assert fig["data"][0]["y"] == [25.0, 75.0]
    assert fig["layout"]["yaxis"]["title"]["text"] == "examples answered there (%)"


def test_predicted_vs_measured_reports_the_error_without_touching_its_rows():
    rows = [
        {"label": "#1 v", "predicted_ms": 11.0, "measured_ms": 10.0, "error_pct": 10.0, "calibrated": True},
        {"label": "#2 w", "predicted_ms": None, "measured_ms": 10.0, "error_pct": None, "calibrated": False},
    ]
    before = copy.deepcopy(rows)
    data = figs.predicted_vs_measured_data(rows)
    assert rows == before
    assert [p["label"] for p in data["points"]] == ["#1 v"]
    fig = figs.predicted_vs_measured_figure(data, "t")
    assert fig["data"][0]["name"] == "prediction = measurement"
    assert "error +10.0 %" in fig["data"][1]["text"][0]
    assert "measured" in fig["layout"]["xaxis"]["title"]["text"]
