"""Enrollment keys, enrollment, pre-registration, revocation; who may do what."""

from __future__ import annotations

import io

import pytest

from accounts.models import hash_token
from devices.models import Device, DeviceToken, EnrollmentKey
from registry.models import AuditEntry
from tests.delivery.conftest import bearer

pytestmark = pytest.mark.django_db
KEYS = "/api/v1/enrollment-keys/"
DEVICES = "/api/v1/devices/"
ENROLL = "/api/v1/device/enroll"
CONFIG = "/api/v1/device/config"


@pytest.fixture
def enrollment_key(api_as, staff, profile):
    response = api_as(staff).post(KEYS, {"fleet": "lab boards", "profile": profile.slug}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def test_staff_create_an_enrollment_key_shown_once_and_stored_hashed(api_as, staff, enrollment_key, profile):
    assert enrollment_key["key"].startswith("efe_") and enrollment_key["profile"] == profile.slug
    stored = EnrollmentKey.objects.get()
    assert stored.digest == hash_token(enrollment_key["key"]) and enrollment_key["key"] not in str(
        stored.__dict__
    )
    listed = api_as(staff).get(KEYS).json()["results"]
    assert "key" not in listed[0] and listed[0]["prefix"] == enrollment_key["key"][:10]
    assert AuditEntry.objects.filter(action="enrollment_key.create").count() == 1


@pytest.mark.parametrize(("role", "status"), [("viewer", 403), ("outsider", 403), ("anonymous", 401)])
def test_only_staff_create_enrollment_keys(api_as, staff, viewer, outsider, profile, role, status):
    user = {"viewer": viewer, "outsider": outsider, "anonymous": None}[role]
    assert api_as(user).post(KEYS, {"fleet": "f"}, format="json").status_code == status
    assert not EnrollmentKey.objects.exists()


def test_a_device_enrolls_with_a_key_and_gets_an_id_and_a_token(client, enrollment_key, profile):
    response = client.post(
        ENROLL,
        {"enrollment_key": enrollment_key["key"], "name": "board-7", "hardware": {"cpus": 2}},
        content_type="application/json",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["token"].startswith("efd_") and body["profile"] == profile.slug
    assert body["channel"] == "stable" and body["config_url"] == "/api/v1/device/config"
    device = Device.objects.get(pk=body["device_id"])
    assert device.hardware == {"cpus": 2} and device.enrollment_key.fleet == "lab boards"
    assert DeviceToken.objects.get().digest == hash_token(body["token"])
    assert client.get(CONFIG, **bearer(body["token"])).status_code == 200


@pytest.mark.parametrize("key", [None, "", "efe_unknown", "efu_not-an-enrollment-key"])
def test_enrolling_without_a_valid_key_is_401_and_creates_nothing(client, enrollment_key, key):
    body = {"name": "x"} | ({"enrollment_key": key} if key is not None else {})
    response = client.post(ENROLL, body, content_type="application/json")
    assert response.status_code == 401 and response["WWW-Authenticate"].startswith("Bearer")
    assert "enrollment_key" in response.json()["errors"]
    assert not Device.objects.exists()


def test_a_revoked_enrollment_key_enrolls_nobody(api_as, client, staff, enrollment_key):
    assert api_as(staff).post(f"{KEYS}{enrollment_key['id']}/revoke/").status_code == 200
    response = client.post(
        ENROLL, {"enrollment_key": enrollment_key["key"], "name": "x"}, content_type="application/json"
    )
    assert response.status_code == 401 and not Device.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 121}, "name"),
        ({"name": "x", "profile": "some-other-profile"}, "profile"),
        ({"name": "x", "hardware": "not an object"}, "hardware"),
        ({"name": "x", "shoe_size": 44}, "shoe_size"),
    ],
)
def test_bad_enrollment_fields_are_400_naming_the_field(client, enrollment_key, body, field):
    response = client.post(
        ENROLL, {"enrollment_key": enrollment_key["key"], **body}, content_type="application/json"
    )
    assert response.status_code == 400, response.json()
    assert field in response.json()["errors"]
    assert not Device.objects.exists()


def test_a_key_without_a_pinned_profile_needs_the_device_to_name_one(api_as, client, staff, profile):
    key = api_as(staff).post(KEYS, {"fleet": "open"}, format="json").json()["key"]
    missing = client.post(ENROLL, {"enrollment_key": key, "name": "x"}, content_type="application/json")
    assert missing.status_code == 400 and "profile" in missing.json()["errors"]
    named = client.post(
        ENROLL, {"enrollment_key": key, "name": "x", "profile": profile.slug}, content_type="application/json"
    )
    assert named.status_code == 201


def test_staff_pre_register_a_device_and_the_token_is_shown_only_then(api_as, staff, viewer, profile):
    response = api_as(staff).post(DEVICES, {"name": "kiosk", "profile": profile.slug}, format="json")
    assert response.status_code == 201, response.json()
    token = response.json()["token"]
    device_id = response.json()["device_id"]
    detail = api_as(viewer).get(f"{DEVICES}{device_id}/")
    assert detail.status_code == 200 and token not in detail.content.decode()
    assert detail.json()["enrolled_by"] == staff.username
    assert api_as(viewer).get(DEVICES).json()["count"] == 1


@pytest.mark.parametrize(("role", "status"), [("viewer", 403), ("outsider", 403), ("anonymous", 401)])
def test_only_staff_pre_register_devices(api_as, viewer, outsider, profile, role, status):
    user = {"viewer": viewer, "outsider": outsider, "anonymous": None}[role]
    response = api_as(user).post(DEVICES, {"name": "k", "profile": profile.slug}, format="json")
    assert response.status_code == status and not Device.objects.exists()


def test_revoking_a_device_answers_401_to_its_next_request(
    api_as, client, staff, viewer, profile, make_device, committed
):
    device = make_device(profile)
    assert client.get(CONFIG, **bearer(device["token"])).status_code == 200
    assert api_as(viewer).post(f"{DEVICES}{device['device_id']}/revoke/").status_code == 403
    with committed():
        response = api_as(staff).post(f"{DEVICES}{device['device_id']}/revoke/")
    assert response.status_code == 200 and response.json()["active"] is False
    assert client.get(CONFIG, **bearer(device["token"])).status_code == 401
    entry = AuditEntry.objects.get(action="device.revoke")
    assert entry.actor_label == staff.username and entry.after["revoked"] is True


def test_device_tokens_open_no_person_endpoint(client, profile, make_device):
    device = make_device(profile)
    for url in (DEVICES, KEYS, "/api/v1/releases/", "/api/v1/audit/", "/api/v1/devices/profiles/"):
        assert client.get(url, **bearer(device["token"])).status_code in (401, 403), url
    assert client.get("/releases/", **bearer(device["token"])).status_code == 302  # login page


def test_people_cannot_use_device_endpoints(api_as, staff):
    assert api_as(staff).post("/api/v1/device/measurements", {}, format="json").status_code in (401, 403)


@pytest.mark.parametrize(
    "url",
    [
        DEVICES,
        KEYS,
        "/api/v1/packages/",
        "/api/v1/releases/",
        "/api/v1/audit/",
        CONFIG,
        "/api/v1/device/measurements",
    ],
)
def test_anonymous_callers_get_nothing(client, url):
    method = client.post if url.endswith("measurements") else client.get
    assert method(url).status_code in (401, 403)


def test_anonymous_callers_may_read_health_ping_signing_key_and_schema(client):
    for url in ("/health/", "/api/v1/ping", "/api/v1/signing-key", "/api/v1/schema/"):
        assert client.get(url).status_code == 200, url


def test_the_enrollment_key_command_prints_a_key_and_reuses_the_kept_one(tmp_path):
    import io

    from django.core.management import call_command

    def run() -> str:
        out = io.StringIO()
        call_command("enrollment_key", "demo", "--keep-in", str(tmp_path / "key"), stdout=out)
        return out.getvalue().strip()

    first = run()
    assert first.startswith("efe_") and run() == first
    assert EnrollmentKey.objects.get().fleet == "demo"
    EnrollmentKey.objects.update(revoked_at="2026-01-01T00:00:00Z")
    assert run() != first  # a revoked key is replaced


def test_the_enrollment_key_is_looked_up_once_per_enrollment(client, enrollment_key):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        response = client.post(
            "/api/v1/device/enroll",
            {"enrollment_key": enrollment_key["key"], "name": "board-8"},
            content_type="application/json",
        )
    assert response.status_code == 201, response.json()
    lookups = [q["sql"] for q in queries if q["sql"].lstrip().upper().startswith("SELECT")]
    assert sum('"devices_enrollmentkey"."digest" =' in sql for sql in lookups) == 1


def test_the_demo_key_file_is_created_private(tmp_path, profile, monkeypatch):
    import os
    import stat
    from pathlib import Path

    from django.core.management import call_command

    keep = tmp_path / "enroll.key"
    # Whatever the umask, and without relying on a chmod after the write.
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    old = os.umask(0)
    try:
        call_command(
            "enrollment_key", "lab", "--profile", profile.slug, "--keep-in", str(keep), stdout=io.StringIO()
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(keep.stat().st_mode) == 0o600
    assert keep.read_text().startswith("efe_")


# --------------------------------------------------------------------------- Idempotency-Key


def enroll(client, key, name="board-7", idempotency_key=None, **fields):
    headers = {} if idempotency_key is None else {"HTTP_IDEMPOTENCY_KEY": idempotency_key}
    body = {"enrollment_key": key, "name": name, **fields}
    return client.post(ENROLL, body, content_type="application/json", **headers)


def test_an_enrollment_repeated_with_its_key_gets_the_same_device_and_a_new_token(
    client, enrollment_key, committed
):
    with committed():
        first = enroll(client, enrollment_key["key"], idempotency_key="enroll-1", hardware={"cpus": 2})
    assert first.status_code == 201, first.json()
    assert client.get(CONFIG, **bearer(first.json()["token"])).status_code == 200  # cached now
    with committed():
        repeat = enroll(client, enrollment_key["key"], idempotency_key="enroll-1", hardware={"cpus": 2})
    assert repeat.status_code == 200, repeat.json()
    assert repeat["Idempotent-Replayed"] == "true"
    assert repeat.json()["device_id"] == first.json()["device_id"]
    assert repeat.json()["token"] != first.json()["token"]
    assert Device.objects.count() == 1
    # The first answer was lost (that is why the agent retried): its token is revoked.
    assert client.get(CONFIG, **bearer(repeat.json()["token"])).status_code == 200
    assert client.get(CONFIG, **bearer(first.json()["token"])).status_code == 401
    assert DeviceToken.objects.filter(revoked_at__isnull=True).count() == 1
    assert AuditEntry.objects.filter(action="device.enroll_repeated").count() == 1


def test_an_enrollment_key_reused_for_another_body_is_422_and_creates_nothing(client, enrollment_key):
    assert enroll(client, enrollment_key["key"], idempotency_key="enroll-1").status_code == 201
    response = enroll(client, enrollment_key["key"], name="board-8", idempotency_key="enroll-1")
    assert response.status_code == 422, response.json()
    assert "already used for another" in response.json()["errors"]["Idempotency-Key"][0]
    assert Device.objects.count() == 1 and DeviceToken.objects.count() == 1


@pytest.mark.parametrize("idempotency_key", ["", "x" * 101, "no spaces"])
def test_a_malformed_idempotency_key_on_enroll_is_400_and_creates_nothing(
    client, enrollment_key, idempotency_key
):
    response = enroll(client, enrollment_key["key"], idempotency_key=idempotency_key)
    assert response.status_code == 400, response.json()
    assert "1 to 100 characters" in response.json()["errors"]["Idempotency-Key"][0]
    assert not Device.objects.exists()


def test_enrollments_without_a_key_each_create_a_device(client, enrollment_key):
    codes = [enroll(client, enrollment_key["key"]).status_code for _ in range(2)]
    assert codes == [201, 201] and Device.objects.filter(idempotency_key__isnull=True).count() == 2


def test_the_same_idempotency_key_under_two_enrollment_keys_enrolls_two_devices(
    api_as, client, staff, profile, enrollment_key
):
    other = api_as(staff).post(KEYS, {"fleet": "other", "profile": profile.slug}, format="json").json()
    first = enroll(client, enrollment_key["key"], idempotency_key="enroll-1")
    second = enroll(client, other["key"], idempotency_key="enroll-1")
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["device_id"] != second.json()["device_id"]
    assert Device.objects.filter(idempotency_key="enroll-1").count() == 2


def test_a_repeat_for_a_revoked_or_old_enrollment_is_409(client, staff, enrollment_key):
    from datetime import timedelta

    from django.utils import timezone

    from devices.enrollment import ENROLL_REPLAY_WINDOW, revoke_device

    first = enroll(client, enrollment_key["key"], idempotency_key="enroll-1")
    device = Device.objects.get(pk=first.json()["device_id"])
    Device.objects.filter(pk=device.pk).update(
        created_at=timezone.now() - ENROLL_REPLAY_WINDOW - timedelta(minutes=1)
    )
    old = enroll(client, enrollment_key["key"], idempotency_key="enroll-1")
    assert old.status_code == 409 and "hours ago" in old.json()["errors"]["Idempotency-Key"][0]
    Device.objects.filter(pk=device.pk).update(created_at=timezone.now())
    revoke_device(device, by=staff)
    revoked = enroll(client, enrollment_key["key"], idempotency_key="enroll-1")
    assert revoked.status_code == 409 and "revoked" in revoked.json()["errors"]["Idempotency-Key"][0]
    assert DeviceToken.objects.filter(revoked_at__isnull=True).count() == 0


def test_the_loser_of_two_concurrent_enrollments_gets_the_winners_device(client, enrollment_key, monkeypatch):
    """Both looked for the key before either stored it: the unique constraint stops the second
    device; its answer is the first device with another token, and the first token is kept
    (which of the two answers reaches the agent cannot be known)."""
    from devices import enrollment

    winner = enroll(client, enrollment_key["key"], idempotency_key="enroll-1")
    looked = []
    real = enrollment._enrolled_under

    def not_yet_on_the_first_look(*args):
        looked.append(args)
        return None if len(looked) == 1 else real(*args)

    monkeypatch.setattr(enrollment, "_enrolled_under", not_yet_on_the_first_look)
    loser = enroll(client, enrollment_key["key"], idempotency_key="enroll-1")
    assert loser.status_code == 200, loser.json()
    assert loser.json()["device_id"] == winner.json()["device_id"] and len(looked) == 2
    assert Device.objects.count() == 1
    for answer in (winner, loser):
        assert client.get(CONFIG, **bearer(answer.json()["token"])).status_code == 200
