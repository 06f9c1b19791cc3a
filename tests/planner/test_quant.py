"""planner.quant: RTN/GPTQ quantization, bit-packing, size prediction, plan application."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from planner.quant import (
    QuantCache,
    apply_plan,
    dequantize,
    pack,
    pack_codes,
    packed_nbytes,
    plan_nbytes,
    quantize,
    quantize_dequantize,
    quantize_plan,
    read_packed_safetensors,
    restore_weights,
    unpack,
    unpack_codes,
    write_packed_safetensors,
)
from planner.quant.core import _fp16_scale, qparams_for
from planner.specs import ModelSpec, Plan, PlanError, TensorScheme, TensorSpec

INT_PRECISIONS = ("int8", "int4", "int3", "int2")
ALL_SCHEMES = [TensorScheme("fp32"), TensorScheme("fp16")] + [
    TensorScheme(p, g, sym, "rtn")
    for p, g, sym in itertools.product(INT_PRECISIONS, (None, 32, 64, 128), (True, False))
]


class TinyNet(nn.Module):
    """An embedding, two Linear blocks and a head: the adapter contract in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.blocks = nn.ModuleList(
            [nn.ModuleDict({"up": nn.Linear(64, 128), "down": nn.Linear(128, 64)}) for _ in range(2)]
        )
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            assert isinstance(block, nn.ModuleDict)
            h = h + block["down"](torch.relu(block["up"](h)))
        return self.head(self.norm(h)).mean(dim=1)


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def tiny_spec(net: nn.Module) -> ModelSpec:
    tensors = [TensorSpec("embed.weight", "embedding", (100, 64), -1, 0)]
    for b in range(2):
        tensors.append(TensorSpec(f"blocks.{b}.up.weight", "linear", (128, 64), b, 128 * 64))
        tensors.append(TensorSpec(f"blocks.{b}.down.weight", "linear", (64, 128), b, 64 * 128))
    tensors.append(TensorSpec("head.weight", "linear", (16, 64), 1, 16 * 64))
    quantizable = {t.name for t in tensors}
    other = sum(p.numel() for n, p in net.named_parameters() if n not in quantizable)
    return ModelSpec(
        name="tiny",
        tensors=tuple(tensors),
        n_blocks=2,
        exit_points=(0, 1),
        hidden_size=64,
        n_heads=4,
        intermediate_size=128,
        vocab_size=100,
        other_params=other,
        max_seq_len=32,
    )


def mixed_plan(spec: ModelSpec) -> Plan:
    return Plan.build(
        {
            "embed.weight": TensorScheme("int3", 32, False),
            "blocks.0.up.weight": TensorScheme("int4", 32, True),
            "blocks.0.down.weight": TensorScheme("int8", None, False),
            "blocks.1.up.weight": TensorScheme("int2", 64, False),
            "blocks.1.down.weight": TensorScheme("fp16"),
        }
    )


def correlated_inputs(n: int, dim: int, rank: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g) + 0.05 * torch.randn(
        n, dim, generator=g
    )


# ----------------------------------------------------------------------------- packing


def test_four_bit_codes_pack_two_per_byte_low_nibble_first() -> None:
    assert pack_codes(np.array([1, 2, 15, 0], dtype=np.uint8), 4).tolist() == [0x21, 0x0F]


def test_two_bit_codes_pack_four_per_byte() -> None:
    assert pack_codes(np.array([1, 2, 3, 0, 3], dtype=np.uint8), 2).tolist() == [0b00111001, 0b11]


def test_three_bit_codes_pack_eight_into_three_bytes() -> None:
    codes = np.arange(8, dtype=np.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack_codes(codes, 3).tolist() == list(word.to_bytes(3, "little"))
    # 9 codes need 27 bits: 4 bytes, not 6.
    assert pack_codes(np.arange(9, dtype=np.uint8) % 8, 3).size == 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_round_trip_for_any_length(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in [1, 7, 8, 9, 31, 100, 1001]:
        codes = rng.integers(0, 2**bits, size=n, dtype=np.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == np.uint8 and packed.size == -(-n * bits // 8)
        assert np.array_equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_bytes_are_the_bit_stream_with_code_i_at_offset_i_times_bits(bits: int) -> None:
    # The format's definition, computed the slow way: one big integer holding the whole stream.
    rng = np.random.default_rng(10 + bits)
    for n in [*range(1, 41), 257]:
        codes = rng.integers(0, 2**bits, size=n, dtype=np.uint8)
        stream = sum(int(c) << (bits * i) for i, c in enumerate(codes))
        expected = list(stream.to_bytes(-(-n * bits // 8), "little"))
        assert pack_codes(codes, bits).tolist() == expected


def test_code_too_large_for_bit_width_is_rejected() -> None:
    with pytest.raises(PlanError, match="does not fit in 3 bits"):
        pack_codes(np.array([8], dtype=np.uint8), 3)


@pytest.mark.parametrize(
    "scheme", ALL_SCHEMES, ids=lambda s: f"{s.precision}-g{s.group_size}-{'sym' if s.symmetric else 'asym'}"
)
def test_pack_unpack_round_trip_is_exact(scheme: TensorScheme) -> None:
    weight = torch.randn(24, 128) * 0.1
    qt = quantize(weight, scheme)
    packed = pack(qt)
    for arr in packed.values():
        assert arr.dtype in (np.uint8, np.float16, np.float32)
    back = unpack(packed, qt.shape, scheme)
    assert torch.equal(dequantize(back), dequantize(qt))
    if scheme.is_integer:
        assert back.codes is not None and qt.codes is not None
        assert torch.equal(back.codes, qt.codes)
        assert packed["scales"].dtype == np.float16
        assert ("zeros" in packed) is (not scheme.symmetric)


def test_predicted_bytes_equal_packed_bytes_for_every_scheme_and_many_shapes() -> None:
    rng = random.Random(7)
    shapes = [(1, 1), (3, 33), (5, 7), (1, 128), (17, 96)] + [
        (rng.randint(1, 40), 32 * rng.randint(1, 12)) for _ in range(25)
    ]
    checked = 0
    for shape in shapes:
        weight = torch.randn(*shape)
        for scheme in ALL_SCHEMES:
            if scheme.group_size is not None and shape[1] % scheme.group_size:
                with pytest.raises(PlanError):
                    packed_nbytes(shape, scheme)
                continue
            produced = sum(a.nbytes for a in pack(quantize(weight, scheme)).values())
            assert packed_nbytes(shape, scheme) == produced, (shape, scheme)
            checked += 1
    assert checked > 300


def test_four_bit_layer_takes_half_a_byte_per_weight_plus_scales() -> None:
    assert packed_nbytes((384, 1536), TensorScheme("int4", 128, True)) == 384 * 1536 // 2 + 384 * 12 * 2
    assert packed_nbytes((384, 1536), TensorScheme("int3", None, False)) == 384 * 1536 * 3 // 8 + 384 * 2 * 2
    assert packed_nbytes((384, 1536), TensorScheme("fp16")) == 384 * 1536 * 2


# ----------------------------------------------------------------------------- quantization


def test_quantize_dequantize_equals_the_packed_pipeline() -> None:
    weight = torch.randn(64, 128)
    x = correlated_inputs(256, 128)
    for scheme in [TensorScheme("int4", 32, False), TensorScheme("int3", None, True, "gptq")]:
        qt = quantize(weight, scheme, x)
        expected = dequantize(unpack(pack(qt), qt.shape, scheme))
        assert torch.equal(quantize_dequantize(weight, scheme, x), expected)
        assert quantize_dequantize(weight, scheme, x).dtype == torch.float32


def test_quantize_dequantize_never_writes_to_its_inputs() -> None:
    # The evaluator hands it the model's parameters without a copy.
    weight = torch.randn(64, 128)
    x = correlated_inputs(256, 128)
    ids = torch.randint(0, 64, (500,))
    cases = [
        (TensorScheme("int4", 32, False), x, "linear"),
        (TensorScheme("int8", None, True), None, "linear"),
        (TensorScheme("int3", 32, True, "gptq"), x, "linear"),
        (TensorScheme("int4", 64, False, "rtn", hot_rows=8), ids, "embedding"),
        (TensorScheme("fp16"), None, "embedding"),
    ]
    for scheme, calib, kind in cases:
        before_w, before_c = weight.clone(), None if calib is None else calib.clone()
        quantize_dequantize(weight, scheme, calib, kind=kind)
        assert torch.equal(weight, before_w), scheme
        assert calib is None or torch.equal(calib, before_c), scheme


def test_symmetric_scale_is_the_rows_largest_magnitude() -> None:
    # Rows all positive, all negative, mixed, and all zero.
    w = torch.tensor([[0.5, 1.0, 2.0], [-3.0, -1.0, -0.5], [-4.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    scale, zero = qparams_for(w, 8, True)
    assert zero is None
    assert torch.equal(scale, _fp16_scale(2.0 * torch.tensor([2.0, 3.0, 4.0, 0.0]) / 255))


def test_rtn_error_is_within_half_a_step_and_shrinks_with_bits() -> None:
    weight = torch.randn(32, 128)
    errors = []
    for p in ("int2", "int3", "int4", "int8"):
        qt = quantize(weight, TensorScheme(p, 32, False))
        err = (dequantize(qt) - weight).abs()
        assert qt.scales is not None
        step = qt.scales.float().repeat_interleave(32, dim=1)
        assert bool((err <= step / 2 * (1 + 1e-3) + 1e-6).all()), p
        errors.append(float(err.mean()))
    assert errors == sorted(errors, reverse=True)


def test_smaller_groups_quantize_more_accurately() -> None:
    weight = torch.randn(32, 256) * torch.linspace(0.1, 3.0, 256)
    err = {
        g: float((quantize_dequantize(weight, TensorScheme("int4", g)) - weight).pow(2).mean())
        for g in (None, 128, 32)
    }
    assert err[32] < err[128] < err[None]


def test_bad_group_size_names_the_tensor_and_the_rule() -> None:
    with pytest.raises(PlanError, match=r"encoder\.q\.weight.*group_size 32 does not divide.*48"):
        quantize(torch.randn(8, 48), TensorScheme("int4", 32), name="encoder.q.weight")


def test_gptq_without_calibration_inputs_is_an_error() -> None:
    with pytest.raises(PlanError, match=r"gptq.*calibration"):
        quantize(torch.randn(8, 64), TensorScheme("int4", None, True, "gptq"), name="w")


def test_gptq_rejects_calibration_inputs_of_the_wrong_width() -> None:
    with pytest.raises(PlanError, match="input dimension is 64"):
        quantize(torch.randn(8, 64), TensorScheme("int4", None, True, "gptq"), torch.randn(10, 32))


@pytest.mark.parametrize(
    "scheme",
    [
        TensorScheme("int4", None, True, "gptq"),
        TensorScheme("int4", 32, False, "gptq"),
        TensorScheme("int3", 64, True, "gptq"),
        TensorScheme("int2", None, False, "gptq"),
        TensorScheme("int8", 32, True, "gptq"),
    ],
)
def test_gptq_output_error_is_below_rtn_on_correlated_inputs(scheme: TensorScheme) -> None:
    torch.manual_seed(1)
    weight = torch.randn(96, 256) * 0.05
    x = correlated_inputs(512, 256, rank=16)
    rtn = quantize_dequantize(
        weight, TensorScheme(scheme.precision, scheme.group_size, scheme.symmetric, "rtn")
    )
    gptq = quantize_dequantize(weight, scheme, x)
    err_rtn = float((x @ (weight - rtn).T).pow(2).mean())
    err_gptq = float((x @ (weight - gptq).T).pow(2).mean())
    assert err_gptq < 0.5 * err_rtn


@pytest.mark.parametrize(
    "scheme", [TensorScheme("int4", 32, True, "gptq"), TensorScheme("int3", None, False, "gptq")]
)
def test_gptq_act_order_helps_when_a_few_input_columns_carry_most_energy(scheme: TensorScheme) -> None:
    # Transformer activations have a few outlier channels: quantizing those columns first
    # (act order) leaves the most columns to absorb their error.
    from planner.quant.gptq import hessian, quantize_gptq

    errors = {}
    for act_order in (False, True):
        total = 0.0
        for seed in range(3):
            torch.manual_seed(seed)  # correlated_inputs draws from the global generator
            gen = torch.Generator().manual_seed(seed)
            weight = torch.randn(64, 128, generator=gen) * 0.05
            x = correlated_inputs(512, 128, rank=32)
            loud = torch.randperm(128, generator=gen)[:6]
            x[:, loud] *= 20.0
            qt = quantize_gptq(weight, scheme, h=hessian(x, 128), act_order=act_order)
            assert qt.codes is not None and qt.codes.shape == (64, 128)  # original column order
            total += float((x @ (weight - dequantize(qt)).T).pow(2).mean())
        errors[act_order] = total
    assert errors[True] < 0.8 * errors[False], errors


def test_gptq_survives_dead_input_columns() -> None:
    x = correlated_inputs(128, 64)
    x[:, 5] = 0.0
    qt = quantize(torch.randn(16, 64), TensorScheme("int4", 32, True, "gptq"), x)
    assert qt.method == "gptq" and torch.isfinite(dequantize(qt)).all()


def test_gptq_on_an_embedding_table_falls_back_to_rtn() -> None:
    table = torch.randn(50, 64)
    qt = quantize(table, TensorScheme("int4", 32, True, "gptq"), kind="embedding")
    assert qt.method == "rtn"
    assert torch.equal(dequantize(qt), quantize_dequantize(table, TensorScheme("int4", 32, True, "rtn")))


def test_scales_are_fp16_and_codes_are_in_range() -> None:
    qt = quantize(torch.randn(16, 64) * 1e-6, TensorScheme("int3", 32, False))
    assert qt.scales is not None and qt.zeros is not None and qt.codes is not None
    assert qt.scales.dtype == torch.float16 and qt.zeros.dtype == torch.float16
    assert int(qt.codes.max()) <= 7
    assert bool(torch.isfinite(dequantize(qt)).all())


def test_quantize_does_not_modify_the_input() -> None:
    weight = torch.randn(16, 64)
    before = weight.clone()
    quantize(weight, TensorScheme("int4", 32, True, "gptq"), correlated_inputs(64, 64))
    assert torch.equal(weight, before)


# ----------------------------------------------------------------------------- plans and files


def test_plan_bytes_predicted_equal_payload_bytes_written(tmp_path: Path) -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    for plan in [Plan(), mixed_plan(spec), Plan.uniform(spec, TensorScheme("int3", 32, False))]:
        quantized = quantize_plan(net, spec, plan)
        quantizable = set(spec.tensor_names)
        others = {n: p for n, p in net.named_parameters() if n not in quantizable}
        report = write_packed_safetensors(tmp_path / f"{plan.hash()}.safetensors", quantized, others)
        assert report.payload_bytes == plan_nbytes(spec, plan)
        assert report.file_bytes == (tmp_path / f"{plan.hash()}.safetensors").stat().st_size
        assert report.file_bytes == report.payload_bytes + report.header_bytes
        assert report.header_bytes > 8


def test_packed_file_reads_back_bit_exact(tmp_path: Path) -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    quantized = quantize_plan(net, spec, mixed_plan(spec))
    write_packed_safetensors(tmp_path / "p.safetensors", quantized, {"norm.weight": net.norm.weight})
    back, others = read_packed_safetensors(tmp_path / "p.safetensors")
    assert set(back) == set(quantized)
    for name, qt in quantized.items():
        assert back[name].scheme == qt.scheme
        assert torch.equal(dequantize(back[name]), dequantize(qt))
    assert torch.equal(others["norm.weight"], net.norm.weight.detach())


def test_packed_parts_that_are_missing_or_wrong_name_the_tensor_the_part_and_the_rule() -> None:
    qt = quantize(torch.randn(8, 64), TensorScheme("int4", 32, False), name="blocks.0.up.weight")
    parts = pack(qt)
    shape, scheme = (8, 64), qt.scheme
    missing = {k: v for k, v in parts.items() if k != "scales"}
    want = r"'blocks\.0\.up\.weight': packed scales is missing, expected float16 \(8, 2\)"
    with pytest.raises(PlanError, match=want):
        unpack(missing, shape, scheme, name="blocks.0.up.weight")
    with pytest.raises(PlanError, match="'w': packed zeros is float32"):
        unpack({**parts, "zeros": parts["zeros"].astype(np.float32)}, shape, scheme, name="w")
    with pytest.raises(PlanError, match="'w': packed codes is uint8 \\(7,\\)"):
        unpack({**parts, "codes": parts["codes"][:7]}, shape, scheme, name="w")
    hot = {"hot_index": np.zeros(1, np.int32)}
    with pytest.raises(PlanError, match=r"'w': packed parts \['hot_index'\] do not belong"):
        unpack({**parts, **hot}, shape, scheme, name="w")
    with pytest.raises(PlanError, match="'w': group_size 128 does not divide its input dimension 64"):
        unpack(parts, shape, TensorScheme("int4", 128, False), name="w")


def test_codes_outside_the_bit_width_are_refused_not_wrapped() -> None:
    with pytest.raises(PlanError, match="code 256 does not fit in 4 bits"):
        pack_codes(np.array([256, 1]), 4)
    with pytest.raises(PlanError, match="code -1 does not fit in 4 bits"):
        pack_codes(np.array([-1, 1]), 4)


def test_a_corrupt_packed_file_is_a_plan_error_naming_the_file(tmp_path: Path) -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    path = tmp_path / "p.safetensors"
    write_packed_safetensors(path, quantize_plan(net, spec, mixed_plan(spec)))
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], data[:5], b""):
        path.write_bytes(broken)
        with pytest.raises(PlanError, match=f"{path}: unreadable or corrupt packed file"):
            read_packed_safetensors(path)


def test_a_failed_packed_write_leaves_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.numpy

    net = tiny_net()
    spec = tiny_spec(net)
    quantized = quantize_plan(net, spec, mixed_plan(spec))
    path = tmp_path / "p.safetensors"
    write_packed_safetensors(path, quantized)
    before = path.read_bytes()

    def half_then_fail(arrays: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_packed_safetensors(path, quantized)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_int4_plan_is_about_eight_times_smaller_than_fp32() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    fp32 = plan_nbytes(spec, Plan()) - 4 * spec.other_params
    int4 = plan_nbytes(spec, Plan.uniform(spec, TensorScheme("int4", 64))) - 4 * spec.other_params
    assert 6.5 < fp32 / int4 < 8


def test_apply_plan_patches_weights_and_restores_fp32_tensors() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    plan = mixed_plan(spec)
    cache = QuantCache()
    apply_plan(net, spec, plan, cache=cache)
    for name, scheme in plan.schemes:
        expected = quantize_dequantize(original[name], scheme, kind=spec.tensor(name).kind)
        assert torch.equal(dict(net.named_parameters())[name].detach(), expected), name
    assert torch.equal(net.head.weight.detach(), original["head.weight"])
    assert torch.equal(net.norm.weight.detach(), original["norm.weight"])
    restore_weights(net, cache)
    assert torch.equal(net.blocks[0]["up"].weight.detach(), original["blocks.0.up.weight"])


def test_apply_plan_that_fails_on_one_tensor_changes_no_weight() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    net.head = nn.Linear(32, 16)  # the spec's last tensor no longer matches the module
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(PlanError, match=r"'head\.weight': module has shape"):
        apply_plan(net, spec, Plan.uniform(spec, TensorScheme("int4", 32)))
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_apply_plan_reuses_cached_tensors_and_never_requantizes_its_own_output() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    cache = QuantCache()
    a = Plan.uniform(spec, TensorScheme("int4", 32))
    b = Plan.uniform(spec, TensorScheme("int2", None, False))
    apply_plan(net, spec, a, cache=cache)
    first = {n: p.detach().clone() for n, p in net.named_parameters()}
    misses = cache.misses
    apply_plan(net, spec, b, cache=cache)
    apply_plan(net, spec, a, cache=cache)
    assert cache.misses == 2 * misses and cache.hits == misses
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), first[name]), name


def test_apply_plan_with_gptq_uses_per_tensor_calibration_inputs() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    calib = {
        n: correlated_inputs(64, spec.tensor(n).shape[1], seed=i) for i, n in enumerate(spec.tensor_names)
    }
    plan = Plan.uniform(spec, TensorScheme("int4", 32, True, "gptq"))
    quantized = quantize_plan(net, spec, plan, calib)
    assert quantized["blocks.0.up.weight"].method == "gptq"
    assert quantized["embed.weight"].method == "rtn"
    apply_plan(net, spec, plan, calib)
    ids = torch.randint(0, 100, (2, 5))
    assert torch.isfinite(net(ids)).all()


def test_apply_plan_with_a_bad_group_size_changes_nothing() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    bad = Plan.build({"blocks.0.up.weight": TensorScheme("int4", 128)})
    with pytest.raises(PlanError, match=r"blocks\.0\.up\.weight.*does not divide"):
        apply_plan(net, spec, bad)
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), before[name])


def test_apply_plan_rejects_a_tensor_that_is_not_a_linear_or_embedding_weight() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    bogus = ModelSpec(**{**spec.__dict__, "tensors": (TensorSpec("norm.weight", "linear", (64, 64), 0, 0),)})
    with pytest.raises(PlanError, match=r"norm\.weight"):
        apply_plan(net, bogus, Plan.uniform(bogus, TensorScheme("int8")))


def test_tiny_weights_keep_their_relative_precision() -> None:
    weight = torch.randn(16, 64) * 1e-5
    err = (quantize_dequantize(weight, TensorScheme("int8")) - weight).abs().max()
    assert float(err) < 0.02 * float(weight.abs().max())


# ----------------------------------------------------------------------------- hot rows


def _lookups() -> torch.Tensor:
    """Row 7 looked up five times, rows 3 and 9 three times each, row 1 once."""
    return torch.tensor([7, 3, 7, 9, 7, 3, 9, 7, 1, 9, 3, 7])


def test_hot_rows_are_the_most_looked_up_rows_ties_to_the_lower_id() -> None:
    qt = quantize(torch.randn(100, 64), TensorScheme("int2", 32, hot_rows=3), _lookups(), kind="embedding")
    assert qt.hot_index is not None and qt.hot_index.tolist() == [3, 7, 9]
    more = quantize(torch.randn(100, 64), TensorScheme("int2", 32, hot_rows=5), _lookups(), kind="embedding")
    assert more.hot_index is not None and more.hot_index.tolist() == [0, 1, 3, 7, 9]  # then unseen rows by id


def test_hot_rows_are_stored_at_int8_and_the_rest_at_the_table_precision() -> None:
    weight = torch.randn(100, 64)
    plain = dequantize(quantize(weight, TensorScheme("int2", 32), kind="embedding"))
    qt = quantize(weight, TensorScheme("int2", 32, hot_rows=3), _lookups(), kind="embedding")
    hot = dequantize(qt)
    assert torch.equal(hot[[0, 1, 2, 4]], plain[[0, 1, 2, 4]])
    int8 = dequantize(quantize(weight[[3, 7, 9]], TensorScheme("int8"), kind="embedding"))
    assert torch.equal(hot[[3, 7, 9]], int8)
    assert float((hot[[3, 7, 9]] - weight[[3, 7, 9]]).abs().max()) < 0.1 * float(
        (plain[[3, 7, 9]] - weight[[3, 7, 9]]).abs().max()
    )


def test_hot_rows_pack_round_trip_and_predicted_bytes_equal_the_bytes_packed() -> None:
    weight = torch.randn(300, 64)
    lookups = torch.randint(0, 300, (2000,), generator=torch.Generator().manual_seed(1))
    for scheme in [
        TensorScheme("int4", 64, False, hot_rows=16),
        TensorScheme("int3", 32, True, hot_rows=256),
        TensorScheme("int2", None, True, hot_rows=1),
    ]:
        qt = quantize(weight, scheme, lookups, kind="embedding")
        packed = pack(qt)
        assert packed["hot_index"].dtype == np.int32 and packed["hot_codes"].dtype == np.uint8
        assert sum(a.nbytes for a in packed.values()) == packed_nbytes((300, 64), scheme)
        back = unpack(packed, qt.shape, scheme)
        assert torch.equal(dequantize(back), dequantize(qt))


def test_hot_rows_need_lookup_statistics_and_a_table() -> None:
    with pytest.raises(PlanError, match=r"'tok\.weight'.*hot_rows 4 needs the table's lookup statistics"):
        quantize(torch.randn(100, 64), TensorScheme("int4", hot_rows=4), name="tok.weight", kind="embedding")
    with pytest.raises(PlanError, match=r"'fc\.weight'.*embedding tables only"):
        quantize(torch.randn(100, 64), TensorScheme("int4", hot_rows=4), name="fc.weight")
    with pytest.raises(PlanError, match=r"hot_rows 100 must be below its 100 rows"):
        quantize(torch.randn(100, 64), TensorScheme("int4", hot_rows=100), _lookups(), kind="embedding")
    with pytest.raises(PlanError, match=r"rows outside 0\.\.99"):
        quantize(
            torch.randn(100, 64), TensorScheme("int4", hot_rows=4), torch.tensor([5, 100]), kind="embedding"
        )
    with pytest.raises(PlanError, match=r"hot_rows -1 must be a whole number"):
        TensorScheme("int4", hot_rows=-1)


def test_a_plan_with_hot_rows_on_a_linear_weight_is_refused_naming_it() -> None:
    spec = tiny_spec(tiny_net())
    with pytest.raises(
        PlanError, match=r"'blocks\.0\.up\.weight': hot_rows applies to embedding tables only"
    ):
        Plan.build({"blocks.0.up.weight": TensorScheme("int4", hot_rows=8)}).validate(spec)
    with pytest.raises(PlanError, match=r"'embed\.weight': hot_rows 256 must be below its 100 rows"):
        Plan.build({"embed.weight": TensorScheme("int4", hot_rows=256)}).validate(spec)


def test_a_scheme_without_hot_rows_serialises_as_before() -> None:
    plain = TensorScheme("int4", 32, False)
    assert "hot_rows" not in plain.to_dict()
    hot = TensorScheme("int4", 32, False, hot_rows=256)
    assert TensorScheme.from_dict(hot.to_dict()) == hot
    assert TensorScheme("fp16", hot_rows=256) == TensorScheme("fp16")


def test_a_plan_with_hot_rows_writes_the_bytes_it_predicts_and_reads_back(tmp_path: Path) -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    plan = Plan.build(
        {**dict(mixed_plan(spec).schemes), "embed.weight": TensorScheme("int3", 32, hot_rows=8)}
    )
    calib = {"embed.weight": _lookups()}
    quantized = quantize_plan(net, spec, plan, calib)
    quantizable = set(spec.tensor_names)
    others = {n: p for n, p in net.named_parameters() if n not in quantizable}
    report = write_packed_safetensors(tmp_path / "hot.safetensors", quantized, others)
    assert report.payload_bytes == plan_nbytes(spec, plan)
    back, _ = read_packed_safetensors(tmp_path / "hot.safetensors")
    assert torch.equal(dequantize(back["embed.weight"]), dequantize(quantized["embed.weight"]))
