"""A shared cache that cannot be reached at all (Redis restarting, a network blip): the device
paths answer from the database with the statuses, bodies and ETags they give from the cache,
throttle in each process, log the outage once, and once the cache is back serve nothing built
before a change made meanwhile."""

from __future__ import annotations

import logging
import time

import pytest

from devices import hotpath
from devices.models import PendingInvalidation
from registry.models import Measurement, RecalibrationRequest
from registry.packages import file_path
from tests.delivery.conftest import bearer, cache_unreachable
from tests.delivery.test_measurements_api import good

URL = "/api/v1/device/config"
UNKNOWN = "efd_" + "u" * 43  # well-formed, never issued
# Real commits: a change's invalidation runs (and fails) on commit, as in production.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def back_at_once(monkeypatch):
    """`back_at_once()`: the next request tries the cache again (not one retry interval later)."""
    return lambda: monkeypatch.setattr(hotpath, "UNREACHABLE_RETRY_S", 0.0)


def _revoke(api_as, staff, device) -> None:
    assert api_as(staff).post(f"/api/v1/devices/{device['device_id']}/revoke/").status_code == 200


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "devices.hotpath" and text in r.getMessage()]


def test_config_answers_from_the_database_while_the_cache_is_unreachable_and_nothing_stale_after(
    client, api_as, staff, profile, package, make_device, publish, back_at_once, caplog
):
    publish(package.variant, profile)
    kept = make_device(profile, name="kept")
    revoked = make_device(profile, name="revoked")
    warm = client.get(URL, **bearer(kept["token"]))
    assert warm.status_code == 200
    assert client.get(URL, **bearer(revoked["token"])).status_code == 200  # shared entries built
    etag = warm["ETag"]
    caplog.set_level(logging.INFO, logger="devices.hotpath")
    with cache_unreachable():
        for _ in range(3):
            again = client.get(URL, **bearer(kept["token"]))
            assert (again.status_code, again["ETag"], again.content) == (200, etag, warm.content)
        not_modified = client.get(URL, HTTP_IF_NONE_MATCH=etag, **bearer(kept["token"]))
        assert (not_modified.status_code, not_modified["ETag"]) == (304, etag)
        _revoke(api_as, staff, revoked)  # committed; its invalidation fails with the cache
        assert client.get(URL, **bearer(revoked["token"])).status_code == 401
        assert client.get(URL, **bearer(UNKNOWN)).status_code == 401
        assert hotpath.store().down_since is not None
    assert len(_messages(caplog, "is unreachable")) == 1  # once per outage, not per request
    assert PendingInvalidation.objects.count() == 1

    back_at_once()
    # The shared cache still holds the revoked token's entry at the marker it still holds: the
    # marker is replaced before anything shared is trusted again, whenever the last look was.
    hotpath.store()._durable_at = time.monotonic()
    assert client.get(URL, **bearer(revoked["token"])).status_code == 401
    assert client.get(URL, **bearer(kept["token"]))["ETag"] == etag
    assert hotpath.store().down_since is None and PendingInvalidation.objects.count() == 0
    assert len(_messages(caplog, "is back after")) == 1
    hotpath.memo.clear()  # another process: it has only the shared cache
    assert client.get(URL, **bearer(revoked["token"])).status_code == 401
    assert client.get(URL, **bearer(kept["token"]))["ETag"] == etag


def test_a_memo_warmed_before_the_outage_is_not_answered_from_during_it(
    client, api_as, staff, profile, package, make_device, publish
):
    publish(package.variant, profile)
    device = make_device(profile)
    assert client.get(URL, **bearer(device["token"])).status_code == 200
    memo = hotpath.memo
    warm = (dict(memo.tokens), dict(memo.profiles), dict(memo.bodies), memo.gen, memo.epoch)
    with cache_unreachable():
        _revoke(api_as, staff, device)  # in another process, whose invalidation fails
        # This process kept its memo and looked for missed invalidations just now.
        memo.tokens, memo.profiles, memo.bodies, memo.gen, memo.epoch = warm
        hotpath.store()._durable_at = time.monotonic()
        assert client.get(URL, **bearer(device["token"])).status_code == 401
        assert not memo.tokens and not memo.bodies


def test_package_downloads_answer_from_the_database_while_the_cache_is_unreachable(
    client, api_as, staff, profile, package, make_device, publish, back_at_once
):
    publish(package.variant, profile)
    kept = make_device(profile, name="kept")
    revoked = make_device(profile, name="revoked")
    url = f"/api/v1/packages/{package.digest}/manifest.json"
    manifest = file_path(package, "manifest.json").read_bytes()
    for device in (kept, revoked):
        assert client.get(url, **bearer(device["token"])).status_code == 200
    with cache_unreachable():
        response = client.get(url, **bearer(kept["token"]))
        assert response.status_code == 200 and response["ETag"] == f'"{package.digest}"'
        assert b"".join(response.streaming_content) == manifest
        etag = response["ETag"]
        assert client.get(url, HTTP_IF_NONE_MATCH=etag, **bearer(kept["token"])).status_code == 304
        _revoke(api_as, staff, revoked)
        assert client.get(url, **bearer(revoked["token"])).status_code == 401
        assert client.get(url, **bearer(UNKNOWN)).status_code == 401
    back_at_once()
    assert client.get(url, **bearer(revoked["token"])).status_code == 401
    assert client.get(url, **bearer(kept["token"])).status_code == 200


def test_throttling_counts_in_this_process_while_the_cache_is_unreachable(
    client, settings, profile, package, make_device, publish
):
    settings.EDGEFIT_DEVICE_RATE_LIMIT = 8  # past one request per process, the shared count decides
    settings.EDGEFIT_DEVICE_RATE_WINDOW_S = 86_400  # no window boundary during the test
    publish(package.variant, profile)
    token = make_device(profile)["token"]
    with cache_unreachable():
        codes = [client.get(URL, **bearer(token)).status_code for _ in range(9)]
    assert codes == [200] * 8 + [429]


def test_measurements_reported_while_the_cache_is_unreachable_are_stored(
    client, settings, profile, package, make_device, publish, monkeypatch
):
    settings.EDGEFIT_DEVICE_RATE_LIMIT = 8  # the second report already counts in the shared cache
    publish(package.variant, profile)
    token = make_device(profile)["token"]
    queued: list[tuple[str, tuple[int, ...]]] = []

    def enqueue(task: str, *args: int) -> bool:  # (no broker in this test)
        queued.append((task, args))
        return True

    monkeypatch.setattr("registry.measurements.enqueue", enqueue)
    with cache_unreachable():
        codes = [
            client.post(
                "/api/v1/device/measurements", good(package), content_type="application/json", **bearer(token)
            ).status_code
            for _ in range(3)
        ]
    assert codes == [201] * 3
    assert Measurement.objects.count() == 3
    # The re-fit is due in the database (the sweep's record) and queued without the cache's flag.
    assert RecalibrationRequest.objects.filter(profile=profile).exists()
    assert queued and queued[0] == ("workers.recalibrate_profile", (profile.pk,))


def test_a_device_enrolling_while_the_cache_is_unreachable_gets_its_token_and_its_config(
    client, api_as, staff, profile, package, publish
):
    publish(package.variant, profile)
    keys = "/api/v1/enrollment-keys/"
    key = api_as(staff).post(keys, {"fleet": "lab", "profile": profile.slug}, format="json")
    assert key.status_code == 201
    with cache_unreachable():
        enrolled = client.post(
            "/api/v1/device/enroll",
            {"enrollment_key": key.json()["key"], "name": "board-9"},
            content_type="application/json",
        )
        assert enrolled.status_code == 201, enrolled.content[:300]
        config = client.get(URL, **bearer(enrolled.json()["token"]))
        assert config.status_code == 200 and config.json()["package"]["digest"] == package.digest
