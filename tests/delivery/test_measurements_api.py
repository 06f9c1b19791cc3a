"""POST /api/v1/device/measurements: validated field by field, nothing stored on error."""

from __future__ import annotations

import copy

import pytest

from registry.measurements import KERNEL_REGIMES
from registry.models import Measurement
from tests.delivery.conftest import bearer

pytestmark = pytest.mark.django_db
URL = "/api/v1/device/measurements"


@pytest.fixture
def device(profile, package, make_device, publish):
    publish(package.variant, profile)
    return make_device(profile)


def good(package, **overrides):
    body = {
        "package_digest": package.digest,
        "batch_size": 1,
        "latency_p50_ms": 14.2,
        "latency_p90_ms": 17.9,
        "peak_memory_bytes": 123_456_789,
        "check_accuracy": 0.73,
        "check_agreement": 0.95,
        "check_examples": 64,
        "samples": [
            {"tokens": 41, "exit_layer": 1, "latency_ms": 12.9},
            {"tokens": 12, "exit_layer": 0, "latency_ms": 7.5},
        ],
        "runtime": {"torch": "2.13.0", "threads": 2, "kernels": {"w8a8 _int_mm": 12}, "host": "board-7"},
        "measured_at": "2026-11-21T23:00:00Z",
    }
    body.update(overrides)
    return body


def post(client, token, body):
    return client.post(URL, body, content_type="application/json", **bearer(token))


def test_a_device_reports_and_a_recalibration_is_queued(
    client, package, device, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = post(client, device["token"], good(package))
    assert response.status_code == 201, response.json()
    assert response.json()["recalibration"] == "queued"
    stored = Measurement.objects.get(pk=response.json()["id"])
    assert stored.kind == "device" and str(stored.device_id) == device["device_id"]
    assert stored.package == package and stored.variant == package.variant
    assert stored.latency_p50_s == pytest.approx(0.0142) and stored.host == "board-7"
    assert stored.samples[0] == {"tokens": 41, "exit_layer": 1, "latency_ms": 12.9}
    assert stored.device.last_seen_at is not None
    assert len(callbacks) == 1


def test_a_device_may_name_itself(client, package, device):
    assert post(client, device["token"], good(package, device_id=device["device_id"])).status_code == 201


def test_a_device_cannot_report_for_another(client, profile, package, device, make_device):
    other = make_device(profile, name="other")
    response = post(client, device["token"], good(package, device_id=other["device_id"]))
    assert response.status_code == 403
    assert not Measurement.objects.exists()


def _set(body, path, value):
    target = body
    *parents, last = path
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("latency_p50_ms",), -3.0, "latency_p50_ms"),
        (("latency_p50_ms",), 0, "latency_p50_ms"),
        (("latency_p90_ms",), 1e12, "latency_p90_ms"),
        (("latency_p90_ms",), 10.0, "latency_p90_ms"),  # below p50
        (("latency_p50_ms",), "fast", "latency_p50_ms"),
        (("batch_size",), 0, "batch_size"),
        (("batch_size",), 5000, "batch_size"),
        (("batch_size",), True, "batch_size"),
        (("peak_memory_bytes",), 0, "peak_memory_bytes"),
        (("peak_memory_bytes",), 10 * 2**50, "peak_memory_bytes"),
        (("check_accuracy",), 1.5, "check_accuracy"),
        (("check_agreement",), -0.1, "check_agreement"),
        (("check_examples",), 0, "check_examples"),
        (("package_digest",), "abc", "package_digest"),
        (("package_digest",), "0" * 64, "package_digest"),  # unknown package
        (("measured_at",), "yesterday", "measured_at"),
        (("measured_at",), "2999-01-01T00:00:00Z", "measured_at"),
        (("measured_at",), "2026-13-01T00:00:00Z", "measured_at"),  # well-formed, impossible
        (("measured_at",), "2026-02-30T00:00:00Z", "measured_at"),
        (("runtime", "colour"), "red", "runtime.colour"),
        (("runtime", "threads"), "two", "runtime.threads"),
        (("runtime", "threads"), 0, "runtime.threads"),
        (("runtime", "torch"), 2.13, "runtime.torch"),
        (("runtime", "kernels"), {"w8a8 _int_mm": "many"}, "runtime.kernels"),
        (("runtime", "kernels"), [1, 2], "runtime.kernels"),
        (("runtime", "host"), {"name": "x"}, "runtime.host"),
        (("samples",), [], "samples"),
        (("samples",), [{"tokens": 1, "exit_layer": 0, "latency_ms": 1.0}] * 1025, "samples"),
        (("samples", 1, "latency_ms"), -1.0, "samples[1].latency_ms"),
        (("samples", 0, "tokens"), 5000, "samples[0].tokens"),
        (("samples", 0, "exit_layer"), 7, "samples[0].exit_layer"),  # the tiny model has 2 blocks
        (("samples", 0, "colour"), "red", "samples[0].colour"),
        (("samples", 0, "tokens"), _DELETE, "samples[0].tokens"),
        (("runtime",), "fast", "runtime"),
        (("runtime", "regimes"), {"encoder.layer.0.attention.self.query.weight": "magic"}, "runtime.regimes"),
        (("runtime", "regimes"), {"no.such.tensor": "w8a8"}, "runtime.regimes"),
        (("latency_p50_ms",), _DELETE, "latency_p50_ms"),
        (("temperature_c",), 41, "temperature_c"),
    ],
)
def test_bad_measurements_are_400_naming_the_field_and_store_nothing(
    client, package, device, path, value, field
):
    body = copy.deepcopy(good(package))
    _set(body, path, value)
    response = post(client, device["token"], body)
    assert response.status_code == 400, response.json()
    assert field in response.json()["errors"], response.json()
    assert not Measurement.objects.exists()


def test_the_runtime_the_agent_sends_is_accepted(client, package, device):
    regimes = {"encoder.layer.0.attention.self.query.weight": "w8a8"}
    body = good(package, runtime={**good(package)["runtime"], "regimes": regimes})
    assert post(client, device["token"], body).status_code == 201


def test_a_package_never_released_to_the_device_is_refused(client, package, make_profile, make_device):
    stranger = make_device(make_profile("Another Phone"))
    response = post(client, stranger["token"], good(package))
    assert response.status_code == 400 and "package_digest" in response.json()["errors"]


def test_non_finite_numbers_are_400(client, package, device):
    text = '{"latency_p50_ms": Infinity}'
    response = client.post(URL, text, content_type="application/json", **bearer(device["token"]))
    assert response.status_code == 400 and not Measurement.objects.exists()


def test_a_body_that_is_not_an_object_is_400(client, package, device):
    response = client.post(URL, "[1, 2]", content_type="application/json", **bearer(device["token"]))
    assert response.status_code == 400 and not Measurement.objects.exists()


def test_a_revoked_device_cannot_report(client, package, device, committed, staff):
    from devices.enrollment import revoke_device
    from devices.models import Device

    with committed():
        revoke_device(Device.objects.get(pk=device["device_id"]), by=staff)
    assert post(client, device["token"], good(package)).status_code == 401


def test_reports_are_throttled_per_device(client, settings, package, device):
    settings.EDGEFIT_DEVICE_RATE_LIMIT = 2
    codes = [post(client, device["token"], good(package)).status_code for _ in range(3)]
    assert codes == [201, 201, 429]


def test_the_kernel_regimes_match_the_cost_model():
    from planner.cost import REGIMES

    assert KERNEL_REGIMES == REGIMES


# --------------------------------------------------------------------------- Idempotency-Key


def post_keyed(client, token, body, key):
    return client.post(URL, body, content_type="application/json", HTTP_IDEMPOTENCY_KEY=key, **bearer(token))


def test_a_report_repeated_with_its_idempotency_key_is_stored_once(
    client, package, device, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as first_callbacks:
        first = post_keyed(client, device["token"], good(package), "bench-7f3a")
    with django_capture_on_commit_callbacks(execute=False) as repeat_callbacks:
        repeat = post_keyed(client, device["token"], good(package), "bench-7f3a")
    assert first.status_code == 201, first.json()
    assert repeat.status_code == 200, repeat.json()
    assert repeat.json() == first.json() and repeat["Idempotent-Replayed"] == "true"
    stored = Measurement.objects.get()
    assert stored.pk == first.json()["id"] and stored.idempotency_key == "bench-7f3a"
    assert len(first_callbacks) == 1 and not repeat_callbacks  # the re-fit is not queued again


def test_a_repeat_matches_its_body_whatever_the_order_of_its_keys(client, package, device):
    body = good(package)
    post_keyed(client, device["token"], body, "k1")
    reordered = dict(reversed(list(body.items())))
    assert post_keyed(client, device["token"], reordered, "k1").status_code == 200
    assert Measurement.objects.count() == 1


def test_an_idempotency_key_used_for_another_body_is_422_and_stores_nothing(client, package, device):
    assert post_keyed(client, device["token"], good(package), "k1").status_code == 201
    response = post_keyed(client, device["token"], good(package, latency_p50_ms=15.0), "k1")
    assert response.status_code == 422, response.json()
    message = response.json()["errors"]["Idempotency-Key"][0]
    assert "already used for another" in message
    assert Measurement.objects.count() == 1


@pytest.mark.parametrize("key", ["", "x" * 101, "two words", "a/b", "clé", "k\t", "k\n"])
def test_a_malformed_idempotency_key_is_400_naming_the_header_and_the_rule(client, package, device, key):
    response = post_keyed(client, device["token"], good(package), key)
    assert response.status_code == 400, response.json()
    assert "1 to 100 characters of A-Z" in response.json()["errors"]["Idempotency-Key"][0]
    assert not Measurement.objects.exists()


def test_the_longest_key_and_every_allowed_character_are_accepted(client, package, device):
    for key in ("x" * 100, "Az09_.:-"):
        assert post_keyed(client, device["token"], good(package), key).status_code == 201


def test_reports_without_a_key_are_each_stored(client, package, device):
    codes = [post(client, device["token"], good(package)).status_code for _ in range(2)]
    assert codes == [201, 201] and Measurement.objects.count() == 2
    assert not Measurement.objects.filter(idempotency_key__isnull=False).exists()


def test_two_devices_may_use_the_same_key(client, profile, package, device, make_device):
    other = make_device(profile, name="other")
    first = post_keyed(client, device["token"], good(package), "k1")
    second = post_keyed(client, other["token"], good(package), "k1")
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["id"] != second.json()["id"]
    assert Measurement.objects.filter(idempotency_key="k1").count() == 2


def test_the_loser_of_two_concurrent_repeats_answers_as_a_repeat(
    client, package, device, monkeypatch, django_capture_on_commit_callbacks
):
    """Both looked for the key before either stored it: the database's unique constraint stops
    the second insert, which then answers with the first one's measurement."""
    from registry import measurements

    assert post_keyed(client, device["token"], good(package), "k1").status_code == 201
    looked = []
    real = measurements._stored_under

    def not_yet_on_the_first_look(*args):
        looked.append(args)
        return None if len(looked) == 1 else real(*args)

    monkeypatch.setattr(measurements, "_stored_under", not_yet_on_the_first_look)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = post_keyed(client, device["token"], good(package), "k1")
    assert response.status_code == 200, response.json()
    assert len(looked) == 2 and Measurement.objects.count() == 1 and not callbacks
    assert response.json()["id"] == Measurement.objects.get().pk


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_repeats_on_postgresql_store_one_row(require_postgres, package, device, monkeypatch):
    """Two threads, two connections, both past the look-up before either inserts: PostgreSQL
    holds the second insert on the unique index until the first commits, then refuses it."""
    import threading

    from django.db import connection

    from devices.models import Device
    from registry import measurements

    both_looked = threading.Barrier(2, timeout=10)
    real = measurements._stored_under
    first_look = threading.local()

    def look(*args):
        if not getattr(first_look, "done", False):
            first_look.done = True
            assert real(*args) is None
            both_looked.wait()
            return None
        return real(*args)

    queued = []
    monkeypatch.setattr(measurements, "_stored_under", look)
    monkeypatch.setattr(measurements, "_queue_recalibration", queued.append)
    results, errors = [], []
    reporter = Device.objects.get(pk=device["device_id"])

    def report():
        try:
            results.append(measurements.record_measurement(reporter, good(package), idempotency_key="k1"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=report) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert sorted(created for _, created in results) == [False, True]
    assert {m.pk for m, _ in results} == {Measurement.objects.get().pk}
    assert len(queued) == 1  # the loser queued no re-fit


@pytest.mark.django_db(transaction=True)
def test_the_agents_retry_after_a_lost_answer_stores_one_row(live_server, package, device, monkeypatch):
    """The agent's client against this server: the first attempt is stored, then answered 503
    (a proxy timing out); the retry carries the same key and gets the stored measurement."""
    from devices.agent.client import Client
    from registry import measurements
    from registry.api import MeasurementView

    real = MeasurementView.post
    seen, queued = [], []
    monkeypatch.setattr(measurements, "_queue_recalibration", queued.append)

    def stored_then_503(self, request):
        response = real(self, request)
        seen.append((request.headers.get("Idempotency-Key"), response.status_code))
        if len(seen) == 1:
            response.status_code = 503
        return response

    monkeypatch.setattr(MeasurementView, "post", stored_then_503)
    client = Client(live_server.url, device["token"], sleep=lambda _s: None)
    answer = client.request("POST", URL, body=good(package), ok=(200, 201))
    (first_key, first_status), (retry_key, retry_status) = seen
    assert (first_status, retry_status, answer.status) == (201, 200, 200)
    assert first_key and retry_key == first_key
    assert answer.json()["id"] == Measurement.objects.get().pk and len(queued) == 1
