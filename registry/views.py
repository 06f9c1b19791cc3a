"""Dashboard pages for models, planning runs and releases."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse

from accounts.decorators import viewer_required
from accounts.roles import is_staff
from devices.models import Device
from registry import studies
from registry.charts import hypervolume_figure, pareto_data, pareto_figure
from registry.forms import PlanningRunForm
from registry.models import AuditEntry, BaseModel, PlanningRun, Release
from registry.planning import RunInputError, cancel_run, create_run
from registry.releases import ReleaseError, rollback, set_rollout

#: Rows of release history on the releases page (heads and pending releases are always shown).
_HISTORY_ROWS = 500


@viewer_required
def model_list(request: HttpRequest) -> HttpResponse:
    models = BaseModel.objects.annotate(variant_count=Count("variants")).order_by("name")
    return render(request, "dashboard/model_list.html", {"models": models})


@viewer_required
def plan_list(request: HttpRequest) -> HttpResponse:
    form = PlanningRunForm(request.POST or None)
    if request.method == "POST":
        if not is_staff(request.user):
            raise PermissionDenied("only staff start planning runs")
        if form.is_valid():
            try:
                run = create_run(**form.run_kwargs(), created_by=request.user)
            except RunInputError as exc:
                for field, message in exc.errors.items():
                    form.add_error(None, f"{field}: {message}")
            else:
                messages.success(request, f"Run {run.pk} queued.")
                return redirect("dashboard:plan", pk=run.pk)
    # The list shows counters only: leave the runs' progress history and results (JSON that
    # grows with every trial and device) in the database.
    runs = (
        PlanningRun.objects.select_related("base_model")
        .defer("progress", "result", "error")
        .annotate(devices=Count("device_profiles"))[:100]
    )
    return render(request, "dashboard/plan_list.html", {"runs": runs, "form": form})


def _device_figures(run: PlanningRun) -> list[dict[str, Any]]:
    """One Pareto figure per device: all trials (estimated; infeasible greyed) and, once the
    run is confirmed, the measured front with the recommended variant marked."""
    key = f"edgefit:run-figures:{run.pk}:{run.status}:{run.trials_done}:{run.real_evaluations}"
    cached = cache.get(key)
    if cached is not None:
        return list(cached)
    figures = []
    results = (run.result or {}).get("devices", {})
    profiles = list(run.device_profiles.order_by("name"))
    # Every device's trials in two queries plus one read of Optuna's tables per study (not
    # Optuna's own API per device, which imports torch into the web worker and builds ~40
    # fields per trial): the live page re-fetches these figures every few seconds.
    trials = studies.trial_points_many((run.pk, p.pk) for p in profiles)
    for profile in profiles:
        entry = results.get(str(profile.pk), {})
        chosen = (entry.get("recommendation") or {}).get("chosen")
        data = pareto_data(trials[(run.pk, profile.pk)], entry.get("front", []), chosen and chosen["key"])
        figures.append({"id": f"device-{profile.pk}", "figure": pareto_figure(data, profile.name)})
    cache.set(key, figures, 3600 if run.finished else 10)
    return figures


@viewer_required
def plan_detail(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(PlanningRun.objects.select_related("base_model"), pk=pk)
    if request.method == "POST":
        if not is_staff(request.user):
            raise PermissionDenied("only staff cancel planning runs")
        cancel_run(run)
        messages.info(request, f"Cancel requested for run {run.pk}.")
        return redirect("dashboard:plan", pk=run.pk)
    profiles = list(run.device_profiles.order_by("name"))
    results = (run.result or {}).get("devices", {})
    devices = [{"profile": p, "result": results.get(str(p.pk))} for p in profiles]
    history, history_len = _hypervolume_history(run)
    figures = [
        {"id": "hypervolume", "figure": hypervolume_figure(history, {str(p.pk): p.name for p in profiles})}
    ]
    figures += _device_figures(run)
    return render(
        request,
        "dashboard/plan_detail.html",
        {
            "run": run,
            "devices": devices,
            "figures": figures,
            "progress_url": reverse("planningrun-progress", args=[run.pk]),
            "figures_url": reverse("dashboard:plan-figures", args=[run.pk]),
            "history_len": history_len,
        },
    )


#: Points per device the hypervolume chart shows at most (a chart 300 px wide shows no more).
CHART_POINTS_PER_DEVICE = 200


def _hypervolume_history(run: PlanningRun) -> tuple[list[dict[str, Any]], int]:
    """The run's hypervolume points for its chart, at most CHART_POINTS_PER_DEVICE per device
    (evenly spaced, the first and the latest kept), and how many points the run has in all."""
    rows = list(
        run.hypervolume_points.order_by("id").values_list("pk", "device_profile_id", "trials", "hypervolume")
    )
    by_device: dict[int, list[tuple[int, int, int, float]]] = {}
    for row in rows:
        by_device.setdefault(row[1], []).append(row)
    kept: list[tuple[int, int, int, float]] = []
    for points in by_device.values():
        if len(points) > CHART_POINTS_PER_DEVICE:
            step = (len(points) - 1) / (CHART_POINTS_PER_DEVICE - 1)
            points = [points[round(i * step)] for i in range(CHART_POINTS_PER_DEVICE)]
        kept.extend(points)
    kept.sort()
    return [{"device": d, "trials": t, "hypervolume": h} for _, d, t, h in kept], len(rows)


@viewer_required
def plan_figures(request: HttpRequest, pk: int) -> JsonResponse:
    """The per-device figures of a run, for the live page (Plotly.react without a reload)."""
    run = get_object_or_404(PlanningRun, pk=pk)
    profiles = {str(p.pk): p.name for p in run.device_profiles.all()}
    history, _ = _hypervolume_history(run)
    figures = [{"id": "hypervolume", "figure": hypervolume_figure(history, profiles)}, *_device_figures(run)]
    return JsonResponse({"status": run.status, "figures": figures})


@viewer_required
def release_list(request: HttpRequest) -> HttpResponse:
    """Per profile: each alias's head (rollout %, package digest and size), the release history
    and, for staff, rollout and rollback forms (If-Match from the version shown); the audit trail."""
    if request.method == "POST":
        return _change_release(request)
    rows = Release.objects.select_related("profile", "variant__base_model", "package", "created_by")
    order = ("profile__name", "alias", "-created_at")
    # Heads and pending releases are always shown; only the history is capped.
    current = list(rows.filter(status__in=[Release.Status.ACTIVE, Release.Status.PENDING]).order_by(*order))
    history = list(rows.order_by(*order)[:_HISTORY_ROWS])
    profiles: dict[int, dict[str, Any]] = {}

    def entry_of(release: Release) -> dict[str, Any]:
        return profiles.setdefault(
            release.profile_id, {"profile": release.profile, "heads": [], "history": [], "pending": []}
        )

    for release in current:
        entry = entry_of(release)
        entry["heads" if release.status == Release.Status.ACTIVE else "pending"].append(release)
    for release in history:
        entry_of(release)["history"].append(release)
    profiles = dict(sorted(profiles.items(), key=lambda item: item[1]["profile"].name))
    releases = history
    devices = dict(
        Device.objects.filter(revoked_at__isnull=True)
        .values("profile_id")
        .annotate(n=Count("pk"))
        .values_list("profile_id", "n")
    )
    for pk, entry in profiles.items():
        entry["devices"] = devices.get(pk, 0)
    audit = AuditEntry.objects.filter(target_type="release")[:50]
    return render(
        request,
        "dashboard/release_list.html",
        {"profiles": list(profiles.values()), "audit": audit, "releases": releases},
    )


def _change_release(request: HttpRequest) -> HttpResponse:
    if not is_staff(request.user):
        raise PermissionDenied("only staff change releases")
    raw = request.POST.get("release", "")
    release = get_object_or_404(Release, pk=int(raw) if raw.isascii() and raw.isdigit() else 0)
    version = f'"{request.POST.get("version", "")}"'
    try:
        if request.POST.get("action") == "rollback":
            rolled, active = rollback(release, by=request.user, if_match=version)
            restored = f"release {active.pk} is the head again" if active else "the alias has no release now"
            messages.success(request, f"Release {rolled.pk} ({rolled.alias}) rolled back: {restored}.")
        elif request.POST.get("action") == "rollout":
            try:
                percent = int(request.POST.get("rollout_percent", ""))
            except ValueError:
                percent = -1
            changed = set_rollout(release, percent, if_match=version, by=request.user)
            messages.success(
                request, f"Release {changed.pk} ({changed.alias}) now reaches {percent} % of devices."
            )
        else:
            messages.error(request, "Unknown action.")
    except ReleaseError as exc:
        messages.error(request, "; ".join(f"{k}: {v}" for k, v in exc.errors.items()))
    return redirect("dashboard:releases")
