"""Measurements reported by devices: validated field by field, stored, and fed to calibration.

Rules (docs/delivery.md, "Measurement body"): latencies > 0 and < 600,000 ms with p90 ≥ p50;
batch size 1–1024; memory 1 B–1 TiB; accuracies in [0, 1]; 1–1024 samples, each with tokens
1–4096, an exit layer inside the model and a latency like the above; unknown fields anywhere
are refused (`runtime` takes only `RUNTIME_FIELDS`).  Any broken rule is a 400 naming the
field (`samples[3].latency_ms`) and nothing is stored.  A stored measurement enqueues
`workers.recalibrate_profile` for the device's profile once the transaction commits (at most
one queued per profile at a time); the re-fit is also recorded as due in the database
(`RecalibrationRequest`), so one whose message the broker lost is enqueued again by the
periodic sweep (`stale_recalibrations`).

A report may carry an ``Idempotency-Key`` header (`devices.idempotency`): the agent retries a
POST whose answer it lost, and the server may have stored it already.  The key is stored on the
measurement, unique per device in the database; a repeat with the same key and body answers with
the stored measurement (nothing stored, no re-fit queued again), the same key with another body
is a 422.  Of two concurrent repeats, the one that loses the unique constraint answers as a
repeat.  A duplicated observation would count twice in the profile's cost-model fit.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.utils import timezone

from devices.idempotency import HEADER, body_digest, reused_message
from devices.models import Device
from registry.dispatch import enqueue
from registry.models import Measurement, Package, RecalibrationRequest, Release

__all__ = [
    "KERNEL_REGIMES",
    "LIMITS",
    "RUNTIME_FIELDS",
    "MeasurementError",
    "clear_recalibration_flag",
    "recalibration_covered",
    "recalibration_due",
    "record_measurement",
    "stale_recalibrations",
    "validate_measurement",
]

MAX_LATENCY_MS = 600_000.0
MAX_MEMORY_BYTES = 1 << 40
MAX_SAMPLES = 1024
MAX_TOKENS = 4096
MAX_RUNTIME_BYTES = 65_536
#: planner.cost.REGIMES (kept here so the web process validates without importing torch;
#: a test checks the two agree).
KERNEL_REGIMES: tuple[str, ...] = (
    "fp32",
    "w8a8",
    "w8a8-fused",
    "weight-only",
    "dequant",
    "fp16-upcast",
    "gather",
    "w8a16",
    "w8a16-fused",
)
#: field → (kind, required, rule text)
LIMITS: dict[str, tuple[str, bool, str]] = {
    "package_digest": ("digest", True, "the SHA-256 (64 lowercase hex) of the package's manifest"),
    "device_id": ("uuid", False, "the caller's device id"),
    "batch_size": ("int", True, "an integer from 1 to 1024"),
    "latency_p50_ms": ("latency", True, "milliseconds, greater than 0 and below 600,000"),
    "latency_p90_ms": ("latency", True, "milliseconds, greater than 0 and below 600,000"),
    "peak_memory_bytes": ("memory", False, "bytes, from 1 to 1 TiB (1,099,511,627,776)"),
    "check_accuracy": ("fraction", False, "a fraction from 0 to 1"),
    "check_agreement": ("fraction", False, "a fraction from 0 to 1"),
    "check_examples": ("count", False, "an integer from 1 to 1,000,000"),
    "samples": ("samples", True, f"a list of 1 to {MAX_SAMPLES} samples"),
    "runtime": ("runtime", False, f"an object of at most {MAX_RUNTIME_BYTES} bytes of JSON"),
    "measured_at": (
        "datetime",
        True,
        "an ISO 8601 date-time from 2000 on, at most one hour ahead of the server's clock",
    ),
}
_SAMPLE_FIELDS = {"tokens", "exit_layer", "latency_ms"}
_RECALIBRATION_FLAG = "recalibration-queued:{}"

log = logging.getLogger(__name__)


class MeasurementError(ValueError):
    def __init__(self, errors: dict[str, str], status: int = 400) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors
        self.status = status


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _latency(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and 0 < number < MAX_LATENCY_MS else None


def _check_field(name: str, kind: str, value: Any) -> Any:
    """The parsed value, or raises KeyError when it breaks its rule (the caller names it)."""
    if kind == "digest":
        if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            return value
    elif kind == "uuid":
        import uuid

        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            pass
    elif kind == "int":
        number = _integer(value)
        if number is not None and 1 <= number <= 1024:
            return number
    elif kind == "latency":
        milliseconds = _latency(value)
        if milliseconds is not None:
            return milliseconds
    elif kind == "memory":
        number = _integer(value)
        if number is not None and 1 <= number <= MAX_MEMORY_BYTES:
            return number
    elif kind == "fraction":
        fraction = _number(value)
        if fraction is not None and 0 <= fraction <= 1:
            return fraction
    elif kind == "count":
        number = _integer(value)
        if number is not None and 1 <= number <= 1_000_000:
            return number
    elif kind == "runtime":
        if isinstance(value, dict):
            try:
                size = len(json.dumps(value, allow_nan=False))
            except (TypeError, ValueError):
                size = MAX_RUNTIME_BYTES + 1
            if size <= MAX_RUNTIME_BYTES:
                return value
    elif kind == "datetime":
        from django.utils.dateparse import parse_datetime

        try:
            parsed = parse_datetime(value) if isinstance(value, str) else None
        except ValueError:  # well-formed but impossible ("2026-13-01T00:00:00Z")
            parsed = None
        if parsed is not None:
            if timezone.is_naive(parsed):
                parsed = timezone.make_aware(parsed, UTC)
            # A device's clock may run ahead of ours: up to an hour is tolerated (LIMITS says so).
            if datetime(2000, 1, 1, tzinfo=UTC) <= parsed <= timezone.now() + timedelta(hours=1):
                return parsed
    raise KeyError(name)


def _check_samples(value: Any, errors: dict[str, str]) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SAMPLES:
        errors["samples"] = LIMITS["samples"][2]
        return []
    samples = []
    for i, item in enumerate(value):
        where = f"samples[{i}]"
        if not isinstance(item, dict):
            errors[where] = "an object with tokens, exit_layer and latency_ms"
            continue
        for key in sorted(set(item) - _SAMPLE_FIELDS):
            errors[f"{where}.{key}"] = "unknown field"
        for key in sorted(_SAMPLE_FIELDS - set(item)):
            errors[f"{where}.{key}"] = "required"
        tokens = _integer(item.get("tokens"))
        if "tokens" in item and (tokens is None or not 1 <= tokens <= MAX_TOKENS):
            errors[f"{where}.tokens"] = f"an integer from 1 to {MAX_TOKENS}"
        exit_layer = _integer(item.get("exit_layer"))
        if "exit_layer" in item and (exit_layer is None or exit_layer < 0):
            errors[f"{where}.exit_layer"] = "a block index of the model (0-based)"
        latency = _latency(item.get("latency_ms"))
        if "latency_ms" in item and latency is None:
            errors[f"{where}.latency_ms"] = LIMITS["latency_p50_ms"][2]
        if not any(k.startswith(where) for k in errors):
            samples.append({"tokens": tokens, "exit_layer": exit_layer, "latency_ms": latency})
    return samples


def _is_str_int_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _integer(v) is not None and v >= 0 for k, v in value.items()
    )


#: runtime key → (check, rule): what the agent sends (devices/agent/commands.py `bench`).
#: `regimes` is checked in detail by validate_measurement.
RUNTIME_FIELDS: dict[str, tuple[Any, str]] = {
    "torch": (lambda v: isinstance(v, str) and 0 < len(v) <= 64, "a version string (≤ 64 characters)"),
    "threads": (lambda v: _integer(v) is not None and 1 <= v <= 1024, "an integer from 1 to 1024"),
    "kernels": (_is_str_int_map, "an object: kernel name → count (a non-negative integer)"),
    "regimes": (lambda v: True, ""),
    "host": (lambda v: isinstance(v, str) and len(v) <= 200, "a host name (≤ 200 characters)"),
}


def _check_runtime(runtime: dict[str, Any], errors: dict[str, str]) -> None:
    for key, value in runtime.items():
        if key not in RUNTIME_FIELDS:
            errors[f"runtime.{key}"] = f"unknown field (known: {', '.join(RUNTIME_FIELDS)})"
            continue
        check, rule = RUNTIME_FIELDS[key]
        if value is not None and not check(value):
            errors[f"runtime.{key}"] = rule


def validate_measurement(data: Any) -> dict[str, Any]:
    """Check every rule that needs no database; {field: parsed value} or MeasurementError."""
    if not isinstance(data, dict):
        raise MeasurementError({"non_field_errors": "the body must be a JSON object"})
    errors: dict[str, str] = {}
    for key in sorted(set(data) - set(LIMITS)):
        errors[key] = "unknown field"
    clean: dict[str, Any] = {}
    for name, (kind, required, rule) in LIMITS.items():
        if name not in data or data[name] is None:
            if required:
                errors[name] = f"required: {rule}"
            continue
        if kind == "samples":
            clean[name] = _check_samples(data[name], errors)
            continue
        try:
            clean[name] = _check_field(name, kind, data[name])
        except KeyError:
            errors[name] = rule
    p50, p90 = clean.get("latency_p50_ms"), clean.get("latency_p90_ms")
    if p50 is not None and p90 is not None and p90 < p50:
        errors["latency_p90_ms"] = f"must be at least latency_p50_ms ({p50:g} ms)"
    _check_runtime(clean.get("runtime") or {}, errors)
    regimes = (clean.get("runtime") or {}).get("regimes")
    if regimes is not None and (
        not isinstance(regimes, dict)
        or not all(isinstance(k, str) and v in KERNEL_REGIMES for k, v in regimes.items())
    ):
        errors["runtime.regimes"] = f"an object: tensor name → one of {', '.join(KERNEL_REGIMES)}"
    if errors:
        raise MeasurementError(errors)
    return clean


def _check_against_model(clean: dict[str, Any], package: Package, errors: dict[str, str]) -> None:
    from planner.specs import ModelSpec, Plan

    spec = ModelSpec.from_dict(package.variant.base_model.spec)
    plan = Plan.from_dict(package.variant.plan)
    allowed = set(range(spec.n_blocks)) if plan.exit_threshold is None else set(spec.exit_points)
    allowed.add(spec.n_blocks - 1)
    for i, sample in enumerate(clean["samples"]):
        if sample["exit_layer"] not in allowed:
            errors[f"samples[{i}].exit_layer"] = (
                f"block {sample['exit_layer']} is not where this package's model can stop "
                f"(one of {sorted(allowed)})"
            )
    regimes = (clean.get("runtime") or {}).get("regimes") or {}
    unknown = sorted(set(regimes) - set(spec.tensor_names))
    if unknown:
        errors["runtime.regimes"] = f"unknown tensor(s) of the model: {', '.join(unknown[:5])}"


def record_measurement(
    device: Device, data: Any, *, idempotency_key: str | None = None
) -> tuple[Measurement, bool]:
    """Validate (nothing is stored on error), store, and queue the profile's re-fit on commit.

    Returns (measurement, created).  With `idempotency_key`, a measurement this device already
    stored under that key is returned as it is (created False) when `data` is the same body,
    and is a 422 MeasurementError naming the header when it is not; the repeat is looked up
    before the body is judged, so it gets the first answer even if a rule changed since (the
    package released no more)."""
    digest = body_digest(data) if idempotency_key is not None else ""
    if idempotency_key is not None:
        stored = _stored_under(device, idempotency_key, digest)
        if stored is not None:
            return stored, False
    clean = validate_measurement(data)
    if clean.get("device_id") not in (None, str(device.pk)):
        raise MeasurementError({"device_id": "a device reports only its own measurements"}, status=403)
    errors: dict[str, str] = {}
    package = (
        Package.objects.select_related("variant__base_model").filter(digest=clean["package_digest"]).first()
    )
    if package is None:
        errors["package_digest"] = "unknown package"
    elif not Release.objects.filter(profile_id=device.profile_id, package=package).exists():
        errors["package_digest"] = "this package was never released to the device's profile"
    else:
        _check_against_model(clean, package, errors)
    if errors:
        raise MeasurementError(errors)
    assert package is not None
    runtime = clean.get("runtime") or {}
    try:
        return _store(device, package, clean, runtime, idempotency_key, digest), True
    except IntegrityError:
        # A concurrent repeat with the same key committed first (the unique constraint held
        # this insert until it did): answer as a repeat.  Anything else is a bug to see.
        if idempotency_key is None:
            raise
        stored = _stored_under(device, idempotency_key, digest)
        if stored is None:
            raise
        return stored, False


def _stored_under(device: Device, key: str, digest: str) -> Measurement | None:
    """The measurement `device` stored under `key` (None: none yet); 422 if for another body."""
    stored = Measurement.objects.filter(device=device, idempotency_key=key).first()
    if stored is not None and stored.request_digest != digest:
        raise MeasurementError({HEADER: reused_message("measurement")}, status=422)
    return stored


def _store(
    device: Device,
    package: Package,
    clean: dict[str, Any],
    runtime: dict[str, Any],
    idempotency_key: str | None,
    digest: str,
) -> Measurement:
    now = timezone.now()
    with transaction.atomic():
        # The insert comes first: a unique-constraint failure leaves nothing else written and no
        # re-fit queued (the block's on-commit callbacks go with its rollback).
        measurement = Measurement.objects.create(
            variant=package.variant,
            device_profile_id=device.profile_id,
            device=device,
            package=package,
            kind=Measurement.Kind.DEVICE,
            host=str(runtime.get("host") or device.name)[:200],
            batch_size=clean["batch_size"],
            seq_len=None,
            latency_p50_s=clean["latency_p50_ms"] / 1000,
            latency_p90_s=clean["latency_p90_ms"] / 1000,
            peak_memory_bytes=clean.get("peak_memory_bytes"),
            accuracy=clean.get("check_accuracy"),
            agreement=clean.get("check_agreement"),
            check_examples=clean.get("check_examples"),
            samples=clean["samples"],
            runtime=runtime,
            measured_at=clean["measured_at"],
            received_at=now,
            idempotency_key=idempotency_key,
            request_digest=digest,
        )
        Device.objects.filter(pk=device.pk).update(last_seen_at=now)
        profile_id = device.profile_id
        RecalibrationRequest.objects.bulk_create(
            [RecalibrationRequest(profile_id=profile_id, requested_at=now)],
            update_conflicts=True,
            unique_fields=["profile"],
            update_fields=["requested_at"],
        )
        transaction.on_commit(lambda: _queue_recalibration(profile_id))
    return measurement


def _queue_recalibration(profile_id: int) -> None:
    # One queued re-fit per profile: the task clears the flag when it starts, so a report
    # arriving while it runs queues the next one.  Runs after the commit: the measurement is
    # stored, so neither a cache nor a broker failure may turn it into a 500.
    flag = _RECALIBRATION_FLAG.format(profile_id)
    try:
        claimed = cache.add(flag, 1, 600)
    except Exception:
        # Without the cache we cannot tell whether a re-fit is queued: one more is harmless.
        log.exception("recalibration flag of profile %s unreadable; queueing the re-fit anyway", profile_id)
        claimed = True
    if not claimed or enqueue("workers.recalibrate_profile", profile_id):
        return
    # Nothing was queued: a flag left behind would block this profile's re-fits for 10 minutes.
    try:
        cache.delete(flag)
    except Exception:
        log.exception("could not clear the recalibration flag of profile %s", profile_id)


def clear_recalibration_flag(profile_id: int) -> None:
    cache.delete(_RECALIBRATION_FLAG.format(profile_id))


def recalibration_due(profile_id: int) -> datetime | None:
    """When the profile's re-fit was last asked for (None: not due).  A re-fit reads this before
    the measurements and hands it to `recalibration_covered` once its fit is stored."""
    return (
        RecalibrationRequest.objects.filter(profile_id=profile_id)
        .values_list("requested_at", flat=True)
        .first()
    )


def recalibration_covered(profile_id: int, requested_at: datetime | None) -> None:
    """The re-fit that read `recalibration_due` → `requested_at` is stored: the request is done,
    unless a report (or the sweep) asked again since — then it stays, for the next re-fit."""
    if requested_at is not None:
        RecalibrationRequest.objects.filter(profile_id=profile_id, requested_at=requested_at).delete()


def stale_recalibrations() -> list[int]:
    """Profiles whose re-fit was asked for longer than EDGEFIT_STALE_SECONDS ago and not done:
    its message was lost (broker down when the report committed) or its worker died.  The
    caller enqueues `workers.recalibrate_profile` for each.

    The requests' time is moved to now, so a re-fit that is merely slow (or keeps failing) is
    enqueued again once per stale period, not at every sweep."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.EDGEFIT_STALE_SECONDS)
    with transaction.atomic():
        profiles = sorted(
            RecalibrationRequest.objects.select_for_update()
            .filter(requested_at__lt=stale)
            .values_list("profile_id", flat=True)
        )
        RecalibrationRequest.objects.filter(profile_id__in=profiles).update(requested_at=now)
    return profiles
