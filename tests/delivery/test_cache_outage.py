"""A cache that fails while a change commits: the change answers normally, its invalidation is
kept in the database, and no entry built before it is served once the cache works again."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from django.core.cache import caches

from devices import hotpath
from devices.models import PendingInvalidation
from tests.delivery.conftest import bearer

URL = "/api/v1/device/config"
# Real commits: the invalidation runs on commit, inside the staff request, as in production.
pytestmark = pytest.mark.django_db(transaction=True)


_WRITES = ("set", "set_many", "delete", "delete_many", "add", "incr")


class BrokenCache:
    """`with broken_cache:` — the shared cache refuses every write (reads still work)."""

    def __init__(self) -> None:
        self.backend = caches["default"]

    def __enter__(self) -> None:
        def refuse(*args: object, **kwargs: object) -> None:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

        for name in _WRITES:
            setattr(self.backend, name, refuse)

    def __exit__(self, *exc: object) -> None:
        for name in _WRITES:
            self.backend.__dict__.pop(name, None)


@pytest.fixture
def broken_cache() -> Iterator[BrokenCache]:
    broken = BrokenCache()
    yield broken
    broken.__exit__()


def _another_process_that_looked_just_before(snapshot: tuple) -> None:
    """Make this process look like another web process: its memo kept what it had before the
    change (the change's message never reached it) and it looked for missed invalidations
    just now."""
    memo = hotpath.memo
    memo.tokens, memo.profiles, memo.bodies, memo.gen, memo.epoch = snapshot
    hotpath.store()._durable_at = time.monotonic()


def _snapshot() -> tuple:
    memo = hotpath.memo
    return (dict(memo.tokens), dict(memo.profiles), dict(memo.bodies), memo.gen, memo.epoch)


def test_a_revoke_during_a_cache_outage_answers_and_the_token_is_refused_once_the_cache_is_back(
    client, api_as, staff, profile, package, make_device, publish, broken_cache
):
    publish(package.variant, profile)
    device = make_device(profile)
    assert client.get(URL, **bearer(device["token"])).status_code == 200  # warm: memo + shared
    with broken_cache:
        response = api_as(staff).post(f"/api/v1/devices/{device['device_id']}/revoke/")
    assert response.status_code == 200 and response.json()["revoked_at"]
    assert PendingInvalidation.objects.count() == 1  # the invalidation the cache missed
    assert client.get(URL, **bearer(device["token"])).status_code == 401
    assert PendingInvalidation.objects.count() == 0  # done: the marker was replaced


def test_another_process_stops_serving_a_rolled_back_release_within_the_recheck_bound(
    client, api_as, staff, profile, make_variant, make_package, make_device, publish, broken_cache
):
    first = make_package(make_variant("a"))
    second = make_package(make_variant("b", precision="int8"))
    publish(first.variant, profile)
    head = publish(second.variant, profile)
    token = make_device(profile)["token"]
    assert client.get(URL, **bearer(token)).json()["package"]["digest"] == second.digest
    warm = _snapshot()
    with broken_cache:
        response = api_as(staff).post(f"/api/v1/releases/{head.pk}/rollback/")
    assert response.status_code == 200
    _another_process_that_looked_just_before(warm)
    hotpath.store()._durable_at -= hotpath.DURABLE_RECHECK_S  # the bound has passed
    assert client.get(URL, **bearer(token)).json()["package"]["digest"] == first.digest
    hotpath.memo.clear()  # a third process: the shared cache no longer serves the old state
    assert client.get(URL, **bearer(token)).json()["package"]["digest"] == first.digest


def test_while_the_cache_still_refuses_writes_the_config_path_reads_the_database(
    client, api_as, staff, profile, package, make_device, publish, broken_cache
):
    publish(package.variant, profile)
    revoked = make_device(profile, name="revoked")
    kept = make_device(profile, name="kept")
    for device in (revoked, kept):
        assert client.get(URL, **bearer(device["token"])).status_code == 200
    with broken_cache:
        assert api_as(staff).post(f"/api/v1/devices/{revoked['device_id']}/revoke/").status_code == 200
        assert client.get(URL, **bearer(revoked["token"])).status_code == 401
        assert client.get(URL, **bearer(kept["token"])).status_code == 200
        assert hotpath.store().behind
    hotpath.store()._durable_at -= hotpath.DURABLE_RECHECK_S
    assert client.get(URL, **bearer(kept["token"])).status_code == 200
    assert not hotpath.store().behind and PendingInvalidation.objects.count() == 0


def test_a_change_whose_invalidation_succeeds_leaves_no_pending_row(
    client, api_as, staff, profile, package, make_device, publish
):
    publish(package.variant, profile)
    device = make_device(profile)
    assert api_as(staff).post(f"/api/v1/devices/{device['device_id']}/revoke/").status_code == 200
    assert PendingInvalidation.objects.count() == 0
    assert client.get(URL, **bearer(device["token"])).status_code == 401


def test_while_behind_a_change_committed_out_of_id_order_still_empties_the_memo(broken_cache):
    # Ids are taken at insert, commits land in any order: a change with a LOWER id than the
    # newest one seen can appear after the memo was refilled from a database without it.  It
    # was ignored (only a new maximum emptied the memo): up to MEMO_MAX_AGE_S of a stale answer.
    store = hotpath.store()
    newer = PendingInvalidation.objects.create()
    older_id = newer.pk - 1
    PendingInvalidation.objects.filter(pk=older_id).delete()
    try:
        with broken_cache:
            store.verify(caches["default"].get(hotpath.GEN_KEY), time.monotonic())
            assert store.behind == newer.pk
            hotpath.memo.tokens["refilled"] = "from a database without the older change"
            epoch = hotpath.memo.epoch
            PendingInvalidation.objects.create(pk=older_id)  # commits late
            store.verify(caches["default"].get(hotpath.GEN_KEY), time.monotonic())
            assert hotpath.memo.epoch > epoch and "refilled" not in hotpath.memo.tokens
            epoch = hotpath.memo.epoch
            store.verify(caches["default"].get(hotpath.GEN_KEY), time.monotonic())
            assert hotpath.memo.epoch == epoch  # nothing new: the memo is kept
        store.verify(caches["default"].get(hotpath.GEN_KEY), time.monotonic())
        assert store.behind == 0 and not PendingInvalidation.objects.exists()
    finally:
        store.behind = 0


def test_a_failing_look_is_logged_once_per_streak(monkeypatch, caplog):
    from django.db import OperationalError

    store = hotpath.store()

    def down(*args: object, **kwargs: object) -> None:
        raise OperationalError("connection refused")

    monkeypatch.setattr(PendingInvalidation.objects, "order_by", down)
    with caplog.at_level("WARNING", logger=hotpath.log.name):
        for _ in range(3):
            assert store.verify("m", time.monotonic()) == ("m", False)
    assert sum("could not look for missed" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.undo()
    assert store.verify(caches["default"].get(hotpath.GEN_KEY), time.monotonic())[1]
