"""Dashboard pages: content, empty states, 404s with a way back, bad query strings (defaults and a
notice, never a 500), CSV twins with the same filters, and pinned query counts (no N+1)."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from django.core.cache import cache
from django.test import Client

from registry.models import Variant
from tests.registry.factories import MIB, candidate, finished_run, make_model, make_variant

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer_client(client: Client, viewer) -> Client:
    client.force_login(viewer)
    return client


def _figures(html: str) -> list[dict]:
    match = re.search(r'<script id="figures" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(match[1]) if match else []


def _csv_rows(response) -> list[dict]:
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    return list(csv.DictReader(io.StringIO(response.content.decode())))


# --------------------------------------------------------------------------- overview


def test_the_home_page_is_the_overview(viewer_client):
    response = viewer_client.get("/")
    assert response.status_code == 302 and response["Location"] == "/overview/"


def test_the_overview_shows_coverage_and_one_cell_per_model_and_device(viewer_client, fleet):
    html = viewer_client.get("/overview/").content.decode()
    assert "80 % of the fleet gets a package within 1 point of full accuracy under 50 ms" in html
    assert html.count('data-device="') == 3
    board_cell = html.split(f'data-device="{fleet["board"].slug}"')[1][:600]
    assert "all int8" in board_cell and "120.00 ms" in board_cell  # max accuracy, no SLO
    assert "No feasible variant" in html and "smallest variant needs" in html  # the watch says why
    assert 'class="src src-predicted">predicted' in html and 'class="src src-measured">measured' in html


def test_overview_thresholds_come_from_the_query_string(viewer_client, fleet):
    html = viewer_client.get("/overview/", {"loss": "1", "slo": "30"}).content.decode()
    assert "50 % of the fleet gets a package within 1 point of full accuracy under 30 ms" in html


def test_overview_bad_thresholds_fall_back_with_a_notice(viewer_client, fleet):
    response = viewer_client.get("/overview/", {"loss": "lots", "slo": "-5", "budget": "nan"})
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('class="notice"') == 3
    assert "80 % of the fleet" in html


def test_overview_without_models_tells_what_to_do_next(viewer_client):
    html = viewer_client.get("/overview/").content.decode()
    assert "No models yet" in html and "register_model minilm-docstrings" in html


def test_overview_without_runs_says_start_one(viewer_client):
    make_model()
    html = viewer_client.get("/overview/").content.decode()
    assert "No planning runs yet" in html and "start a run" not in html  # a viewer cannot start one


def test_the_overview_csv_has_a_row_per_cell_with_sources(viewer_client, fleet):
    rows = _csv_rows(viewer_client.get("/overview.csv", {"slo": "30"}))
    assert len(rows) == 3
    phone = next(r for r in rows if r["device"] == "Phone A")
    assert phone["status"] == "ok" and phone["latency_source"] == "predicted"
    assert next(r for r in rows if r["device"] == "Watch C")["status"] == "infeasible"


# --------------------------------------------------------------------------- model page


def test_the_model_page_has_the_table_heatmap_sensitivity_and_exit_charts(viewer_client, fleet):
    response = viewer_client.get(f"/models/{fleet['model'].slug}/", {"device": fleet["phone"].slug})
    html = response.content.decode()
    assert response.status_code == 200
    assert html.count('name="selv"') == 4
    ids = {f["id"] for f in _figures(html)}
    assert ids == {"heatmap", "sensitivity", "exits"}
    assert "40.000 ms" not in html and "40.00 ms" in html  # predicted latency on the phone
    exits = next(f for f in _figures(html) if f["id"] == "exits")["figure"]
    assert exits["data"][0]["y"] == [40.0, 60.0]


def test_the_variant_table_filters_and_sorts_in_sql(viewer_client, fleet):
    slug = fleet["model"].slug
    base = {"device": fleet["phone"].slug}

    def names(**params):
        html = viewer_client.get(f"/models/{slug}/", {**base, **params}).content.decode()
        return re.findall(r'<a href="/variants/\d+/">#\d+ ([^<]+)</a>', html)

    assert names(sort="latency") == ["all int4", "all int8, exit ≥ 0.90", "mixed 4/8", "all int8"]
    assert names(sort="-accuracy")[0] == "all int8"
    assert names(latency_max="16") == ["all int4", "all int8, exit ≥ 0.90"]
    assert names(acc_min="79", sort="size") == ["mixed 4/8", "all int8", "all int8, exit ≥ 0.90"] or names(
        acc_min="79", sort="size"
    ) == ["mixed 4/8", "all int8, exit ≥ 0.90", "all int8"]
    assert names(size_max="4") == ["all int4"]
    assert names(q="exit") == ["all int8, exit ≥ 0.90"]
    assert names(provenance="trial 3", source="estimated") == []


def test_the_variant_table_ignores_malformed_filters_with_notices(viewer_client, fleet):
    response = viewer_client.get(
        f"/models/{fleet['model'].slug}/",
        {
            "acc_min": "high",
            "size_max": "-3",
            "sort": "bogus",
            "page": "zz",
            "device": "toaster",
            "latency_max": "5",
        },
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('class="notice"') >= 5
    assert html.count('name="selv"') == 4


@pytest.mark.parametrize("suffix", ["", "variants.csv"])
@pytest.mark.parametrize("value", ["1e50", "1e400"])
@pytest.mark.parametrize("field", ["size_min", "size_max", "latency_max"])
def test_huge_number_filters_answer_200(viewer_client, fleet, field, value, suffix):
    # The largest value the form accepts (1e50) must not overflow the SQL comparison; past it,
    # a notice (1e400 is a finite decimal but an infinite float).
    params = {field: value, "device": fleet["phone"].slug}
    response = viewer_client.get(f"/models/{fleet['model'].slug}/{suffix}", params)
    assert response.status_code == 200
    if not suffix:
        assert ('class="notice"' in response.content.decode()) == (value == "1e400")


def test_a_page_past_the_end_shows_the_last_page(viewer_client, fleet):
    html = viewer_client.get(f"/models/{fleet['model'].slug}/", {"page": "99"}).content.decode()
    assert "past the last page" in html and html.count('name="selv"') == 4


def test_the_variants_csv_takes_the_same_filters(viewer_client, fleet):
    rows = _csv_rows(
        viewer_client.get(
            f"/models/{fleet['model'].slug}/variants.csv",
            {"device": fleet["phone"].slug, "latency_max": "16"},
        )
    )
    assert sorted(r["name"] for r in rows) == ["all int4", "all int8, exit ≥ 0.90"]
    assert all(r["latency_source"] == "predicted" for r in rows)


def test_a_model_without_variants_says_how_to_get_some(viewer_client):
    model = make_model("Lonely", sensitivity=False)
    html = viewer_client.get(f"/models/{model.slug}/").content.decode()
    assert (
        "No variants yet" in html and "No sensitivity profile yet" in html and "No early-exit variant" in html
    )


def test_thousands_of_variants_page_in_a_fixed_number_of_queries(
    viewer_client, fleet, django_assert_num_queries
):
    model = fleet["model"]
    Variant.objects.bulk_create(
        Variant(
            base_model=model,
            name=f"bulk {i}",
            plan={"schemes": {}, "exit_threshold": None},
            plan_hash=f"bulk{i:012d}",
            weight_bytes=MIB + i,
            metrics={"accuracy": 0.5 + (i % 100) / 1000},
            metrics_source="estimated",
            provenance="bulk",
        )
        for i in range(3000)
    )
    url = f"/models/{model.slug}/"
    params = {"device": fleet["phone"].slug, "sort": "-accuracy", "page": "3"}
    viewer_client.get(url, params)  # warm the session and caches
    # session, user, viewer group, model, profiles, count, page rows, heatmap variants,
    # exit variants, planning-run count
    with django_assert_num_queries(10):
        response = viewer_client.get(url, params)
    assert response.status_code == 200
    assert response.content.decode().count('name="selv"') == 50
    assert "page 3 of 61" in response.content.decode()


# --------------------------------------------------------------------------- variant page


def test_the_variant_page_shows_the_plan_devices_and_measurements(viewer_client, fleet):
    from django.utils import timezone

    from registry.models import Measurement

    Measurement.objects.create(
        variant=fleet["full"],
        device_profile=fleet["phone"],
        kind="device",
        host="p1",
        batch_size=1,
        latency_p50_s=0.05,
        latency_p90_s=0.06,
        measured_at=timezone.now(),
    )
    html = viewer_client.get(f"/variants/{fleet['full'].pk}/").content.decode()
    assert html.count("<code>encoder.layer") == 4
    assert "Phone A" in html and "Board B" in html
    assert "-20.0 %" in html  # predicted 40 ms vs measured 50 ms
    assert "No package built for this variant yet" in html
    assert 'id="recommended-for"' in html and "Phone A</a>" in html.split('id="recommended-for"')[1][:400]
    rows = _csv_rows(viewer_client.get(f"/variants/{fleet['full'].pk}/devices.csv"))
    assert {r["device"] for r in rows} == {"Phone A", "Board B"}
    plan = _csv_rows(viewer_client.get(f"/variants/{fleet['full'].pk}/plan.csv"))
    assert [r["precision"] for r in plan] == ["int8"] * 5


def test_the_variant_page_links_its_packages_and_aliases(viewer_client, fleet):
    from registry.models import Package, Release

    package = Package.objects.create(
        digest="ab" * 32,
        variant=fleet["full"],
        manifest={},
        manifest_bytes=100,
        blob_bytes=3 * MIB,
        blob_sha256="cd" * 32,
        predicted_bytes=3 * MIB,
        signature="ef" * 64,
        key_id="0123456789abcdef",
        build_seconds=0.5,
        storage_path="/nowhere",
    )
    Release.objects.create(
        profile=fleet["phone"],
        alias="stable",
        variant=fleet["full"],
        package=package,
        rollout_percent=25,
        seed="s",
        status="active",
    )
    html = viewer_client.get(f"/variants/{fleet['full'].pk}/").content.decode()
    assert f'href="/api/v1/packages/{"ab" * 32}/model.safetensors"' in html
    assert "= predicted bytes" in html
    assert "stable" in html and "25 %" in html


def test_an_unknown_variant_or_device_is_a_404_with_a_way_back(viewer_client):
    for url in ("/variants/999999/", "/devices/no-such-device/", "/models/no-such-model/"):
        response = viewer_client.get(url)
        assert response.status_code == 404
        assert b"Back to the device list" in response.content and b"/overview/" in response.content


# --------------------------------------------------------------------------- device page


def test_the_device_page_has_recommendation_reason_neighbours_and_front(viewer_client, fleet):
    html = viewer_client.get(f"/devices/{fleet['phone'].slug}/").content.decode()
    assert "Recommended:" in html and "highest accuracy" in html
    assert "Front neighbour" in html
    ids = [f["id"] for f in _figures(html)]
    assert ids == [f"front-{fleet['model'].pk}", "roofline"]
    front = _figures(html)[0]["figure"]
    assert "recommended" in [t["name"] for t in front["data"]]
    assert "No device has reported a measurement" in html
    rows = _csv_rows(viewer_client.get(f"/devices/{fleet['phone'].slug}/recommendations.csv"))
    assert rows[0]["status"] == "ok" and any(r["status"] == "neighbour" for r in rows)


def test_the_device_page_explains_an_infeasible_device(viewer_client, fleet):
    html = viewer_client.get(f"/devices/{fleet['watch'].slug}/").content.decode()
    assert "No feasible variant" in html and "smallest variant needs" in html


def test_the_device_page_shows_predicted_against_measured(viewer_client, fleet):
    from django.utils import timezone

    from registry.models import Measurement

    Measurement.objects.create(
        variant=fleet["mid"],
        device_profile=fleet["phone"],
        kind="device",
        host="p1",
        batch_size=1,
        latency_p50_s=0.025,
        latency_p90_s=0.03,
        measured_at=timezone.now(),
        # devices always report their per-text samples: the chart predicts the same texts
        samples=[{"tokens": 12 + i, "exit_layer": 1, "latency_ms": 24.0 + i} for i in range(3)],
    )
    html = viewer_client.get(f"/devices/{fleet['phone'].slug}/").content.decode()
    assert "pvm" in [f["id"] for f in _figures(html)]
    assert 'id="pvm-table"' in html
    table = html.split('id="pvm-table"')[1]
    assert f'href="/variants/{fleet["mid"].pk}/"' in table and "25.00 ms" in table  # the median


def test_a_device_without_measurements_shows_no_predicted_vs_measured_chart(viewer_client, fleet):
    html = viewer_client.get(f"/devices/{fleet['phone'].slug}/").content.decode()
    assert "pvm" not in [f["id"] for f in _figures(html)]
    assert 'id="pvm-table"' not in html


def test_a_device_without_runs_says_how_to_plan_it(viewer_client, catalog):
    make_model()
    html = viewer_client.get("/devices/raspberry-pi-5-8-gb/").content.decode()
    assert "No finished planning run covers this device" in html
    assert "derived: 4 Cortex-A76 cores" in html  # sources still shown


# --------------------------------------------------------------------------- compare


def test_the_compare_page_embeds_the_what_if_data_and_renders_the_initial_state(viewer_client, fleet):
    response = viewer_client.get(
        "/compare/",
        {
            "slo": "30",
            "devices": f"{fleet['phone'].slug},{fleet['board'].slug}",
            "variants": f"{fleet['full'].pk}",
        },
    )
    html = response.content.decode()
    assert "50 % of the fleet gets a package within 1 point of full accuracy under 30 ms" in html
    payload = json.loads(
        re.search(r'<script id="compare-data" type="application/json">(.*?)</script>', html, re.S)[1]
    )
    assert payload["state"]["devices"] == [fleet["phone"].slug, fleet["board"].slug]
    assert payload["state"]["variants"] == [fleet["full"].pk]
    board = next(d for d in payload["devices"] if d["slug"] == fleet["board"].slug)
    assert {c["variant"] for c in board["candidates"]} == {fleet["full"].pk, fleet["exit"].pk}


def test_compare_bad_input_keeps_the_defaults_with_notices(viewer_client, fleet):
    response = viewer_client.get(
        "/compare/",
        {"model": "nope", "policy": "cheapest", "slo": "fast", "devices": "a,b", "variants": "x,999999"},
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('class="notice"') >= 5
    assert "80 % of the fleet" in html


def test_compare_without_models_tells_what_to_do_next(viewer_client):
    html = viewer_client.get("/compare/").content.decode()
    assert "No models yet" in html


def test_the_compare_csv_follows_the_what_if(viewer_client, fleet):
    rows = _csv_rows(viewer_client.get("/compare.csv", {"policy": "min_latency", "loss": "5", "slo": ""}))
    phone = next(r for r in rows if r["device"] == "Phone A")
    assert phone["variant"] == "all int4"
    board = next(r for r in rows if r["device"] == "Board B")
    assert board["variant"] == "all int8, exit ≥ 0.90"


def test_unicode_digits_in_id_lists_and_pages_are_notices_not_errors(viewer_client, fleet):
    # "²".isdigit() is true but int("²") raises: each of these was a 500
    response = viewer_client.get("/compare/", {"variants": f"²,{fleet['full'].pk}"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "is not an id; ignored" in html
    assert json.loads(
        re.search(r'<script id="compare-data" type="application/json">(.*?)</script>', html, re.S)[1]
    )["state"]["variants"] == [fleet["full"].pk]
    assert viewer_client.get("/compare.csv", {"variants": "²"}).status_code == 200
    url = f"/models/{fleet['model'].slug}/"
    for params in ({"sel": "²"}, {"sel": "⑦,1"}, {"page": "²"}, {"page": "-²"}, {"page": "٣"}):
        response = viewer_client.get(url, params)
        assert response.status_code == 200, params
        assert 'class="notice"' in response.content.decode(), params


# --------------------------------------------------------------------------- list pages: pinned queries


def test_list_pages_run_a_fixed_number_of_queries(viewer_client, fleet, catalog, django_assert_num_queries):
    other = make_model("Second")
    for i in range(5):
        v = make_variant(other, accuracy=0.7 + i / 100)
        finished_run(other, {fleet["phone"]: [candidate(v, latency_ms=10 + i, memory_mib=10)]})
    for url in ("/overview/", "/models/", "/devices/", "/plans/", "/compare/"):
        viewer_client.get(url)
    expected = {
        # session, user, viewer group + the page's own queries
        # models, profiles, runs, their devices, results and variant ids (cold cache),
        # device measurements, calibrated predictions, "any run at all"
        "/overview/": 3 + 9,
        "/models/": 3 + 1,
        "/devices/": 3 + 1,
        "/plans/": 3 + 1,
        "/compare/": 3 + 9,  # the overview's queries for one model, and the picked variants
    }
    for url, count in expected.items():
        cache.clear()
        with django_assert_num_queries(count):
            assert viewer_client.get(url).status_code == 200


def test_the_plan_list_leaves_runs_progress_and_results_in_the_database(viewer_client, fleet):
    # A run's progress history and results grow with every trial and device (a 10,000-trial
    # run made the list page take 326 ms at p95 on `bench dashboard`); the list shows counters.
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        assert viewer_client.get("/plans/").status_code == 200
    run_queries = [q["sql"] for q in ctx.captured_queries if "registry_planningrun" in q["sql"]]
    heavy = [f'"registry_planningrun"."{column}"' for column in ("result", "progress")]
    assert run_queries and not any(column in sql for sql in run_queries for column in heavy)


def _grow(fleet, n: int) -> None:
    """n more of everything a list page lists: models with variants and finished runs, device
    profiles, device measurements, predictions, packages and releases."""
    from django.utils import timezone

    from registry.models import Measurement, Package, Release
    from tests.registry.factories import make_profile

    profiles = [fleet["phone"], fleet["board"]] + [make_profile(f"Extra {n}-{i}") for i in range(n)]
    for i in range(n):
        model = make_model(f"Grown {n}-{i}")
        variants = [make_variant(model, accuracy=0.7 + j / 100) for j in range(n)]
        exit_v = make_variant(fleet["model"], accuracy=0.75, exit_threshold=0.8, exit_fraction=[0.5, 0.5])
        finished_run(
            model,
            {
                p: [candidate(v, latency_ms=10 + j, memory_mib=10) for j, v in enumerate(variants)]
                for p in profiles
            },
        )
        finished_run(
            fleet["model"],
            {fleet["phone"]: [candidate(exit_v, latency_ms=12, memory_mib=12)]},
            finished_at=timezone.now() - timezone.timedelta(days=1),
        )
        for j, v in enumerate(variants):
            Measurement.objects.create(
                variant=v,
                device_profile=fleet["phone"],
                kind="device",
                host=f"dev-{n}-{i}-{j}",
                batch_size=1,
                latency_p50_s=0.01,
                latency_p90_s=0.012,
                measured_at=timezone.now(),
            )
            package = Package.objects.create(
                digest=f"{n:02d}{i:02d}{j:02d}".ljust(64, "0"),
                variant=v,
                manifest={},
                manifest_bytes=100,
                blob_bytes=MIB,
                blob_sha256="cd" * 32,
                predicted_bytes=MIB,
                signature="ef" * 64,
                key_id="0123456789abcdef",
                build_seconds=0.5,
                storage_path="/nowhere",
            )
            Release.objects.create(
                profile=profiles[j % len(profiles)],
                alias=f"a{n}-{i}-{j}",
                variant=v,
                package=package,
                rollout_percent=25,
                seed="s",
                status="active",
            )


def _query_counts(client, urls) -> dict[str, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    counts = {}
    for url in urls:
        client.get(url)  # the session and per-process caches warm
        cache.clear()
        with CaptureQueriesContext(connection) as queries:
            assert client.get(url).status_code == 200, url
        counts[url] = len(queries)
    return counts


def test_list_pages_run_as_many_queries_for_more_data(viewer_client, fleet, catalog):
    """No N+1: the same count of queries with twice as many models, devices, variants, runs,
    measurements and releases (a count pinned at one size would not show that)."""
    urls = [
        "/overview/",
        "/models/",
        f"/models/{fleet['model'].slug}/",
        f"/models/{fleet['model'].slug}/?device={fleet['phone'].slug}&sel={fleet['full'].pk},{fleet['exit'].pk}",
        "/devices/",
        f"/devices/{fleet['phone'].slug}/",
        "/plans/",
        "/compare/",
        f"/compare/?devices={fleet['phone'].slug}&variants={fleet['full'].pk},{fleet['mid'].pk}",
        "/releases/",
    ]
    _grow(fleet, 2)
    small = _query_counts(viewer_client, urls)
    _grow(fleet, 4)
    large = _query_counts(viewer_client, urls)
    assert large == small


def test_a_long_runs_chart_shows_a_bounded_spread_of_its_history(viewer_client, fleet):
    # The history lives in rows; the chart draws at most CHART_POINTS_PER_DEVICE per device,
    # evenly spread, the first and the latest point kept.
    from django.utils import timezone

    from registry.models import HypervolumePoint
    from registry.views import CHART_POINTS_PER_DEVICE

    run, phone, board = fleet["run"], fleet["phone"], fleet["board"]
    at = timezone.now()
    HypervolumePoint.objects.bulk_create(
        [
            HypervolumePoint(run=run, device_profile=phone, trials=50 * i, hypervolume=i / 1000, at=at)
            for i in range(1, 1001)
        ]
        + [HypervolumePoint(run=run, device_profile=board, trials=50, hypervolume=0.5, at=at)]
    )
    data = viewer_client.get(f"/plans/{run.pk}/figures/").json()
    chart = next(f["figure"] for f in data["figures"] if f["id"] == "hypervolume")
    traces = {t["name"]: t for t in chart["data"]}
    phone_x = traces[phone.name]["x"]
    assert len(phone_x) == CHART_POINTS_PER_DEVICE
    assert phone_x[0] == 50 and phone_x[-1] == 50_000 and phone_x == sorted(phone_x)
    assert traces[board.name]["x"] == [50]
    page = viewer_client.get(f"/plans/{run.pk}/")
    assert b'"historyLength": 1001' in page.content
