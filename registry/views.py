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
from registry.charts import hypervolume_figure, pareto_data, pareto_figure
from registry.forms import PlanningRunForm
from registry.models import BaseModel, PlanningRun
from registry.planning import RunInputError, cancel_run, create_run


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
    runs = PlanningRun.objects.select_related("base_model").annotate(devices=Count("device_profiles"))[:100]
    return render(request, "dashboard/plan_list.html", {"runs": runs, "form": form})


def _device_figures(run: PlanningRun) -> list[dict[str, Any]]:
    """One Pareto figure per device: all trials (estimated; infeasible greyed) and, once the
    run is confirmed, the measured front with the recommended variant marked."""
    key = f"edgefit:run-figures:{run.pk}:{run.status}:{run.trials_done}:{run.real_evaluations}"
    cached = cache.get(key)
    if cached is not None:
        return list(cached)
    # The fleet module pulls in torch and optuna: load it on the first chart, not at start-up.
    from registry import fleet

    figures = []
    results = (run.result or {}).get("devices", {})
    for profile in run.device_profiles.order_by("name"):
        entry = results.get(str(profile.pk), {})
        chosen = (entry.get("recommendation") or {}).get("chosen")
        data = pareto_data(
            fleet.device_trials(run, profile.pk), entry.get("front", []), chosen and chosen["key"]
        )
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
    history = (run.progress or {}).get("hypervolume", [])
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
            "history_len": len(history),
        },
    )


@viewer_required
def plan_figures(request: HttpRequest, pk: int) -> JsonResponse:
    """The per-device figures of a run, for the live page (Plotly.react without a reload)."""
    run = get_object_or_404(PlanningRun, pk=pk)
    profiles = {str(p.pk): p.name for p in run.device_profiles.all()}
    history = (run.progress or {}).get("hypervolume", [])
    figures = [{"id": "hypervolume", "figure": hypervolume_figure(history, profiles)}, *_device_figures(run)]
    return JsonResponse({"status": run.status, "figures": figures})


@viewer_required
def release_list(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/release_list.html", {"releases": []})
