"""GET /api/v1/device/config: the caller's package, strong ETag / 304, 429, no SQL when warm."""

from __future__ import annotations

import pytest

from devices.enrollment import revoke_device
from devices.models import Device
from registry.releases import bucket, rollback, set_rollout
from tests.delivery.conftest import bearer

URL = "/api/v1/device/config"
pytestmark = pytest.mark.django_db


def test_a_device_gets_its_package_with_a_strong_etag(client, profile, package, make_device, publish):
    release = publish(package.variant, profile)
    device = make_device(profile)
    response = client.get(URL, **bearer(device["token"]))
    assert response.status_code == 200
    etag = response["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    body = response.json()
    assert body["device_id"] == device["device_id"]
    assert body["profile"] == profile.slug and body["channel"] == "stable"
    assert body["poll_interval_s"] == 300 and body["poll_jitter_s"] == 60
    assert body["package"] == {
        "digest": package.digest,
        "size": package.blob_bytes,
        "manifest_url": f"/api/v1/packages/{package.digest}/manifest.json",
        "signature_url": f"/api/v1/packages/{package.digest}/manifest.sig",
        "blob_url": f"/api/v1/packages/{package.digest}/model.safetensors",
        "signature": package.signature,
        "key_id": package.key_id,
        "model": "tiny-topics",
        "variant_id": package.variant_id,
        "release_id": release.pk,
        "precision_summary": {"fp32": 15},
    }


def test_the_same_etag_in_if_none_match_gets_a_304_without_a_body(
    client, profile, package, make_device, publish
):
    publish(package.variant, profile)
    device = make_device(profile)
    etag = client.get(URL, **bearer(device["token"]))["ETag"]
    response = client.get(URL, HTTP_IF_NONE_MATCH=etag, **bearer(device["token"]))
    assert response.status_code == 304 and response.content == b"" and response["ETag"] == etag
    listed = client.get(URL, HTTP_IF_NONE_MATCH=f'"other", W/{etag}', **bearer(device["token"]))
    assert listed.status_code == 304
    assert client.get(URL, HTTP_IF_NONE_MATCH='"stale"', **bearer(device["token"])).status_code == 200


def test_warm_config_requests_make_no_sql_query(
    client, profile, package, make_device, publish, django_assert_num_queries
):
    publish(package.variant, profile)
    device = make_device(profile)
    etag = client.get(URL, **bearer(device["token"]))["ETag"]  # warm-up fills the caches
    with django_assert_num_queries(0):
        assert client.get(URL, **bearer(device["token"])).status_code == 200
    with django_assert_num_queries(0):
        assert client.get(URL, HTTP_IF_NONE_MATCH=etag, **bearer(device["token"])).status_code == 304


def test_the_shared_cache_alone_serves_without_sql_when_the_process_memo_is_empty(
    client, profile, package, make_device, publish, django_assert_num_queries
):
    from devices import hotpath

    publish(package.variant, profile)
    device = make_device(profile)
    client.get(URL, **bearer(device["token"]))
    hotpath.memo.clear()  # another web process: only the shared cache is warm
    with django_assert_num_queries(0):
        assert client.get(URL, **bearer(device["token"])).status_code == 200


def test_a_device_without_a_release_gets_no_package(client, profile, make_device):
    device = make_device(profile)
    response = client.get(URL, **bearer(device["token"]))
    assert response.status_code == 200 and response.json()["package"] is None


def test_a_release_change_reaches_the_device_on_its_next_request(
    client, profile, make_variant, make_package, make_device, publish, staff, committed
):
    first = make_package(make_variant("a"))
    second = make_package(make_variant("b", precision="int8"))
    publish(first.variant, profile)
    device = make_device(profile)
    token = device["token"]
    before = client.get(URL, **bearer(token))
    assert before.json()["package"]["digest"] == first.digest
    newer = publish(second.variant, profile)
    after = client.get(URL, HTTP_IF_NONE_MATCH=before["ETag"], **bearer(token))
    assert after.status_code == 200 and after.json()["package"]["digest"] == second.digest
    with committed():
        rollback(newer, by=staff)
    assert client.get(URL, **bearer(token)).json()["package"]["digest"] == first.digest


def test_devices_outside_a_partial_rollout_keep_the_previous_full_release(
    client, profile, make_variant, make_package, make_device, publish, staff, committed
):
    old = make_package(make_variant("a"))
    new = make_package(make_variant("b", precision="int8"))
    publish(old.variant, profile)
    canary = publish(new.variant, profile, rollout_percent=30)
    devices = [make_device(profile, name=f"d{i}") for i in range(40)]
    for d in devices:
        got = client.get(URL, **bearer(d["token"])).json()["package"]["digest"]
        inside = bucket(canary.seed, d["device_id"]) < 30
        assert got == (new.digest if inside else old.digest)
    with committed():
        set_rollout(canary, 100, if_match=canary.etag, by=staff)
    assert {client.get(URL, **bearer(d["token"])).json()["package"]["digest"] for d in devices} == {
        new.digest
    }


def test_a_device_follows_its_own_channel(client, profile, make_variant, make_package, make_device, publish):
    stable = make_package(make_variant("a"))
    canary = make_package(make_variant("b", precision="int8"))
    publish(stable.variant, profile, alias="stable")
    publish(canary.variant, profile, alias="canary")
    on_canary = make_device(profile, channel="canary")
    assert client.get(URL, **bearer(on_canary["token"])).json()["package"]["digest"] == canary.digest


def test_a_device_reads_only_its_own_config(client, profile, package, make_device, publish):
    publish(package.variant, profile)
    a, b = make_device(profile, name="a"), make_device(profile, name="b")
    response = client.get(URL, {"device_id": b["device_id"]}, **bearer(a["token"]))
    assert response.json()["device_id"] == a["device_id"]


def test_a_revoked_device_gets_401_on_its_next_request(
    client, profile, package, make_device, publish, staff, committed
):
    publish(package.variant, profile)
    device = make_device(profile)
    assert client.get(URL, **bearer(device["token"])).status_code == 200
    with committed():
        revoke_device(Device.objects.get(pk=device["device_id"]), by=staff)
    response = client.get(URL, **bearer(device["token"]))
    assert response.status_code == 401 and response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header",
    [None, "Bearer efd_not-a-real-token", "Bearer efu_a-person-token", "Token efd_x", "Basic dXNlcjpwdw=="],
)
def test_anything_but_a_valid_device_token_gets_401(client, profile, make_device, header):
    make_device(profile)
    extra = {"HTTP_AUTHORIZATION": header} if header else {}
    response = client.get(URL, **extra)
    assert response.status_code == 401
    assert response.json()["detail"]


def test_a_logged_in_person_is_not_a_device(client, staff):
    client.force_login(staff)
    assert client.get(URL).status_code == 401


def test_too_many_requests_get_429_with_retry_after(client, settings, profile, make_device):
    settings.EDGEFIT_DEVICE_RATE_LIMIT = 3
    device = make_device(profile)
    other = make_device(profile, name="other")
    codes = [client.get(URL, **bearer(device["token"])).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = client.get(URL, **bearer(device["token"]))
    assert limited.status_code == 429
    assert 1 <= int(limited["Retry-After"]) <= settings.EDGEFIT_DEVICE_RATE_WINDOW_S
    assert client.get(URL, **bearer(other["token"])).status_code == 200  # per device


def test_only_get_and_head(client, profile, make_device):
    device = make_device(profile)
    assert client.post(URL, **bearer(device["token"])).status_code == 405


def test_ping_is_a_constant_json_for_anyone(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/api/v1/ping")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_edits_made_outside_the_services_reach_the_config_too(
    client, profile, make_variant, make_package, make_device, publish, committed
):
    publish(make_package(make_variant("a")).variant, profile)
    device = make_device(profile)
    assert client.get(URL, **bearer(device["token"])).json()["channel"] == "stable"
    with committed():
        row = Device.objects.get(pk=device["device_id"])
        row.channel = "canary"
        row.save()  # e.g. in the admin
    assert client.get(URL, **bearer(device["token"])).json()["channel"] == "canary"
    with committed():
        profile.name = "Renamed Phone"
        profile.save()
    assert client.get(URL, **bearer(device["token"])).json()["profile"] == "renamed-phone"
    with committed():
        token = Device.objects.get(pk=device["device_id"]).tokens.get()
        token.revoked_at = "2026-01-01T00:00:00Z"
        token.save()
    assert client.get(URL, **bearer(device["token"])).status_code == 401


def test_the_config_path_skips_sessions_and_cookies(client, staff, profile, make_device):
    device = make_device(profile)
    client.force_login(staff)  # a session cookie is sent along: it must not be read or renewed
    response = client.get(URL, **bearer(device["token"]))
    assert response.status_code == 200
    assert not response.cookies and "Vary" not in response
    assert response["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", [URL, "/api/v1/ping"])
def test_the_fast_paths_still_check_the_host_header(client, path):
    response = client.get(path, HTTP_HOST="evil.example")
    assert response.status_code == 400
