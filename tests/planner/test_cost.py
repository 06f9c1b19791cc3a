"""planner.cost: roofline prediction, fallbacks, early exit, memory, and NNLS calibration."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from planner.cost import (
    COST_MODEL_VERSION,
    CostParams,
    FitResult,
    Observation,
    compute_precision,
    fit,
    least_squares_factor,
    nnls,
    predict,
    reach_probabilities,
)
from planner.cost import _nnls_lawson_hanson as lawson_hanson
from planner.quant import packed_nbytes, plan_nbytes
from planner.specs import DeviceSpec, ModelSpec, Plan, PlanError, TensorScheme, TensorSpec


def minilm_spec(n_blocks: int = 6) -> ModelSpec:
    """all-MiniLM-L6-v2's quantizable tensors (hidden 384, intermediate 1536, vocab 30522)."""
    h, i = 384, 1536
    tensors = [TensorSpec("embeddings.word_embeddings.weight", "embedding", (30522, h), -1, 0)]
    for b in range(n_blocks):
        p = f"encoder.layer.{b}."
        for part in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            tensors.append(TensorSpec(p + part + ".weight", "linear", (h, h), b, h * h))
        tensors.append(TensorSpec(p + "intermediate.dense.weight", "linear", (i, h), b, i * h))
        tensors.append(TensorSpec(p + "output.dense.weight", "linear", (h, i), b, i * h))
    return ModelSpec(
        name="minilm",
        tensors=tuple(tensors),
        n_blocks=n_blocks,
        exit_points=tuple(range(1, n_blocks, 2)),
        hidden_size=h,
        n_heads=12,
        intermediate_size=i,
        vocab_size=30522,
        other_params=200_000,
    )


PHONE = DeviceSpec(
    name="phone",
    ram_total_bytes=8 * 2**30,
    ram_budget_bytes=512 * 2**20,
    bandwidth_gbs=40.0,
    fp32_tflops=0.5,
    fp16_tflops=1.0,
    int8_tops=4.0,
    int4_tops=8.0,
    weight_formats=("fp32", "fp16", "int8", "int4"),
    activation_formats=("fp32", "fp16"),
)
INT8_ONLY = dataclasses.replace(
    PHONE, name="int8-npu", int4_tops=None, weight_formats=("fp32", "fp16", "int8")
)
CPU = DeviceSpec(
    name="cpu",
    ram_total_bytes=4 * 2**30,
    ram_budget_bytes=2**30,
    bandwidth_gbs=10.0,
    fp32_tflops=0.2,
    weight_formats=("fp32",),
)


def test_prediction_says_it_is_a_prediction_and_which_model_made_it() -> None:
    spec = minilm_spec()
    pred = predict(spec, Plan(), PHONE)
    assert pred.predicted is True and pred.cost_model_version == COST_MODEL_VERSION == "roofline-7"
    assert pred.to_dict()["predicted"] is True
    assert pred.latency_s > 0 and pred.memory_bytes > pred.weight_bytes
    assert len(pred.ops) == len(spec.tensors) + 2 * spec.n_blocks


def test_op_time_is_the_roofline_max_plus_overhead() -> None:
    spec = minilm_spec()
    params = CostParams(mem_efficiency=0.5, compute_efficiency={"fp32": 0.25}, per_tensor_overhead_s=1e-5)
    pred = predict(spec, Plan(), CPU, batch=1, seq_len=16, params=params)
    op = next(o for o in pred.ops if o.name == "encoder.layer.0.intermediate.dense.weight")
    weight_bytes = 1536 * 384 * 4
    act_bytes = 16 * (1536 + 384) * 4
    assert op.bytes_read == weight_bytes + act_bytes
    assert op.memory_s == pytest.approx((weight_bytes + act_bytes) / (10e9 * 0.5))
    assert op.compute_s == pytest.approx(2 * 16 * 1536 * 384 / (0.2e12 * 0.25))
    assert op.seconds == pytest.approx(max(op.memory_s, op.compute_s) + 1e-5)
    assert op.bound == "memory"


def test_lower_precision_is_faster_when_memory_bound() -> None:
    spec = minilm_spec()
    times = [
        predict(spec, Plan.uniform(spec, TensorScheme(p, 128)), PHONE, batch=1, seq_len=8).latency_s
        for p in ("fp32", "fp16", "int8", "int4")
    ]
    assert times == sorted(times, reverse=True)


def test_large_batches_become_compute_bound() -> None:
    spec = minilm_spec()
    pred = predict(spec, Plan(), PHONE, batch=32, seq_len=128)
    linear = [o for o in pred.ops if o.kind == "linear"]
    assert all(o.bound == "compute" for o in linear)


def test_embedding_reads_only_the_rows_touched() -> None:
    spec = minilm_spec()
    scheme = TensorScheme("int4", 128, False)
    plan = Plan.build({"embeddings.word_embeddings.weight": scheme})
    pred = predict(spec, plan, PHONE, batch=2, seq_len=10)
    emb = next(o for o in pred.ops if o.kind == "embedding")
    assert emb.macs == 0 and emb.compute_s == 0
    row = packed_nbytes((1, 384), scheme)
    assert emb.bytes_read == 20 * row + 20 * 384 * 2  # fp16 activations written out


def test_missing_int4_falls_back_to_int8_compute_but_keeps_int4_bytes() -> None:
    spec = minilm_spec()
    plan = Plan.uniform(spec, TensorScheme("int4", 64))
    native = predict(spec, plan, PHONE, batch=8, seq_len=128)
    fallback = predict(spec, plan, INT8_ONLY, batch=8, seq_len=128)
    op_native = next(o for o in native.ops if o.name.endswith("0.intermediate.dense.weight"))
    op_fb = next(o for o in fallback.ops if o.name.endswith("0.intermediate.dense.weight"))
    assert op_native.compute_precision == "int4" and not op_native.fallback
    assert op_fb.compute_precision == "int8" and op_fb.fallback
    assert op_fb.bytes_read == op_native.bytes_read
    assert op_fb.compute_s == pytest.approx(op_native.compute_s * 2 * 0.3 / 0.4)
    assert fallback.weight_bytes == native.weight_bytes
    assert fallback.dequant_buffer_bytes == 1536 * 384 and native.dequant_buffer_bytes == 0
    assert "encoder.layer.0.intermediate.dense.weight" in fallback.fallbacks


def test_fallback_chain_goes_through_the_precisions_the_device_has() -> None:
    assert compute_precision("int2", PHONE) == "int4"
    assert compute_precision("int3", INT8_ONLY) == "int8"
    assert compute_precision("int4", CPU) == "fp32"
    fp16_gpu = dataclasses.replace(CPU, name="gpu", fp16_tflops=2.0, activation_formats=("fp16",))
    assert compute_precision("int8", fp16_gpu) == "fp16"
    assert compute_precision("fp32", fp16_gpu) == "fp32"


def test_a_device_without_any_usable_peak_is_a_plan_error() -> None:
    npu = dataclasses.replace(
        PHONE, name="npu", fp32_tflops=None, fp16_tflops=None, activation_formats=("int8",)
    )
    with pytest.raises(PlanError, match="npu"):
        predict(minilm_spec(), Plan(), npu)


def test_early_exit_weights_blocks_by_the_probability_of_reaching_them() -> None:
    spec = minilm_spec()  # exits after blocks 1, 3, 5
    plan = Plan.uniform(spec, TensorScheme("int8"), exit_threshold=0.9)
    reach = reach_probabilities(spec, plan, [0.5, 0.25, 0.25])
    assert reach == (1.0, 1.0, 0.5, 0.5, 0.25, 0.25)
    full = predict(spec, plan, PHONE, exit_probs=[0.0, 0.0, 1.0])
    early = predict(spec, plan, PHONE, exit_probs=[0.5, 0.25, 0.25])
    assert early.latency_s < 0.7 * full.latency_s
    assert early.full_depth_latency_s == pytest.approx(full.full_depth_latency_s)
    no_exit = predict(spec, plan.with_threshold(None), PHONE, exit_probs=[0.5, 0.25, 0.25])
    assert no_exit.reach_probability == (1.0,) * 6


@pytest.mark.parametrize("probs", [[0.5, 0.5], [0.5, 0.6, -0.1], [0.2, 0.2, 0.2]])
def test_invalid_exit_distribution_is_rejected(probs: list[float]) -> None:
    spec = minilm_spec()
    with pytest.raises(PlanError, match="exit_probs"):
        predict(spec, Plan(exit_threshold=0.8), PHONE, exit_probs=probs)


def test_attention_cost_grows_quadratically_with_sequence_length() -> None:
    spec = minilm_spec()
    short = next(o for o in predict(spec, Plan(), PHONE, seq_len=64).ops if o.kind == "attention")
    long = next(o for o in predict(spec, Plan(), PHONE, seq_len=256).ops if o.kind == "attention")
    assert long.macs == 16 * short.macs


def test_memory_is_packed_weights_plus_activations_plus_overhead() -> None:
    spec = minilm_spec()
    plan = Plan.uniform(spec, TensorScheme("int4", 128))
    params = CostParams(runtime_overhead_bytes=1000)
    one = predict(spec, plan, PHONE, batch=1, seq_len=128, params=params)
    many = predict(spec, plan, PHONE, batch=32, seq_len=128, params=params)
    assert one.weight_bytes == plan_nbytes(spec, plan)
    assert one.memory_bytes == one.weight_bytes + one.activation_bytes + 1000
    assert many.activation_bytes == 32 * one.activation_bytes
    assert one.fits_memory_budget
    tiny = dataclasses.replace(PHONE, ram_budget_bytes=one.memory_bytes - 1)
    assert not predict(spec, plan, tiny, params=params).fits_memory_budget


def test_a_plan_that_breaks_the_group_rule_is_rejected() -> None:
    odd = TensorSpec("odd.weight", "linear", (64, 96), 0, 64 * 96)
    spec = dataclasses.replace(minilm_spec(), tensors=(*minilm_spec().tensors, odd))
    with pytest.raises(PlanError, match=r"odd\.weight.*group_size 64 does not divide"):
        predict(spec, Plan.uniform(spec, TensorScheme("int4", 64)), PHONE)


def test_cost_params_round_trip_and_validate() -> None:
    params = CostParams(mem_efficiency=0.8, compute_efficiency={"int8": 0.7}, per_tensor_overhead_s=3e-6)
    back = CostParams.from_dict(params.to_dict())
    assert back == params and back.compute_efficiency["fp32"] == 0.5
    assert params.to_dict()["_type"] == "CostParams"
    with pytest.raises(PlanError, match="mem_efficiency"):
        CostParams(mem_efficiency=0.0)
    with pytest.raises(PlanError, match="int2"):
        CostParams(compute_efficiency={"int2": 0.5})
    with pytest.raises(PlanError, match="unknown"):
        CostParams.from_dict({"_type": "CostParams", "_version": 1, "_data": {"bogus": 1}})
    # stored parameters that are damaged: a PlanError naming the field, not a raw KeyError
    header = {"_type": "CostParams", "_version": 1}
    for data, field in (
        (header, "'_data'"),
        ({**header, "_data": {"mem_efficiency": "fast"}}, "'mem_efficiency'"),
        ({**header, "_data": {"compute_efficiency": [0.5]}}, "'compute_efficiency'"),
        ({**header, "_data": {"regime_overhead_s": {"fp32": None}}}, "'regime_overhead_s'\\['fp32'\\]"),
    ):
        with pytest.raises(PlanError, match=field):
            CostParams.from_dict(data)


def test_numpy_nnls_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        a = rng.normal(size=(20, 6))
        b = rng.normal(size=20)
        x = lawson_hanson(a, b)
        ref, solver = nnls(a, b)
        assert solver in ("scipy.optimize.nnls", "numpy-lawson-hanson")
        assert (x >= 0).all()
        assert np.linalg.norm(a @ x - b) == pytest.approx(np.linalg.norm(a @ ref - b), rel=1e-6, abs=1e-9)


def _synthetic_observations(true: CostParams, device: DeviceSpec, n: int) -> list[Observation]:
    rng = random.Random(3)
    spec = minilm_spec()
    obs = []
    precisions = ("fp32", "fp16", "int8", "int4")
    for _ in range(n):
        plan = Plan.build(
            {name: TensorScheme(rng.choice(precisions), 128) for name in spec.tensor_names},
            exit_threshold=0.9,
        )
        batch, seq = rng.choice([1, 2, 8, 32]), rng.choice([8, 32, 128])
        p1 = rng.random() * 0.5
        probs = [p1, (1 - p1) / 2, (1 - p1) / 2]
        seconds = predict(
            spec, plan, device, batch=batch, seq_len=seq, exit_probs=probs, params=true
        ).latency_s
        obs.append(Observation(spec, plan, batch, seq, probs, seconds))
    return obs


def test_fit_recovers_known_parameters_from_synthetic_measurements() -> None:
    true = CostParams(
        mem_efficiency=0.35,
        compute_efficiency={"fp32": 0.8, "fp16": 0.3, "int8": 0.2, "int4": 0.15},
        per_tensor_overhead_s=2e-5,
        fixed_overhead_s=1e-3,
    )
    obs = _synthetic_observations(true, PHONE, 40)
    result = fit(CostParams(), obs, PHONE)
    got = result.params
    assert got.mem_efficiency == pytest.approx(0.35, rel=0.02)
    for p in ("fp32", "fp16", "int8", "int4"):
        assert got.compute_efficiency[p] == pytest.approx(true.compute_efficiency[p], rel=0.02), p
    assert got.per_tensor_overhead_s == pytest.approx(2e-5, rel=0.05)
    assert got.fixed_overhead_s == pytest.approx(1e-3, rel=0.05)
    assert result.report.mape < 0.005 < result.report.mape_before
    assert result.report.n_observations == 40 and result.report.cost_model_version == COST_MODEL_VERSION


def test_fit_keeps_prior_values_for_precisions_never_observed() -> None:
    spec = minilm_spec()
    true = CostParams(mem_efficiency=0.5, per_tensor_overhead_s=1e-5, fixed_overhead_s=5e-4)
    obs = [
        Observation(
            spec, Plan(), b, s, None, predict(spec, Plan(), CPU, batch=b, seq_len=s, params=true).latency_s
        )
        for b, s in [(1, 8), (1, 64), (4, 32), (8, 128), (2, 16), (16, 64)]
    ]
    prior = CostParams(compute_efficiency={"int4": 0.123})
    result = fit(prior, obs, CPU)
    assert result.params.compute_efficiency["int4"] == 0.123
    assert "compute_efficiency[int4]" in result.report.unidentified
    assert result.report.mape < 0.01


def test_fit_reports_the_error_on_noisy_measurements() -> None:
    true = CostParams(mem_efficiency=0.5)
    obs = _synthetic_observations(true, PHONE, 20)
    rng = random.Random(0)
    noisy = [dataclasses.replace(o, measured_s=o.measured_s * (1 + rng.uniform(-0.1, 0.1))) for o in obs]
    report = fit(CostParams(), noisy, PHONE).report
    assert 0 < report.mape < 0.1 and report.max_rel_error < 0.2 and report.max_abs_error_s > 0


def test_fit_rejects_empty_or_non_positive_measurements() -> None:
    spec = minilm_spec()
    with pytest.raises(PlanError):
        fit(CostParams(), [], PHONE)
    with pytest.raises(PlanError, match="measured_s"):
        fit(CostParams(), [Observation(spec, Plan(), 1, 8, None, 0.0)], PHONE)


def test_fit_with_a_shared_error_scale_aims_at_the_plans_mean_time() -> None:
    # One plan timed on texts of several lengths, the shortest 50 % slower than the model can
    # explain.  Relative error per text weighs that text most and misses the plan's mean time
    # (by 2.5 %); with the plan's mean as every text's error scale, the per-op overhead (a
    # constant within one plan) makes the least-squares predictions average to the mean.
    spec = minilm_spec()
    true = CostParams(mem_efficiency=0.5, fixed_overhead_s=2e-3)
    lengths = [8, 16, 32, 64, 96, 128]
    obs = []
    for s in lengths:
        model = predict(spec, Plan(), CPU, seq_len=s, params=true).latency_s
        obs.append(Observation(spec, Plan(), 1, s, None, model * (1.5 if s == 8 else 1.0)))
    mean_s = sum(o.measured_s for o in obs) / len(obs)

    def mean_error(result: FitResult) -> float:
        preds = [predict(spec, Plan(), CPU, seq_len=s, params=result.params).latency_s for s in lengths]
        return abs(sum(preds) / len(preds) - mean_s) / mean_s

    per_text = fit(CostParams(), obs, CPU)
    shared = fit(CostParams(), [dataclasses.replace(o, error_scale_s=mean_s) for o in obs], CPU)
    assert mean_error(shared) < 1e-9 and mean_error(per_text) > 0.01
    with pytest.raises(PlanError, match="observation 0: error_scale_s"):
        fit(CostParams(), [dataclasses.replace(obs[0], error_scale_s=0.0)], CPU)


def test_least_squares_factor_scales_predictions_onto_the_measurements() -> None:
    measured = np.array([1.0, 2.0, 4.0])
    scale = np.array([1.0, 2.0, 4.0])
    # predictions 20 % high everywhere: the factor undoes it exactly
    assert least_squares_factor(measured * 1.2, measured, scale) == pytest.approx(1 / 1.2)
    # mixed errors: the factor zeroes the scaled residuals' projection on the predictions
    predicted = np.array([1.5, 1.8, 4.4])
    c = least_squares_factor(predicted, measured, scale)
    assert float((c * predicted - measured) / scale @ (predicted / scale)) == pytest.approx(0.0, abs=1e-12)
    assert least_squares_factor(np.zeros(3), measured, scale) == 1.0
