"""REST CRUD of device profiles: validation per field, nothing written on bad input."""

from __future__ import annotations

import pytest

from devices.models import DeviceProfile
from tests.devices.factories import GIB, profile_payload

URL = "/api/v1/devices/profiles/"
pytestmark = pytest.mark.django_db


def test_staff_creates_a_profile_and_reads_it_back(api_as, staff):
    response = api_as(staff).post(URL, profile_payload(), format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["slug"] == "test-phone-x"
    assert body["origin"] == "manual"
    assert body["ram_total_gib"] == pytest.approx(8.0)
    detail = api_as(staff).get(f"{URL}{body['id']}/").json()
    assert detail["sources"]["bandwidth_gbs"] == "https://example.com/acme-a1"


def test_a_profile_converts_to_the_planner_device_spec(api_as, staff):
    api_as(staff).post(URL, profile_payload(), format="json")
    spec = DeviceProfile.objects.get().to_device_spec()
    assert spec.ram_budget_bytes == 2 * GIB
    assert spec.weight_formats == ("fp32", "fp16", "int8", "int4")
    assert spec.int4_tops is None


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"ram_total_bytes": -1}, "ram_total_bytes", "greater than or equal to 1"),
        ({"ram_total_bytes": 0}, "ram_total_bytes", "greater than or equal to 1"),
        ({"ram_total_bytes": 10 * 1024**5}, "ram_total_bytes", "at most"),
        ({"ram_budget_bytes": 9 * GIB}, "ram_budget_bytes", "must not exceed ram_total_bytes"),
        ({"weight_formats": ["fp32", "int5"]}, "weight_formats", "unknown format(s) int5"),
        ({"activation_formats": []}, "activation_formats", "non-empty list"),
        ({"bandwidth_gbs": "fast"}, "bandwidth_gbs", "valid number"),
        ({"ram_total_bytes": "eight"}, "ram_total_bytes", "valid"),
        ({"bandwidth_gbs": -5}, "bandwidth_gbs", "greater than 0"),
        ({"fleet_share": 1.5}, "fleet_share", "fraction between 0 and 1"),
        ({"int4_tops": 70.0, "weight_formats": ["fp32"]}, "int4_tops", "int4 is not among weight_formats"),
        ({"sources": {"bandwidth_gbs": "a blog said so"}}, "sources", "http(s) URL"),
        ({"kind": "toaster"}, "kind", "not a valid choice"),
        ({"colour": "blue"}, "colour", "unknown field"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_writes_nothing(api_as, staff, overrides, field, fragment):
    response = api_as(staff).post(URL, profile_payload(**overrides), format="json")
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert field in errors, errors
    assert any(fragment in message for message in errors[field]), errors[field]
    assert DeviceProfile.objects.count() == 0


def test_missing_required_fields_are_each_named(api_as, staff):
    response = api_as(staff).post(URL, {"name": "Bare"}, format="json")
    assert response.status_code == 400
    errors = response.json()["errors"]
    for field in (
        "vendor",
        "ram_total_bytes",
        "ram_budget_bytes",
        "bandwidth_gbs",
        "weight_formats",
        "sources",
    ):
        assert field in errors
    assert DeviceProfile.objects.count() == 0


def test_every_number_needs_a_source(api_as, staff):
    payload = profile_payload()
    del payload["sources"]["int8_tops"]
    response = api_as(staff).post(URL, payload, format="json")
    assert response.status_code == 400
    assert "int8_tops is set but has no source" in response.json()["errors"]["sources"]


def test_a_patch_writes_only_its_fields_not_a_calibration_stored_meanwhile(api_as, staff, monkeypatch):
    from devices.serializers import DeviceProfileSerializer

    created = api_as(staff).post(URL, profile_payload(), format="json").json()
    refit = {"note": "a worker's re-fit, stored while the PATCH ran"}
    real_validate = DeviceProfileSerializer.validate

    def validate_while_a_worker_stores(self, attrs):  # the request already holds the profile
        DeviceProfile.objects.filter(pk=created["id"]).update(calibration=refit)
        return real_validate(self, attrs)

    monkeypatch.setattr(DeviceProfileSerializer, "validate", validate_while_a_worker_stores)
    response = api_as(staff).patch(f"{URL}{created['id']}/", {"notes": "checked"}, format="json")
    assert response.status_code == 200
    stored = DeviceProfile.objects.get(pk=created["id"])
    assert stored.notes == "checked" and stored.calibration == refit


def test_a_patch_is_judged_against_the_whole_profile(api_as, staff):
    created = api_as(staff).post(URL, profile_payload(), format="json").json()
    response = api_as(staff).patch(f"{URL}{created['id']}/", {"ram_total_bytes": GIB}, format="json")
    assert response.status_code == 400
    assert "ram_budget_bytes" in response.json()["errors"]
    assert DeviceProfile.objects.get().ram_total_bytes == 8 * GIB
    ok = api_as(staff).patch(f"{URL}{created['id']}/", {"bandwidth_gbs": 60}, format="json")
    assert ok.status_code == 200
    assert DeviceProfile.objects.get().bandwidth_gbs == 60


def test_staff_deletes_a_profile(api_as, staff):
    created = api_as(staff).post(URL, profile_payload(), format="json").json()
    assert api_as(staff).delete(f"{URL}{created['id']}/").status_code == 204
    assert not DeviceProfile.objects.exists()


def test_a_name_whose_slug_is_taken_is_a_400_on_name(api_as, staff):
    # The slug is unique too: this was an IntegrityError, a 500.
    client = api_as(staff)
    assert client.post(URL, profile_payload(name="Pixel 8"), format="json").status_code == 201
    response = client.post(URL, profile_payload(name="pixel-8"), format="json")
    assert response.status_code == 400
    assert "slug 'pixel-8' is taken by the profile 'Pixel 8'" in response.json()["errors"]["name"][0]
    assert DeviceProfile.objects.count() == 1
    other = client.post(URL, profile_payload(name="Pixel 9"), format="json").json()
    renamed = client.patch(f"{URL}{other['id']}/", {"name": "PIXEL 8"}, format="json")
    assert renamed.status_code == 400 and "name" in renamed.json()["errors"]
    assert DeviceProfile.objects.get(pk=other["id"]).name == "Pixel 9"
    # Renaming a profile to a spelling of its own name keeps working.
    assert client.patch(f"{URL}{other['id']}/", {"name": "pixel 9"}, format="json").status_code == 200


def test_a_profile_in_use_is_a_409_naming_what_uses_it(api_as, staff):
    from devices.enrollment import create_enrollment_key, preregister_device

    client = api_as(staff)
    with_device = DeviceProfile.objects.create(**profile_payload(name="With device"))
    preregister_device(name="d1", profile=with_device, channel="stable", by=None)
    pinned = DeviceProfile.objects.create(**profile_payload(name="Pinned"))
    create_enrollment_key(fleet="north", profile=pinned, created_by=None)
    for profile, what in ((with_device, "1 enrolled device(s)"), (pinned, "1 enrollment key(s) that pin it")):
        response = client.delete(f"{URL}{profile.pk}/")
        assert response.status_code == 409  # was a ProtectedError, a 500
        assert what in response.json()["errors"]["profile"][0]
        assert DeviceProfile.objects.filter(pk=profile.pk).exists()


def test_a_profile_a_planning_run_used_is_not_deleted_under_it(api_as, staff):
    from tests.registry.factories import demo_fleet

    phone = demo_fleet()["phone"]
    response = api_as(staff).delete(f"{URL}{phone.pk}/")
    assert response.status_code == 409
    message = response.json()["errors"]["profile"][0]
    assert "1 planning run(s)" in message and "prediction(s), which would be deleted with it" in message
    assert phone.predictions.exists()


def test_list_filters_orders_and_paginates(api_as, viewer, catalog):
    client = api_as(viewer)
    apple = client.get(URL, {"vendor": "apple"}).json()
    assert apple["count"] == 2
    assert {p["soc"] for p in apple["results"]} == {"A17 Pro", "A18 Pro"}

    int8_only = client.get(URL, {"weight_format": "int4"}).json()["results"]
    assert all("int4" in p["weight_formats"] for p in int8_only)
    assert "Google Coral Dev Board (Edge TPU, 1 GB)" not in {p["name"] for p in int8_only}

    by_bandwidth = client.get(URL, {"ordering": "-bandwidth_gbs", "page_size": 3}).json()
    widths = [p["bandwidth_gbs"] for p in by_bandwidth["results"]]
    assert widths == sorted(widths, reverse=True) and len(widths) == 3
    assert by_bandwidth["next"] is not None

    boards = client.get(URL, {"kind": "board", "ram_total_bytes__lte": 8 * GIB}).json()
    assert {p["kind"] for p in boards["results"]} == {"board"}

    searched = client.get(URL, {"search": "Orin"}).json()
    assert [p["name"] for p in searched["results"]] == ["NVIDIA Jetson Orin Nano 8GB"]


def test_an_unknown_filter_value_is_a_400_naming_the_filter(api_as, viewer, catalog):
    response = api_as(viewer).get(URL, {"weight_format": "int5"})
    assert response.status_code == 400
    assert "weight_format" in response.json()["errors"]


def test_a_patch_is_judged_against_a_change_committed_after_the_profile_was_loaded(
    api_as, staff, monkeypatch
):
    from devices.api import DeviceProfileViewSet

    created = api_as(staff).post(URL, profile_payload(), format="json").json()  # 8 GiB, budget 2
    real_get_object = DeviceProfileViewSet.get_object

    def get_object_then_another_patch_commits(self):
        loaded = real_get_object(self)
        # Another PATCH, valid alone, commits now: total 4 GiB (budget 2 GiB still fits).
        DeviceProfile.objects.filter(pk=loaded.pk).update(ram_total_bytes=4 * GIB)
        return loaded

    monkeypatch.setattr(DeviceProfileViewSet, "get_object", get_object_then_another_patch_commits)
    # Valid against the loaded copy (8 GiB), not against the profile as it now is (4 GiB).
    response = api_as(staff).patch(f"{URL}{created['id']}/", {"ram_budget_bytes": 6 * GIB}, format="json")
    assert response.status_code == 400
    assert list(response.json()["errors"]) == ["ram_budget_bytes"]
    assert "must not exceed ram_total_bytes" in response.json()["errors"]["ram_budget_bytes"][0]
    stored = DeviceProfile.objects.get(pk=created["id"])
    assert (stored.ram_total_bytes, stored.ram_budget_bytes) == (4 * GIB, 2 * GIB)


@pytest.mark.parametrize(
    ("change", "field"),
    [({"ram_budget_bytes": 16 * GIB}, "ram_budget_bytes"), ({"fleet_share": 2.0}, "fleet_share")],
)
def test_a_check_constraint_broken_at_save_time_names_its_field_not_the_name(
    api_as, staff, monkeypatch, change, field
):
    import devices.serializers

    created = api_as(staff).post(URL, profile_payload(), format="json").json()
    monkeypatch.setattr(devices.serializers, "profile_errors", lambda values: {})  # let the database judge
    response = api_as(staff).patch(f"{URL}{created['id']}/", change, format="json")
    assert response.status_code == 400
    assert list(response.json()["errors"]) == [field]


def test_a_name_taken_at_save_time_is_still_a_400_on_name(api_as, staff, monkeypatch):
    from devices.serializers import DeviceProfileSerializer

    assert api_as(staff).post(URL, profile_payload(name="Pixel 8"), format="json").status_code == 201
    monkeypatch.setattr(DeviceProfileSerializer, "validate_name", lambda self, name: name)  # the race
    for name in ("Pixel 8", "pixel-8"):  # the name's constraint, then the slug's
        response = api_as(staff).post(URL, profile_payload(name=name), format="json")
        assert response.status_code == 400 and list(response.json()["errors"]) == ["name"]


def test_a_put_of_the_get_body_is_accepted_with_its_read_only_fields(api_as, staff):
    client = api_as(staff)
    created = client.post(URL, profile_payload(), format="json").json()
    body = client.get(f"{URL}{created['id']}/").json()
    assert {"id", "slug", "ram_total_gib", "created_at", "updated_at", "origin"} <= set(body)
    body["notes"] = "edited from the GET body"
    body["created_at"] = body["created_at"].replace("Z", "+00:00")  # the same instant, spelled otherwise
    response = client.put(f"{URL}{created['id']}/", body, format="json")
    assert response.status_code == 200, response.json()
    assert DeviceProfile.objects.get(pk=created["id"]).notes == "edited from the GET body"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("slug", "renamed"),
        ("id", 999),
        ("origin", "catalog"),
        ("ram_total_gib", 64.0),
        ("created_at", "2020-01-01T00:00:00Z"),
    ],
)
def test_a_changed_read_only_field_is_refused_as_read_only(api_as, staff, field, value):
    client = api_as(staff)
    created = client.post(URL, profile_payload(), format="json").json()
    body = client.get(f"{URL}{created['id']}/").json()
    body[field] = value
    response = client.put(f"{URL}{created['id']}/", body, format="json")
    assert response.status_code == 400
    assert list(response.json()["errors"]) == [field]
    assert response.json()["errors"][field][0].startswith("read-only field: it is ")
    patched = client.patch(f"{URL}{created['id']}/", {field: value}, format="json")
    assert patched.status_code == 400 and list(patched.json()["errors"]) == [field]


def test_a_read_only_field_in_a_create_is_refused_and_a_typo_is_still_unknown(api_as, staff):
    response = api_as(staff).post(URL, profile_payload(origin="catalog", vendr="Acme"), format="json")
    assert response.status_code == 400
    assert response.json()["errors"] == {
        "origin": ["read-only field: the server sets it"],
        "vendr": ["unknown field"],
    }
    assert not DeviceProfile.objects.exists()
