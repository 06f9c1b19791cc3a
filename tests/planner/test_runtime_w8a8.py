"""planner.runtime W8A8 kernels and the early-exit runtime, on small tensors and the tiny BERT."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from planner import runtime as runtime_module
from planner.data import TextDataset
from planner.exits import ExitHeads, pooled_features, train_exit_heads
from planner.models import Batch, TinyAdapter, TokenizedSplit
from planner.quant import dequantize, quantize
from planner.runtime import (
    KERNEL_FP32,
    KERNEL_W8A8,
    KERNEL_W8A8_FROM_INT4,
    KERNEL_W8A8_FROM_LOWBIT,
    KERNEL_W8A8_FUSED,
    KERNEL_W8A16_FUSED,
    EarlyExitRunner,
    Int8DynamicLinear,
    Int8MatmulProbe,
    build_runtime_model,
    compiled_vector_isa,
    evaluate_runtime,
    int_mm_supported,
    measure_text_latency,
    probe_int8_matmul,
    quantize_rows_int8,
    quantize_rows_int8_asym,
    quantize_rows_two_digits_asym,
    runtime_exit_curve,
)
from planner.specs import Plan, PlanError, TensorScheme


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("scheme", "exact"),
    [
        (TensorScheme("int8"), True),
        (TensorScheme("int4"), True),
        (TensorScheme("int4", None, False), True),
        (TensorScheme("int2"), True),
        (TensorScheme("int4", 32), False),
        (TensorScheme("int8", None, False), False),
    ],
)
def test_int8_dynamic_linear_matches_the_fp32_reference(
    one_thread: None, scheme: TensorScheme, exact: bool
) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(48, 64) * 0.1, torch.randn(48)
    qt = quantize(w, scheme)
    layer = Int8DynamicLinear(qt, b)
    assert layer.exact is exact
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.shape == (48, 64)
    if exact:  # the int8 weight is the quantized weight itself, not an approximation
        assert torch.allclose(layer.weight, dequantize(qt), atol=1e-6)
    else:
        assert _rel_err(layer.weight, dequantize(qt)) < 0.01
    x = torch.randn(2, 7, 64)
    ref = F.linear(x, dequantize(qt), b)
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (2, 7, 48)
    # Per-token int8 activations: ~0.5 % relative error on random data, far below int4's.
    assert _rel_err(out, ref) < 0.02
    assert layer.calls == 1 and layer.fallback_calls == 0


def test_int8_dynamic_linear_falls_back_when_int_mm_cannot_run(
    one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    qt = quantize(torch.randn(16, 32), TensorScheme("int8"))
    layer = Int8DynamicLinear(qt, None)
    monkeypatch.setattr("planner.runtime.int_mm_supported", lambda *a, **k: False)
    x = torch.randn(3, 32)
    out = layer(x)
    # The fallback runs unquantized activations against the same int8 weight: exact fp32.
    assert torch.allclose(out, F.linear(x, dequantize(qt)), atol=1e-5)
    assert layer.fallback_calls == 1


def test_int_mm_shape_rules() -> None:
    assert int_mm_supported(1, 7, 9)  # CPU: any shape
    assert not int_mm_supported(0, 8, 8)
    cuda = torch.device("cuda")
    assert not int_mm_supported(16, 64, 64, cuda) and int_mm_supported(17, 64, 64, cuda)
    assert not int_mm_supported(32, 60, 64, cuda)


def test_row_quantization_is_within_half_a_step_and_handles_zero_rows() -> None:
    x = torch.randn(5, 40)
    x[2] = 0.0
    q, scale = quantize_rows_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (5, 1)
    assert int(q.abs().max()) <= 127
    err = (q.float() * scale - x).abs()
    assert bool((err <= scale / 2 + 1e-7).all())
    assert bool(torch.isfinite(scale).all()) and int(q[2].abs().max()) == 0


def test_asymmetric_row_quantization_uses_the_whole_range_and_keeps_zero_exact() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=gen)
    x[1] = x[1].abs() + 0.5  # one-sided row
    x[2] = 0.0
    x[3, :20] = 0.0
    q, scale, zero = quantize_rows_int8_asym(x)
    assert q.dtype == torch.int8 and scale.shape == zero.shape == (6, 1) and zero.dtype == torch.int32
    back = (q.int() - zero).float() * scale
    assert bool(((back - x).abs() <= scale / 2 + 1e-6).all())
    assert bool((back[x == 0.0] == 0.0).all())  # zero is a code: no offset on zero inputs
    # The whole 256-code range is used: each row reaches both ends (a row's range includes 0).
    assert int(q.min()) == -128 and int(q.max()) == 127
    # A one-sided row gets about twice the symmetric grid's resolution.
    _, sym_scale = quantize_rows_int8(x)
    assert float(scale[1]) < 0.51 * float(sym_scale[1])


def test_asymmetric_input_linear_tracks_the_fp32_reference_better_on_skewed_rows(one_thread: None) -> None:
    torch.manual_seed(4)
    w, b = torch.randn(48, 64) * 0.1, torch.randn(48)
    qt = quantize(w, TensorScheme("int8"))
    sym, asym = Int8DynamicLinear(qt, b), Int8DynamicLinear(qt, b)
    asym.asymmetric_input = True
    assert torch.equal(asym.weight_rowsum, asym.weight_int8.sum(1, dtype=torch.int32))
    x = torch.randn(32, 64).abs() + 1.0  # skewed rows, as after a LayerNorm with large channels
    ref = F.linear(x, dequantize(qt), b)
    with torch.inference_mode():
        e_sym, e_asym = _rel_err(sym(x), ref), _rel_err(asym(x), ref)
    assert e_asym < 0.7 * e_sym < 0.02


def test_two_digit_rows_are_within_1_508th_of_a_step() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, generator=gen) * 3
    x[1] = x[1].abs() + 0.5  # one-sided row
    x[2] = 0.0
    digits, scale, zero = quantize_rows_two_digits_asym(x)
    assert digits.dtype == torch.int8 and digits.shape == (12, 40)
    q, r = digits[:6].int(), digits[6:].int()
    one_q, one_scale, one_zero = quantize_rows_int8_asym(x)
    # The first digit is exactly the one-digit quantization; the second is its residual.
    assert torch.equal(q, one_q.int()) and torch.equal(scale, one_scale) and torch.equal(zero, one_zero)
    assert int(r.abs().max()) <= 127
    back = ((q - zero).float() + r.float() / 254.0) * scale
    assert bool(((back - x).abs() <= scale / 508 + 1e-5 * x.abs().amax()).all())
    assert bool((back[2] == 0.0).all())


def test_two_digit_input_linear_is_far_closer_to_the_fp32_reference(one_thread: None) -> None:
    torch.manual_seed(6)
    w, b = torch.randn(48, 64) * 0.1, torch.randn(48)
    qt = quantize(w, TensorScheme("int8"))
    one, two = Int8DynamicLinear(qt, b), Int8DynamicLinear(qt, b)
    one.asymmetric_input = two.asymmetric_input = True
    two.two_digit_input = True
    x = torch.randn(32, 64)
    x[:, 3] *= 20  # an outlier channel stretches every row's grid
    ref = F.linear(x, dequantize(qt), b)  # the same int8 weights, fp32 activations
    with torch.inference_mode():
        e_one, e_two = _rel_err(one(x), ref), _rel_err(two(x), ref)
    assert e_two < e_one / 50 and e_two < 1e-4


def test_input_bits_choose_one_or_two_digits_per_site(one_thread: None, tiny_adapter: TinyAdapter) -> None:
    spec = tiny_adapter.spec()
    plan = Plan.build({t.name: TensorScheme("int8") for t in spec.tensors if t.kind == "linear"})
    x = torch.randn(1, 5, tiny_adapter.config.hidden_size, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    query, inter = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight"
    errors, outputs = {}, {}
    dense, _ = build_runtime_model(tiny_adapter.module, spec, plan, dequant_all=True)
    with torch.inference_mode():
        ref = dense.encoder.layer[0](x, keep)  # the same weights, fp32 activations
    for attention_bits, intermediate_bits in ((8, 8), (16, 8), (8, 16), (16, 16)):
        module, report = build_runtime_model(
            tiny_adapter.module,
            spec,
            plan,
            w8a8=True,
            attention_input_bits=attention_bits,
            intermediate_input_bits=intermediate_bits,
        )
        layer = module.encoder.layer[0]
        assert layer.attention.self.query.two_digit_input is (attention_bits == 16)
        assert layer.intermediate.dense.two_digit_input is (intermediate_bits == 16)
        # Either mix still runs as one fused block, each site on its own kernel.
        assert report.kernel_for(query) == (KERNEL_W8A16_FUSED if attention_bits == 16 else KERNEL_W8A8_FUSED)
        assert report.regimes()[inter] == ("w8a16-fused" if intermediate_bits == 16 else "w8a8-fused")
        assert report.kernel_for("encoder.layer.0.output.dense.weight") == KERNEL_W8A8_FUSED
        with torch.inference_mode():
            outputs[attention_bits, intermediate_bits] = out = layer(x, keep)
        errors[attention_bits, intermediate_bits] = _rel_err(out, ref)
    # The fused block follows each flag on its own (every mix computes something different)…
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(outputs.values(), 2))
    # …and both second digits together bring the block closer to fp32.
    assert errors[16, 16] < errors[8, 8]
    for field in ("attention_input_bits", "intermediate_input_bits"):
        with pytest.raises(PlanError, match=f"{field} must be 8 or 16, got 4"):
            build_runtime_model(tiny_adapter.module, spec, plan, w8a8=True, **{field: 4})


@pytest.fixture()
def runtime_pair(
    tiny_adapter: TinyAdapter, tiny_heads: ExitHeads
) -> tuple[TinyAdapter, torch.nn.Module, Plan]:
    spec = tiny_adapter.spec()
    schemes = {}
    for t in spec.tensors:
        if t.kind == "linear":
            schemes[t.name] = TensorScheme("int8" if t.block == 0 else "int4")
    plan = Plan.build(schemes)
    module, report = build_runtime_model(tiny_adapter.module, spec, plan, w8a8=True)
    counts = report.by_kernel()
    # every block's six Linears are W8A8, so both blocks run fused (Q/K/V on two-digit inputs
    # by default); the note keeps the kernel
    assert counts[KERNEL_W8A8_FUSED] == 6 and counts[KERNEL_W8A16_FUSED] == 6 and counts[KERNEL_FP32] == 3
    notes = [c.note for c in report.choices if c.kernel in (KERNEL_W8A8_FUSED, KERNEL_W8A16_FUSED)]
    assert sum(n.startswith(KERNEL_W8A8_FROM_INT4) for n in notes) == 6
    assert sum(n.startswith(KERNEL_W8A8 + ";") or n == KERNEL_W8A8 for n in notes) == 6
    assert KERNEL_W8A8_FROM_LOWBIT not in counts
    # Asymmetric activations exactly where a LayerNorm output is read: Q, K, V, intermediate.
    layer = module.encoder.layer[0]
    flags = [
        m.asymmetric_input
        for m in (
            layer.attention.self.query,
            layer.attention.self.key,
            layer.attention.self.value,
            layer.attention.output.dense,
            layer.intermediate.dense,
            layer.output.dense,
        )
    ]
    assert flags == [True, True, True, False, True, False]
    regimes = report.regimes()
    assert regimes["encoder.layer.0.attention.self.query.weight"] == "w8a16-fused"
    assert regimes["encoder.layer.0.intermediate.dense.weight"] == "w8a8-fused"
    assert regimes["embeddings.word_embeddings.weight"] == "fp32"
    return tiny_adapter, module, plan


def test_w8a8_runtime_tracks_the_fake_quantized_model(
    one_thread: None, runtime_pair: tuple[TinyAdapter, torch.nn.Module, Plan], tiny_heads: ExitHeads
) -> None:
    adapter, module, plan = runtime_pair
    # Reference: the same quantized weights, dequantized at load, fp32 activations.
    dense, _ = build_runtime_model(adapter.module, adapter.spec(), plan, dequant_all=True)
    batch = adapter.tokenize(["the cat saw rain", "some bread with honey and cheese today"])
    with torch.inference_mode():
        got = EarlyExitRunner(adapter, module, tiny_heads, None).exit_logits(batch)
        ref = EarlyExitRunner(adapter, dense, tiny_heads, None).exit_logits(batch)
        fp32 = EarlyExitRunner(adapter, adapter.module, tiny_heads, None).exit_logits(batch)
    assert got.shape == (2, 2, 3)
    # Activation quantization adds a little on top of the weights' own error.
    assert _rel_err(got, ref) < 0.05 < _rel_err(ref, fp32)
    # Q, K and V read one hidden state: one fused GEMM on their concatenated weights, inside
    # the fused W8A8 block every all-W8A8 BERT layer runs as.
    layer0 = module.encoder.layer[0]
    shared = layer0.attention.self.query.shared_input
    assert shared is layer0.attention.self.key.shared_input
    assert shared is not None and shared.weight.shape[0] == 3 * layer0.attention.self.query.out_features
    assert type(layer0).__name__ == "_W8A8BertLayer" and layer0.attention.self.query.calls >= 1


def test_fused_w8a8_block_matches_the_layer_by_layer_runtime(
    one_thread: None, runtime_pair: tuple[TinyAdapter, torch.nn.Module, Plan]
) -> None:
    from planner.models.bert import _Layer

    adapter, module, _ = runtime_pair
    batch = adapter.tokenize(["the cat saw rain", "some bread with honey and cheese today"])
    layer = module.encoder.layer[1]
    keep = batch.attention_mask.bool()[:, None, None, :]
    x = torch.randn(2, batch.input_ids.shape[1], adapter.config.hidden_size)
    with torch.inference_mode():
        fused = layer(x, keep)  # compiled (or eager if this host cannot compile)
        by_layer = _Layer.forward(layer, x, keep)  # each Int8DynamicLinear called in turn
    assert _rel_err(fused, by_layer) < 1e-4


def test_fused_siblings_compute_once_and_let_the_input_go_once_all_have_read(
    one_thread: None, runtime_pair: tuple[TinyAdapter, torch.nn.Module, Plan]
) -> None:
    _, module, _ = runtime_pair
    attention = module.encoder.layer[0].attention.self
    shared = attention.query.shared_input
    x = torch.randn(2, 5, attention.query.in_features)
    with torch.inference_mode():
        q, k = attention.query(x), attention.key(x)
        assert shared.source is x and shared.value is not None  # V has not read yet
        v = attention.value(x)
    assert shared.source is None and shared.value is None  # nothing held between inputs
    assert shared.hits >= 2
    with torch.inference_mode():
        again = attention.query(x), attention.key(x), attention.value(x)
    for a, b in zip((q, k, v), again, strict=True):
        assert torch.equal(a, b)


def test_fused_w8a8_block_takes_packed_hidden_states(
    one_thread: None, runtime_pair: tuple[TinyAdapter, torch.nn.Module, Plan]
) -> None:
    """A packed pass over a runtime module (real tokens only) pads for the fused block and
    packs again: the same rows as the padded call."""
    adapter, module, _ = runtime_pair
    batch = adapter.tokenize(["the cat saw rain", "some bread with honey and cheese today"])
    assert int(batch.attention_mask.sum()) < batch.attention_mask.numel()
    layer = module.encoder.layer[1]
    keep = batch.attention_mask.bool()[:, None, None, :]
    x = torch.randn(2, batch.input_ids.shape[1], adapter.config.hidden_size)
    with torch.inference_mode():
        padded = layer(x, keep)
        packed = layer(batch.packing.pack(x), keep, batch.packing)
    torch.testing.assert_close(packed, batch.packing.pack(padded))


def test_fused_w8a8_block_caches_its_arguments_until_apply(
    one_thread: None, runtime_pair: tuple[TinyAdapter, torch.nn.Module, Plan]
) -> None:
    adapter, module, _ = runtime_pair
    layer = module.encoder.layer[0]
    linears = layer._parts()[0]
    batch = adapter.tokenize(["the cat saw rain"])
    keep = batch.attention_mask.bool()[:, None, None, :]
    x = torch.randn(1, batch.input_ids.shape[1], adapter.config.hidden_size)
    before = [m.calls for m in linears]
    with torch.inference_mode():
        first = layer(x, keep)
        args = layer._block_args()
        assert layer._block_args() is args  # gathered once, not per call
        second = layer(x, keep)
    # Every fused Linear still counts each block call.
    assert [m.calls for m in linears] == [c + 2 for c in before]
    assert torch.equal(first, second)
    # The weights passed are the layer's own buffers (Q/K/V: their fused concatenation).
    _, weights, heads, _, _, qkv_digits, intermediate_digits, signature = args
    assert weights[0] is linears[0].shared_input.weight and weights[4] is linears[3].weight_int8
    assert weights[2] is linears[0].shared_input.rowsum and weights[11] is linears[4].weight_rowsum
    assert heads == layer.attention.self.n_heads
    assert qkv_digits is linears[0].two_digit_input and intermediate_digits is linears[4].two_digit_input
    assert signature == tuple((tuple(w.shape), str(w.dtype)) for w in weights)  # the AOT package key's part
    layer.float()  # any _apply (.to(), .float(), …) drops the cache
    assert "_block_args_cache" not in vars(layer)


def test_early_exit_stops_at_the_first_confident_exit(
    one_thread: None, runtime_pair: tuple[TinyAdapter, torch.nn.Module, Plan], tiny_heads: ExitHeads
) -> None:
    adapter, module, _ = runtime_pair
    texts = ["the cat saw rain", "some bread with honey", "a storm and fog on the goat", "we saw a lion"]
    batch = adapter.tokenize(texts)
    with torch.inference_mode():
        logits = EarlyExitRunner(adapter, module, tiny_heads, None).exit_logits(batch)
        conf = torch.softmax(logits, -1).amax(-1)  # (rows, exits)
        # Forced thresholds: everything stops at block 0; nothing can reach 1.5 → last block.
        low = EarlyExitRunner(adapter, module, tiny_heads, 1e-6).run(batch)
        high = EarlyExitRunner(adapter, module, tiny_heads, 1.5).run(batch)
        none = EarlyExitRunner(adapter, module, tiny_heads, None).run(batch)
        # A threshold halfway between the rows' two middle first-exit confidences splits them
        # (not at one of them: batch 1 sums the pooled states in another order, so a row's
        # confidence may differ from the batch's in the last bit).
        middle = conf[:, 0].sort().values[1:3]
        mid = float(middle.mean())
        split = EarlyExitRunner(adapter, module, tiny_heads, mid).run(batch)
        one_by_one = [
            EarlyExitRunner(adapter, module, tiny_heads, mid).run(adapter.tokenize([t]))[0] for t in texts
        ]
    assert [d.exit_index for d in low] == [0] * 4
    assert [d.exit_index for d in high] == [1] * 4 == [d.exit_index for d in none]
    expected = [0 if float(conf[r, 0]) >= mid else 1 for r in range(4)]
    assert [d.exit_index for d in split] == expected and 0 in expected and 1 in expected
    for r, d in enumerate(split):
        assert d.prediction == int(logits[r, d.exit_index].argmax())
        assert d.confidence == pytest.approx(float(conf[r, d.exit_index]), abs=1e-3)
    assert [d.exit_index for d in one_by_one] == expected  # batch 1 decides like the batch


def test_batch_one_on_fused_blocks_pools_and_classifies_inside_the_compiled_call(
    one_thread: None,
    runtime_pair: tuple[TinyAdapter, torch.nn.Module, Plan],
    tiny_heads: ExitHeads,
    tiny_dataset: TextDataset,
) -> None:
    adapter, module, _ = runtime_pair
    texts = tiny_dataset.split("test").texts[:24]
    with torch.inference_mode():
        for threshold in (None, 0.5, 0.7, 0.9):
            fused = EarlyExitRunner(adapter, module, tiny_heads, threshold)
            assert fused._fused_layers is not None
            eager = EarlyExitRunner(adapter, module, tiny_heads, threshold)
            eager._fused_layers = None  # block by block, pooling and heads as eager ops
            for text in texts:
                got, want = fused.run(adapter.tokenize([text]))[0], eager.run(adapter.tokenize([text]))[0]
                assert (got.exit_index, got.prediction) == (want.exit_index, want.prediction)
                assert got.confidence == pytest.approx(want.confidence, abs=1e-5)
    # A block with an fp32 Linear is not fused: the whole runner keeps the generic path.
    spec = adapter.spec()
    first_block_int8 = Plan.build(
        {t.name: TensorScheme("int8") for t in spec.tensors if t.kind == "linear" and t.block == 0}
    )
    partly, _ = build_runtime_model(adapter.module, spec, first_block_int8, w8a8=True)
    assert EarlyExitRunner(adapter, partly, tiny_heads, 0.5)._fused_layers is None


def test_batch_one_fused_blocks_run_as_an_aot_package(
    one_thread: None,
    runtime_pair: tuple[TinyAdapter, torch.nn.Module, Plan],
    tiny_heads: ExitHeads,
    tiny_dataset: TextDataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch-1 fused path runs an AOTInductor package (compiled here, kept on disk) and
    decides exactly as the eager block-by-block path."""
    monkeypatch.setenv("EDGEFIT_AOT_DIR", str(tmp_path))
    monkeypatch.setitem(runtime_module._AOT_STATE, "packages", {})
    monkeypatch.setitem(runtime_module._AOT_STATE, "enabled", True)
    monkeypatch.setitem(runtime_module._AOT_STATE, "error", None)
    adapter, module, _ = runtime_pair
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = EarlyExitRunner(adapter, module, tiny_heads, 0.7)
        eager = EarlyExitRunner(adapter, module, tiny_heads, 0.7)
        eager._fused_layers = None
        for text in tiny_dataset.split("test").texts[:12]:
            got, want = fused.run(adapter.tokenize([text]))[0], eager.run(adapter.tokenize([text]))[0]
            assert (got.exit_index, got.prediction) == (want.exit_index, want.prediction)
            assert got.confidence == pytest.approx(want.confidence, abs=1e-5)
    # torch's pytree deprecation noise from export and package loading stays out of the logs.
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert runtime_module._AOT_STATE["error"] is None
    # The package's key took the source hash when the module was imported, not from the file now.
    assert runtime_module._aot_source_hash.cache_info().currsize == 1
    assert compiled_vector_isa()
    assert len(runtime_module._AOT_STATE["packages"]) == 1
    (package,) = tmp_path.glob("block-exit-*.pt2")
    assert not list(tmp_path.glob("*.pt2.*"))  # no temporary package left behind
    # A damaged package: this process falls back to torch.compile (same decisions), says why,
    # and removes the file so the next process compiles it afresh.
    package.write_bytes(b"not a zip")
    monkeypatch.setitem(runtime_module._AOT_STATE, "packages", {})
    with torch.inference_mode():
        text = tiny_dataset.split("test").texts[0]
        got, want = fused.run(adapter.tokenize([text]))[0], eager.run(adapter.tokenize([text]))[0]
    assert (got.exit_index, got.prediction) == (want.exit_index, want.prediction)
    assert runtime_module._AOT_STATE["error"] is not None
    assert runtime_module._AOT_STATE["enabled"] is False
    assert not package.exists()


def test_evaluate_runtime_applies_the_runners_threshold(
    one_thread: None,
    runtime_pair: tuple[TinyAdapter, torch.nn.Module, Plan],
    tiny_heads: ExitHeads,
    tiny_dataset: TextDataset,
) -> None:
    adapter, module, _ = runtime_pair
    split = tiny_dataset.split("test")
    tokens = TokenizedSplit.build(adapter, split.texts, 32, max_tokens_per_batch=64)
    full = evaluate_runtime(
        EarlyExitRunner(adapter, module, tiny_heads, None), tokens, split.labels, threads=1
    )
    assert full.mean_layers == 2.0 and full.agreement == 1.0  # agreement with itself
    low = evaluate_runtime(
        EarlyExitRunner(adapter, module, tiny_heads, 1e-6), tokens, split.labels, threads=1
    )
    assert low.mean_layers == 1.0 and low.exit_fraction == (1.0, 0.0)
    mid_runner = EarlyExitRunner(adapter, module, tiny_heads, 0.6)
    mid = evaluate_runtime(mid_runner, tokens, split.labels, threads=1)
    with torch.inference_mode():
        direct = [mid_runner.run(adapter.tokenize([t]))[0] for t in split.texts]
    assert list(mid.predictions) == [d.prediction for d in direct]
    assert mid.mean_layers == pytest.approx(sum(d.exit_index + 1 for d in direct) / len(direct))
    # The whole curve from the same kernels: at the runner's threshold it gives the same figures.
    curve = runtime_exit_curve(mid_runner, tokens, split.labels, list(mid.predictions), threads=1)
    at = curve.at(0.6)
    assert at["mean_layers"] == pytest.approx(mid.mean_layers) and at["agreement"] == 1.0
    assert at["accuracy"] == pytest.approx(mid.accuracy)


def test_text_latency_reports_per_text_medians_and_exits(
    one_thread: None, runtime_pair: tuple[TinyAdapter, torch.nn.Module, Plan], tiny_heads: ExitHeads
) -> None:
    adapter, module, _ = runtime_pair
    runners = {
        "early": EarlyExitRunner(adapter, module, tiny_heads, 1e-6),
        "full": EarlyExitRunner(adapter, module, tiny_heads, None),
    }
    batches = [adapter.tokenize([t]) for t in ("the cat", "rain and snow", "bread")]
    got = measure_text_latency(runners, batches, rounds=3, warmup=1, threads=1)
    assert got["early"].exits == (0, 0, 0) and got["full"].exits == (1, 1, 1)
    for lat in got.values():
        assert len(lat.per_text_s) == 3 and lat.rounds == 3 and lat.threads == 1 and not lat.predicted
        assert min(lat.per_text_s) <= lat.median_s <= max(lat.per_text_s)


def test_text_latency_interleaves_runners_chunk_by_chunk() -> None:
    calls: list[tuple[str, int]] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, batch: int) -> list[SimpleNamespace]:
            calls.append((self.name, batch))
            return [SimpleNamespace(exit_index=0)]

    runners = {n: Recorder(n) for n in ("a", "b", "c")}
    texts = list(range(5))
    measure_text_latency(runners, texts, rounds=2, warmup=0, threads=1, chunk=2)  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="one runner"):
        measure_text_latency({}, texts, rounds=2, warmup=0, threads=1)  # type: ignore[arg-type]
    # Round 0: chunk [0, 1] by a, b, c; chunk [2, 3] by b, c, a; chunk [4] by c, a, b; round 1
    # starts one runner later.
    expected = []
    for r in range(2):
        for c, chunk in enumerate(([0, 1], [2, 3], [4])):
            shift = (r + c) % 3
            for name in ["a", "b", "c"][shift:] + ["a", "b", "c"][:shift]:
                expected += [(name, t) for t in chunk]
    assert calls == expected
    with pytest.raises(PlanError, match="chunk ≥ 1"):
        measure_text_latency(runners, texts, chunk=0)  # type: ignore[arg-type]


def test_the_int8_probe_times_both_paths_once_per_process_and_shape() -> None:
    probe = probe_int8_matmul(8, 32, 48, repeats=3)
    assert probe.int8_s > 0 and probe.fp32_s > 0 and probe.threads == torch.get_num_threads()
    assert "8×32→48" in probe.describe() and f"({probe.int8_speedup:.2f}×)" in probe.describe()
    assert probe_int8_matmul(8, 32, 48, repeats=3) is probe  # measured once
    assert probe_int8_matmul(8, 32, 64, repeats=3) is not probe
    # At another thread count than the process's (the count a caller will run the model at).
    other = 1 if torch.get_num_threads() != 1 else 2
    at_other = probe_int8_matmul(8, 32, 48, repeats=3, threads=other)
    assert at_other is not probe and at_other.threads == other and f"{other} threads" in at_other.describe()
    # W8A8 only where the int8 GEMM is strictly faster: quantizing activations costs extra.
    assert Int8MatmulProbe(1, 1, 1, int8_s=1e-3, fp32_s=1.01e-3, threads=1).favours_w8a8
    assert not Int8MatmulProbe(1, 1, 1, int8_s=1e-3, fp32_s=1e-3, threads=1).favours_w8a8


def test_the_compiled_blocks_additive_mask_gives_torchs_masked_attention() -> None:
    from planner.runtime import _masked_attention, attention_mask_bias

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen) for _ in range(3))
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)[:, None, None, :]
    bias = attention_mask_bias(keep)
    assert bias.dtype == torch.float32 and bias.shape == keep.shape
    assert torch.equal(bias == float("-inf"), ~keep) and torch.equal(bias[keep], torch.zeros(8))
    expected = F.scaled_dot_product_attention(q, k, v, keep)
    assert torch.allclose(_masked_attention(q, k, v, bias), expected, atol=1e-6)


def test_dense_exit_heads_decide_at_batch_one_as_their_logits_say(
    one_thread: None, tiny_dataset: TextDataset
) -> None:
    # Three blocks: the middle exit's head reads blocks 0 and 1, so the runner must keep the
    # pooled state of block 0 (and drop the rows that left) to run it.
    adapter = TinyAdapter(seed=1, n_blocks=3)
    train = tiny_dataset.split("train")
    feats = pooled_features(adapter, TokenizedSplit.build(adapter, train.texts, 32))
    heads = train_exit_heads(feats, train.labels, tiny_dataset.classes)
    assert heads.input_blocks(1) == (0, 1)
    texts = tiny_dataset.split("test").texts[:12]
    batch = adapter.tokenize(texts)
    with torch.inference_mode():
        logits = EarlyExitRunner(adapter, adapter.module, heads, None).exit_logits(batch)
        torch.testing.assert_close(logits, heads.logits(_pooled(adapter, batch)), atol=1e-4, rtol=1e-4)
        conf = torch.softmax(logits, -1).amax(-1)
        mid = float(conf[:, :2].median())
        together = EarlyExitRunner(adapter, adapter.module, heads, mid).run(batch)
        alone = [
            EarlyExitRunner(adapter, adapter.module, heads, mid).run(adapter.tokenize([t]))[0] for t in texts
        ]
    expected = [next((e for e in range(2) if float(conf[r, e]) >= mid), 2) for r in range(len(texts))]
    assert len(set(expected)) > 1  # the threshold splits the rows over the exits
    assert [d.exit_index for d in together] == expected == [d.exit_index for d in alone]
    for r, d in enumerate(together):
        assert d.prediction == int(logits[r, d.exit_index].argmax())


def _pooled(adapter: TinyAdapter, batch: Batch) -> torch.Tensor:
    return torch.stack(adapter.forward_exits(batch), dim=1)
