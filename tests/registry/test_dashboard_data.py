"""The dashboard's data layer: entries of finished runs, recommendations, coverage, predictions,
measurement overlay, query-string parsing — without HTTP."""

from __future__ import annotations

import datetime as dt

import pytest
from django.http import QueryDict
from django.utils import timezone

from planner.recommend import Policy
from registry import dashboard as dash
from registry import studies
from registry.models import DeviceSearch, Measurement, Prediction
from registry.predictions import UNSUPPORTED_MEMORY
from tests.registry.factories import MIB, candidate, finished_run, make_variant

pytestmark = pytest.mark.django_db


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


def test_a_run_priced_with_fitted_parameters_records_calibrated_predictions(fleet):
    from registry.predictions import record_run_predictions

    run = fleet["run"]
    phone = str(fleet["phone"].pk)
    Prediction.objects.filter(variant=fleet["full"], device_profile=fleet["phone"]).update(
        calibrated=True, latency_s=0.033
    )
    run.result["devices"][phone]["cost_params_fitted"] = True
    run.save(update_fields=["result"])
    record_run_predictions(run)
    phone_row = Prediction.objects.get(variant=fleet["full"], device_profile=fleet["phone"])
    board_row = Prediction.objects.get(variant=fleet["full"], device_profile=fleet["board"])
    # the newer fitted prediction replaces the older one; the board's stays from the defaults
    assert phone_row.calibrated and phone_row.latency_s == pytest.approx(0.040)
    assert not board_row.calibrated


def test_a_run_priced_before_a_refit_leaves_the_refits_predictions_alone(fleet):
    # The run's figures come from the parameters it was priced with; a re-fit landed since
    # (or a backfill re-records an old run) must not put them back over the re-fit's.
    from planner.cost import CostParams
    from registry.predictions import cost_params_digest, record_run_predictions

    run, phone = fleet["run"], fleet["phone"]
    older = CostParams(mem_efficiency=0.5).to_dict()
    newer = CostParams(mem_efficiency=0.2).to_dict()
    entry = run.result["devices"][str(phone.pk)]
    entry["cost_params_fitted"] = True
    entry["cost_params_digest"] = cost_params_digest(older)
    run.save(update_fields=["result"])
    type(phone).objects.filter(pk=phone.pk).update(cost_params=newer)
    Prediction.objects.filter(variant=fleet["full"], device_profile=phone).update(
        calibrated=True, latency_s=0.033
    )

    record_run_predictions(run)
    kept = Prediction.objects.get(variant=fleet["full"], device_profile=phone)
    assert kept.calibrated and kept.latency_s == pytest.approx(0.033)
    board_row = Prediction.objects.get(variant=fleet["full"], device_profile=fleet["board"])
    assert board_row.latency_s == pytest.approx(0.120)  # no digest recorded: recorded as before

    type(phone).objects.filter(pk=phone.pk).update(cost_params=older)  # priced with these: recorded
    record_run_predictions(run)
    assert Prediction.objects.get(variant=fleet["full"], device_profile=phone).latency_s == pytest.approx(
        0.040
    )


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


@pytest.mark.parametrize("value", ["²", "1,²", "٣", "１２", "⑦"])
def test_ids_that_are_unicode_digits_are_ignored_with_a_notice(value):
    # str.isdigit() is true for these, int() rejects "²" and "⑦": a 500 before the fix
    params = dash.Params(QueryDict(f"variants={value}"))
    ids = params.ids("variants", label="v", limit=4)
    assert ids == ([1] if value.startswith("1,") else [])
    assert len(params.notices) == 1 and "is not an id" in params.notices[0]


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


def _study(fleet_module, name, n=12):
    import optuna

    study = optuna.create_study(
        study_name=name, storage=fleet_module._storage(), directions=["maximize", "minimize", "minimize"]
    )
    for i in range(n):
        study.add_trial(
            optuna.trial.create_trial(
                values=[0.7 + i / 100, 10.0 + i, 30.0 + i],
                system_attrs={"constraints:memory": -1.0, "constraints:latency": 1.0 if i % 3 == 0 else -1.0},
            )
        )


@pytest.fixture
def optuna_file(settings, tmp_path):
    from registry import fleet as fleet_module

    settings.OPTUNA_STORAGE_URL = f"sqlite:///{tmp_path / 'optuna.sqlite3'}"
    fleet_module._STORAGES.clear()
    studies._ENGINES.clear()
    yield fleet_module
    fleet_module._STORAGES.clear()
    studies._ENGINES.clear()


def test_trial_points_read_from_optunas_tables_match_optunas_api(optuna_file, fleet):
    run, device = fleet["run"], fleet["phone"].pk
    search = DeviceSearch.objects.create(run=run, device_profile_id=device, status="done")
    _study(optuna_file, search.study_name)
    fast = studies._trial_points_sql(search.study_name)
    slow = optuna_file.device_trials(run, device)
    assert sorted(fast, key=lambda p: p["trial"]) == sorted(slow, key=lambda p: p["trial"])
    assert sum(1 for p in fast if not p["feasible"]) == 4
    assert studies.trial_points(run.pk, device) == fast
    assert optuna_file.optuna_storage_url is studies.optuna_storage_url


def test_trial_points_use_the_study_name_the_device_search_gives(optuna_file, fleet, monkeypatch):
    monkeypatch.setattr(DeviceSearch, "study_name", property(lambda s: f"renamed-{s.pk}"))
    run, device = fleet["run"], fleet["phone"].pk
    search = DeviceSearch.objects.create(run=run, device_profile_id=device, status="done")
    _study(optuna_file, search.study_name, n=5)
    assert len(studies.trial_points(run.pk, device)) == 5


def test_trial_points_fall_back_to_optunas_api_when_the_direct_read_fails(optuna_file, fleet, monkeypatch):
    from sqlalchemy.exc import OperationalError

    run, device = fleet["run"], fleet["phone"].pk
    search = DeviceSearch.objects.create(run=run, device_profile_id=device, status="done")
    _study(optuna_file, search.study_name, n=3)

    def broken(name):
        raise OperationalError("SELECT", {}, Exception("no such column"))

    monkeypatch.setattr(studies, "_trial_points_sql", broken)
    assert len(studies.trial_points(run.pk, device)) == 3


def test_a_study_not_created_yet_has_no_trial_points(optuna_file, fleet):
    run, device = fleet["run"], fleet["phone"].pk
    DeviceSearch.objects.create(run=run, device_profile_id=device, status="queued")
    optuna_file._storage()  # Optuna's tables exist, the device's study does not
    assert studies.trial_points(run.pk, device) == []


def test_a_plan_pages_queries_do_not_grow_with_its_devices(optuna_file, fleet, client, viewer):
    """The plan page and the figures its live view polls read every device's search at once
    (one DeviceSearch query per device before), with the trials from Optuna's tables."""
    from django.core.cache import cache
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.registry.factories import make_profile

    client.force_login(viewer)
    counts, points = [], []
    for n in (2, 4):
        profiles = [make_profile(f"Plan page {n}-{i}") for i in range(n)]
        run = finished_run(
            fleet["model"], {p: [candidate(fleet["full"], latency_ms=10, memory_mib=10)] for p in profiles}
        )
        for p in profiles:
            search = DeviceSearch.objects.create(run=run, device_profile=p, status="done", trials_done=12)
            _study(optuna_file, search.study_name)
        per_url = []
        for url in (f"/plans/{run.pk}/", f"/plans/{run.pk}/figures/"):
            cache.clear()
            with CaptureQueriesContext(connection) as queries:
                response = client.get(url)
            assert response.status_code == 200, url
            per_url.append(len(queries))
        counts.append(per_url)
        figures = response.json()["figures"]
        points.append([sum(len(t.get("x", [])) for t in f["figure"]["data"]) for f in figures[1:]])
    assert counts[0] == counts[1]
    assert all(p >= 12 for p in points[0] + points[1]), points  # every device's trials are drawn


def test_the_optuna_url_of_djangos_in_memory_test_database_uses_uri(settings, monkeypatch):
    settings.OPTUNA_STORAGE_URL = ""
    db = settings.DATABASES["default"]
    monkeypatch.setitem(db, "ENGINE", "django.db.backends.sqlite3")
    monkeypatch.setitem(db, "NAME", "file:memorydb_default?mode=memory&cache=shared")
    url = "sqlite:///file:memorydb_default?mode=memory&cache=shared&uri=true"
    assert studies.optuna_storage_url() == url
    monkeypatch.setitem(db, "NAME", "/var/lib/edgefit/db.sqlite3")
    assert studies.optuna_storage_url() == "sqlite:////var/lib/edgefit/db.sqlite3"


def test_csv_cells_that_look_like_formulas_are_neutralised():
    body = dash.csv_response_body(["a", "b"], [["=cmd()", 1.5], ["plain", None]])
    assert body.splitlines() == ["a,b", "'=cmd(),1.5", "plain,"]


def test_unsupported_memory_marker_is_larger_than_any_budget():
    assert (
        dash.feasible_keys(
            [{"key": "k", "memory_bytes": UNSUPPORTED_MEMORY, "latency_s": 0.001, "accuracy": 1.0}],
            Policy(),
            0.8,
            10 * MIB,
        )
        == set()
    )


def test_every_reader_treats_the_runs_unsupported_marker_as_unusable(fleet):
    marked = {"key": "k", "memory_bytes": UNSUPPORTED_MEMORY, "extra": {}}
    assert not dash._usable(marked)
    assert dash._usable({**marked, "memory_bytes": 10 * MIB})


def _device_measurement(variant, profile, *, p50_ms, batch_size=1, minutes_ago=0, **extra):
    return Measurement.objects.create(
        variant=variant,
        device_profile=profile,
        kind="device",
        host="dev-1",
        batch_size=batch_size,
        latency_p50_s=p50_ms / 1000,
        latency_p90_s=p50_ms / 1000 * 1.2,
        measured_at=timezone.now() - dt.timedelta(minutes=minutes_ago),
        **extra,
    )


def test_the_measured_latency_is_the_batch_1_p50_on_every_page(fleet):
    full, phone = fleet["full"], fleet["phone"]
    _device_measurement(full, phone, p50_ms=25, minutes_ago=10)
    _device_measurement(full, phone, p50_ms=90, batch_size=8)  # newer, but a throughput test
    table = {v.pk: v for v in dash.variant_table_queryset(fleet["model"], phone)}
    row = dash.variant_figures(table[full.pk])
    assert row["latency_source"] == "measured" and row["latency_ms"] == pytest.approx(25)
    device_row = next(r for r in dash.variant_devices(full) if r["profile"].pk == phone.pk)
    assert device_row["measured_p50_ms"] == pytest.approx(25)
    entry = dash.device_entries([fleet["model"].pk])[(fleet["model"].pk, phone.pk)]
    overview = next(c for c in entry["candidates"] if c["variant"] == full.pk)
    assert overview["latency_source"] == "measured" and overview["latency_ms"] == pytest.approx(25)


def test_the_variant_page_does_not_read_measurement_samples(fleet, django_assert_max_num_queries):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    samples = [{"tokens": 12, "exit_layer": 1, "latency_ms": 20.0}] * 10
    _device_measurement(fleet["full"], fleet["phone"], p50_ms=20, samples=samples)
    with CaptureQueriesContext(connection) as queries:
        rows = dash.variant_devices(fleet["full"])
    assert any(r["measured_p50_ms"] == pytest.approx(20) for r in rows)
    measurement_sql = [q["sql"] for q in queries if "registry_measurement" in q["sql"]]
    assert measurement_sql and all('"samples"' not in q and '"runtime"' not in q for q in measurement_sql)


def test_predicted_vs_measured_errors_surface_instead_of_a_different_chart(fleet, monkeypatch):
    from registry import calibration

    assert dash.predicted_vs_measured_rows(fleet["phone"]) == []  # no samples: the empty state

    def broken(profile):
        raise RuntimeError("cost model bug")

    monkeypatch.setattr(calibration, "predicted_vs_measured", broken)
    _device_measurement(fleet["full"], fleet["phone"], p50_ms=25)
    with pytest.raises(RuntimeError):
        dash.predicted_vs_measured_rows(fleet["phone"])


def test_exit_fractions_are_indexed_by_plan_once_for_every_reader(fleet, django_assert_num_queries):
    from planner.specs import Plan
    from registry.exits import exit_fractions
    from registry.models import RealEvaluation

    plans = [
        Plan.from_dict(make_variant(fleet["model"], accuracy=0.7, exit_threshold=t).plan) for t in (0.8, 0.9)
    ]
    RealEvaluation.objects.create(
        base_model=fleet["model"],
        weights_key=plans[0].weights_key(),
        plan=plans[0].to_dict(),
        status="done",
        result={
            "options": [
                {"plan": p.to_dict(), "exit_fraction": [0.2 + i / 10, 0.8 - i / 10]}
                for i, p in enumerate(plans)
            ]
        },
    )
    RealEvaluation.objects.create(  # unfinished: not a measurement
        base_model=fleet["model"],
        weights_key="other",
        plan=plans[0].to_dict(),
        status="running",
        result={"options": [{"plan": plans[0].to_dict(), "exit_fraction": [1.0, 0.0]}]},
    )
    with django_assert_num_queries(1):
        index = exit_fractions([fleet["model"].pk], [p.hash() for p in plans])
    assert index == {
        (fleet["model"].pk, plans[0].hash()): pytest.approx([0.2, 0.8]),
        (fleet["model"].pk, plans[1].hash()): pytest.approx([0.3, 0.7]),
    }
    assert exit_fractions([fleet["model"].pk], [plans[0].hash()], ["nope"]) == {}


def test_the_dashboard_predicts_and_reads_studies_without_importing_torch_or_optuna():
    # The device page's predicted-vs-measured goes through registry.calibration and planner.cost:
    # importing torch there made a web worker's first device page ~2 s slower.
    import os
    import subprocess
    import sys

    code = (
        "import django, sys; django.setup(); "
        "import registry.pages, registry.studies, registry.exits, registry.calibration, planner.cost; "
        "print(sorted(m for m in ('torch', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"},
    )
    assert out.stdout.strip() == "[]"
