"""Sensitivity profile and the additive fidelity proxy."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from planner.evaluate import Evaluator
from planner.sensitivity import (
    SensitivityProfile,
    check_proxy,
    fidelity_losses,
    profile_sensitivity,
    random_plans,
    spearman,
)
from planner.specs import Plan, PlanError, TensorScheme

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def profiled(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[Evaluator, SensitivityProfile]:
    reference_quantize = request.getfixturevalue("quantizer")
    adapter = request.getfixturevalue("tiny_adapter")
    dataset = request.getfixturevalue("tiny_dataset")
    heads = request.getfixturevalue("tiny_heads")
    ev = Evaluator(
        adapter,
        dataset,
        heads,
        cache_dir=tmp_path_factory.mktemp("sens"),
        quantizer=reference_quantize,
        threads=1,
    )
    return ev, profile_sensitivity(ev)


def test_profile_covers_every_tensor_and_precision(profiled: tuple[Evaluator, SensitivityProfile]) -> None:
    ev, prof = profiled
    assert prof.tensors == ev.spec.tensor_names
    assert prof.precisions == ("fp32", "fp16", "int8", "int4", "int3", "int2")
    for m in ("kl", "disagreement", "cosine"):
        table = prof.losses[m]
        assert table.shape == (len(prof.tensors), 6)
        assert (table[:, 0] == 0).all()
    kl = prof.losses["kl"]
    assert (kl[:, 5] > kl[:, 2]).all()  # int2 hurts more than int8 for every tensor
    assert kl[:, 5].mean() > kl[:, 3].mean() > kl[:, 1].mean()


def test_profile_resumes_from_cached_prefixes(profiled: tuple[Evaluator, SensitivityProfile]) -> None:
    ev, _ = profiled
    assert ev.stats.stages_skipped > 0


def test_profile_entry_equals_a_direct_measurement(profiled: tuple[Evaluator, SensitivityProfile]) -> None:
    ev, prof = profiled
    name = "encoder.layer.1.attention.self.value.weight"
    got = fidelity_losses(ev, Plan.build({name: TensorScheme("int3")}))
    assert prof.losses["kl"][prof.tensors.index(name), 4] == pytest.approx(got["kl"])


def test_variants_are_measured_where_they_apply_and_round_trip(
    tiny_adapter: object, tiny_dataset: object, tiny_heads: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ev = Evaluator(
        tiny_adapter,  # type: ignore[arg-type]
        tiny_dataset,  # type: ignore[arg-type]
        tiny_heads,  # type: ignore[arg-type]
        cache_dir=tmp_path_factory.mktemp("variants"),
        threads=1,
    )
    templates = [
        TensorScheme("int4", 64, False, "gptq"),  # 64 divides the 64-wide FFN input only
        TensorScheme("int3", None, True, "gptq", hot_rows=64),  # tables with > 64 rows only
        TensorScheme("int8", None, True, "gptq"),  # the family's own int8: not measured twice
    ]
    prof = profile_sensitivity(ev, ("int8", "int4"), method="gptq", variants=templates)
    grouped = {v.tensor for v in prof.variants if v.scheme.group_size == 64}
    assert grouped == {t.name for t in ev.spec.tensors if t.shape[1] % 64 == 0}
    hot = [v for v in prof.variants if v.scheme.hot_rows]
    assert {v.tensor for v in hot} == {
        t.name for t in ev.spec.tensors if t.kind == "embedding" and t.shape[0] > 64
    }
    assert all(v.scheme.method == "rtn" for v in hot)  # a lookup is measured as what it is: RTN
    assert not any(v.scheme == TensorScheme("int8", None, True, "gptq") for v in prof.variants)
    one = hot[0]
    assert one.losses["kl"] == pytest.approx(fidelity_losses(ev, Plan.build({one.tensor: one.scheme}))["kl"])
    again = SensitivityProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert again.variants == prof.variants


def test_profile_round_trips_through_json(profiled: tuple[Evaluator, SensitivityProfile]) -> None:
    _, prof = profiled
    again = SensitivityProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    for m in prof.losses:
        np.testing.assert_allclose(again.losses[m], prof.losses[m])
    assert again.tensors == prof.tensors
    bad = prof.to_dict()
    bad["losses"]["kl"] = bad["losses"]["kl"][:-1]
    with pytest.raises(PlanError, match="shape"):
        SensitivityProfile.from_dict(bad)


def test_estimate_is_the_sum_of_tensor_losses(profiled: tuple[Evaluator, SensitivityProfile]) -> None:
    _, prof = profiled
    a, b = prof.tensors[0], prof.tensors[5]
    plan = Plan.build({a: TensorScheme("int4"), b: TensorScheme("int2")})
    expected = prof.losses["kl"][0, 3] + prof.losses["kl"][5, 5]
    assert prof.estimate(plan) == pytest.approx(expected)
    assert prof.estimate(Plan()) == 0.0


def test_batch_estimate_matches_single(profiled: tuple[Evaluator, SensitivityProfile]) -> None:
    _, prof = profiled
    plans, idx = random_plans(prof, 20, seed=3)
    batch = prof.estimate_many(idx, "cosine")
    np.testing.assert_allclose(batch, [prof.estimate(p, "cosine") for p in plans])
    # Throughput (plans/s) is measured by `python -m bench engine`, not asserted here.
    big = np.random.default_rng(0).integers(0, 6, size=(5_000, len(prof.tensors)))
    assert prof.estimate_many(big).shape == (5_000,)


def test_random_plans_for_a_model_use_the_schemes_the_profile_measured(
    profiled: tuple[Evaluator, SensitivityProfile],
) -> None:
    ev, measured = profiled
    # A profile measured in groups of 32, and one tensor whose input dimension that does not
    # divide: its columns were measured per channel, and plans to run must say so.
    prof = dataclasses.replace(measured, group_size=32)
    assert prof.group_size is not None
    odd = next(t for t in ev.spec.tensors if t.kind == "linear")
    tensors = tuple(
        dataclasses.replace(t, shape=(t.shape[0], prof.group_size + 8)) if t.name == odd.name else t
        for t in ev.spec.tensors
    )
    spec = dataclasses.replace(ev.spec, tensors=tensors)
    plans, idx = random_plans(prof, 40, seed=3, spec=spec)
    assert any(plan.scheme(odd.name).is_integer for plan in plans)
    for plan in plans:
        plan.validate(spec)
        scheme = plan.scheme(odd.name)
        assert scheme == prof.family_scheme(spec.tensor(odd.name).shape, scheme.precision)
        assert not scheme.is_integer or scheme.group_size is None
    np.testing.assert_allclose(prof.estimate_many(idx, "kl"), [prof.estimate(p, "kl") for p in plans])


def test_unprofiled_precision_is_refused(profiled: tuple[Evaluator, SensitivityProfile]) -> None:
    ev, _ = profiled
    small = profile_sensitivity(ev, precisions=("int8",))
    with pytest.raises(PlanError, match="int4"):
        small.estimate(Plan.build({small.tensors[0]: TensorScheme("int4")}))


def test_proxy_ranks_random_plans(profiled: tuple[Evaluator, SensitivityProfile]) -> None:
    ev, prof = profiled
    report = check_proxy(ev, prof, n_plans=20, seed=1)
    assert report["cosine"]["spearman"] > 0.8
    # The tiny random model saturates KL quickly; MiniLM's figure is measured outside the suite.
    assert report["kl"]["spearman"] > 0.5


def test_correction_is_monotone_and_fits(profiled: tuple[Evaluator, SensitivityProfile]) -> None:
    ev, prof = profiled
    plans, idx = random_plans(prof, 12, seed=5)
    measured = np.array([fidelity_losses(ev, p)["cosine"] for p in plans])
    fitted = prof.with_correction("cosine", idx, measured)
    raw, corrected = prof.estimate_many(idx, "cosine"), fitted.estimate_many(idx, "cosine")
    assert spearman(raw, corrected) == pytest.approx(1.0)
    ok = measured > 0
    err_fit = np.abs(np.log(corrected[ok] / measured[ok])).mean()
    assert err_fit <= np.abs(np.log(raw[ok] / measured[ok])).mean() + 1e-9


def test_spearman_known_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) == 0.0
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
