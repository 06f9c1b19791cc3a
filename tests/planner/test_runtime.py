"""planner.runtime: real int8/int4 kernels match the dequantized reference; measurement helpers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planner.quant import (
    QuantCache,
    apply_plan,
    dequantize,
    packed_nbytes,
    quantize,
    quantize_plan,
    read_packed_safetensors,
    write_packed_safetensors,
)
from planner.runtime import (
    KERNEL_DEQUANT_AT_LOAD,
    KERNEL_FP16_UPCAST,
    KERNEL_FP32,
    KERNEL_FP32_DEFAULT,
    KERNEL_FP32_ONEDNN,
    KERNEL_INT4,
    KERNEL_INT8,
    KERNEL_PACKED_GATHER,
    DequantLinear,
    Fp16Linear,
    Int4Linear,
    Int8Linear,
    PackedEmbedding,
    build_runtime_model,
    measure_latency,
    measure_memory,
    module_storage_bytes,
    runtime_layer,
)
from planner.specs import Plan, PlanError, TensorScheme
from tests.planner.test_quant import mixed_plan, tiny_net, tiny_spec

torch.set_num_threads(2)


def _reference(x: torch.Tensor, qt_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, qt_weight, bias)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_kernel_matches_the_dequantized_reference(symmetric: bool) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(96, 64), torch.randn(96)
    qt = quantize(w, TensorScheme("int8", None, symmetric))
    layer = Int8Linear(qt, b)
    x = torch.randn(3, 5, 64)
    ref = _reference(x, dequantize(qt), b)
    out = layer(x)
    assert out.shape == (3, 5, 96)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert layer.weight_int8.dtype == torch.int8


@pytest.mark.parametrize(
    "scheme",
    [
        TensorScheme("int4", 32, True),
        TensorScheme("int4", 64, False),
        TensorScheme("int4", 128, False),
        TensorScheme("int4", None, True),
        TensorScheme("int4", None, False),
    ],
)
def test_int4_kernel_matches_the_dequantized_reference(scheme: TensorScheme) -> None:
    torch.manual_seed(1)
    w, b = torch.randn(48, 384) * 0.05, torch.randn(48)
    qt = quantize(w, scheme)
    layer = Int4Linear(qt, b)
    x = torch.randn(7, 384)
    ref = _reference(x, dequantize(qt), b)
    assert torch.allclose(layer(x), ref, atol=1e-4, rtol=1e-4)
    assert layer.weight_int4.dtype == torch.uint8 and layer.weight_int4.numel() == 48 * 384 // 2


def test_bf16_activations_stay_close_to_the_reference() -> None:
    torch.manual_seed(2)
    qt = quantize(torch.randn(64, 128) * 0.05, TensorScheme("int4", 32))
    x = torch.randn(4, 128)
    ref = _reference(x, dequantize(qt), None)
    out = Int4Linear(qt, act_dtype=torch.bfloat16)(x)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_int4_kernel_refuses_shapes_it_cannot_run() -> None:
    qt = quantize(torch.randn(40, 64), TensorScheme("int4", 32))
    with pytest.raises(PlanError, match="out % 16"):
        Int4Linear(qt)


def test_packed_embedding_dequantizes_only_the_rows_looked_up() -> None:
    table = torch.randn(100, 64)
    for scheme in [
        TensorScheme("int3", 32, False),
        TensorScheme("int4", None, True),
        TensorScheme("int2", 64),
    ]:
        qt = quantize(table, scheme, kind="embedding")
        emb = PackedEmbedding(qt)
        ids = torch.tensor([[0, 5, 99], [5, 5, 1]])
        assert torch.equal(emb(ids), F.embedding(ids, dequantize(qt)))
        # a 25 KB table is looked up from its dequantized copy; the packed path gives the same
        assert torch.equal(emb.lookup_packed(ids), F.embedding(ids, dequantize(qt)))
        assert emb.packed_rows.numel() == 100 * 64 * scheme.bits // 8
        assert module_storage_bytes(emb) == packed_nbytes((100, 64), scheme)


def test_packed_embedding_refuses_ids_outside_the_table_as_nn_embedding_does() -> None:
    large = PackedEmbedding(quantize(torch.randn(4096, 128), TensorScheme("int4", 32), kind="embedding"))
    for bad in ([[-1, 3]], [[4096]]):
        with pytest.raises(IndexError, match="out of range"):
            large(torch.tensor(bad))
        with pytest.raises(IndexError):
            torch.nn.Embedding(4096, 128)(torch.tensor(bad))


def test_only_small_packed_tables_keep_a_dequantized_copy() -> None:
    small = PackedEmbedding(quantize(torch.randn(512, 384), TensorScheme("int2", 32), kind="embedding"))
    large = PackedEmbedding(quantize(torch.randn(4096, 128), TensorScheme("int4", 32), kind="embedding"))
    ids = torch.tensor([[0, 3, 7]])
    small(ids), large(ids)
    assert "_dequantized" in small.__dict__ and "_dequantized" not in large.__dict__
    small.float()  # moving / converting the module drops the copy; the next lookup rebuilds it
    assert "_dequantized" not in small.__dict__
    assert torch.equal(small(ids), small.lookup_packed(ids))


def test_small_fp16_tables_are_upcast_once_large_ones_per_lookup() -> None:
    small_qt = quantize(torch.randn(2, 384), TensorScheme("fp16"), kind="embedding")
    large_qt = quantize(torch.randn(4096, 128), TensorScheme("fp16"), kind="embedding")
    small, s_kernel, s_note = runtime_layer(torch.nn.Embedding(2, 384), small_qt)
    large, _, l_note = runtime_layer(torch.nn.Embedding(4096, 128), large_qt)
    assert s_kernel == KERNEL_FP16_UPCAST and "upcast once" in s_note and l_note == "lookup"
    ids = torch.tensor([[0, 1, 1]])
    for layer, qt in ((small, small_qt), (large, large_qt)):
        assert torch.equal(layer(ids), F.embedding(ids, qt.values.float()))
    assert "_upcast" in small.__dict__ and "_upcast" not in large.__dict__
    small.float()  # moving / converting the module drops the copy; the next lookup rebuilds it
    assert "_upcast" not in small.__dict__
    assert torch.equal(small(ids), F.embedding(ids, small_qt.values.float()))


def test_packed_embedding_serves_hot_rows_from_their_int8_copy() -> None:
    table = torch.randn(100, 64)
    lookups = torch.tensor([5, 5, 5, 99, 99, 42])
    for scheme in [TensorScheme("int2", 32, hot_rows=3), TensorScheme("int4", 64, False, hot_rows=2)]:
        qt = quantize(table, scheme, lookups, kind="embedding")
        emb = PackedEmbedding(qt)
        # some ids hot, every id hot (no low-bit row unpacked), none hot
        mixed, all_hot, none_hot = [[0, 5, 99], [42, 5, 1]], [[5, 99]], [[0, 1, 2]]
        for ids in (torch.tensor(mixed), torch.tensor(all_hot), torch.tensor(none_hot)):
            assert torch.equal(emb(ids), F.embedding(ids, dequantize(qt)))
            assert torch.equal(emb.lookup_packed(ids), F.embedding(ids, dequantize(qt)))
        # The row-id → hot-slot map (int16 per row) replaces the stored int32 row ids.
        k = scheme.hot_rows
        assert module_storage_bytes(emb) == packed_nbytes((100, 64), scheme) - 4 * k + 2 * 100


def test_runtime_model_reports_kernels_and_matches_the_fake_quantized_model() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    plan = mixed_plan(spec)
    runtime, report = build_runtime_model(net, spec, plan, act_dtype=torch.float32)
    assert report.kernel_for("blocks.0.up.weight") == KERNEL_INT4
    assert report.kernel_for("blocks.0.down.weight") == KERNEL_INT8
    assert report.kernel_for("blocks.1.up.weight") == KERNEL_DEQUANT_AT_LOAD  # int2
    assert report.kernel_for("blocks.1.down.weight") == KERNEL_FP16_UPCAST
    assert report.kernel_for("head.weight") == KERNEL_FP32
    assert report.kernel_for("embed.weight") == KERNEL_PACKED_GATHER
    assert isinstance(runtime.blocks[1]["up"], DequantLinear)
    assert isinstance(net.blocks[0]["up"], nn.Linear)  # the original is untouched

    reference = apply_plan(tiny_net(), spec, plan, cache=QuantCache())
    ids = torch.randint(0, 100, (4, 9))
    with torch.inference_mode():
        assert torch.allclose(runtime(ids), reference(ids), atol=1e-4, rtol=1e-4)


def test_runtime_model_runs_from_a_packed_file(tmp_path: Path) -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    plan = Plan.uniform(spec, TensorScheme("int8"))
    write_packed_safetensors(tmp_path / "w.safetensors", quantize_plan(net, spec, plan))
    quantized, _ = read_packed_safetensors(tmp_path / "w.safetensors")
    runtime, report = build_runtime_model(net, spec, plan, quantized=quantized, act_dtype=torch.float32)
    assert report.by_kernel()[KERNEL_INT8] == 5
    reference = apply_plan(tiny_net(), spec, plan)
    ids = torch.randint(0, 100, (2, 6))
    with torch.inference_mode():
        assert torch.allclose(runtime(ids), reference(ids), atol=1e-4, rtol=1e-4)


def test_default_runtime_uses_bf16_activations_and_stays_close() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    plan = Plan.uniform(spec, TensorScheme("int4", 32))
    runtime, report = build_runtime_model(net, spec, plan)
    assert "bfloat16" in next(c.note for c in report.choices if c.kernel == KERNEL_INT4)
    plain, plain_report = build_runtime_model(net, spec, plan, dequant_all=True)
    assert plain_report.kernel_for("blocks.0.up.weight") == KERNEL_DEQUANT_AT_LOAD
    ids = torch.randint(0, 100, (3, 8))
    with torch.inference_mode():
        ref = plain(ids)
        assert (runtime(ids) - ref).abs().max() < 0.05 * ref.abs().max()


def test_runtime_model_refuses_quantized_tensors_from_another_plan() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    quantized = quantize_plan(net, spec, Plan.uniform(spec, TensorScheme("int8")))
    with pytest.raises(PlanError, match="plan says"):
        build_runtime_model(net, spec, Plan.uniform(spec, TensorScheme("int4", 32)), quantized=quantized)


def test_low_bit_runtime_model_stores_fewer_bytes() -> None:
    net = tiny_net()
    spec = tiny_spec(net)
    int4, _ = build_runtime_model(net, spec, Plan.uniform(spec, TensorScheme("int4", 32)))
    assert module_storage_bytes(int4) < 0.35 * module_storage_bytes(net)


def test_measure_latency_times_every_repeat() -> None:
    calls: list[int] = []
    stats = measure_latency(lambda n: calls.append(n), (1,), repeats=7, warmup=2, threads=1)
    assert len(calls) == 9 and len(stats.samples_s) == 7
    assert stats.min_s <= stats.median_s <= stats.p90_s <= max(stats.samples_s)
    assert stats.predicted is False and stats.threads == 1
    with pytest.raises(PlanError):
        measure_latency(lambda: None, repeats=0)


def test_measure_memory_sees_activations_and_weights() -> None:
    net = tiny_net()
    ids = torch.randint(0, 100, (8, 32))
    stats = measure_memory(net, net, (ids,))
    assert stats.weights_bytes == sum(p.numel() * 4 for p in net.parameters())
    # at least one (batch, seq, 128) fp32 intermediate was alive
    assert stats.activation_peak_bytes >= 8 * 32 * 128 * 4
    assert stats.predicted is False


def test_layers_give_back_their_weight_for_model_code_that_reads_it() -> None:
    torch.manual_seed(3)
    w = torch.randn(32, 64) * 0.1
    for layer, scheme in [
        (Int8Linear, TensorScheme("int8", None, False)),
        (Int4Linear, TensorScheme("int4", 32, False)),
        (Int4Linear, TensorScheme("int4", None, True)),
    ]:
        qt = quantize(w, scheme)
        built = layer(qt, act_dtype=torch.float32)
        assert torch.allclose(built.weight, dequantize(qt), atol=1e-6), scheme


def _refuse(*_args: object) -> torch.Tensor:
    raise AssertionError("forward called")


@pytest.mark.parametrize(
    ("layer", "scheme"),
    [(DequantLinear, TensorScheme("int4", 32, False)), (Fp16Linear, TensorScheme("fp16"))],
)
def test_fp32_product_layers_take_bias_and_gelu_in_one_call_as_the_fp32_model_does(
    layer: type[DequantLinear] | type[Fp16Linear], scheme: TensorScheme
) -> None:
    from planner.models.linear import linear_gelu

    torch.manual_seed(5)
    w, bias = torch.randn(48, 32) * 0.1, torch.randn(48)
    built = layer(quantize(w, scheme), bias)
    deq = built._dequantized_weight()
    x = torch.randn(2, 7, 32)  # leading dims the op keeps: no reshapes around the product
    with torch.inference_mode():
        out = built(x)
        assert out.shape == (2, 7, 48)
        torch.testing.assert_close(out, F.linear(x, deq, bias), rtol=1e-5, atol=1e-5)
        with torch.profiler.profile() as prof:
            built(x)
        ops = {e.name for e in prof.events()}
        assert "aten::add" not in ops, ops  # the bias inside the product, as the FP32 model has it
        built.forward = _refuse  # type: ignore[method-assign]
        fused = linear_gelu(built, x)  # unobserved: one product with GELU, not forward + gelu
        del built.forward
        torch.testing.assert_close(fused, F.gelu(F.linear(x, deq, bias)), rtol=1e-5, atol=1e-5)
        assert built.calls == 3  # the fused call counts as the layer's own call
        seen: list[torch.Tensor] = []
        built.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        torch.testing.assert_close(linear_gelu(built, x), fused, rtol=1e-5, atol=1e-5)
    assert len(seen) == 1  # observed: called through forward, so the hook sees its input
    assert built.calls == 4
    with torch.inference_mode():
        half = built(x.to(torch.bfloat16))  # other activation dtypes are multiplied in fp32
    assert half.dtype == torch.float32


class _FusedQK(nn.Module):
    """Reads two Linear weights and fuses them, as an optimised model might."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 32)
        self.k = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch.cat([self.q.weight, self.k.weight]), torch.cat([self.q.bias, self.k.bias]))


def test_observed_kernels_reveal_model_code_that_bypasses_the_kernels() -> None:
    from planner.runtime import KERNEL_BYPASSED, observed_kernels
    from planner.specs import ModelSpec, TensorSpec

    torch.manual_seed(4)
    net = _FusedQK().eval()
    spec = ModelSpec(
        name="fused",
        tensors=(
            TensorSpec("q.weight", "linear", (32, 64), 0, 32 * 64),
            TensorSpec("k.weight", "linear", (32, 64), 0, 32 * 64),
        ),
        n_blocks=1,
        exit_points=(0,),
        hidden_size=64,
        n_heads=1,
        intermediate_size=64,
        vocab_size=1,
    )
    plan = Plan.uniform(spec, TensorScheme("int8"))
    runtime, report = build_runtime_model(net, spec, plan, act_dtype=torch.float32)
    assert report.kernel_for("q.weight") == KERNEL_INT8
    x = torch.randn(3, 64)
    with torch.inference_mode():
        out = runtime(x)
        reference = apply_plan(copy.deepcopy(net), spec, plan)(x)
    assert torch.allclose(out, reference, atol=1e-5)
    seen = observed_kernels(runtime, report)
    assert seen.kernel_for("q.weight") == KERNEL_BYPASSED
    assert "int8pack_mm" in next(c.note for c in seen.choices if c.name == "q.weight")


def test_benchmark_linear_times_the_kernels_asked_for_and_names_an_unknown_one() -> None:
    from planner.runtime import benchmark_linear

    got = benchmark_linear(64, 32, 4, repeats=2, warmup=1, kernels=(KERNEL_FP32_DEFAULT, KERNEL_FP32_ONEDNN))
    assert list(got) == [KERNEL_FP32_DEFAULT, KERNEL_FP32_ONEDNN]
    assert all(len(s.samples_s) == 2 and s.median_s > 0 for s in got.values())
    with pytest.raises(PlanError, match="unknown kernel"):
        benchmark_linear(64, 32, 4, repeats=1, warmup=0, kernels=("magic",))
