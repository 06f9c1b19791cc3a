"""The data behind the dashboard pages: plain dicts and lists built from the database.

No HTTP and no Plotly here (views live in `registry.pages`, figures in `registry.figures`), so
every number a page shows can be tested directly.  Conventions:

- A device's *entry* for a model is what the latest finished planning run that covered the
  device found: its confirmed candidates (accuracy measured on the held-out split, latency and
  memory predicted for the device) and the run's policy.  Candidates are "slim" dicts (no plan).
- Latency is overlaid with what devices reported: a device measurement of the variant on that
  profile replaces the prediction (`latency_source = "measured"`); else a prediction fitted to
  the device's measurements (`calibrated`) replaces the run's default one.
- Recommendations are recomputed from the entry with `planner.recommend`, so a what-if, the
  overview and the device page agree, and `static/js/whatif.js` mirrors the same function.
- Query-string values are parsed by `Params`: a malformed value falls back to its default and
  leaves a notice for the page, never an error.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.core.cache import cache
from django.db.models import FloatField, OuterRef, QuerySet, Subquery
from django.db.models.fields.json import KT
from django.db.models.functions import Cast

from devices.models import DeviceProfile
from planner.recommend import POLICY_KINDS, Candidate, Policy, recommend
from planner.specs import PlanError
from registry.exits import exit_fractions, variant_exit_fraction
from registry.models import BaseModel, Measurement, PlanningRun, Prediction, Variant
from registry.predictions import UNSUPPORTED_MEMORY, error_pct

__all__ = [
    "DEFAULT_LOSS_POINTS",
    "DEFAULT_SLO_MS",
    "MEASURED_BATCH",
    "MIB",
    "Params",
    "compare_data",
    "coverage",
    "csv_response_body",
    "device_entries",
    "latest_entries",
    "overview_data",
    "packages_for",
    "policy_from_params",
    "predicted_vs_measured_rows",
    "recommendation",
    "variant_devices",
    "variant_figures",
]

DEFAULT_LOSS_POINTS = 1.0
DEFAULT_SLO_MS = 50.0
MIB = 2**20
#: Most recent finished runs looked at for the latest entry of each (model, device).
RUNS_SCANNED = 200
_ENTRY_TTL = 600
#: The batch size whose device p50 is "the measured latency" on every page (agents report batch 1;
#: a larger batch is a throughput test, not what one request waits).
MEASURED_BATCH = 1


# --------------------------------------------------------------------------- query-string values


@dataclass
class Params:
    """Reads query-string values; a malformed one yields its default and a notice."""

    data: Mapping[str, Any]
    notices: list[str] = field(default_factory=list)

    def number(
        self, name: str, default: float | None, *, low: float, high: float, label: str, blank: bool = False
    ) -> float | None:
        """A float in [low, high]; "" gives None when `blank` (the control's "none")."""
        raw = self.data.get(name)
        if raw is None:
            return default
        raw = str(raw).strip()
        if raw == "":
            return None if blank else default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not (low <= value <= high):
            shown = raw[:40]
            self.notices.append(
                f"{label}: {shown!r} is not a number from {low:g} to {high:g}; using "
                f"{'none' if default is None else f'{default:g}'}."
            )
            return default
        return value

    def choice(self, name: str, choices: Iterable[str], default: str, *, label: str) -> str:
        raw = str(self.data.get(name, "") or "").strip()
        options = list(choices)
        if not raw:
            return default
        if raw not in options:
            self.notices.append(f"{label}: unknown value {raw[:40]!r}; using {default!r}.")
            return default
        return raw

    def ids(self, name: str, *, label: str, limit: int) -> list[int]:
        raw = str(self.data.get(name, "") or "").strip()
        if not raw:
            return []
        out: list[int] = []
        for part in raw.split(","):
            part = part.strip()
            if not part:
                continue
            # str.isdigit accepts "²" and other digits int() rejects: ASCII digits only
            if not (part.isascii() and part.isdigit()) or len(part) > 12:
                self.notices.append(f"{label}: {part[:20]!r} is not an id; ignored.")
                continue
            if int(part) not in out:
                out.append(int(part))
        if len(out) > limit:
            self.notices.append(f"{label}: at most {limit}; kept the first {limit}.")
            out = out[:limit]
        return out

    def slugs(self, name: str, *, known: Iterable[str], label: str, limit: int) -> list[str]:
        raw = str(self.data.get(name, "") or "").strip()
        if not raw:
            return []
        valid = set(known)
        out: list[str] = []
        for part in raw.split(","):
            part = part.strip()
            if not part:
                continue
            if part not in valid:
                self.notices.append(f"{label}: unknown {part[:40]!r}; ignored.")
            elif part not in out:
                out.append(part)
        if len(out) > limit:
            self.notices.append(f"{label}: at most {limit}; kept the first {limit}.")
            out = out[:limit]
        return out


def policy_from_params(params: Params, *, default_kind: str = "max_accuracy") -> Policy:
    """The what-if policy: kind, loss bound (points below FP32), latency SLO (ms), memory
    budget (MiB; none = each device's own). A kind missing what it needs → max_accuracy + notice.
    Mirrored by `policyFromState` in static/js/whatif.js."""
    kind = params.choice("policy", POLICY_KINDS, default_kind, label="Policy")
    loss = params.number(
        "loss", DEFAULT_LOSS_POINTS, low=0, high=100, label="Accuracy floor (points below FP32)", blank=True
    )
    slo = params.number(
        "slo", DEFAULT_SLO_MS, low=0.001, high=3_600_000, label="Latency SLO (ms)", blank=True
    )
    budget_mib = params.number(
        "budget", None, low=0.001, high=2 * 1024 * 1024, label="Memory budget (MiB)", blank=True
    )
    budget = int(budget_mib * MIB) if budget_mib is not None else None
    if kind in {"min_latency", "min_memory"} and loss is None:
        params.notices.append(f"Policy {kind} needs an accuracy floor: using max_accuracy.")
        kind = "max_accuracy"
    if kind == "min_memory" and slo is None:
        params.notices.append("Policy min_memory needs a latency SLO: using max_accuracy.")
        kind = "max_accuracy"
    try:
        return Policy(kind=kind, latency_slo_ms=slo, max_loss_points=loss, memory_budget_bytes=budget)
    except PlanError as exc:  # every value was range-checked above; keep the page up regardless
        params.notices.append(f"{exc}: using the default policy.")
        return Policy(kind="max_accuracy", latency_slo_ms=DEFAULT_SLO_MS, max_loss_points=DEFAULT_LOSS_POINTS)


def policy_state(policy: Policy) -> dict[str, Any]:
    """The policy as the page's controls and URL hold it."""
    return {
        "policy": policy.kind,
        "loss": policy.max_loss_points,
        "slo": policy.latency_slo_ms,
        "budget": (policy.memory_budget_bytes / MIB) if policy.memory_budget_bytes else None,
    }


# --------------------------------------------------------------------------- run entries


def _slim(candidate: dict[str, Any], variant_of: dict[str, int]) -> dict[str, Any]:
    extra = candidate.get("extra") or {}
    return {
        "key": candidate["key"],
        "label": candidate.get("label") or candidate["key"],
        "variant": candidate.get("variant") or variant_of.get(candidate["key"]),
        "accuracy": float(candidate["accuracy"]),
        "accuracy_source": candidate.get("accuracy_source", "measured"),
        "latency_s": float(candidate["latency_s"]),
        "latency_ms": float(candidate["latency_s"]) * 1000,
        "latency_source": candidate.get("latency_source", "predicted"),
        "memory_bytes": int(candidate["memory_bytes"]),
        "weight_bytes": extra.get("weight_bytes"),
        "exit_threshold": extra.get("exit_threshold"),
        "calibrated": False,
    }


def _usable(candidate: dict[str, Any]) -> bool:
    extra = candidate.get("extra") or {}
    return not extra.get("unsupported_precisions") and candidate.get("memory_bytes", 0) < UNSUPPORTED_MEMORY


def _entries_key(run_id: int, finished_at: Any) -> str:
    stamp = finished_at.timestamp() if finished_at else 0
    return f"edgefit:dash:run:{run_id}:{stamp}"


def _run_entries(
    run_id: int, model_id: int, finished_at: Any, result: dict[str, Any], variant_of: dict[str, int]
) -> dict[int, dict]:
    """Slim per-device entries of one finished run (cached: a finished run's result changes only
    when a calibration re-ranks it, and live figures are overlaid at read time anyway)."""
    devices = result.get("devices", {})
    entries: dict[int, dict] = {}
    for device_id, entry in devices.items():
        stored = entry.get("recommendation") or {}
        chosen = stored.get("chosen")
        entries[int(device_id)] = {
            "run_id": run_id,
            "model_id": model_id,
            "device_id": int(device_id),
            "finished_at": finished_at,
            "candidates": [_slim(c, variant_of) for c in entry.get("candidates", []) if _usable(c)],
            "stored": {
                "chosen": _slim(chosen, variant_of) if chosen else None,
                "reason": stored.get("reason", ""),
                "binding": stored.get("binding", ""),
                "infeasible": dict(stored.get("infeasible") or {}),
                "policy": stored.get("policy", ""),
            },
            "hypervolume": entry.get("hypervolume"),
        }
    cache.set(_entries_key(run_id, finished_at), entries, _ENTRY_TTL)
    return entries


def _load_entries(needed: dict[int, tuple[int, int, Any, Any]]) -> dict[int, dict[int, dict]]:
    """Entries of the runs in `needed` (run id → (run id, model id, finished_at, policy)): from
    the cache, else two queries for all the missing runs together (results, variant ids)."""
    loaded: dict[int, dict[int, dict]] = {}
    missing = []
    for run_id, (_, _, finished_at, _) in needed.items():
        hit = cache.get(_entries_key(run_id, finished_at))
        if hit is not None:
            loaded[run_id] = dict(hit)
        else:
            missing.append(run_id)
    if not missing:
        return loaded
    results = dict(PlanningRun.objects.filter(pk__in=missing).values_list("pk", "result"))
    keys = {
        c["key"]
        for result in results.values()
        for e in (result or {}).get("devices", {}).values()
        for c in e.get("candidates", [])
        if _usable(c)
    }
    variant_of: dict[int, dict[str, int]] = {}
    if keys:
        for model_id, plan_hash, pk in Variant.objects.filter(
            base_model_id__in={needed[r][1] for r in missing}, plan_hash__in=keys
        ).values_list("base_model_id", "plan_hash", "pk"):
            variant_of.setdefault(model_id, {})[plan_hash] = pk
    for run_id in missing:
        _, model_id, finished_at, _ = needed[run_id]
        loaded[run_id] = _run_entries(
            run_id, model_id, finished_at, results.get(run_id) or {}, variant_of.get(model_id, {})
        )
    return loaded


def latest_entries(
    model_ids: Iterable[int] | None = None, device_ids: Iterable[int] | None = None
) -> dict[tuple[int, int], dict[str, Any]]:
    """(model id, device id) → that device's entry from the newest finished run covering it.

    Four queries at most (runs, their devices, and for runs not cached yet their results and
    the variant ids of their candidates), however many runs and devices."""
    runs = PlanningRun.objects.filter(status=PlanningRun.Status.DONE)
    if model_ids is not None:
        runs = runs.filter(base_model_id__in=list(model_ids))
    if device_ids is not None:
        runs = runs.filter(device_profiles__in=list(device_ids)).distinct()
    heads = list(
        runs.order_by("-finished_at", "-pk").values_list("pk", "base_model_id", "finished_at", "policy")[
            :RUNS_SCANNED
        ]
    )
    if not heads:
        return {}
    through = PlanningRun.device_profiles.through
    devices_of: dict[int, list[int]] = {}
    for run_id, device_id in through.objects.filter(planningrun_id__in=[h[0] for h in heads]).values_list(
        "planningrun_id", "deviceprofile_id"
    ):
        devices_of.setdefault(run_id, []).append(device_id)
    wanted = set(device_ids) if device_ids is not None else None
    chosen: dict[tuple[int, int], tuple[int, int, Any, dict]] = {}
    for run_id, model_id, finished_at, policy in heads:
        for device_id in devices_of.get(run_id, []):
            if wanted is not None and device_id not in wanted:
                continue
            chosen.setdefault((model_id, device_id), (run_id, model_id, finished_at, policy))
    needed = {v[0]: v for v in chosen.values()}
    loaded = _load_entries(needed)
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for (model_id, device_id), (run_id, _, _, policy) in chosen.items():
        entry = loaded.get(run_id, {}).get(device_id)
        if entry is None:
            continue
        out[(model_id, device_id)] = {**entry, "policy": dict(policy or {})}
    return out


def device_measurements(**filters: Any) -> QuerySet[Measurement]:
    """Device measurements that count as a variant's measured latency on a profile, newest
    first: the one rule behind every "measured" figure (overview, variants table, variant and
    device pages)."""
    return Measurement.objects.filter(
        kind=Measurement.Kind.DEVICE, batch_size=MEASURED_BATCH, **filters
    ).order_by("-measured_at", "-pk")


def overlay_device_figures(entries: Iterable[dict[str, Any]]) -> None:
    """Replace predicted latencies by what devices measured (or by calibrated predictions), in
    place. Two queries for any number of entries."""
    entries = list(entries)
    variant_ids = {c["variant"] for e in entries for c in e["candidates"] if c.get("variant")}
    device_ids = {e["device_id"] for e in entries}
    if not variant_ids:
        return
    measured: dict[tuple[int, int], float] = {}
    for variant_id, device_id, p50 in device_measurements(
        variant_id__in=variant_ids, device_profile_id__in=device_ids
    ).values_list("variant_id", "device_profile_id", "latency_p50_s"):
        measured.setdefault((variant_id, device_id), p50)
    calibrated = {
        (v, d): (lat, mem)
        for v, d, lat, mem in Prediction.objects.filter(
            calibrated=True, batch_size=1, variant_id__in=variant_ids, device_profile_id__in=device_ids
        ).values_list("variant_id", "device_profile_id", "latency_s", "memory_bytes")
    }
    if not measured and not calibrated:
        return
    for entry in entries:
        fresh = []
        for c in entry["candidates"]:
            pair = (c.get("variant"), entry["device_id"])
            if pair in measured:
                c = {**c, "latency_s": measured[pair], "latency_source": "measured"}
            elif pair in calibrated:
                latency, memory = calibrated[pair]
                c = {**c, "latency_s": latency, "memory_bytes": memory, "calibrated": True}
            c["latency_ms"] = c["latency_s"] * 1000
            fresh.append(c)
        entry["candidates"] = fresh


def device_entries(model_ids: Iterable[int] | None = None, device_ids: Iterable[int] | None = None) -> dict:
    """`latest_entries` with device measurements overlaid (copies: the cache is not touched)."""
    entries = {
        k: {**e, "candidates": [dict(c) for c in e["candidates"]]}
        for k, e in latest_entries(model_ids, device_ids).items()
    }
    overlay_device_figures(entries.values())
    return entries


# --------------------------------------------------------------------------- recommendations


def _candidate(c: dict[str, Any]) -> Candidate:
    return Candidate(
        key=c["key"],
        accuracy=c["accuracy"],
        latency_s=c["latency_s"],
        memory_bytes=c["memory_bytes"],
        accuracy_source=c["accuracy_source"],
        latency_source=c["latency_source"],
        label=c["label"],
    )


def feasible_keys(
    candidates: list[dict[str, Any]], policy: Policy, fp32_accuracy: float, device_budget: int
) -> set[str]:
    budget = policy.memory_budget_bytes or device_budget
    slo_s = policy.latency_slo_ms / 1000 if policy.latency_slo_ms is not None else None
    floor = policy.floor(fp32_accuracy)
    return {
        c["key"]
        for c in candidates
        if c["memory_bytes"] <= budget
        and (slo_s is None or c["latency_s"] <= slo_s)
        and (floor is None or c["accuracy"] >= floor)
    }


def recommendation(
    entry: dict[str, Any] | None, policy: Policy, fp32_accuracy: float, device_budget: int
) -> dict[str, Any]:
    """The device's recommendation under `policy`, as the pages show it. Without candidates (no
    plan fitted during the search) the run's stored explanation stands."""
    if entry is None:
        return {
            "status": "unplanned",
            "chosen": None,
            "reason": "no finished planning run covers this device",
        }
    candidates = entry["candidates"]
    by_key = {c["key"]: c for c in candidates}
    if not candidates:
        stored = entry["stored"]
        return {
            "status": "infeasible",
            "chosen": None,
            "binding": stored.get("binding", ""),
            "reason": stored.get("reason") or "the search found no variant",
            "infeasible": stored.get("infeasible", {}),
            "neighbours": [],
            "front_keys": [],
            "feasible_keys": [],
            "policy": policy.describe(),
        }
    rec = recommend(
        [_candidate(c) for c in candidates],
        policy,
        fp32_accuracy=fp32_accuracy,
        device_memory_budget=device_budget,
    )
    return {
        "status": "ok" if rec.chosen else "infeasible",
        "chosen": by_key[rec.chosen.key] if rec.chosen else None,
        "binding": rec.binding,
        "reason": rec.reason,
        "infeasible": dict(rec.infeasible),
        "neighbours": [by_key[n.key] for n in rec.neighbours],
        "front_keys": [c.key for c in rec.front],
        "feasible_keys": sorted(feasible_keys(candidates, policy, fp32_accuracy, device_budget)),
        "policy": rec.policy,
    }


def run_policy(entry: dict[str, Any]) -> Policy:
    try:
        return Policy.from_dict(entry.get("policy") or {})
    except (PlanError, TypeError):
        return Policy()


def fp32_accuracy_of(model: BaseModel) -> float:
    try:
        return float((model.fp32_metrics or {}).get("accuracy", 0.0))
    except (TypeError, ValueError):
        return 0.0


# --------------------------------------------------------------------------- fleet coverage


def coverage(
    devices: list[dict[str, Any]], recs: Mapping[int, Mapping[str, Any]], total_share: float | None = None
) -> dict[str, Any]:
    """Fleet share whose device gets a feasible recommendation.

    `devices`: {"id", "share"}; `recs`: device id → recommendation (see `recommendation`).
    The share of every profile counts in the denominator; unplanned devices are not covered."""
    total = sum(d["share"] for d in devices) if total_share is None else total_share
    covered = sum(d["share"] for d in devices if (recs.get(d["id"]) or {}).get("chosen"))
    unplanned = sum(d["share"] for d in devices if (recs.get(d["id"]) or {}).get("status") == "unplanned")
    return {
        "covered_share": covered,
        "total_share": total,
        "unplanned_share": unplanned,
        "fraction": covered / total if total > 0 else 0.0,
        "devices_covered": sum(1 for d in devices if (recs.get(d["id"]) or {}).get("chosen")),
        "devices": len(devices),
    }


def coverage_sentence(cov: Mapping[str, Any], policy: Policy) -> str:
    parts = []
    if policy.max_loss_points is not None:
        parts.append(
            f"within {policy.max_loss_points:g} point{'' if policy.max_loss_points == 1 else 's'}"
            " of full accuracy"
        )
    if policy.latency_slo_ms is not None:
        parts.append(f"under {policy.latency_slo_ms:g} ms")
    if policy.memory_budget_bytes:
        parts.append(f"in {policy.memory_budget_bytes / MIB:g} MiB")
    return f"{cov['fraction'] * 100:.0f} % of the fleet gets a package " + " ".join(parts)


def _fleet(profiles: Iterable[DeviceProfile]) -> list[dict[str, Any]]:
    return [
        {
            "id": p.pk,
            "name": p.name,
            "slug": p.slug,
            "share": float(p.fleet_share or 0.0),
            "budget_bytes": int(p.ram_budget_bytes),
        }
        for p in profiles
    ]


# --------------------------------------------------------------------------- overview


def overview_data(params: Params) -> dict[str, Any]:
    """Models × devices: each cell the recommended variant under its run's policy; coverage per
    model under the thresholds of the query string (loss, slo, budget)."""
    loss = params.number(
        "loss", DEFAULT_LOSS_POINTS, low=0, high=100, label="Accuracy floor (points below FP32)"
    )
    slo = params.number(
        "slo", DEFAULT_SLO_MS, low=0.001, high=3_600_000, label="Latency SLO (ms)", blank=True
    )
    budget_mib = params.number(
        "budget", None, low=0.001, high=2 * 1024 * 1024, label="Memory budget (MiB)", blank=True
    )
    threshold = Policy(
        kind="max_accuracy",
        latency_slo_ms=slo,
        max_loss_points=loss,
        memory_budget_bytes=int(budget_mib * MIB) if budget_mib else None,
    )
    models = list(BaseModel.objects.order_by("name").only("id", "name", "slug", "fp32_metrics", "kind"))
    profiles = list(DeviceProfile.objects.order_by("-fleet_share", "name"))
    fleet = _fleet(profiles)
    entries = device_entries([m.pk for m in models]) if models else {}
    rows = []
    for model in models:
        fp32 = fp32_accuracy_of(model)
        cells: list[dict[str, Any]] = []
        recs: dict[int, dict[str, Any]] = {}
        for profile in profiles:
            entry = entries.get((model.pk, profile.pk))
            rec = recommendation(
                entry, run_policy(entry) if entry else Policy(), fp32, profile.ram_budget_bytes
            )
            cells.append({"profile": profile, "rec": rec, "run_id": entry and entry["run_id"]})
            recs[profile.pk] = recommendation(entry, threshold, fp32, profile.ram_budget_bytes)
        cov = coverage(fleet, recs)
        rows.append(
            {
                "model": model,
                "fp32": fp32,
                "cells": cells,
                "coverage": cov,
                "sentence": coverage_sentence(cov, threshold),
                "planned": any(c["rec"]["status"] != "unplanned" for c in cells),
            }
        )
    return {
        "rows": rows,
        "profiles": profiles,
        "threshold": threshold,
        "state": {"loss": loss, "slo": slo, "budget": budget_mib},
    }


def overview_csv_rows(data: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = [
        "model",
        "device",
        "fleet_share",
        "status",
        "variant_id",
        "variant",
        "accuracy",
        "accuracy_source",
        "latency_ms",
        "latency_source",
        "memory_bytes",
        "reason",
        "run_id",
    ]
    out = []
    for row in data["rows"]:
        for cell in row["cells"]:
            chosen = cell["rec"].get("chosen") or {}
            out.append(
                [
                    row["model"].name,
                    cell["profile"].name,
                    cell["profile"].fleet_share,
                    cell["rec"]["status"],
                    chosen.get("variant") or "",
                    chosen.get("label", ""),
                    chosen.get("accuracy", ""),
                    chosen.get("accuracy_source", ""),
                    chosen.get("latency_ms", ""),
                    chosen.get("latency_source", ""),
                    chosen.get("memory_bytes", ""),
                    cell["rec"].get("reason", ""),
                    cell["run_id"] or "",
                ]
            )
    return header, out


# --------------------------------------------------------------------------- variants table


def variant_table_queryset(model: BaseModel, device: DeviceProfile | None) -> QuerySet[Variant]:
    """Variants of `model` with their accuracy as a number and, for `device`, the predicted
    latency / memory and the latest measured p50 (NULL without a device): one query per page."""
    device_id = device.pk if device else -1
    predictions = Prediction.objects.filter(variant=OuterRef("pk"), device_profile_id=device_id, batch_size=1)
    measured = device_measurements(variant=OuterRef("pk"), device_profile_id=device_id)
    return (
        Variant.objects.filter(base_model=model)
        .defer("plan")
        .annotate(
            accuracy=Cast(KT("metrics__accuracy"), FloatField()),
            pred_latency_s=Subquery(predictions.values("latency_s")[:1]),
            pred_memory_bytes=Subquery(predictions.values("memory_bytes")[:1]),
            pred_calibrated=Subquery(predictions.values("calibrated")[:1]),
            measured_p50_s=Subquery(measured.values("latency_p50_s")[:1]),
        )
    )


def variant_figures(v: Variant) -> dict[str, Any]:
    """A row of `variant_table_queryset` as numbers: accuracy, latency (measured, else
    predicted) and its source, predicted latency and memory on the chosen device."""
    measured = getattr(v, "measured_p50_s", None)
    predicted = getattr(v, "pred_latency_s", None)
    latency = measured if measured is not None else predicted
    source = "measured" if measured is not None else ("predicted" if predicted is not None else "")
    return {
        "accuracy": getattr(v, "accuracy", None),
        "latency_ms": latency * 1000 if latency is not None else None,
        "latency_source": source,
        "predicted_ms": predicted * 1000 if predicted is not None else None,
        "calibrated": bool(getattr(v, "pred_calibrated", False)),
        "memory_bytes": getattr(v, "pred_memory_bytes", None),
    }


def variant_rows(page: Iterable[Variant], fp32: float) -> list[dict[str, Any]]:
    rows = []
    for v in page:
        figures = variant_figures(v)
        acc, memory = figures["accuracy"], figures["memory_bytes"]
        rows.append(
            {
                **figures,
                "variant": v,
                "delta_points": (acc - fp32) * 100 if acc is not None else None,
                "size_mib": v.weight_bytes / MIB,
                "memory_mib": memory / MIB if memory else None,
            }
        )
    return rows


VARIANT_CSV_HEADER = [
    "id",
    "name",
    "accuracy",
    "metrics_source",
    "weight_bytes",
    "latency_ms",
    "latency_source",
    "memory_bytes",
    "exit_threshold",
    "provenance",
    "created_at",
]


def variant_csv_rows(queryset: Iterable[Variant]) -> Iterable[list[Any]]:
    for v in queryset:
        figures = variant_figures(v)
        yield [
            v.pk,
            v.name,
            figures["accuracy"],
            v.metrics_source,
            v.weight_bytes,
            figures["latency_ms"],
            figures["latency_source"],
            figures["memory_bytes"],
            (v.metrics or {}).get("exit_threshold"),
            v.provenance,
            v.created_at.isoformat(),
        ]


def exit_variants(model: BaseModel, selected: list[Variant]) -> list[dict[str, Any]]:
    """Variants that may stop early with their measured exit fractions: the selected ones that
    have a threshold, else the latest six. Fractions come from the variant's metrics or from the
    real evaluation that measured its plan (one query)."""
    chosen = [v for v in selected if (v.metrics or {}).get("exit_threshold") is not None]
    if not chosen:
        chosen = list(
            Variant.objects.filter(base_model=model, metrics__has_key="exit_threshold")
            .exclude(metrics__exit_threshold=None)
            .order_by("-created_at")[:6]
        )
    need = [v for v in chosen if not (v.metrics or {}).get("exit_fraction")]
    fractions: dict[tuple[int, str], list[float]] = {}
    if need:
        from planner.specs import Plan

        keys: set[str] = set()
        for v in need:
            try:
                keys.add(Plan.from_dict(v.plan).weights_key())
            except (TypeError, KeyError, ValueError):  # PlanError is a ValueError
                continue
        fractions = exit_fractions([model.pk], {v.plan_hash for v in need}, keys)
    out = []
    for v in chosen:
        metrics = v.metrics or {}
        out.append(
            {
                "id": v.pk,
                "name": v.name,
                "exit_fraction": variant_exit_fraction(metrics, model.pk, v.plan_hash, fractions),
                "exit_threshold": metrics.get("exit_threshold"),
                "mean_layers": metrics.get("mean_layers"),
            }
        )
    return out


# --------------------------------------------------------------------------- variant page


def variant_devices(variant: Variant) -> list[dict[str, Any]]:
    """Per device profile: predicted latency / memory (batch 1) and the latest device measurement
    (`device_measurements`: batch 1, as every page counts "measured")."""
    predictions = {
        p.device_profile_id: p
        for p in Prediction.objects.filter(variant=variant, batch_size=1).select_related("device_profile")
    }
    measurements: dict[int, Measurement] = {}
    # per-text samples and the runtime report are up to 64 KiB each: not read for a table row
    for reported in (
        device_measurements(variant=variant).defer("samples", "runtime").select_related("device_profile")
    ):
        if reported.device_profile_id is not None:
            measurements.setdefault(reported.device_profile_id, reported)
    rows: list[dict[str, Any]] = []
    for device_id in sorted(set(predictions) | set(measurements)):
        p = predictions.get(device_id)
        latest = measurements.get(device_id)
        profile = p.device_profile if p else latest.device_profile if latest else None
        if profile is None:
            continue
        predicted_ms = p.latency_s * 1000 if p else None
        m = latest
        measured_ms = m.latency_p50_s * 1000 if m else None
        rows.append(
            {
                "profile": profile,
                "predicted_ms": predicted_ms,
                "predicted_memory_bytes": p.memory_bytes if p else None,
                "fits_budget": (p.memory_bytes <= profile.ram_budget_bytes) if p else None,
                "calibrated": bool(p and p.calibrated),
                "cost_model_version": p.cost_model_version if p else "",
                "measured_p50_ms": measured_ms,
                "measured_p90_ms": m.latency_p90_s * 1000 if m else None,
                "measured_memory_bytes": m.peak_memory_bytes if m else None,
                "measured_at": m.measured_at if m else None,
                "error_pct": error_pct(predicted_ms, measured_ms),
            }
        )
    rows.sort(key=lambda r: r["profile"].name)
    return rows


def packages_for(variant: Variant) -> dict[str, Any]:
    """The variant's signed packages (newest first, with their download URLs) and the releases
    (aliases on device profiles) that point at it. Two queries."""
    from django.urls import reverse

    from registry.models import Package, Release

    packages = []
    for package in Package.objects.filter(variant=variant).order_by("-created_at")[:20]:
        packages.append(
            {
                "package": package,
                "download_url": reverse("package-file", args=[package.digest, "model.safetensors"]),
                "manifest_url": reverse("package-file", args=[package.digest, "manifest.json"]),
                "signature_url": reverse("package-file", args=[package.digest, "manifest.sig"]),
            }
        )
    releases = list(
        Release.objects.filter(variant=variant)
        .select_related("profile", "package")
        .order_by("-created_at")[:50]
    )
    return {"packages": packages, "releases": releases}


# --------------------------------------------------------------------------- device page


def predicted_vs_measured_rows(profile: DeviceProfile) -> list[dict[str, Any]]:
    """Device measurements of this profile against the cost model's predictions (default and
    calibrated) for the same texts: `registry.calibration.predicted_vs_measured`, with each
    row's variant id under the name the page links with. [] (the page's empty state) when the
    profile has no device measurement with samples."""
    from registry import calibration

    return [{**r, "variant_id": r["variant"]} for r in calibration.predicted_vs_measured(profile)]


# --------------------------------------------------------------------------- compare / what-if


def compare_data(model: BaseModel, params: Params) -> dict[str, Any]:
    """Everything the compare page computes, server-side (first paint, CSV) and as the JSON the
    page's what-if script recomputes from (`payload`)."""
    policy = policy_from_params(params)
    profiles = list(DeviceProfile.objects.order_by("-fleet_share", "name"))
    by_slug = {p.slug: p for p in profiles}
    picked_devices = params.slugs("devices", known=by_slug, label="Devices to compare", limit=4)
    picked_variant_ids = params.ids("variants", label="Variants to compare", limit=4)
    variants = {
        v.pk: v for v in Variant.objects.filter(base_model=model, pk__in=picked_variant_ids).defer("plan")
    }
    for vid in picked_variant_ids:
        if vid not in variants:
            params.notices.append(f"Variants to compare: #{vid} is not a variant of {model.name}; ignored.")
    picked_variant_ids = [v for v in picked_variant_ids if v in variants]
    fp32 = fp32_accuracy_of(model)
    entries = device_entries([model.pk])
    fleet = _fleet(profiles)
    recs: dict[int, dict[str, Any]] = {}
    for profile in profiles:
        recs[profile.pk] = recommendation(
            entries.get((model.pk, profile.pk)), policy, fp32, profile.ram_budget_bytes
        )
    cov = coverage(fleet, recs)
    payload = {
        "model": {"id": model.pk, "name": model.name, "slug": model.slug, "fp32_accuracy": fp32},
        "devices": [
            {
                **d,
                "candidates": [
                    {
                        k: c[k]
                        for k in (
                            "key",
                            "label",
                            "variant",
                            "accuracy",
                            "accuracy_source",
                            "latency_s",
                            "latency_source",
                            "memory_bytes",
                            "calibrated",
                        )
                    }
                    for c in (entries.get((model.pk, d["id"])) or {}).get("candidates", [])
                ],
                "planned": (model.pk, d["id"]) in entries,
                # what the run said when nothing fitted (shown as is: no candidates to re-rank)
                "stored": {
                    k: ((entries.get((model.pk, d["id"])) or {}).get("stored") or {}).get(k, default)
                    for k, default in (("reason", ""), ("binding", ""), ("infeasible", {}))
                },
            }
            for d in fleet
        ],
        "state": {
            **policy_state(policy),
            "devices": picked_devices,
            "variants": picked_variant_ids,
        },
        "policy_kinds": POLICY_KINDS,
        "defaults": {"loss": DEFAULT_LOSS_POINTS, "slo": DEFAULT_SLO_MS},
    }
    variant_cols = []
    for vid in picked_variant_ids:
        v = variants[vid]
        per_device = []
        for profile in profiles:
            entry = entries.get((model.pk, profile.pk))
            c = next((c for c in (entry or {}).get("candidates", []) if c.get("variant") == vid), None)
            feasible = c is not None and c["key"] in feasible_keys(
                [c], policy, fp32, profile.ram_budget_bytes
            )
            per_device.append({"profile": profile, "candidate": c, "feasible": feasible})
        variant_cols.append(
            {"variant": v, "accuracy": (v.metrics or {}).get("accuracy"), "per_device": per_device}
        )
    choices: dict[int, str] = {}
    for (_, _), entry in sorted(entries.items()):
        for c in entry["candidates"]:
            if c.get("variant"):
                choices.setdefault(c["variant"], c["label"])
    return {
        "model": model,
        "variant_choices": [{"id": k, "label": v} for k, v in sorted(choices.items())][:200],
        "policy": policy,
        "profiles": profiles,
        "recs": recs,
        "rows": [{"profile": p, "rec": recs[p.pk], "planned": (model.pk, p.pk) in entries} for p in profiles],
        "coverage": cov,
        "sentence": coverage_sentence(cov, policy),
        "picked_devices": [by_slug[s] for s in picked_devices],
        "variant_cols": variant_cols,
        "payload": payload,
    }


def compare_csv_rows(data: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = [
        "device",
        "fleet_share",
        "status",
        "variant_id",
        "variant",
        "accuracy",
        "latency_ms",
        "latency_source",
        "memory_bytes",
        "binding",
        "reason",
    ]
    out = []
    for row in data["rows"]:
        rec = row["rec"]
        chosen = rec.get("chosen") or {}
        out.append(
            [
                row["profile"].name,
                row["profile"].fleet_share,
                rec["status"],
                chosen.get("variant") or "",
                chosen.get("label", ""),
                chosen.get("accuracy", ""),
                chosen.get("latency_ms", chosen.get("latency_s", 0) * 1000 if chosen else ""),
                chosen.get("latency_source", ""),
                chosen.get("memory_bytes", ""),
                rec.get("binding", ""),
                rec.get("reason", ""),
            ]
        )
    return header, out


# --------------------------------------------------------------------------- CSV


def _csv_cell(value: Any) -> Any:
    # A cell starting with = + - @ is a formula to a spreadsheet: neutralise text ones.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return "" if value is None else value


def csv_response_body(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_cell(v) for v in row])
    return buffer.getvalue()
