"""Dashboard pages for engineers and product managers: overview, model, variant, device, compare.

Views only parse the request, call `registry.dashboard` (data) and `registry.figures` (charts)
and render; every table has a CSV twin that takes the same query string.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.paginator import EmptyPage, PageNotAnInteger, Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse

from accounts.decorators import viewer_required
from devices.charts import roofline_data, roofline_figure
from devices.models import DeviceProfile
from devices.views import profile_rows
from registry import dashboard as dash
from registry import figures as figs
from registry import studies
from registry.filters import SORT_FIELDS, filter_variants
from registry.models import BaseModel, Measurement, PlanningRun, Variant

PER_PAGE = 50
HEATMAP_MAX = 30


def _csv(filename: str, header: list[str], rows: Iterable[Iterable[Any]]) -> HttpResponse:
    response = HttpResponse(dash.csv_response_body(header, rows), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _csv_url(request: HttpRequest, name: str, *args: Any) -> str:
    query = request.GET.urlencode()
    return reverse(name, args=args) + (f"?{query}" if query else "")


# --------------------------------------------------------------------------- overview


@viewer_required
def overview(request: HttpRequest) -> HttpResponse:
    params = dash.Params(request.GET)
    data = dash.overview_data(params)
    return render(
        request,
        "dashboard/overview.html",
        {
            **data,
            "notices": params.notices,
            "csv_url": _csv_url(request, "dashboard:overview-csv"),
            "runs_exist": PlanningRun.objects.exists(),
        },
    )


@viewer_required
def overview_csv(request: HttpRequest) -> HttpResponse:
    data = dash.overview_data(dash.Params(request.GET))
    header, rows = dash.overview_csv_rows(data)
    return _csv("edgefit-overview.csv", header, rows)


# --------------------------------------------------------------------------- model page


def _variant_table(request: HttpRequest, model: BaseModel, notices: list[str]) -> dict[str, Any]:
    profiles = list(DeviceProfile.objects.order_by("name").only("pk", "name", "slug", "ram_budget_bytes"))
    by_slug = {p.slug: p for p in profiles}
    slug = str(request.GET.get("device", "") or "")
    device = by_slug.get(slug)
    if slug and device is None:
        notices.append(f"Device: unknown {slug[:40]!r}; showing no device figures.")
    data = request.GET.copy()
    if slug and device is None:
        data.pop("device", None)
    queryset, filterset = filter_variants(
        dash.variant_table_queryset(model, device),
        data,
        devices=[(p.slug, p.name) for p in profiles],
        device_chosen=device is not None,
        notices=notices,
    )
    return {"queryset": queryset, "filterset": filterset, "device": device, "profiles": profiles}


@viewer_required
def model_detail(request: HttpRequest, slug: str) -> HttpResponse:
    model = get_object_or_404(BaseModel, slug=slug)
    params = dash.Params(request.GET)
    notices = params.notices
    table = _variant_table(request, model, notices)
    paginator = Paginator(table["queryset"], PER_PAGE)
    raw_page = request.GET.get("page", "1")
    try:
        page = paginator.page(raw_page)
    except PageNotAnInteger:
        notices.append(f"Page {str(raw_page)[:20]!r} is not a number: showing page 1.")
        page = paginator.page(1)
    except EmptyPage:
        last = paginator.num_pages
        digits = str(raw_page).lstrip("-")
        if digits.isascii() and digits.isdigit() and int(raw_page) > last:
            notices.append(f"Page {raw_page} is past the last page: showing page {last}.")
            page = paginator.page(last)
        else:
            notices.append(f"Page {str(raw_page)[:20]!r} does not exist: showing page 1.")
            page = paginator.page(1)
    fp32 = dash.fp32_accuracy_of(model)
    rows = dash.variant_rows(page.object_list, fp32)

    selected_ids = params.ids("sel", label="Heatmap selection", limit=HEATMAP_MAX)
    if selected_ids:
        selected = list(Variant.objects.filter(base_model=model, pk__in=selected_ids))
        if len(selected) < len(selected_ids):
            notices.append("Heatmap selection: ids that are not variants of this model were ignored.")
        selected.sort(key=lambda v: selected_ids.index(v.pk))
    else:
        ids = [r["variant"].pk for r in rows[:20]]
        selected = sorted(Variant.objects.filter(pk__in=ids), key=lambda v: ids.index(v.pk))
    metric = params.choice("metric", ("kl", "disagreement", "cosine"), "kl", label="Sensitivity metric")

    figures = []
    tensors = (model.spec or {}).get("tensors", [])
    if selected and tensors:
        heat = figs.precision_heatmap_data(
            tensors, [{"id": v.pk, "name": v.name, "plan": v.plan} for v in selected]
        )
        figures.append({"id": "heatmap", "figure": figs.precision_heatmap_figure(heat)})
    sens = figs.sensitivity_data(model.sensitivity, metric)
    if sens:
        figures.append({"id": "sensitivity", "figure": figs.sensitivity_figure(sens)})
    exits = figs.exit_rate_data(
        list((model.spec or {}).get("exit_points", [])), dash.exit_variants(model, selected)
    )
    if exits["rows"]:
        figures.append({"id": "exits", "figure": figs.exit_rate_figure(exits)})

    query = request.GET.copy()
    query.pop("page", None)
    sort = str(request.GET.get("sort", "") or "")
    columns = []
    for key, (_, title) in SORT_FIELDS.items():
        q = query.copy()
        q["sort"] = f"-{key}" if sort == key else key
        arrow = " ▲" if sort == key else (" ▼" if sort == f"-{key}" else "")
        columns.append({"key": key, "title": title + arrow, "href": "?" + q.urlencode()})
    return render(
        request,
        "dashboard/model_detail.html",
        {
            "model": model,
            "fp32": fp32,
            "rows": rows,
            "page": page,
            "paginator": paginator,
            "filter": table["filterset"],
            "device": table["device"],
            "profiles": table["profiles"],
            "query": query.urlencode(),
            "columns": columns,
            "selected": selected,
            "metric": metric,
            "figures": figures,
            "has_sensitivity": bool(sens),
            "has_exits": bool(exits["rows"]),
            "notices": notices,
            "csv_url": _csv_url(request, "dashboard:model-variants-csv", model.slug),
            "run_count": model.planning_runs.count(),
        },
    )


@viewer_required
def model_variants_csv(request: HttpRequest, slug: str) -> HttpResponse:
    model = get_object_or_404(BaseModel, slug=slug)
    table = _variant_table(request, model, [])
    return _csv(
        f"edgefit-{model.slug}-variants.csv",
        dash.VARIANT_CSV_HEADER,
        dash.variant_csv_rows(table["queryset"].iterator(chunk_size=1000)),
    )


# --------------------------------------------------------------------------- variant page


def _plan_rows(model: BaseModel, variant: Variant) -> list[dict[str, Any]]:
    schemes = (variant.plan or {}).get("schemes") or {}
    rows = []
    for t in (model.spec or {}).get("tensors", []):
        s = schemes.get(t["name"]) or {}
        precision = s.get("precision", "fp32")
        shape = t.get("shape") or []
        params = 1
        for d in shape:
            params *= int(d)
        rows.append(
            {
                "name": t["name"],
                "kind": t.get("kind", ""),
                "block": t.get("block"),
                "shape": "×".join(str(d) for d in shape),
                "params": params,
                "precision": precision,
                "bits": figs.PRECISION_BITS.get(precision, 32),
                "group_size": s.get("group_size"),
                "method": s.get("method", "") if precision.startswith("int") else "",
                "symmetric": s.get("symmetric", True),
            }
        )
    return rows


@viewer_required
def variant_detail(request: HttpRequest, pk: int) -> HttpResponse:
    variant = get_object_or_404(Variant.objects.select_related("base_model"), pk=pk)
    model = variant.base_model
    fp32 = dash.fp32_accuracy_of(model)
    accuracy = (variant.metrics or {}).get("accuracy")
    devices = dash.variant_devices(variant)
    entries = dash.device_entries([model.pk])
    budgets = {
        pk: (budget, slug)
        for pk, budget, slug in DeviceProfile.objects.values_list("pk", "ram_budget_bytes", "slug")
    }
    recommended = []
    for (_, device_id), entry in entries.items():
        budget, device_slug = budgets.get(device_id, (0, ""))
        rec = dash.recommendation(entry, dash.run_policy(entry), fp32, budget)
        if rec.get("chosen") and rec["chosen"].get("variant") == variant.pk:
            recommended.append(device_slug)
    profiles = {p.slug: p for p in DeviceProfile.objects.filter(slug__in=[s for s in recommended if s])}
    host = list(Measurement.objects.filter(variant=variant, kind=Measurement.Kind.HOST)[:20])
    heat = figs.precision_heatmap_data(
        (model.spec or {}).get("tensors", []),
        [{"id": variant.pk, "name": variant.name, "plan": variant.plan}],
    )
    figures = (
        [{"id": "plan-heatmap", "figure": figs.precision_heatmap_figure(heat)}] if heat["tensors"] else []
    )
    return render(
        request,
        "dashboard/variant_detail.html",
        {
            "variant": variant,
            "model": model,
            "fp32": fp32,
            "accuracy": accuracy,
            "delta_points": (accuracy - fp32) * 100 if accuracy is not None else None,
            "plan_rows": _plan_rows(model, variant),
            "devices": devices,
            "recommended_for": [profiles[s] for s in recommended if s in profiles],
            "host_measurements": host,
            "delivery": dash.packages_for(variant),
            "figures": figures,
            "csv_url": reverse("dashboard:variant-devices-csv", args=[variant.pk]),
            "plan_csv_url": reverse("dashboard:variant-plan-csv", args=[variant.pk]),
        },
    )


@viewer_required
def variant_devices_csv(request: HttpRequest, pk: int) -> HttpResponse:
    variant = get_object_or_404(Variant, pk=pk)
    header = [
        "device",
        "predicted_latency_ms",
        "predicted_memory_bytes",
        "calibrated",
        "measured_p50_ms",
        "measured_p90_ms",
        "error_pct",
        "cost_model_version",
    ]
    rows = [
        [
            r["profile"].name,
            r["predicted_ms"],
            r["predicted_memory_bytes"],
            r["calibrated"],
            r["measured_p50_ms"],
            r["measured_p90_ms"],
            r["error_pct"],
            r["cost_model_version"],
        ]
        for r in dash.variant_devices(variant)
    ]
    return _csv(f"edgefit-variant-{variant.pk}-devices.csv", header, rows)


@viewer_required
def variant_plan_csv(request: HttpRequest, pk: int) -> HttpResponse:
    variant = get_object_or_404(Variant.objects.select_related("base_model"), pk=pk)
    rows = _plan_rows(variant.base_model, variant)
    header = [
        "tensor",
        "kind",
        "block",
        "shape",
        "params",
        "precision",
        "bits",
        "group_size",
        "method",
        "symmetric",
    ]
    return _csv(
        f"edgefit-variant-{variant.pk}-plan.csv",
        header,
        ([r["name"], *(r[k] for k in header[1:])] for r in rows),
    )


# --------------------------------------------------------------------------- device page


def _device_sections(
    profile: DeviceProfile, *, with_figures: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per model: the device's entry and recommendation under its run's policy and, unless
    `with_figures` is off (the CSV), the Pareto front chart with the search's trial points."""
    models = BaseModel.objects.order_by("name").only("pk", "name", "slug", "fp32_metrics")
    entries = dash.device_entries(device_ids=[profile.pk])
    trials_of = (
        studies.trial_points_many((e["run_id"], profile.pk) for e in entries.values()) if with_figures else {}
    )
    sections: list[dict[str, Any]] = []
    figures = []
    for model in models:
        entry = entries.get((model.pk, profile.pk))
        if entry is None:
            sections.append({"model": model, "entry": None, "rec": None})
            continue
        fp32 = dash.fp32_accuracy_of(model)
        policy = dash.run_policy(entry)
        rec = dash.recommendation(entry, policy, fp32, profile.ram_budget_bytes)
        if not with_figures:
            sections.append({"model": model, "entry": entry, "rec": rec})
            continue
        trials = trials_of[(entry["run_id"], profile.pk)]
        chosen = rec.get("chosen")
        data = figs.front_data(
            trials,
            entry["candidates"],
            rec.get("front_keys", []),
            chosen["key"] if chosen else None,
            set(rec.get("feasible_keys", [])),
        )
        chart_id = f"front-{model.pk}"
        figures.append(
            {
                "id": chart_id,
                "figure": figs.front_figure(data, f"{model.name} on {profile.name}: Pareto front"),
            }
        )
        section: dict[str, Any] = {
            "model": model,
            "entry": entry,
            "rec": rec,
            "chart_id": chart_id,
            "trial_count": len(trials),
            "policy": policy.describe(),
            "fp32": fp32,
        }
        sections.append(section)
    return sections, figures


@viewer_required
def device_detail(request: HttpRequest, slug: str) -> HttpResponse:
    profile = get_object_or_404(DeviceProfile, slug=slug)
    sections, figures = _device_sections(profile)
    # the fronts first: they are what a reader looks for, and the first drawn is the first seen
    figures.append({"id": "roofline", "figure": roofline_figure(roofline_data(profile))})
    pvm_rows = dash.predicted_vs_measured_rows(profile)
    pvm = figs.predicted_vs_measured_data(pvm_rows)
    if pvm["points"]:
        figures.append(
            {
                "id": "pvm",
                "figure": figs.predicted_vs_measured_figure(
                    pvm, f"Predicted vs measured latency on {profile.name}"
                ),
            }
        )
    return render(
        request,
        "dashboard/device_detail.html",
        {
            "profile": profile,
            "rows": profile_rows(profile),
            "sections": sections,
            "figures": figures,
            "pvm_rows": pvm["points"] or pvm_rows,
            "has_models": any(True for _ in sections),
            "csv_url": reverse("dashboard:device-csv", args=[profile.slug]),
        },
    )


@viewer_required
def device_csv(request: HttpRequest, slug: str) -> HttpResponse:
    profile = get_object_or_404(DeviceProfile, slug=slug)
    sections, _ = _device_sections(profile, with_figures=False)
    header = [
        "model",
        "status",
        "variant_id",
        "variant",
        "accuracy",
        "accuracy_source",
        "latency_ms",
        "latency_source",
        "memory_bytes",
        "binding",
        "reason",
        "run_id",
    ]
    rows = []
    for s in sections:
        rec = s["rec"] or {"status": "unplanned", "reason": "no finished planning run covers this device"}
        chosen = rec.get("chosen") or {}
        rows.append(
            [
                s["model"].name,
                rec["status"],
                chosen.get("variant") or "",
                chosen.get("label", ""),
                chosen.get("accuracy", ""),
                chosen.get("accuracy_source", ""),
                chosen.get("latency_ms", ""),
                chosen.get("latency_source", ""),
                chosen.get("memory_bytes", ""),
                rec.get("binding", ""),
                rec.get("reason", ""),
                (s["entry"] or {}).get("run_id", ""),
            ]
        )
        for n in rec.get("neighbours", []):
            rows.append(
                [
                    s["model"].name,
                    "neighbour",
                    n.get("variant") or "",
                    n["label"],
                    n["accuracy"],
                    n["accuracy_source"],
                    n["latency_ms"],
                    n["latency_source"],
                    n["memory_bytes"],
                    "",
                    "",
                    (s["entry"] or {}).get("run_id", ""),
                ]
            )
    return _csv(f"edgefit-{profile.slug}-recommendations.csv", header, rows)


# --------------------------------------------------------------------------- compare


def _compare(request: HttpRequest) -> tuple[dict[str, Any] | None, dash.Params, list[BaseModel]]:
    query = request.GET.copy()
    # Without JavaScript the form sends one pick_* value per ticked box.
    for name, target in (("pick_device", "devices"), ("pick_variant", "variants")):
        if name in query:
            query[target] = ",".join(query.getlist(name))
    params = dash.Params(query)
    models = list(BaseModel.objects.order_by("name").only("pk", "name", "slug", "fp32_metrics"))
    if not models:
        return None, params, models
    slugs = [m.slug for m in models]
    default = slugs[0]
    planned = set(
        PlanningRun.objects.filter(status=PlanningRun.Status.DONE).values_list("base_model__slug", flat=True)
    )
    for s in slugs:
        if s in planned:
            default = s
            break
    slug = params.choice("model", slugs, default, label="Model")
    model = next(m for m in models if m.slug == slug)
    return dash.compare_data(model, params), params, models


@viewer_required
def compare(request: HttpRequest) -> HttpResponse:
    data, params, models = _compare(request)
    return render(
        request,
        "dashboard/compare.html",
        {
            **(data or {}),
            "data": data,
            "models": models,
            "notices": params.notices,
            "csv_url": _csv_url(request, "dashboard:compare-csv"),
            "csv_base": reverse("dashboard:compare-csv"),
        },
    )


@viewer_required
def compare_csv(request: HttpRequest) -> HttpResponse:
    data, _, _ = _compare(request)
    if data is None:
        return _csv("edgefit-compare.csv", ["device"], [])
    header, rows = dash.compare_csv_rows(data)
    return _csv(f"edgefit-compare-{data['model'].slug}.csv", header, rows)
