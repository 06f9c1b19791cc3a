"""Calibrating a device profile's cost model from what its devices measured, and what follows.

`recalibrate_profile` (run by `workers.recalibrate_profile` after a device reports):
  1. turn the per-text samples of the profile's latest device measurements into
     `planner.cost.Observation`s — the package's plan at batch 1, the text's token count, a
     one-hot exit distribution at the block where it stopped, the kernel regime per tensor when
     the agent reported them — exactly as `bench engine` does on the host;
  2. fit the roofline model's efficiencies and overheads (`planner.cost.fit`, NNLS) starting from
     the profile's stored parameters, and store parameters + fit report on the profile;
  3. recompute the batch-1 `Prediction` of every variant on that profile (calibrated);
  4. re-rank the profile's recommendation in every finished planning run that covers it.

Steps 2–4 are written with the profile's row locked (two re-fits of a profile never interleave
their writes), and not at all when the fit stored meanwhile read newer measurements.

`predicted_vs_measured(profile)` gives the rows of the device page's chart
(`registry.figures.predicted_vs_measured_data` / `_figure`).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.core.cache import cache
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from devices.models import DeviceProfile
from registry.exits import exit_fractions, variant_exit_fraction
from registry.measurements import clear_recalibration_flag, recalibration_covered, recalibration_due
from registry.models import Measurement, PlanningRun, Prediction, Variant
from registry.predictions import UNSUPPORTED_MEMORY, cost_params_digest, error_pct, lock_profiles

if TYPE_CHECKING:
    from planner.cost import CostParams, CostPrediction, Observation
    from planner.specs import ModelSpec, Plan

__all__ = [
    "MAX_MEASUREMENTS",
    "predict_samples",
    "predict_variant",
    "predicted_vs_measured",
    "recalibrate_profile",
    "rerank_profile",
    "variants_on_profile",
]

log = logging.getLogger(__name__)

#: The newest device measurements of a profile that a fit uses.
MAX_MEASUREMENTS = 50


def _seq_len() -> int:
    """The planner's default scoring length: a variant's predictions outside any run use it."""
    from planner.search import DEFAULT_SEQ_LEN

    return DEFAULT_SEQ_LEN


def _exit_probs(spec: ModelSpec, plan: Plan, exit_layer: int) -> list[float] | None:
    points = sorted(spec.exit_points)
    if plan.exit_threshold is None or exit_layer not in points:
        return None
    probs = [0.0] * len(points)
    probs[points.index(exit_layer)] = 1.0
    return probs


def _kernels(measurement: Measurement) -> dict[str, str] | None:
    regimes = (measurement.runtime or {}).get("regimes")
    return dict(regimes) if isinstance(regimes, dict) and regimes else None


def _spec_plan(measurement: Measurement) -> tuple[ModelSpec, Plan]:
    from planner.specs import ModelSpec, Plan

    return ModelSpec.from_dict(measurement.variant.base_model.spec), Plan.from_dict(measurement.variant.plan)


def _observations(measurements: Sequence[Measurement], with_kernels: bool) -> list[Observation]:
    from planner.cost import Observation

    out = []
    for m in measurements:
        spec, plan = _spec_plan(m)
        kernels = _kernels(m) if with_kernels else None
        for sample in m.samples or []:
            out.append(
                Observation(
                    spec,
                    plan,
                    1,
                    int(sample["tokens"]),
                    _exit_probs(spec, plan, int(sample["exit_layer"])),
                    float(sample["latency_ms"]) / 1000,
                    kernels,
                )
            )
    return out


def _device_measurements(profile: DeviceProfile) -> list[Measurement]:
    return list(
        Measurement.objects.filter(device_profile=profile, kind=Measurement.Kind.DEVICE)
        .exclude(samples=[])
        .select_related("variant__base_model", "package")
        .order_by("-measured_at", "-pk")[:MAX_MEASUREMENTS]
    )


def predict_samples(
    measurement: Measurement, device: Any, params: CostParams, memo: dict[Any, float] | None = None
) -> list[float]:
    """Predicted batch-1 latency (s) of each of the measurement's texts (its length and exit).

    `memo` shares predictions between calls with the same `params`: the texts of a package's
    check set repeat in every measurement of it."""
    from planner.cost import predict
    from planner.specs import PlanError

    spec, plan = _spec_plan(measurement)
    kernels = _kernels(measurement)
    kernels_key = tuple(sorted(kernels.items())) if kernels else ()
    memo = {} if memo is None else memo
    out = []
    for sample in measurement.samples:
        tokens, exit_layer = int(sample["tokens"]), int(sample["exit_layer"])
        key = (spec.name, plan.hash(), kernels_key, tokens, exit_layer)
        if key not in memo:
            probs = _exit_probs(spec, plan, exit_layer)
            try:
                cost = predict(
                    spec, plan, device, seq_len=tokens, exit_probs=probs, params=params, kernels=kernels
                )
            except PlanError:  # the profile lacks a peak for a reported kernel regime
                cost = predict(spec, plan, device, seq_len=tokens, exit_probs=probs, params=params)
            memo[key] = cost.latency_s
        out.append(memo[key])
    return out


def _exits_index(variants: Sequence[Variant]) -> dict[tuple[int, str], list[float]]:
    """The evaluations' exit fractions of the early-exit variants without their own (one query)."""
    from planner.specs import Plan

    need = [
        v
        for v in variants
        if (v.plan or {}).get("exit_threshold") is not None and not (v.metrics or {}).get("exit_fraction")
    ]
    if not need:
        return {}
    return exit_fractions(
        {v.base_model_id for v in need},
        {v.plan_hash for v in need},
        {Plan.from_dict(v.plan).weights_key() for v in need},
    )


def _regime_map(measurements: Sequence[Measurement]) -> list[list[str]]:
    """[tensor kind, weight precision, kernel regime] as the profile's devices ran them (the
    most frequent regime per kind and precision): how an unmeasured plan would run there."""
    from planner.specs import ModelSpec, Plan

    votes: dict[tuple[str, str], dict[str, int]] = {}
    for m in measurements:
        regimes = _kernels(m) or {}
        if not regimes:
            continue
        spec = ModelSpec.from_dict(m.variant.base_model.spec)
        plan = Plan.from_dict(m.variant.plan)
        for tensor in spec.tensors:
            regime = regimes.get(tensor.name)
            if regime:
                counts = votes.setdefault((tensor.kind, plan.scheme(tensor.name).precision), {})
                counts[regime] = counts.get(regime, 0) + 1
    return [[kind, precision, max(c, key=lambda r: c[r])] for (kind, precision), c in sorted(votes.items())]


def _variant_kernels(spec: ModelSpec, plan: Plan, profile: DeviceProfile) -> dict[str, str] | None:
    """Each tensor's kernel regime on this profile, from the map its last fit learned."""
    learned = {(k, p): regime for k, p, regime in (profile.calibration or {}).get("regimes", [])}
    kernels = {
        t.name: learned[(t.kind, plan.scheme(t.name).precision)]
        for t in spec.tensors
        if (t.kind, plan.scheme(t.name).precision) in learned
    }
    return kernels or None


def predict_variant(
    variant: Variant,
    profile: DeviceProfile,
    params: CostParams | None = None,
    exits: dict[tuple[int, str], list[float]] | None = None,
) -> CostPrediction | None:
    """Batch-1 prediction of `variant` on `profile` at the planner's sequence length, with the
    profile's cost model (or `params`) and the kernel regimes its devices use for each kind of
    tensor and precision; None when the profile cannot run the plan.  `exits`: the
    `_exits_index` of a batch of variants (read here when not given)."""
    from planner.specs import ModelSpec, Plan

    plan = Plan.from_dict(variant.plan)
    probs = None
    if plan.exit_threshold is not None:
        index = _exits_index([variant]) if exits is None else exits
        probs = variant_exit_fraction(variant.metrics, variant.base_model_id, variant.plan_hash, index)
    return _predict_plan(
        ModelSpec.from_dict(variant.base_model.spec),
        plan,
        profile,
        params or profile.cost_params_or_default(),
        probs,
        _seq_len(),
    )


def _predict_plan(
    spec: ModelSpec,
    plan: Plan,
    profile: DeviceProfile,
    params: CostParams,
    exit_probs: list[float] | None,
    seq_len: int,
) -> CostPrediction | None:
    from planner.cost import predict
    from planner.specs import PlanError

    device = profile.to_device_spec()
    kernels = _variant_kernels(spec, plan, profile)
    for attempt in (kernels, None) if kernels else (None,):
        try:
            return predict(
                spec, plan, device, seq_len=seq_len, exit_probs=exit_probs, params=params, kernels=attempt
            )
        except PlanError:  # a regime computes at a precision the profile has no peak for
            continue
    return None


def variants_on_profile(profile: DeviceProfile) -> list[Variant]:
    """Variants predicted, released or measured on the profile, or on a run's front for it."""
    keys: set[tuple[int, str]] = set()
    for run in PlanningRun.objects.filter(status=PlanningRun.Status.DONE, device_profiles=profile):
        entry = (run.result or {}).get("devices", {}).get(str(profile.pk)) or {}
        keys |= {(run.base_model_id, c["key"]) for c in entry.get("front", [])}
    by_plan = Q()
    for model_id, key in keys:
        by_plan |= Q(base_model_id=model_id, plan_hash=key)
    direct = (
        Q(predictions__device_profile=profile)
        | Q(releases__profile=profile)
        | Q(measurements__device_profile=profile)
    )
    query = direct | by_plan if keys else direct
    return list(Variant.objects.filter(query).select_related("base_model").distinct().order_by("pk"))


def recalibrate_profile(profile_id: int) -> dict[str, Any] | None:
    """Steps 1–4 of the module docstring. Returns the stored calibration report, or None when
    the profile is gone, has no device samples yet, or a fit from newer measurements was stored
    while this one ran. Safe to run twice."""
    from planner.cost import COST_MODEL_VERSION, fit
    from planner.specs import PlanError

    clear_recalibration_flag(profile_id)
    requested_at = recalibration_due(profile_id)  # before the measurements: any later report stays due
    profile = DeviceProfile.objects.filter(pk=profile_id).first()
    if profile is None:
        return None
    measurements = _device_measurements(profile)
    if not measurements:
        recalibration_covered(profile_id, requested_at)
        return None
    device = profile.to_device_spec()
    start = profile.cost_params_or_default()
    kernels_used = True
    try:
        result = fit(start, _observations(measurements, True), device)
    except PlanError as exc:
        # A reported kernel regime computes at a precision this profile has no peak for:
        # price by precision instead.
        log.warning("profile %s: fitting without kernel regimes (%s)", profile.pk, exc)
        kernels_used = False
        result = fit(start, _observations(measurements, False), device)
    report = result.report
    calibration = {
        "n_measurements": len(measurements),
        "n_observations": report.n_observations,
        "mape": report.mape,
        "mape_before": report.mape_before,
        "max_rel_error": report.max_rel_error,
        "rmse_s": report.rmse_s,
        "solver": report.solver,
        "iterations": report.iterations,
        "fitted": list(report.fitted),
        "unidentified": list(report.unidentified),
        "never_binding": list(report.never_binding),
        "confounded": list(report.confounded),
        "kernel_regimes": kernels_used,
        "regimes": _regime_map(measurements) if kernels_used else [],
        "fitted_at": timezone.now().isoformat(),
        "cost_model_version": COST_MODEL_VERSION,
        "measurements": [m.pk for m in measurements],
    }
    # One re-fit at a time per profile from here: the profile row is locked while the fit, the
    # predictions and the re-ranked runs are written, so two re-fits (a slow one and the one a
    # later report queued) cannot interleave their writes, and one that read older
    # measurements than the fit now stored leaves it alone.
    with transaction.atomic():
        locked = lock_profiles([profile.pk]).get(profile.pk)
        if locked is None:
            return None
        stored_through = _measured_through(locked.calibration)
        if stored_through > _measured_through(calibration):
            log.info(
                "profile %s: a fit from newer measurements (through #%d) is stored; this one "
                "(through #%d) is dropped",
                profile.pk,
                stored_through,
                _measured_through(calibration),
            )
            return None
        locked.cost_params = result.params.to_dict()
        written = _store_predictions(locked)
        reranked = rerank_profile(locked)
        calibration = {**calibration, "predictions": written, "runs_reranked": reranked}
        DeviceProfile.objects.filter(pk=profile.pk).update(
            cost_params=locked.cost_params, calibration=calibration
        )
        recalibration_covered(profile.pk, requested_at)
    log.info(
        "profile %s calibrated on %d observations: MAPE %.1f %% (was %.1f %%), %d predictions, %d runs",
        profile.pk,
        report.n_observations,
        report.mape * 100,
        report.mape_before * 100,
        written,
        reranked,
    )
    return calibration


def _measured_through(calibration: dict[str, Any] | None) -> int:
    """The newest measurement (by id: ids grow as reports arrive) a stored fit read; -1 if none."""
    ids = (calibration or {}).get("measurements")
    return max(ids) if isinstance(ids, list) and ids else -1


def _store_predictions(profile: DeviceProfile) -> int:
    from planner.cost import COST_MODEL_VERSION

    params = profile.cost_params_or_default()
    variants = variants_on_profile(profile)
    exits = _exits_index(variants)
    rows = []
    for variant in variants:
        cost = predict_variant(variant, profile, params, exits)
        if cost is None:
            continue
        rows.append(
            Prediction(
                variant=variant,
                device_profile=profile,
                batch_size=1,
                latency_s=cost.latency_s,
                memory_bytes=cost.memory_bytes,
                cost_model_version=COST_MODEL_VERSION,
                calibrated=True,
            )
        )
    with transaction.atomic():
        Prediction.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=["variant", "device_profile", "batch_size"],
            update_fields=["latency_s", "memory_bytes", "cost_model_version", "calibrated", "predicted_at"],
        )
    return len(rows)


def reprice_profile(profile: DeviceProfile) -> None:
    """Write the profile's predictions and re-rank its finished runs with its stored cost
    parameters, as a re-fit does (the caller holds the profile's row lock).

    For a planning run finishing after a re-fit landed during its confirm stage: the re-fit
    re-ranked finished runs only, and the run was priced with the parameters before it."""
    _store_predictions(profile)
    rerank_profile(profile)


# --------------------------------------------------------------------------- re-ranking


def rerank_profile(profile: DeviceProfile) -> int:
    """Re-score the confirmed candidates of every finished run covering `profile` with its
    calibrated cost model and store the new front and recommendation. Returns runs updated."""
    updated = 0
    # In id order: two re-rankings of different profiles lock their shared runs in one order.
    for run_id in (
        PlanningRun.objects.filter(status=PlanningRun.Status.DONE, device_profiles=profile)
        .order_by("pk")
        .values_list("pk", flat=True)
    ):
        with transaction.atomic():
            run = PlanningRun.objects.select_for_update().select_related("base_model").get(pk=run_id)
            entry = (run.result or {}).get("devices", {}).get(str(profile.pk))
            if not entry or not entry.get("candidates"):
                continue
            result = dict(run.result)
            result["devices"] = dict(result["devices"])
            result["devices"][str(profile.pk)] = _reranked(run, profile, entry)
            run.result = result
            run.save(update_fields=["result"])
            updated += 1
    return updated


def _reranked(run: PlanningRun, profile: DeviceProfile, entry: dict[str, Any]) -> dict[str, Any]:
    """The entry re-scored as `registry.fleet` scored it (same sequence length, the measured
    exit fractions of early-exit plans), with the profile's calibrated cost model."""
    from planner.recommend import Candidate, Policy, pareto_front, recommend
    from planner.specs import ModelSpec, Plan
    from registry.fleet import search_settings

    spec = ModelSpec.from_dict(run.base_model.spec)
    params = profile.cost_params_or_default()
    policy = Policy.from_dict(run.policy)
    fp32_accuracy = float(run.base_model.fp32_metrics["accuracy"])
    seq_len = search_settings(run).seq_len
    plans = {old["key"]: Plan.from_dict(old["extra"]["plan"]) for old in entry["candidates"]}
    exits = exit_fractions(
        [run.base_model_id],
        [key for key, plan in plans.items() if plan.exit_threshold is not None],
        {(old.get("extra") or {}).get("weights_key", "") for old in entry["candidates"]},
    )
    candidates = []
    for old in entry["candidates"]:
        extra = dict(old.get("extra") or {})
        plan = plans[old["key"]]
        probs = exits.get((run.base_model_id, old["key"])) if plan.exit_threshold is not None else None
        cost = _predict_plan(spec, plan, profile, params, probs, seq_len)
        if cost is None:
            continue
        unsupported = bool(extra.get("unsupported_precisions"))
        extra["calibrated"] = True
        candidates.append(
            Candidate(
                key=old["key"],
                accuracy=old["accuracy"],
                latency_s=cost.latency_s,
                memory_bytes=cost.memory_bytes if not unsupported else UNSUPPORTED_MEMORY,
                accuracy_source=old.get("accuracy_source", "measured"),
                latency_source="predicted",
                label=old.get("label", ""),
                extra=extra,
            )
        )
    usable = [c for c in candidates if not c.extra.get("unsupported_precisions")]
    rec = recommend(
        usable, policy, fp32_accuracy=fp32_accuracy, device_memory_budget=profile.ram_budget_bytes
    )
    front = pareto_front(usable)
    variants = _front_variants(run, front)
    known = dict(
        Variant.objects.filter(
            base_model=run.base_model, plan_hash__in=[c.key for c in candidates]
        ).values_list("plan_hash", "pk")
    )
    known.update(variants)

    def as_json(c: Candidate) -> dict[str, Any]:
        return {**c.to_dict(), "variant": known.get(c.key), "latency_ms": c.latency_s * 1000}

    return {
        **entry,
        "cost_params_fitted": profile.calibrated,
        "cost_params_digest": cost_params_digest(profile.cost_params),
        "front": [as_json(c) for c in front],
        "candidates": [as_json(c) for c in candidates],
        "recommendation": {**rec.to_dict(), "variant": known.get(rec.chosen.key) if rec.chosen else None},
        "calibration": {
            "calibrated": True,
            "fitted_at": (profile.calibration or {}).get("fitted_at"),
            "cost_model_version": (profile.calibration or {}).get("cost_model_version"),
        },
    }


def _front_variants(run: PlanningRun, front: Sequence[Any]) -> dict[str, int]:
    """Front members become registry variants (as `registry.fleet` stores a run's front)."""
    from planner.specs import Plan

    # Imported here: registry.engine loads the model bundles (torch), and this module is
    # imported by dashboard pages that only predict.
    from registry.engine import record_variant

    stored: dict[str, int] = {}
    existing = dict(
        Variant.objects.filter(base_model=run.base_model, plan_hash__in=[c.key for c in front]).values_list(
            "plan_hash", "pk"
        )
    )
    for candidate in front:
        if candidate.key in existing:
            stored[candidate.key] = existing[candidate.key]
            continue
        variant = record_variant(
            run.base_model,
            Plan.from_dict(candidate.extra["plan"]),
            name=candidate.label,
            metrics={
                "accuracy": candidate.accuracy,
                "agreement": candidate.extra.get("agreement"),
                "mean_layers": candidate.extra.get("mean_layers"),
                "exit_threshold": candidate.extra.get("exit_threshold"),
                "split": "test",
            },
            source="measured",
            provenance=f"{candidate.extra.get('provenance', '')}; on the front after calibrating {run.pk}",
            tags=[f"run:{run.pk}"],
        )
        stored[candidate.key] = variant.pk
    return stored


# --------------------------------------------------------------------------- reading


def predicted_vs_measured(profile: DeviceProfile) -> list[dict[str, Any]]:
    """Per device measurement of the profile: the median latency over its texts as measured,
    and as predicted for the same texts (their lengths and exits) by the default and by the
    calibrated cost model.

    Medians, like the p50 the device reports: a device's timings carry bursts of noise (other
    apps, throttling) that a mean would average in and the fit — which weighs relative error —
    rightly discounts.  Means are in the row too.  Rows: {"label", "measured_ms",
    "predicted_ms", "error_pct", "calibrated", "measured_mean_ms", "predicted_mean_ms",
    "measurement", "package", "variant", "measured_at", "n_samples"} — two rows per
    measurement (default model, then calibrated when the profile has been fitted), the shape
    `registry.figures.predicted_vs_measured_data` takes.  Cached until the profile is re-fitted
    or measured again."""
    from planner.cost import CostParams

    measurements = _device_measurements(profile)
    if not measurements:
        return []
    key = (
        f"calibration:pvm:v2:{profile.pk}:{measurements[0].pk}:{len(measurements)}:"
        f"{(profile.calibration or {}).get('fitted_at')}:{profile.updated_at.timestamp()}"
    )
    cached = cache.get(key)
    if cached is not None:
        return list(cached)
    device = profile.to_device_spec()
    models: list[tuple[bool, CostParams, dict[Any, float]]] = [(False, CostParams(), {})]
    if profile.cost_params:
        models.append((True, profile.cost_params_or_default(), {}))
    rows = []
    for m in reversed(measurements):
        measured = [float(s["latency_ms"]) for s in m.samples]
        measured_ms = statistics.median(measured)
        for calibrated, params, memo in models:
            predicted = [seconds * 1000 for seconds in predict_samples(m, device, params, memo)]
            predicted_ms = statistics.median(predicted)
            rows.append(
                {
                    "label": f"{m.variant.name} · {m.package.digest[:12] if m.package else '—'} · {m.host}",
                    "measured_ms": measured_ms,
                    "predicted_ms": predicted_ms,
                    "error_pct": error_pct(predicted_ms, measured_ms),
                    "calibrated": calibrated,
                    "measured_mean_ms": statistics.fmean(measured),
                    "predicted_mean_ms": statistics.fmean(predicted),
                    "measurement": m.pk,
                    "package": m.package.digest if m.package else None,
                    "variant": m.variant_id,
                    "measured_at": m.measured_at.isoformat(),
                    "n_samples": len(m.samples),
                }
            )
    cache.set(key, rows, 3600)
    return rows
