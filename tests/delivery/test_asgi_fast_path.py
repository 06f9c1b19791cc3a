"""The ASGI entry point (`config.asgi`): warm polls are answered before Django, with the bytes
and headers Django's view gives; every other request reaches Django unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator

from tests.delivery.conftest import bearer, wait_until

URL = "/api/v1/device/config"
# Django's ASGI handler runs sync views in a thread of its own per request (ThreadSensitiveContext),
# on its own database connection: the rows must be committed for it to see them.
pytestmark = pytest.mark.django_db(transaction=True)


class Answer:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> None:
        self.status = status
        self.headers = {k.decode().lower(): v.decode() for k, v in headers}
        self.chunks = chunks
        self.body = b"".join(chunks)


def call(
    path: str, method: str = "GET", body: bytes = b"", app: Any = None, scheme: str = "http", **headers: str
) -> Answer:
    """One request through the production ASGI application (or `app`), as gunicorn's worker
    makes it."""
    from config.asgi import application

    headers = {"host": "testserver", **headers}
    header_list = [(name.replace("_", "-").lower().encode(), v.encode()) for name, v in headers.items()]
    if body:
        header_list.append((b"content-length", str(len(body)).encode()))

    async def run() -> Answer:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": scheme,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": header_list,
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        communicator = ApplicationCommunicator(app or application, scope)
        await communicator.send_input({"type": "http.request", "body": body, "more_body": False})
        start = await communicator.receive_output(10)
        chunks: list[bytes] = []
        while True:
            message = await communicator.receive_output(10)
            if message.get("body"):
                chunks.append(message["body"])
            if not message.get("more_body"):
                break
        await communicator.wait(1)
        return Answer(start["status"], start["headers"], chunks)

    return async_to_sync(run)()


@pytest.fixture(autouse=True)
def _connections_closed_per_request():
    """As under the production entry point (config.asgi): the handler's request threads close
    their database connections when the request ends."""
    from django.db import connections

    saved = connections.settings["default"]["CONN_MAX_AGE"]
    connections.settings["default"]["CONN_MAX_AGE"] = 0
    yield
    connections.settings["default"]["CONN_MAX_AGE"] = saved


def answered() -> int:
    from config.asgi import application

    return application.answered


def auth(token: str) -> dict[str, str]:
    return {"authorization": bearer(token)["HTTP_AUTHORIZATION"]}


@pytest.fixture
def warm(redis_cache, profile, package, make_device, publish) -> dict[str, Any]:
    """A device whose config this process has answered once since it subscribed."""
    from devices import hotpath

    publish(package.variant, profile)
    device = make_device(profile)
    call(URL, **auth(device["token"]))
    assert wait_until(lambda: hotpath.store().live), "the invalidation listener did not subscribe"
    first = call(URL, **auth(device["token"]))  # refill after the subscription emptied the memo
    return {"device": device, "django": first}


@pytest.mark.integration
def test_warm_polls_are_answered_before_django_with_the_same_bytes_and_headers(
    warm, django_assert_num_queries
):
    token = warm["device"]["token"]
    by_django = warm["django"]
    assert by_django.status == 200
    before = answered()
    with django_assert_num_queries(0):
        fast = call(URL, **auth(token))
        not_modified = call(URL, if_none_match=fast.headers["etag"], **auth(token))
    assert answered() == before + 2
    assert (fast.status, fast.body, fast.headers) == (200, by_django.body, by_django.headers)
    assert not_modified.status == 304 and not_modified.body == b""
    assert not_modified.headers["etag"] == by_django.headers["etag"]
    assert not_modified.headers["cache-control"] == "private, no-cache"


@pytest.mark.integration
def test_the_look_for_missed_invalidations_never_sends_a_warm_poll_to_django(warm, settings):
    """The listener thread makes the once-a-second look (`Store.verify`, a query) ahead of
    time; made by the request that found it due, it sent every poll of that moment to the view
    (p99 6-7 ms -> 60-84 ms in `bench serve`)."""
    import time

    from devices import hotpath

    settings.EDGEFIT_DEVICE_RATE_LIMIT = 100_000  # this process's share holds every poll here
    hotpath.rate.reset()
    token = warm["device"]["token"]
    polls, before = 0, answered()
    deadline = time.monotonic() + 3.5  # three and a half looks' worth
    while time.monotonic() < deadline:
        assert call(URL, **auth(token)).status == 200
        polls += 1
        time.sleep(0.05)
    # (One poll may still meet a look the listener is late for on a loaded machine.)
    assert answered() - before >= polls - 1, (answered() - before, polls)


def test_a_missed_invalidation_is_found_by_the_listener_without_any_request(warm):
    from devices import hotpath
    from devices.models import PendingInvalidation

    marker = hotpath.store().generation()
    PendingInvalidation.objects.create()  # as a writer that died right after its commit leaves it
    assert wait_until(lambda: not PendingInvalidation.objects.exists(), 5.0)
    assert hotpath.store().generation() != marker


def test_under_secure_ssl_redirect_only_https_polls_are_answered_before_django(warm, settings):
    token = warm["device"]["token"]
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    before = answered()
    plain = call(URL, **auth(token))
    assert plain.status == 301 and plain.headers["location"] == f"https://testserver{URL}"
    assert answered() == before  # Django redirected it: memory answered nothing over plain HTTP
    assert call(URL, scheme="https", **auth(token)).status == 200
    assert call(URL, x_forwarded_proto="https", **auth(token)).status == 200  # the trusted proxy
    assert answered() == before + 2


def test_ping_is_answered_before_django_with_the_same_bytes_and_headers(redis_cache):
    from config.asgi import application

    by_django = call("/api/v1/ping", app=application.app)
    before = answered()
    fast = call("/api/v1/ping")
    assert answered() == before + 1
    assert (fast.status, fast.body, fast.headers) == (200, by_django.body, by_django.headers)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("request_kw", "status"),
    [
        ({"method": "HEAD"}, 200),
        ({"authorization": "Bearer efd_" + "x" * 43}, 401),  # well-formed, unknown
        ({"authorization": "Basic Zm9vOmJhcg=="}, 401),
        ({"host": "evil.example"}, 400),
        ({"body": b"{}"}, 200),
    ],
    ids=["head", "unknown-token", "not-a-device-token", "foreign-host", "with-a-body"],
)
def test_what_memory_cannot_answer_goes_to_django(warm, request_kw, status):
    before = answered()
    assert call(URL, **{**auth(warm["device"]["token"]), **request_kw}).status == status
    assert answered() == before


@pytest.mark.integration
def test_a_process_not_listening_sends_every_poll_through_the_view(warm):
    from devices import hotpath

    store = hotpath.store()
    store.live = False  # the channel was lost: each request must read the marker itself
    before = answered()
    assert [call(URL, **auth(warm["device"]["token"])).status for _ in range(2)] == [200, 200]
    assert answered() == before
    store.live = True
    assert call(URL, **auth(warm["device"]["token"])).status == 200
    assert answered() == before + 1


@pytest.mark.integration
def test_a_lost_announcement_is_caught_by_the_listeners_marker_reread(warm):
    """A marker replaced without a message (a publish that failed) still empties the memo
    within MARKER_RECHECK_S, with no request needed."""
    from django.core.cache import cache

    from devices import hotpath

    epoch = hotpath.memo.epoch
    cache.set(hotpath.GEN_KEY, "replaced-without-a-message", None)
    assert wait_until(lambda: hotpath.memo.epoch > epoch, hotpath.MARKER_RECHECK_S + 0.5)
    assert not hotpath.memo.bodies


@pytest.mark.integration
def test_while_the_cache_is_unreachable_memory_answers_nothing_and_the_view_answers_from_the_database(
    warm, settings, api_as, staff, profile, make_device, monkeypatch
):
    from devices import hotpath
    from tests.delivery.conftest import cache_unreachable

    settings.EDGEFIT_DEVICE_RATE_LIMIT = 1000  # the fast path's share (an eighth) is not the point
    token, by_django = warm["device"]["token"], warm["django"]
    other = make_device(profile, name="other")
    assert call(URL, **auth(other["token"])).status == 200
    store = hotpath.store()
    before = answered()
    with cache_unreachable():
        # The listener's marker re-read finds the outage, no request needed; the memory goes.
        assert wait_until(lambda: store.down_since is not None, hotpath.MARKER_RECHECK_S + 1)
        assert not store.fresh() and not hotpath.memo.bodies
        polled = call(URL, **auth(token))
        assert (polled.status, polled.body, polled.headers) == (200, by_django.body, by_django.headers)
        assert call(URL, if_none_match=by_django.headers["etag"], **auth(token)).status == 304
        assert api_as(staff).post(f"/api/v1/devices/{other['device_id']}/revoke/").status_code == 200
        assert call(URL, **auth(other["token"])).status == 401
        assert call(URL, **auth("efd_" + "u" * 43)).status == 401
    assert answered() == before  # every poll of the outage went to the view
    monkeypatch.setattr(hotpath, "UNREACHABLE_RETRY_S", 0.0)  # the next request tries the cache
    assert call(URL, **auth(other["token"])).status == 401
    assert call(URL, **auth(token)).body == by_django.body
    assert store.down_since is None
    # Memory answers again once refilled (after the new marker's announcement emptied it).
    assert wait_until(lambda: call(URL, **auth(token)).status == 200 and answered() > before)
    assert call(URL, **auth(other["token"])).status == 401


@pytest.mark.integration
def test_throttling_past_the_process_share_is_decided_by_the_view(warm, settings):
    settings.EDGEFIT_DEVICE_RATE_LIMIT = 16  # an eighth, 2, may be counted here alone
    settings.EDGEFIT_DEVICE_RATE_WINDOW_S = 86_400  # no window boundary during the test
    token = warm["device"]["token"]
    from devices import hotpath

    hotpath.rate.reset()
    before = answered()
    statuses = [call(URL, **auth(token)).status for _ in range(20)]
    # The fast path answers at most this process's share (2); everything past it is the view's.
    # It may answer only 1: an invalidation message that arrives late (the listener thread
    # runs on its own) empties the memo, that poll goes to the view, and the view's count
    # uses up the same local share (seen once in a full run).
    assert before + 1 <= answered() <= before + 2
    assert statuses[:16] == [200] * 16 and set(statuses[16:]) == {429}


def test_without_the_redis_channel_every_poll_goes_to_the_view(profile, package, make_device, publish):
    """With a file or local cache no process hears about changes: each poll re-reads the marker."""
    publish(package.variant, profile)
    token = make_device(profile)["token"]
    before = answered()
    assert [call(URL, **auth(token)).status for _ in range(3)] == [200] * 3
    assert answered() == before


def test_package_files_stream_in_chunks_under_asgi(package, profile, make_device, publish, recwarn):
    publish(package.variant, profile)
    token = make_device(profile)["token"]
    path = f"/api/v1/packages/{package.digest}/model.safetensors"
    blob = (package_path := _blob(package)).read_bytes()
    whole = call(path, **auth(token))
    assert whole.status == 200 and whole.body == blob and len(whole.chunks) > 1, package_path
    assert whole.headers["content-length"] == str(len(blob))
    part = call(path, range="bytes=10-299999", **auth(token))
    assert part.status == 206 and part.body == blob[10:300_000] and len(part.chunks) > 1
    assert not [w for w in recwarn if "consume synchronous iterators" in str(w.message)]


def _blob(package: Any) -> Any:
    from registry.packages import file_path

    return file_path(package, "model.safetensors")


def test_static_files_stream_in_chunks_under_asgi(recwarn):
    """Under ASGI static files go out in chunks as they are read: a synchronous file iterator
    (WhiteNoise's; the old package download) makes Django read the whole file into memory first,
    and warn."""
    from django.contrib.staticfiles import finders

    plotly = Path(finders.find("vendor/plotly.min.js"))
    answer = call("/static/vendor/plotly.min.js")
    assert answer.status == 200 and answer.body == plotly.read_bytes()
    assert len(answer.chunks) > 1 and answer.headers["content-length"] == str(plotly.stat().st_size)
    assert not [w for w in recwarn if "consume synchronous iterators" in str(w.message)]
