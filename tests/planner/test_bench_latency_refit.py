"""`python -m bench engine --save-latencies` / `--refit-latencies`: the latency-model check re-run
on saved measurements (no timing), as a cost-model change is checked."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from bench.engine import _latency_model, _refit_latencies, _save_latencies
from planner.cost import CostParams, predict
from planner.runtime import TextLatency
from planner.specs import Plan, TensorScheme
from tests.planner.test_cost import minilm_spec
from tests.planner.test_cost_regimes import HOST

LENGTHS = [12, 24, 48, 96]


def _measured(true: CostParams) -> list[tuple[Plan, TextLatency, dict[str, str]]]:
    spec = minilm_spec()
    linears = [t.name for t in spec.tensors if t.kind == "linear"]
    out = []
    for k in range(12):
        quantized = linears[: 6 * (k % 6 + 1)]  # 1..6 blocks of int8 Linears
        plan = Plan.build({n: TensorScheme("int8") for n in quantized})
        regimes = {n: ("w8a8" if n in quantized else "fp32") for n in spec.tensor_names}
        times = tuple(
            predict(spec, plan, HOST, seq_len=n, params=true, kernels=regimes).latency_s for n in LENGTHS
        )
        latency = TextLatency(
            per_text_s=times,
            mean_s=statistics.fmean(times),
            median_s=statistics.median(times),
            exits=(spec.n_blocks - 1,) * len(LENGTHS),
            rounds=1,
            warmup=0,
            threads=1,
        )
        out.append((plan, latency, regimes))
    return out


def test_saved_latencies_refit_to_the_same_check(tmp_path: Path) -> None:
    true = CostParams(per_tensor_overhead_s=9e-6, regime_overhead_s={"w8a8": 2e-5}, fixed_overhead_s=3e-4)
    measured = _measured(true)
    spec = minilm_spec()
    direct = _latency_model(spec, HOST, LENGTHS, measured)
    path = tmp_path / "latencies.json"
    _save_latencies(path, spec, HOST, LENGTHS, measured)
    again = _refit_latencies(path)
    assert again == {"latency_within_10pct_share": direct.within10, "latency_mape": direct.mape}
    assert direct.within10 == 1.0 and direct.mape < 0.01  # measurements the model can express
    path.write_text('{"spec": {}}')
    with pytest.raises(SystemExit, match=r"--refit-latencies .*not a file saved by --save-latencies"):
        _refit_latencies(path)
