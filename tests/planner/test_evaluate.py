"""Evaluator: measured figures, the three caches, early exit, errors."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from planner.data import TextDataset
from planner.evaluate import Evaluator, ExitOutputs, kl_divergence
from planner.exits import ExitHeads, prepare_heads
from planner.models import TinyAdapter, TokenizedSplit
from planner.specs import Plan, PlanError, TensorScheme
from tests.planner.conftest import reference_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def _direct_logits(ev: Evaluator, plan: Plan, split: str) -> np.ndarray:
    """Independent computation: patch every weight, run the whole model, no caches."""
    module = ev.adapter.module
    saved = {}
    for name, scheme in plan.schemes:
        p = module.get_parameter(name)
        saved[name] = p.data
        p.data = reference_quantize(p.data, scheme, None)
    try:
        tokens = TokenizedSplit.build(ev.adapter, ev.dataset.split(split).texts, ev.max_length)
        with torch.inference_mode():
            feats = tokens.unsort([torch.stack(ev.adapter.forward_exits(b), 1) for b in tokens])
        return ev.heads.logits(feats).numpy()
    finally:
        for name, data in saved.items():
            module.get_parameter(name).data = data


def test_fp32_plan_is_perfectly_faithful(tiny_evaluator: Evaluator) -> None:
    r = tiny_evaluator.evaluate(Plan(), "test")
    assert r.agreement == r.final_agreement == 1.0
    assert r.kl == pytest.approx(0.0, abs=1e-6)
    assert r.cosine == pytest.approx(1.0, abs=1e-5)
    assert r.mean_layers == 2.0
    assert r.source == "measured"
    assert r.accuracy == pytest.approx(r.curve.full_accuracy)


def test_lower_precision_loses_more_fidelity(tiny_evaluator: Evaluator) -> None:
    spec = tiny_evaluator.spec
    r8 = tiny_evaluator.evaluate(Plan.uniform(spec, TensorScheme("int8")))
    r2 = tiny_evaluator.evaluate(Plan.uniform(spec, TensorScheme("int2")))
    assert 0 < r8.kl < r2.kl
    assert r2.cosine < r8.cosine < 1.0
    assert r2.agreement <= r8.agreement


def test_resumed_pass_equals_a_full_pass(tiny_evaluator: Evaluator) -> None:
    tiny_evaluator.reference("calibration")
    plan = Plan.build({"encoder.layer.1.intermediate.dense.weight": TensorScheme("int3")})
    before = tiny_evaluator.stats.stages_skipped
    out = tiny_evaluator.outputs(plan, "calibration")
    assert tiny_evaluator.stats.stages_skipped > before  # started after block 0
    np.testing.assert_allclose(out.logits, _direct_logits(tiny_evaluator, plan, "calibration"), atol=1e-4)


def test_embedding_plan_recomputes_everything_and_matches(tiny_evaluator: Evaluator) -> None:
    plan = Plan.build({"embeddings.word_embeddings.weight": TensorScheme("int4", group_size=32)})
    out = tiny_evaluator.outputs(plan, "test")
    np.testing.assert_allclose(out.logits, _direct_logits(tiny_evaluator, plan, "test"), atol=1e-4)


def test_shared_prefix_with_a_previous_plan_is_reused(tiny_evaluator: Evaluator) -> None:
    first = {"encoder.layer.0.output.dense.weight": TensorScheme("int4")}
    tiny_evaluator.outputs(Plan.build(first), "test")
    runs = tiny_evaluator.stats.stages_run
    second = {**first, "encoder.layer.1.attention.self.key.weight": TensorScheme("int2")}
    tiny_evaluator.outputs(Plan.build(second), "test")
    n_buckets = len(tiny_evaluator._split("test").tokens.buckets)
    assert tiny_evaluator.stats.stages_run - runs == n_buckets  # only block 1 ran


def test_a_shared_prefix_with_an_evicted_stage_is_recomputed(
    tiny_dataset: TextDataset, tmp_path: Path
) -> None:
    # Three blocks, and an activation cache too small to keep anything but the stage put last:
    # after the first plan only its block-1 stage is cached, not the embeddings' or block 0's.
    # A plan sharing that prefix must not resume after block 1 (it would need block 0's pooled
    # rows, evicted): it crashed with a TypeError before.
    adapter = TinyAdapter(n_blocks=3)
    heads = prepare_heads(adapter, tiny_dataset, data_dir=tmp_path)
    ev = Evaluator(
        adapter,
        tiny_dataset,
        heads,
        cache_dir=tmp_path,
        quantizer=reference_quantize,
        threads=1,
        activation_cache_mb=0,
    )
    first = {"embeddings.word_embeddings.weight": TensorScheme("int4", group_size=32)}
    ev.outputs(Plan.build(first), "test")
    second = Plan.build({**first, "encoder.layer.2.output.dense.weight": TensorScheme("int2")})
    out = ev.outputs(second, "test")
    np.testing.assert_allclose(out.logits, _direct_logits(ev, second, "test"), atol=1e-4)


def _store_repeatedly(ev: Evaluator, wkey: str, out: ExitOutputs) -> None:
    for _ in range(40):
        ev._store("test", wkey, out)


def test_workers_storing_one_plan_at_once_do_not_collide(tiny_evaluator: Evaluator) -> None:
    # Two planning workers sharing the cache directory may finish the same plan together; with
    # one temporary name per entry, one's rename took the other's file away mid-write
    # (FileNotFoundError) or published a file both had written into.
    plan = Plan.uniform(tiny_evaluator.spec, TensorScheme("int4"))
    out = tiny_evaluator.outputs(plan, "test")
    big = ExitOutputs(logits=np.repeat(out.logits, 200, axis=0), cosine=np.repeat(out.cosine, 200))
    fork = multiprocessing.get_context("fork")
    workers = [
        fork.Process(target=_store_repeatedly, args=(tiny_evaluator, plan.weights_key(), big))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    with np.load(tiny_evaluator._output_path("test", plan.weights_key())) as z:
        np.testing.assert_array_equal(z["logits"], big.logits)
    assert not list(tiny_evaluator._output_path("test", plan.weights_key()).parent.glob("*.tmp*"))


def test_weights_are_restored_after_a_pass(tiny_evaluator: Evaluator) -> None:
    name = "encoder.layer.0.attention.self.query.weight"
    before = tiny_evaluator.adapter.module.get_parameter(name).detach().clone()
    tiny_evaluator.evaluate(Plan.build({name: TensorScheme("int2")}))
    assert torch.equal(tiny_evaluator.adapter.module.get_parameter(name), before)


def test_quantized_weights_are_cached(tiny_evaluator: Evaluator) -> None:
    spec = tiny_evaluator.spec
    tiny_evaluator.evaluate(Plan.uniform(spec, TensorScheme("int4")))
    n = tiny_evaluator.stats.weights_quantized
    tiny_evaluator.evaluate(Plan.uniform(spec, TensorScheme("int4")), "calibration")
    assert tiny_evaluator.stats.weights_quantized == n
    assert tiny_evaluator.stats.weight_cache_hits >= len(spec.tensors)


def test_outputs_are_cached_in_memory_and_on_disk(
    tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tiny_heads: ExitHeads, tmp_path: Path
) -> None:
    plan = Plan.uniform(tiny_adapter.spec(), TensorScheme("int3"), exit_threshold=0.7)
    ev = Evaluator(
        tiny_adapter, tiny_dataset, tiny_heads, cache_dir=tmp_path, quantizer=reference_quantize, threads=1
    )
    first = ev.evaluate(plan)
    assert not first.from_cache
    again = ev.evaluate(plan.with_threshold(0.9))  # same weights: no pass
    assert again.from_cache
    assert ev.stats.output_memory_hits >= 1
    fresh = Evaluator(
        tiny_adapter, tiny_dataset, tiny_heads, cache_dir=tmp_path, quantizer=reference_quantize, threads=1
    )
    third = fresh.evaluate(plan)
    assert third.from_cache and fresh.stats.passes == 0
    assert fresh.stats.output_disk_hits == 2  # the plan and the FP32 reference
    assert third.kl == pytest.approx(first.kl)
    assert fresh.stats.weights_quantized == 0


def test_a_damaged_output_cache_file_is_recomputed(
    tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tiny_heads: ExitHeads, tmp_path: Path
) -> None:
    plan = Plan.uniform(tiny_adapter.spec(), TensorScheme("int4"))
    first = Evaluator(
        tiny_adapter, tiny_dataset, tiny_heads, cache_dir=tmp_path, quantizer=reference_quantize, threads=1
    ).evaluate(plan)
    files = sorted((tmp_path / "evals").rglob("*.npz"))
    assert len(files) == 2  # the plan's and the FP32 reference's
    # empty (EOFError), truncated (zipfile.BadZipFile), garbage: each recomputed, none trusted
    for damage in (b"", files[0].read_bytes()[:40], b"garbage"):
        for f in files:
            f.write_bytes(damage)
        ev = Evaluator(
            tiny_adapter, tiny_dataset, tiny_heads, cache_dir=tmp_path, quantizer=reference_quantize
        )
        again = ev.evaluate(plan)
        assert ev.stats.passes >= 1 and ev.stats.output_disk_hits == 0
        assert again.kl == pytest.approx(first.kl) and again.accuracy == first.accuracy


def test_exit_threshold_figures_match_the_curve(tiny_evaluator: Evaluator) -> None:
    plan = Plan(exit_threshold=0.5)
    r = tiny_evaluator.evaluate(plan)
    assert r.mean_layers < 2.0
    assert sum(r.exit_fraction) == pytest.approx(1.0)
    at = r.curve.at(0.5)
    assert r.accuracy == pytest.approx(at["accuracy"])
    assert r.mean_layers == pytest.approx(at["mean_layers"])


def test_gptq_gets_calibration_inputs_of_the_right_width(tiny_evaluator: Evaluator) -> None:
    seen: dict[int, tuple[int, ...]] = {}

    def spy(weight: torch.Tensor, scheme: TensorScheme, calib: torch.Tensor | None) -> torch.Tensor:
        assert calib is not None
        seen[weight.shape[1]] = tuple(calib.shape)
        return reference_quantize(weight, scheme, calib)

    tiny_evaluator._quantizer = spy
    name = "encoder.layer.0.output.dense.weight"  # input width = intermediate (64)
    tiny_evaluator.outputs(Plan.build({name: TensorScheme("int4", method="gptq")}))
    assert seen[64][1] == 64 and seen[64][0] > 10


def test_gptq_calibration_inputs_come_from_the_fp32_model(
    tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tiny_heads: ExitHeads, tmp_path: Path
) -> None:
    target = "encoder.layer.1.attention.self.query.weight"
    seen: list[torch.Tensor] = []

    def spy(weight: torch.Tensor, scheme: TensorScheme, calib: torch.Tensor | None) -> torch.Tensor:
        if scheme.method == "gptq":
            assert calib is not None
            seen.append(calib)
        return reference_quantize(weight, scheme, calib)

    gptq = TensorScheme("int4", method="gptq")
    # Embeddings sort first in the plan, so they would be patched before layer 1 is quantized.
    mixed = Plan.build({"embeddings.word_embeddings.weight": TensorScheme("int2"), target: gptq})
    for i, plan in enumerate([mixed, Plan.build({target: gptq})]):
        ev = Evaluator(tiny_adapter, tiny_dataset, tiny_heads, cache_dir=tmp_path / str(i), quantizer=spy)
        ev.outputs(plan, "test")
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1])


def test_embedding_tables_get_their_lookups_on_the_train_split(tiny_evaluator: Evaluator) -> None:
    calib = tiny_evaluator.calibration_inputs()
    train = tiny_evaluator._split("train").tokens
    real = [b.attention_mask.bool() for b in train]
    words = torch.cat([b.input_ids[m] for b, m in zip(train, real, strict=True)])
    word_name = "embeddings.word_embeddings.weight"
    assert torch.equal(torch.sort(calib[word_name]).values, torch.sort(words).values)
    # Positions: every real token's position, once per text that reaches it.
    positions = calib["embeddings.position_embeddings.weight"]
    assert positions.numel() == words.numel()
    assert int(torch.bincount(positions)[0]) == len(tiny_evaluator.dataset.split("train").texts)
    assert calib["embeddings.token_type_embeddings.weight"].unique().tolist() == [0]


def test_hot_rows_are_chosen_from_the_lookups_and_measured(
    tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tiny_heads: ExitHeads, tmp_path: Path
) -> None:
    ev = Evaluator(tiny_adapter, tiny_dataset, tiny_heads, cache_dir=tmp_path, threads=1)
    name = "embeddings.word_embeddings.weight"
    cold = ev.evaluate(Plan.build({name: TensorScheme("int2", 32)}), "calibration")
    hot = ev.evaluate(Plan.build({name: TensorScheme("int2", 32, hot_rows=64)}), "calibration")
    assert hot.weights_key != cold.weights_key
    assert hot.kl < cold.kl  # the tiny task's 64 most frequent tokens cover most lookups


def test_bad_plans_and_mismatched_heads_are_refused(
    tiny_evaluator: Evaluator, tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tiny_heads: ExitHeads
) -> None:
    with pytest.raises(PlanError, match="unknown tensor"):
        tiny_evaluator.evaluate(Plan.build({"encoder.layer.9.x.weight": TensorScheme("int8")}))
    with pytest.raises(PlanError, match="blocks"):
        Evaluator(TinyAdapter(n_blocks=3), tiny_dataset, tiny_heads, quantizer=reference_quantize)


def test_default_quantizer_is_planner_quant(
    tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tiny_heads: ExitHeads, tmp_path: Path
) -> None:
    pytest.importorskip("planner.quant", reason="planner.quant not written yet")
    ev = Evaluator(tiny_adapter, tiny_dataset, tiny_heads, cache_dir=tmp_path, threads=1)
    r8 = ev.evaluate(Plan.uniform(tiny_adapter.spec(), TensorScheme("int8")))
    r2 = ev.evaluate(Plan.uniform(tiny_adapter.spec(), TensorScheme("int2", group_size=32)))
    assert 0 < r8.kl < r2.kl
    name = "encoder.layer.0.intermediate.dense.weight"
    rtn = ev.evaluate(Plan.build({name: TensorScheme("int3")}), "calibration")
    gptq = ev.evaluate(Plan.build({name: TensorScheme("int3", method="gptq")}), "calibration")
    assert gptq.weights_key != rtn.weights_key
    assert gptq.kl > 0  # ran through planner.quant's GPTQ with our calibration inputs


def test_kl_divergence_is_zero_for_equal_and_positive_otherwise() -> None:
    a = np.array([[1.0, 2.0, 3.0]])
    assert kl_divergence(a, a)[0] == pytest.approx(0.0)
    assert kl_divergence(a, a + np.array([[0.0, 0.0, 5.0]]))[0] > 0.1


def test_calibrated_exit_respects_the_bound_on_calibration(tiny_evaluator: Evaluator) -> None:
    plan, curve = tiny_evaluator.with_calibrated_exit(Plan(), max_loss_points=5.0)
    if plan.exit_threshold is None:
        pytest.skip("no threshold saves work on this tiny model")
    cal = tiny_evaluator.evaluate(plan, "calibration")
    assert (curve.full_accuracy - cal.accuracy) * 100 <= 5.0 + 1e-9
    assert cal.mean_layers < tiny_evaluator.adapter.n_blocks
    assert tiny_evaluator.evaluate(plan, "test").split == "test"
