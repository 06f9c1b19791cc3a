"""Per-device predictions of stored variants, as rows the dashboard can filter and sort in SQL.

A finished planning run scores every confirmed plan on every device of the run (the cost model's
predicted latency and memory; see `registry.fleet`).  Those figures live in the run's result JSON;
`record_run_predictions` copies the ones that belong to a stored variant into `Prediction` rows
(batch 1), so "variants of model M sorted by latency on device D" is one query.  A row already
fitted to the device's measurements (`calibrated=True`) is left alone: an uncalibrated run
must not overwrite a calibrated figure.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.db import transaction

from devices.models import DeviceProfile
from registry.models import PlanningRun, Prediction, Variant

__all__ = ["UNSUPPORTED_MEMORY", "cost_params_digest", "error_pct", "lock_profiles", "record_run_predictions"]

#: The memory a run gives a candidate that uses precisions the device cannot run: larger than
#: any budget, so no policy picks it. Readers treat anything this large as "unsupported".
UNSUPPORTED_MEMORY = 2**62


def error_pct(predicted: float | None, measured: float | None) -> float | None:
    """How far a prediction is from the measurement, in % of the measurement (+ = too slow)."""
    if predicted is None or not measured:
        return None
    return (predicted / measured - 1) * 100


def _cost_model_version() -> str:
    from planner.cost import COST_MODEL_VERSION

    return COST_MODEL_VERSION


def cost_params_digest(cost_params: dict[str, Any] | None) -> str:
    """Short fingerprint of a profile's stored cost parameters ("" for the defaults): a run's
    result records the one it was priced with."""
    if not cost_params:
        return ""
    return hashlib.sha256(json.dumps(cost_params, sort_keys=True).encode()).hexdigest()[:16]


def lock_profiles(profile_ids: list[int]) -> dict[int, DeviceProfile]:
    """The profiles, row-locked (FOR NO KEY UPDATE: reports and predictions naming them are
    not blocked) in id order, the one order every writer of a profile's predictions takes them
    in; call inside a transaction."""
    locked = DeviceProfile.objects.select_for_update(no_key=True).filter(pk__in=profile_ids)
    return {p.pk: p for p in locked.order_by("pk")}


def record_run_predictions(run: PlanningRun) -> int:
    """Upsert batch-1 Prediction rows for every (stored variant, device) pair the finished run
    scored. Returns the number of rows written. Idempotent.

    A device whose cost parameters changed since the run priced it (its entry's
    `cost_params_digest`, checked under the profile's row lock) is left out: a re-fit has
    written newer predictions for it, and the run's figures are older (`fleet.confirm_run`
    re-prices such a run before recording; a backfill of an old run leaves them alone)."""
    if run.status != PlanningRun.Status.DONE:
        return 0
    with transaction.atomic():
        return _record_run_predictions(run)


def _record_run_predictions(run: PlanningRun) -> int:
    devices: dict[str, Any] = (run.result or {}).get("devices", {})
    current = {pk: p.cost_params for pk, p in lock_profiles([int(d) for d in devices]).items()}
    scored: dict[tuple[str, int], dict[str, Any]] = {}
    fitted: dict[int, bool] = {}
    for device_id, entry in devices.items():
        priced_with = entry.get("cost_params_digest")
        if int(device_id) not in current:
            continue
        if priced_with is not None and priced_with != cost_params_digest(current[int(device_id)]):
            continue
        fitted[int(device_id)] = bool(entry.get("cost_params_fitted", False))
        for candidate in entry.get("candidates", []):
            if candidate.get("memory_bytes", 0) >= UNSUPPORTED_MEMORY:
                continue
            if (candidate.get("extra") or {}).get("unsupported_precisions"):
                continue
            scored[(candidate["key"], int(device_id))] = candidate
    if not scored:
        return 0
    variant_of = dict(
        Variant.objects.filter(
            base_model_id=run.base_model_id, plan_hash__in={key for key, _ in scored}
        ).values_list("plan_hash", "pk")
    )
    calibrated = set(
        Prediction.objects.filter(
            variant_id__in=variant_of.values(), batch_size=1, calibrated=True
        ).values_list("variant_id", "device_profile_id")
    )
    version = _cost_model_version()
    rows = [
        Prediction(
            variant_id=variant_of[key],
            device_profile_id=device_id,
            batch_size=1,
            latency_s=float(candidate["latency_s"]),
            memory_bytes=int(candidate["memory_bytes"]),
            cost_model_version=version,
            calibrated=fitted[device_id],
        )
        for (key, device_id), candidate in scored.items()
        # A prediction from fitted parameters is not replaced by one from the defaults.
        if key in variant_of and (fitted[device_id] or (variant_of[key], device_id) not in calibrated)
    ]
    Prediction.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["variant", "device_profile", "batch_size"],
        update_fields=["latency_s", "memory_bytes", "cost_model_version", "calibrated", "predicted_at"],
    )
    return len(rows)
