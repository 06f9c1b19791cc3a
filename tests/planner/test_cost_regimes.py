"""planner.cost kernel regimes: pricing per host kernel and recovering regime parameters by fit."""

from __future__ import annotations

import random

import pytest

from planner.cost import (
    FUSED_EXIT_REGIME,
    PRICED_REGIMES,
    REGIMES,
    CostParams,
    Observation,
    fit,
    predict,
)
from planner.specs import DeviceSpec, ModelSpec, Plan, PlanError, TensorScheme
from tests.planner.test_cost import minilm_spec

HOST = DeviceSpec(
    name="host",
    ram_total_bytes=8 * 2**30,
    ram_budget_bytes=2**30,
    bandwidth_gbs=10.0,
    fp32_tflops=0.1,
    int8_tops=0.5,
    weight_formats=("fp32", "int8", "int4"),
)


def _kernels(plan: Plan, spec_names: tuple[str, ...], dequant: bool) -> dict[str, str]:
    out = {}
    for name in spec_names:
        if plan.scheme(name).is_integer and "embeddings" not in name:
            out[name] = "dequant" if dequant else "w8a8"
        elif "embeddings" in name:
            out[name] = "gather" if plan.scheme(name).is_integer else "fp32"
        else:
            out[name] = "fp32"
    return out


def _observed(
    spec: ModelSpec, plan: Plan, kernels: dict[str, str], true: CostParams, rng: random.Random
) -> Observation:
    """A batch-1 run of `plan` at a random length (and exit, if it has a threshold) timed as the
    cost model with `true` parameters prices it."""
    seq = rng.choice([12, 24, 48, 96])
    probs = None
    if plan.exit_threshold is not None:
        stop = rng.randrange(len(spec.exit_points))
        probs = [1.0 if i == stop else 0.0 for i in range(len(spec.exit_points))]
    seconds = predict(spec, plan, HOST, seq_len=seq, exit_probs=probs, params=true, kernels=kernels).latency_s
    return Observation(spec, plan, 1, seq, probs, seconds, kernels)


def test_w8a8_is_priced_on_the_int8_peak_with_int8_bytes_and_activation_cost() -> None:
    spec = minilm_spec()
    name = "encoder.layer.0.intermediate.dense.weight"
    plan = Plan.build({name: TensorScheme("int4", 128)})
    params = CostParams(regime_overhead_s={"w8a8": 7e-6}, act_quant_s_per_element=1e-9)
    w8 = predict(spec, plan, HOST, seq_len=40, params=params, kernels={name: "w8a8"})
    dq = predict(spec, plan, HOST, seq_len=40, params=params, kernels={name: "dequant"})
    plain = predict(spec, plan, HOST, seq_len=40, params=params)
    op8 = next(o for o in w8.ops if o.name == name)
    opd = next(o for o in dq.ops if o.name == name)
    assert op8.regime == "w8a8" and op8.compute_precision == "int8"
    assert opd.regime == "dequant" and opd.compute_precision == "fp32"
    assert next(o for o in plain.ops if o.name == name).regime == ""
    macs = 40 * 1536 * 384
    assert op8.compute_s == pytest.approx(2 * macs / (0.5e12 * params.regime_efficiency["w8a8"]))
    assert opd.compute_s == pytest.approx(2 * macs / (0.1e12 * params.regime_efficiency["dequant"]))
    # Memory: W8A8 holds int8 per-channel weights, dequantized-at-load holds fp32.
    act = 40 * (1536 + 384) * 4
    assert op8.bytes_read == 1536 * 384 + 1536 * 2 + act
    assert opd.bytes_read == 1536 * 384 * 4 + act
    extra = params.per_tensor_overhead_s + 7e-6 + 1e-9 * 40 * (1536 + 384)
    assert op8.seconds == pytest.approx(max(op8.memory_s, op8.compute_s) + extra)
    assert w8.predicted and w8.weight_bytes == dq.weight_bytes  # package bytes do not change
    with pytest.raises(PlanError, match="unknown kernel regime"):
        predict(spec, plan, HOST, kernels={name: "magic"})
    with pytest.raises(PlanError, match="unknown kernel regime"):
        CostParams(regime_efficiency={"magic": 1.0})


def test_two_digit_activations_are_priced_as_w8a8_on_twice_the_integer_work() -> None:
    spec = minilm_spec()
    name = "encoder.layer.0.intermediate.dense.weight"
    plan = Plan.build({name: TensorScheme("int8")})
    params = CostParams(regime_overhead_s={"w8a8": 7e-6}, act_quant_s_per_element=1e-9)
    a8 = next(
        o
        for o in predict(spec, plan, HOST, seq_len=40, params=params, kernels={name: "w8a8"}).ops
        if o.name == name
    )
    a16 = next(
        o
        for o in predict(spec, plan, HOST, seq_len=40, params=params, kernels={name: "w8a16"}).ops
        if o.name == name
    )
    assert a16.regime == "w8a16" and a16.compute_precision == "int8" and a16.macs == a8.macs
    assert a16.compute_s == pytest.approx(2 * a8.compute_s)
    assert a16.bytes_read == a8.bytes_read  # the weight is read once for both digits
    # Two codes per input element are quantized: 40 tokens × 384 more elements.
    extra = params.per_tensor_overhead_s + 7e-6 + 1e-9 * 40 * (1536 + 2 * 384)
    assert a16.seconds == pytest.approx(max(a16.memory_s, a16.compute_s) + extra)


def test_params_round_trip_and_accept_version_1() -> None:
    p = CostParams(
        regime_efficiency={"w8a8": 0.7}, regime_overhead_s={"w8a8": 3e-6}, act_quant_s_per_element=4e-9
    )
    assert CostParams.from_dict(p.to_dict()) == p
    old = {"_type": "CostParams", "_version": 1, "_data": {"mem_efficiency": 0.3}}
    assert CostParams.from_dict(old).regime_efficiency == CostParams().regime_efficiency
    # v2 priced an exit head like one tensor op: that is what its exit check costs when read back.
    v2 = {"_type": "CostParams", "_version": 2, "_data": {"per_tensor_overhead_s": 7e-6}}
    assert CostParams.from_dict(v2).exit_check_s == 7e-6
    assert CostParams.from_dict(CostParams(exit_check_s=0.0).to_dict()).exit_check_s == 0.0
    assert set(PRICED_REGIMES) == set(CostParams().regime_overhead_s)
    # The fully fused batch-1 regime is the cost model's choice, never a kernel's report.
    assert set(PRICED_REGIMES) - {FUSED_EXIT_REGIME} < set(REGIMES) and FUSED_EXIT_REGIME not in REGIMES
    with pytest.raises(PlanError, match="unknown kernel regime"):
        CostParams(regime_efficiency={"w8a16": 1.0})  # priced with w8a8's parameters, none of its own


def test_fit_recovers_regime_efficiencies_and_overheads() -> None:
    spec = minilm_spec()
    true = CostParams(
        mem_efficiency=0.5,
        compute_efficiency={"fp32": 0.6},
        per_tensor_overhead_s=8e-6,
        fixed_overhead_s=4e-4,
        regime_efficiency={"fp32": 0.6, "w8a8": 0.25, "dequant": 0.45, "gather": 1.0},
        regime_overhead_s={"w8a8": 1.2e-5, "gather": 3e-5},
        act_quant_s_per_element=1.5e-9,
        exit_check_s=6e-5,
    )
    rng = random.Random(0)
    obs = []
    for k in range(40):
        schemes = {}
        for name in spec.tensor_names:
            p = rng.choice(["fp32", "int8", "int4"])
            if p != "fp32":
                schemes[name] = TensorScheme(p, 128 if p == "int4" else None)
        plan = Plan.build(schemes, exit_threshold=0.8 if k % 3 == 0 else None)
        kernels = _kernels(plan, spec.tensor_names, dequant=k % 4 == 3)
        obs.append(_observed(spec, plan, kernels, true, rng))
    result = fit(CostParams(), obs, HOST)
    got = result.params
    assert result.report.mape < 0.005 < result.report.mape_before
    assert got.regime_efficiency["w8a8"] == pytest.approx(0.25, rel=0.05)
    assert got.regime_efficiency["fp32"] == pytest.approx(0.6, rel=0.05)
    assert got.regime_efficiency["dequant"] == pytest.approx(0.45, rel=0.05)
    assert got.act_quant_s_per_element == pytest.approx(1.5e-9, rel=0.1)
    # Every op ran in a named regime, so only per-tensor + regime overhead is in the data, not
    # the split (NNLS lands on one split on one host's LAPACK, another elsewhere): the report
    # says so, and what the data does determine — one regime's overhead over another's — holds.
    assert {"per_tensor_overhead_s", "regime_overhead_s[w8a8]"} <= set(result.report.confounded)
    over = got.regime_overhead_s
    assert over["w8a8"] - over["fp32"] == pytest.approx(1.2e-5, rel=0.1)
    assert over["gather"] - over["fp32"] == pytest.approx(3e-5, rel=0.1)
    assert got.fixed_overhead_s == pytest.approx(4e-4, rel=0.1)
    # Exit checks have their own price, no longer tied to one tensor op's launch cost.
    assert got.exit_check_s == pytest.approx(6e-5, rel=0.1)
    # A regime never observed keeps its prior and is reported as such.
    assert "regime_efficiency[weight-only]" in result.report.unidentified
    assert got.regime_efficiency["weight-only"] == CostParams().regime_efficiency["weight-only"]


def test_a_fused_block_pays_its_regime_overhead_instead_of_per_op_launches() -> None:
    spec = minilm_spec()
    block0 = [t.name for t in spec.tensors if t.kind == "linear" and t.block == 0]
    plan = Plan.build({name: TensorScheme("int8") for name in block0})
    params = CostParams(per_tensor_overhead_s=50e-6, regime_overhead_s={"w8a8-fused": 3e-6})
    fused = predict(spec, plan, HOST, seq_len=40, params=params, kernels=dict.fromkeys(block0, "w8a8-fused"))
    # one Linear of the block not fused (as when the runtime could not fuse it): per-op costs
    partly = dict.fromkeys(block0, "w8a8-fused") | {block0[0]: "w8a8"}
    mixed = predict(spec, plan, HOST, seq_len=40, params=params, kernels=partly)
    by_name = {o.name: o for o in fused.ops}
    for name in block0:
        op = by_name[name]
        assert op.regime == "w8a8-fused" and op.compute_precision == "int8"
        assert op.seconds == pytest.approx(max(op.memory_s, op.compute_s) + 3e-6)
    for name in ("attention.0", "elementwise.0"):
        op = by_name[name]
        assert op.seconds == pytest.approx(max(op.memory_s, op.compute_s))
        other = next(o for o in mixed.ops if o.name == name)
        assert other.seconds == pytest.approx(max(other.memory_s, other.compute_s) + 50e-6)
    # Two-digit Linears inside the compiled block keep the block fused.
    two = dict.fromkeys(block0, "w8a8-fused") | {block0[0]: "w8a16-fused"}
    att = next(
        o
        for o in predict(spec, plan, HOST, seq_len=40, params=params, kernels=two).ops
        if o.name == "attention.0"
    )
    assert att.seconds == pytest.approx(by_name["attention.0"].seconds)
    # block 1 is not fused in either: its attention still pays the launch
    att1 = by_name["attention.1"]
    assert att1.seconds == pytest.approx(max(att1.memory_s, att1.compute_s) + 50e-6)


def test_exit_checks_inside_fully_fused_blocks_cost_nothing_of_their_own_at_batch_1() -> None:
    spec = minilm_spec()
    linears = [t.name for t in spec.tensors if t.kind == "linear"]
    plan = Plan.build({name: TensorScheme("int8") for name in linears}, exit_threshold=0.8)
    params = CostParams(exit_check_s=1e-3)
    probs = [0.0] * (len(spec.exit_points) - 1) + [1.0]  # every text runs all blocks
    every_block = dict.fromkeys(linears, "w8a8-fused")
    one_block_eager = every_block | {linears[0]: "w8a8"}

    def latency(kernels: dict[str, str], batch: int) -> float:
        return predict(
            spec, plan, HOST, batch=batch, seq_len=32, exit_probs=probs, params=params, kernels=kernels
        ).latency_s

    checks = sum(e < spec.n_blocks - 1 for e in spec.exit_points) * 1e-3  # non-final heads, eager
    no_checks = Plan.build({name: TensorScheme("int8") for name in linears})
    full = predict(spec, no_checks, HOST, seq_len=32, params=params, kernels=every_block).latency_s
    # batch 1, every block fused: the checks run inside the compiled calls
    assert latency(every_block, 1) == pytest.approx(full)
    # a larger batch, or one block the runtime runs op by op: every check is eager work
    full_b4 = predict(spec, no_checks, HOST, batch=4, seq_len=32, params=params, kernels=every_block)
    assert latency(every_block, 4) == pytest.approx(full_b4.latency_s + checks)
    partly = predict(spec, no_checks, HOST, seq_len=32, params=params, kernels=one_block_eager).latency_s
    assert latency(one_block_eager, 1) == pytest.approx(partly + checks)


def _fused_model(
    spec_names: tuple[str, ...], linears: list[str], eager: tuple[str, ...] = ()
) -> dict[str, str]:
    kernels = dict.fromkeys(linears, "w8a8-fused") | dict.fromkeys(eager, "w8a8")
    return kernels | {n: "fp32" for n in spec_names if n not in kernels}


def test_a_fully_fused_model_at_batch_1_is_priced_in_its_own_regime() -> None:
    spec = minilm_spec()
    linears = [t.name for t in spec.tensors if t.kind == "linear"]
    plan = Plan.build({name: TensorScheme("int8") for name in linears})
    params = CostParams(
        per_tensor_overhead_s=50e-6,
        regime_efficiency={"w8a8-fused": 0.3, FUSED_EXIT_REGIME: 0.6},
        regime_overhead_s={"w8a8-fused": 9e-6, FUSED_EXIT_REGIME: 2e-6},
    )
    whole = _fused_model(spec.tensor_names, linears)
    b1 = {o.name: o for o in predict(spec, plan, HOST, seq_len=40, params=params, kernels=whole).ops}
    b4 = {o.name: o for o in predict(spec, plan, HOST, batch=4, seq_len=10, params=params, kernels=whole).ops}
    partly = _fused_model(spec.tensor_names, linears, eager=(linears[0],))
    part = {o.name: o for o in predict(spec, plan, HOST, seq_len=40, params=params, kernels=partly).ops}
    name = linears[-1]  # a Linear of the last block: fused in all three
    macs = b1[name].macs
    # The kernel's own regime is what the report shows; the price is the whole-model regime's.
    assert b1[name].regime == "w8a8-fused" and b1[name].compute_precision == "int8"
    assert b1[name].compute_s == pytest.approx(2 * macs / (0.5e12 * 0.6))
    assert b1[name].seconds == pytest.approx(max(b1[name].memory_s, b1[name].compute_s) + 2e-6)
    # Same tokens at batch 4, and a model with one eager Linear: the fused regime's price.
    for other in (b4[name], part[name]):
        assert other.macs == macs
        assert other.compute_s == pytest.approx(2 * macs / (0.5e12 * 0.3))
        assert other.seconds == pytest.approx(max(other.memory_s, other.compute_s) + 9e-6)
    # Attention inside a compiled block pays no launch in either fused regime.
    assert b1["attention.0"].seconds == pytest.approx(
        max(b1["attention.0"].memory_s, b1["attention.0"].compute_s)
    )
    with pytest.raises(PlanError, match="unknown kernel regime"):
        predict(spec, plan, HOST, kernels=dict.fromkeys(linears, FUSED_EXIT_REGIME))


def test_params_without_the_whole_model_fused_regime_price_it_as_the_fused_one() -> None:
    # A roofline-6 calibration (stored before the regime existed) keeps predicting as it did.
    stored = CostParams(
        regime_efficiency={"w8a8-fused": 0.42}, regime_overhead_s={"w8a8-fused": 7e-6}
    ).to_dict()
    for regimes in (stored["_data"]["regime_efficiency"], stored["_data"]["regime_overhead_s"]):
        del regimes[FUSED_EXIT_REGIME]
    old = CostParams.from_dict(stored)
    assert old.regime_efficiency[FUSED_EXIT_REGIME] == 0.42
    assert old.regime_overhead_s[FUSED_EXIT_REGIME] == 7e-6
    # Given explicitly, it keeps its own value.
    own = CostParams(regime_efficiency={"w8a8-fused": 0.42, FUSED_EXIT_REGIME: 0.9})
    assert own.regime_efficiency[FUSED_EXIT_REGIME] == 0.9
    assert CostParams.from_dict(own.to_dict()) == own


def _fused_observations(
    spec: ModelSpec, true: CostParams, n: int, whole: bool, seed: int
) -> list[Observation]:
    rng = random.Random(seed)
    linears = [t.name for t in spec.tensors if t.kind == "linear"]
    obs = []
    for k in range(n):
        plan = Plan.build(
            {name: TensorScheme(rng.choice(["int8", "int4"]), None) for name in linears},
            exit_threshold=0.8 if k % 2 else None,
        )
        eager = () if whole else tuple(rng.sample(linears, 2))
        kernels = _fused_model(spec.tensor_names, linears, eager)
        obs.append(_observed(spec, plan, kernels, true, rng))
    return obs


def test_fit_tells_the_whole_model_fused_path_from_partly_fused_blocks() -> None:
    spec = minilm_spec()
    true = CostParams(
        per_tensor_overhead_s=8e-6,
        fixed_overhead_s=3e-4,
        regime_efficiency={"w8a8": 0.3, "w8a8-fused": 0.35, FUSED_EXIT_REGIME: 0.35},
        regime_overhead_s={"w8a8": 1e-5, "w8a8-fused": 1.5e-5, FUSED_EXIT_REGIME: 0.4e-5},
        act_quant_s_per_element=1e-9,
        exit_check_s=5e-5,
    )
    obs = _fused_observations(spec, true, 30, whole=False, seed=1) + _fused_observations(
        spec, true, 30, whole=True, seed=2
    )
    result = fit(CostParams(), obs, HOST)
    assert result.report.mape < 0.005 < result.report.mape_before
    got = result.params
    assert got.regime_overhead_s["w8a8-fused"] == pytest.approx(1.5e-5, rel=0.1)
    assert got.regime_overhead_s[FUSED_EXIT_REGIME] == pytest.approx(0.4e-5, rel=0.1)
    # Only partly fused models observed: the whole-model path is priced as their fused blocks.
    partly = fit(CostParams(), obs[:30], HOST)
    assert f"regime_overhead_s[{FUSED_EXIT_REGIME}]" in partly.report.unidentified
    assert partly.params.regime_overhead_s[FUSED_EXIT_REGIME] == partly.params.regime_overhead_s["w8a8-fused"]
    assert partly.params.regime_efficiency[FUSED_EXIT_REGIME] == partly.params.regime_efficiency["w8a8-fused"]
