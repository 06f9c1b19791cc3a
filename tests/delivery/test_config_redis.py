"""The device config path on Redis: invalidation by pub/sub, shared throttling, no SQL when warm."""

from __future__ import annotations

import pytest

from tests.delivery.conftest import bearer, wait_until

pytestmark = pytest.mark.integration
URL = "/api/v1/device/config"


def test_warm_requests_need_no_sql_and_no_marker_read_once_subscribed(
    redis_cache, client, profile, package, make_device, publish, django_assert_num_queries
):
    from devices import hotpath

    publish(package.variant, profile)
    device = make_device(profile)
    etag = client.get(URL, **bearer(device["token"]))["ETag"]
    assert wait_until(lambda: hotpath.store().live), "the invalidation listener did not subscribe"
    client.get(URL, **bearer(device["token"]))  # refill after the subscription cleared the memo
    with django_assert_num_queries(0):
        assert client.get(URL, **bearer(device["token"])).status_code == 200
        assert client.get(URL, HTTP_IF_NONE_MATCH=etag, **bearer(device["token"])).status_code == 304


def test_a_change_announced_by_another_process_empties_this_ones_memo(
    redis_cache, client, profile, package, make_device, publish
):
    import redis
    from django.core.cache import cache

    from devices import hotpath

    publish(package.variant, profile)
    device = make_device(profile)
    client.get(URL, **bearer(device["token"]))
    assert wait_until(lambda: hotpath.store().live)
    client.get(URL, **bearer(device["token"]))
    assert hotpath.memo.bodies
    epoch = hotpath.memo.epoch
    # What bump_generation does in another process (a worker, another web server).
    redis.Redis.from_url(redis_cache.CACHES["default"]["LOCATION"]).publish(
        cache.make_key(hotpath.CHANNEL), "x"
    )
    assert wait_until(lambda: hotpath.memo.epoch > epoch and not hotpath.memo.bodies)


def test_revocation_reaches_the_next_request(
    redis_cache, client, profile, package, make_device, publish, committed, staff
):
    from devices.enrollment import revoke_device
    from devices.models import Device

    publish(package.variant, profile)
    device = make_device(profile)
    assert client.get(URL, **bearer(device["token"])).status_code == 200
    with committed():
        revoke_device(Device.objects.get(pk=device["device_id"]), by=staff)
    assert client.get(URL, **bearer(device["token"])).status_code == 401


def test_throttling_is_shared_through_redis(redis_cache, client, profile, make_device):
    from devices import hotpath

    redis_cache.EDGEFIT_DEVICE_RATE_LIMIT = 16
    device = make_device(profile)
    codes = [client.get(URL, **bearer(device["token"])).status_code for _ in range(17)]
    assert codes[:16] == [200] * 16 and codes[16] == 429
    hotpath.rate.reset()  # a fresh process: its own count starts at 0, the shared one does not
    assert client.get(URL, **bearer(device["token"])).status_code in (200, 429)
    limited = [client.get(URL, **bearer(device["token"])).status_code for _ in range(3)]
    assert limited[-1] == 429
