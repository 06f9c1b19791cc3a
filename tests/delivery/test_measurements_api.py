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
