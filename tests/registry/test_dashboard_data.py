"""The dashboard's data layer: entries of finished runs, recommendations, coverage, predictions,
measurement overlay, query-string parsing — without HTTP."""

from __future__ import annotations

import datetime as dt

import pytest
from django.core.cache import cache
from django.http import QueryDict
from django.utils import timezone

from planner.recommend import Policy
from registry import dashboard as dash
from registry.models import Measurement, Prediction
from tests.registry.factories import MIB, candidate, demo_fleet, finished_run, make_variant

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def fleet():
    return demo_fleet()


def _recs(fleet, policy):
    entries = dash.device_entries([fleet["model"].pk])
    return {
        p.pk: dash.recommendation(entries.get((fleet["model"].pk, p.pk)), policy, 0.80, p.ram_budget_bytes)
        for p in (fleet["phone"], fleet["board"], fleet["watch"])
    }


def _devices(fleet):
    return [{"id": p.pk, "share": p.fleet_share} for p in (fleet["phone"], fleet["board"], fleet["watch"])]


def test_coverage_is_weighted_by_fleet_share(fleet):
    loose = Policy(kind="max_accuracy", latency_slo_ms=50, max_loss_points=1)
    cov = dash.coverage(_devices(fleet), _recs(fleet, loose))
    assert cov["fraction"] == pytest.approx(0.8)
    assert cov["devices_covered"] == 2
    tight = Policy(kind="max_accuracy", latency_slo_ms=30, max_loss_points=1)
    assert dash.coverage(_devices(fleet), _recs(fleet, tight))["fraction"] == pytest.approx(0.5)
    sentence = dash.coverage_sentence(cov, loose)
    assert sentence == "80 % of the fleet gets a package within 1 point of full accuracy under 50 ms"


def test_a_device_no_run_covers_counts_as_unplanned(fleet):
    from tests.registry.factories import make_profile

    extra = make_profile("Tablet D", fleet_share=0.0)
    entries = dash.device_entries([fleet["model"].pk])
    rec = dash.recommendation(
        entries.get((fleet["model"].pk, extra.pk)), Policy(), 0.8, extra.ram_budget_bytes
    )
    assert rec["status"] == "unplanned" and rec["chosen"] is None


def test_recommendations_follow_the_policy_and_unsupported_precisions_are_never_offered(fleet):
    recs = _recs(fleet, Policy(kind="max_accuracy", latency_slo_ms=50))
    assert recs[fleet["phone"].pk]["chosen"]["variant"] == fleet["full"].pk
    assert recs[fleet["board"].pk]["chosen"]["variant"] == fleet["exit"].pk
    fast = _recs(fleet, Policy(kind="min_latency", max_loss_points=5))
    assert fast[fleet["phone"].pk]["chosen"]["variant"] == fleet["small"].pk
    # the board cannot run int4: the int4 variants are not its candidates
    assert fast[fleet["board"].pk]["chosen"]["variant"] == fleet["exit"].pk
    watch = recs[fleet["watch"].pk]
    assert watch["status"] == "infeasible" and "memory" in watch["reason"]


def test_the_recommendation_explains_what_binds_and_lists_neighbours(fleet):
    rec = _recs(fleet, Policy(kind="max_accuracy", latency_slo_ms=30))[fleet["phone"].pk]
    assert rec["chosen"]["variant"] == fleet["mid"].pk
    assert rec["binding"] == "latency SLO 30 ms"
    assert {n["variant"] for n in rec["neighbours"]} <= {
        fleet["full"].pk,
        fleet["small"].pk,
        fleet["exit"].pk,
    }
    assert "highest accuracy" in rec["reason"]


def test_the_newest_finished_run_wins_per_device(fleet):
    newer = finished_run(
        fleet["model"],
        {fleet["phone"]: [candidate(fleet["small"], latency_ms=5, memory_mib=10)]},
        finished_at=timezone.now() + dt.timedelta(minutes=5),
    )
    entries = dash.latest_entries([fleet["model"].pk])
    assert entries[(fleet["model"].pk, fleet["phone"].pk)]["run_id"] == newer.pk
    assert entries[(fleet["model"].pk, fleet["board"].pk)]["run_id"] == fleet["run"].pk


def test_a_device_measurement_replaces_the_prediction_and_is_marked(fleet):
    Measurement.objects.create(
        variant=fleet["full"],
        device_profile=fleet["phone"],
        kind="device",
        host="phone-123",
        batch_size=1,
        latency_p50_s=0.025,
        latency_p90_s=0.03,
        measured_at=timezone.now(),
    )
    rec = _recs(fleet, Policy(kind="max_accuracy", latency_slo_ms=30))[fleet["phone"].pk]
    # measured at 25 ms, the full-accuracy variant now meets the 30 ms SLO
    assert rec["chosen"]["variant"] == fleet["full"].pk
    assert rec["chosen"]["latency_source"] == "measured"
    assert rec["chosen"]["latency_ms"] == pytest.approx(25)


def test_finished_runs_become_prediction_rows_and_calibrated_ones_are_kept(fleet):
    rows = Prediction.objects.filter(variant=fleet["full"])
    assert {(r.device_profile_id, round(r.latency_s * 1000)) for r in rows} == {
        (fleet["phone"].pk, 40),
        (fleet["board"].pk, 120),
    }
    # unsupported candidates get no prediction on that device
    assert not Prediction.objects.filter(variant=fleet["small"], device_profile=fleet["board"]).exists()
    Prediction.objects.filter(variant=fleet["full"], device_profile=fleet["phone"]).update(
        calibrated=True, latency_s=0.033
    )
    from registry.predictions import record_run_predictions

    record_run_predictions(fleet["run"])
    kept = Prediction.objects.get(variant=fleet["full"], device_profile=fleet["phone"])
    assert kept.calibrated and kept.latency_s == pytest.approx(0.033)


def test_malformed_query_values_fall_back_to_defaults_with_notices():
    params = dash.Params(QueryDict("policy=best&loss=abc&slo=-1&budget=1e999"))
    policy = dash.policy_from_params(params)
    assert policy == Policy(kind="max_accuracy", latency_slo_ms=50.0, max_loss_points=1.0)
    assert len(params.notices) == 4
    params = dash.Params(QueryDict("policy=min_memory&slo="))
    assert dash.policy_from_params(params).kind == "max_accuracy"
    assert "needs a latency SLO" in params.notices[0]
    params = dash.Params(QueryDict("variants=1,x,2,2,3,4,5"))
    assert params.ids("variants", label="v", limit=4) == [1, 2, 3, 4]
    assert len(params.notices) == 2


def test_exit_fractions_come_from_the_variant_or_its_real_evaluation(fleet):
    from planner.specs import Plan
    from registry.models import RealEvaluation

    no_fraction = make_variant(
        fleet["model"], accuracy=0.7, exit_threshold=0.8, precisions=["int8", "int8", "int4"]
    )
    plan = Plan.from_dict(no_fraction.plan)
    no_fraction.plan_hash = plan.hash()
    no_fraction.save()
    RealEvaluation.objects.create(
        base_model=fleet["model"],
        weights_key=plan.weights_key(),
        plan=plan.to_dict(),
        status="done",
        result={"options": [{"plan": plan.to_dict(), "exit_fraction": [0.7, 0.3]}]},
    )
    rows = dash.exit_variants(fleet["model"], [fleet["exit"], no_fraction, fleet["full"]])
    by_id = {r["id"]: r for r in rows}
    assert by_id[fleet["exit"].pk]["exit_fraction"] == [0.4, 0.6]
    assert by_id[no_fraction.pk]["exit_fraction"] == [0.7, 0.3]
    assert fleet["full"].pk not in by_id


def test_trial_points_read_from_optunas_tables_match_optunas_api(settings, tmp_path, fleet):
    import optuna

    from registry import fleet as fleet_module

    settings.OPTUNA_STORAGE_URL = f"sqlite:///{tmp_path / 'optuna.sqlite3'}"
    fleet_module._STORAGES.clear()
    run = fleet["run"]
    device = fleet["phone"].pk
    study = optuna.create_study(
        study_name=f"edgefit-run-{run.pk}-device-{device}",
        storage=fleet_module._storage(),
        directions=["maximize", "minimize", "minimize"],
    )
    for i in range(12):
        study.add_trial(
            optuna.trial.create_trial(
                values=[0.7 + i / 100, 10.0 + i, 30.0 + i],
                system_attrs={"constraints:memory": -1.0, "constraints:latency": 1.0 if i % 3 == 0 else -1.0},
            )
        )
    from registry.models import DeviceSearch

    DeviceSearch.objects.create(run=run, device_profile_id=device, status="done")
    fast = dash._trial_points_sql(f"edgefit-run-{run.pk}-device-{device}")
    slow = fleet_module.device_trials(run, device)
    assert sorted(fast, key=lambda p: p["trial"]) == sorted(slow, key=lambda p: p["trial"])
    assert sum(1 for p in fast if not p["feasible"]) == 4
    assert dash.trial_points(run.pk, device) == fast
    assert dash.optuna_url() == fleet_module.optuna_storage_url()
    fleet_module._STORAGES.clear()
    dash._ENGINES.clear()


def test_csv_cells_that_look_like_formulas_are_neutralised():
    body = dash.csv_response_body(["a", "b"], [["=cmd()", 1.5], ["plain", None]])
    assert body.splitlines() == ["a,b", "'=cmd(),1.5", "plain,"]


def test_unsupported_memory_marker_is_larger_than_any_budget():
    assert (
        dash.feasible_keys(
            [{"key": "k", "memory_bytes": 2**62, "latency_s": 0.001, "accuracy": 1.0}],
            Policy(),
            0.8,
            10 * MIB,
        )
        == set()
    )
