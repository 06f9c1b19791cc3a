"""Device measurements re-fit the profile's cost model, re-predict its variants, re-rank."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from django.utils import timezone

from planner.cost import CostParams, predict
from planner.specs import ModelSpec, Plan
from registry.calibration import predicted_vs_measured, recalibrate_profile
from registry.models import Measurement, PlanningRun, Prediction

pytestmark = pytest.mark.django_db

#: The "real" device: much slower memory and bigger overheads than the defaults assume.
TRUE = CostParams(mem_efficiency=0.02, per_tensor_overhead_s=4e-5, fixed_overhead_s=3e-3)


def measure(package, profile, device_id=None, n=24, seed=0) -> Measurement:
    """What an agent would report, generated from TRUE with ±2 % noise."""
    rng = random.Random(seed)
    spec = ModelSpec.from_dict(package.variant.base_model.spec)
    plan = Plan.from_dict(package.variant.plan)
    samples = []
    for _ in range(n):
        tokens = rng.randint(8, 60)
        seconds = predict(spec, plan, profile.to_device_spec(), seq_len=tokens, params=TRUE).latency_s
        samples.append(
            {
                "tokens": tokens,
                "exit_layer": spec.n_blocks - 1,
                "latency_ms": seconds * 1000 * rng.uniform(0.98, 1.02),
            }
        )
    ms = sorted(s["latency_ms"] for s in samples)
    return Measurement.objects.create(
        variant=package.variant,
        device_profile=profile,
        device_id=device_id,
        package=package,
        kind=Measurement.Kind.DEVICE,
        host="board",
        batch_size=1,
        latency_p50_s=ms[n // 2] / 1000,
        latency_p90_s=ms[int(n * 0.9)] / 1000,
        samples=samples,
        runtime={},
        measured_at=timezone.now() - timedelta(minutes=seed),
    )


@pytest.fixture
def two_packages(make_variant, make_package):
    return make_package(make_variant("fp32")), make_package(make_variant("int8", precision="int8"))


def test_recalibration_fits_the_profile_to_what_its_devices_measured(profile, two_packages, publish):
    for i, package in enumerate(two_packages):
        publish(package.variant, profile, alias=f"a{i}")
        measure(package, profile, seed=i)
    report = recalibrate_profile(profile.pk)
    profile.refresh_from_db()
    assert report is not None and profile.cost_params["_type"] == "CostParams"
    assert report["n_observations"] == 48 and report["n_measurements"] == 2
    assert report["mape"] < 0.05 < report["mape_before"]
    assert profile.calibration["cost_model_version"] == "roofline-7"
    # Every variant on the profile got a calibrated prediction.
    rows = Prediction.objects.filter(device_profile=profile)
    assert {p.variant_id for p in rows} == {p.variant_id for p in two_packages}
    assert all(p.calibrated and p.cost_model_version == "roofline-7" for p in rows)


def test_predicted_vs_measured_within_ten_percent_after_calibration(profile, two_packages, publish):
    for i, package in enumerate(two_packages):
        publish(package.variant, profile, alias=f"a{i}")
        measure(package, profile, seed=i)
    before = predicted_vs_measured(profile)
    assert {r["calibrated"] for r in before} == {False}
    recalibrate_profile(profile.pk)
    profile.refresh_from_db()
    rows = predicted_vs_measured(profile)
    calibrated = [r for r in rows if r["calibrated"]]
    assert len(calibrated) == 2 and len(rows) == 4
    assert all(abs(r["error_pct"]) < 10 for r in calibrated)
    assert all(abs(r["error_pct"]) > 30 for r in rows if not r["calibrated"])
    from registry.figures import predicted_vs_measured_data, predicted_vs_measured_figure

    figure = predicted_vs_measured_figure(predicted_vs_measured_data(rows), profile.name)
    assert len(figure["data"]) == 3  # the diagonal, default model, calibrated


def test_nothing_to_fit_without_device_samples(profile):
    assert recalibrate_profile(profile.pk) is None
    assert recalibrate_profile(999_999) is None


def test_recalibration_re_ranks_the_profiles_recommendation(profile, model, two_packages, publish):
    fp32, int8 = two_packages
    spec = ModelSpec.from_dict(model.spec)
    device = profile.to_device_spec()

    def latency(package, params):
        return predict(
            spec, Plan.from_dict(package.variant.plan), device, seq_len=64, params=params
        ).latency_s

    slo_s = (latency(fp32, TRUE) + latency(int8, TRUE)) / 2
    assert latency(fp32, CostParams()) < slo_s  # uncalibrated, the fp32 variant meets the SLO
    candidates = [
        {
            "key": p.variant.plan_hash,
            "accuracy": acc,
            "latency_s": latency(p, CostParams()),
            "memory_bytes": 10_000,
            "accuracy_source": "measured",
            "latency_source": "predicted",
            "label": p.variant.name,
            "extra": {"plan": p.variant.plan, "weights_key": "", "unsupported_precisions": []},
        }
        for p, acc in ((fp32, 0.90), (int8, 0.89))
    ]
    run = PlanningRun.objects.create(
        base_model=model,
        policy={"kind": "max_accuracy", "latency_slo_ms": slo_s * 1000},
        trials_per_device=1,
        real_eval_budget=1,
        status=PlanningRun.Status.DONE,
        result={
            "devices": {
                str(profile.pk): {
                    "candidates": candidates,
                    "front": candidates,
                    "recommendation": {"chosen": candidates[0], "variant": fp32.variant_id},
                }
            }
        },
    )
    run.device_profiles.set([profile])
    for i, package in enumerate(two_packages):
        publish(package.variant, profile, alias=f"a{i}")
        measure(package, profile, seed=i)
    report = recalibrate_profile(profile.pk)
    assert report["runs_reranked"] == 1
    run.refresh_from_db()
    entry = run.result["devices"][str(profile.pk)]
    assert entry["recommendation"]["chosen"]["key"] == int8.variant.plan_hash
    assert entry["recommendation"]["variant"] == int8.variant_id
    assert entry["calibration"]["calibrated"] is True


def test_the_worker_task_runs_the_service(profile, two_packages, publish):
    from workers.tasks import recalibrate_profile as task

    publish(two_packages[0].variant, profile)
    measure(two_packages[0], profile)
    assert task.apply(args=[profile.pk]).get()["n_measurements"] == 1


def test_a_slow_refit_never_overwrites_the_fit_a_later_report_stored_meanwhile(
    profile, two_packages, publish, monkeypatch
):
    from planner import cost
    from registry import calibration

    fp32, int8 = two_packages
    for i, package in enumerate(two_packages):
        publish(package.variant, profile, alias=f"a{i}")
    measure(fp32, profile, seed=0)
    real_fit = cost.fit
    newer: list[dict | None] = []

    def slow_fit(*args, **kwargs):
        # While this re-fit computes, a device reports and that report's re-fit runs to the end.
        if not newer:
            newer.append(None)
            measure(int8, profile, seed=1)
            newer[0] = calibration.recalibrate_profile(profile.pk)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(cost, "fit", slow_fit)
    assert calibration.recalibrate_profile(profile.pk) is None  # dropped: it read older data
    assert newer[0] is not None and newer[0]["n_measurements"] == 2
    profile.refresh_from_db()
    assert profile.calibration == newer[0]  # the newer fit, whole: report, predictions count
    assert profile.cost_params is not None


def test_the_fit_is_written_under_the_profiles_row_lock(profile, package, publish):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    if not connection.features.has_select_for_update:
        pytest.skip("SQLite has no row locks (its writers take the whole database)")
    publish(package.variant, profile)
    measure(package, profile)
    with CaptureQueriesContext(connection) as captured:
        assert recalibrate_profile(profile.pk) is not None
    sql = [q["sql"] for q in captured.captured_queries]
    locked = next(
        i for i, q in enumerate(sql) if "devices_deviceprofile" in q and q.rstrip().endswith("UPDATE")
    )
    written = [i for i, q in enumerate(sql) if q.startswith("UPDATE") and "devices_deviceprofile" in q]
    predictions = [i for i, q in enumerate(sql) if "registry_prediction" in q and q.startswith("INSERT")]
    assert written and predictions and locked < min(predictions) and locked < min(written)
