"""The config path's caches: tagged shared entries, bounded staleness, token form, negatives."""

from __future__ import annotations

import time

import pytest
from django.core.cache import caches

from devices import hotpath
from registry.delivery import profile_key
from tests.delivery.conftest import bearer

URL = "/api/v1/device/config"
pytestmark = pytest.mark.django_db


def _digest(client, token):
    return client.get(URL, **bearer(token)).json()["package"]["digest"]


def test_a_state_read_before_a_change_and_stored_after_it_is_never_served(
    client, profile, make_variant, make_package, make_device, publish, monkeypatch
):
    first = make_package(make_variant("a"))
    second = make_package(make_variant("b", precision="int8"))
    publish(first.variant, profile)
    token = make_device(profile)["token"]
    changed: list[object] = []
    backend = caches["default"]
    real_set = backend.set

    def set_after_a_change(key, value, *args, **kwargs):
        # The change commits after this reader built the state and checked the marker,
        # just before it writes the state back (the check-then-set race).
        if key == profile_key(profile.pk) and not changed:
            changed.append(publish(second.variant, profile))
        return real_set(key, value, *args, **kwargs)

    monkeypatch.setattr(backend, "set", set_after_a_change)
    client.get(URL, **bearer(token))
    monkeypatch.setattr(backend, "set", real_set)
    assert changed
    hotpath.memo.clear()  # another web process: it has only the shared cache
    assert _digest(client, token) == second.digest


def test_a_subscribed_process_that_missed_the_message_sees_the_change_within_a_second(
    client, profile, make_variant, make_package, make_device, publish
):
    first = make_package(make_variant("a"))
    second = make_package(make_variant("b", precision="int8"))
    publish(first.variant, profile)
    token = make_device(profile)["token"]
    store = hotpath.store()
    assert _digest(client, token) == first.digest
    memo = hotpath.memo
    missed = (memo.tokens, memo.profiles, memo.bodies, memo.gen, memo.epoch)
    publish(second.variant, profile)  # another process's change; its message never arrives here
    memo.tokens, memo.profiles, memo.bodies, memo.gen, memo.epoch = missed
    store.live = True
    try:
        store._read_at = time.monotonic()
        assert _digest(client, token) == first.digest  # within the bound: may still be old
        store._read_at = time.monotonic() - hotpath.MARKER_RECHECK_S - 0.1
        assert _digest(client, token) == second.digest
    finally:
        store.live = False


def test_no_memo_entry_outlives_its_max_age(client, profile, package, make_device, publish):
    publish(package.variant, profile)
    client.get(URL, **bearer(make_device(profile)["token"]))
    store = hotpath.store()
    store.live, store._read_at = True, time.monotonic()
    try:
        epoch = hotpath.memo.epoch
        store.check()
        assert hotpath.memo.epoch == epoch and hotpath.memo.tokens  # fresh: kept
        hotpath.memo.born -= hotpath.MEMO_MAX_AGE_S + 1
        store.check()
        assert hotpath.memo.epoch > epoch and not hotpath.memo.tokens
    finally:
        store.live = False


def test_a_forked_child_that_inherited_live_starts_its_own_listener(monkeypatch):
    store = hotpath.Store("redis://127.0.0.1:1/0")
    store.live, store._pid = True, -1  # the parent's listener, the parent's flag
    started: list[bool] = []
    monkeypatch.setattr(store, "_start_listener", lambda: started.append(True))
    store.check()
    assert started == [True]


def test_a_failed_publish_is_retried_once_on_a_fresh_connection(monkeypatch):
    store = hotpath.Store("redis://127.0.0.1:1/0")
    calls: list[str] = []

    class Flaky:
        def publish(self, channel, marker):
            calls.append(marker)
            if len(calls) == 1:
                raise ConnectionError("reset by peer")

    monkeypatch.setattr(store, "_redis", lambda: Flaky())
    store.publish("m1")
    assert calls == ["m1", "m1"]


@pytest.mark.parametrize(
    "header",
    [
        "Bearer efd_short",
        "Bearer efd_" + "a" * 44,
        "Bearer efd_" + "a" * 42 + "!",
        "Bearer efd_" + "é" * 43,
    ],
)
def test_a_malformed_device_token_is_refused_before_any_lookup(
    client, header, monkeypatch, django_assert_num_queries
):
    writes: list[str] = []
    monkeypatch.setattr(caches["default"], "set", lambda key, *a, **k: writes.append(key))
    with django_assert_num_queries(0):
        assert client.get(URL, HTTP_AUTHORIZATION=header).status_code == 401
    assert writes == []


def test_unknown_tokens_are_remembered_only_here_and_never_evict_known_ones(
    client, profile, make_device, monkeypatch, django_assert_num_queries
):
    device = make_device(profile)
    assert client.get(URL, **bearer(device["token"])).status_code == 200
    monkeypatch.setattr(hotpath, "NEGATIVE_MAX_ENTRIES", 5)
    writes: list[str] = []
    backend = caches["default"]  # (the object itself: the test's cache settings are undone first)
    real_set = backend.set
    monkeypatch.setattr(backend, "set", lambda key, *a, **k: (writes.append(key), real_set(key, *a, **k))[1])
    unknown = [f"efd_{i:043d}" for i in range(12)]
    for token in unknown:
        assert client.get(URL, **bearer(token)).status_code == 401
    assert not any("token" in key for key in writes)  # nothing shared for unknown tokens
    assert len(hotpath.memo.negative) <= 5
    with django_assert_num_queries(0):  # the known token survived the flood
        assert client.get(URL, **bearer(device["token"])).status_code == 200
        assert client.get(URL, **bearer(unknown[-1])).status_code == 401  # remembered


def test_under_secure_ssl_redirect_the_config_path_redirects_plain_http_like_every_path(
    settings, client, profile, package, make_device, publish
):
    # DevicePathMiddleware answers the config path ahead of SecurityMiddleware: it answered a
    # plain-HTTP poll 200 (the device token in cleartext) while every other path was redirected.
    publish(package.variant, profile)
    token = make_device(profile)["token"]
    settings.SECURE_SSL_REDIRECT = True
    from django.test import Client

    fresh = Client()  # its handler builds the middleware with the setting on
    plain = fresh.get(URL, **bearer(token))
    assert plain.status_code == 301 and plain["Location"] == f"https://testserver{URL}"
    assert fresh.get(URL, secure=True, **bearer(token)).status_code == 200
