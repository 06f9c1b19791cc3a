"""The model page's variants table: filters and sort keys (django-filter), bad values tolerated.

The queryset comes from `registry.dashboard.variant_table_queryset` (accuracy as a number and,
for the chosen device, predicted and measured latency annotated), so every filter and sort runs
in SQL and a page of rows is one query however many variants there are.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import django_filters
from django.db.models import Q, QuerySet
from django.db.models.functions import Coalesce

from registry.dashboard import MIB
from registry.models import Variant

__all__ = ["SORT_FIELDS", "VariantTableFilter", "filter_variants"]

#: query value → (annotation / field, column title)
SORT_FIELDS: dict[str, tuple[str, str]] = {
    "name": ("name", "Variant"),
    "size": ("weight_bytes", "Size (MiB, written)"),
    "accuracy": ("accuracy", "Accuracy (%)"),
    "latency": ("latency_s", "Latency (ms)"),
    "source": ("metrics_source", "Accuracy source"),
    "created": ("created_at", "Created"),
}


class VariantTableFilter(django_filters.FilterSet):
    q = django_filters.CharFilter(method="filter_q", label="Search", max_length=100)
    device = django_filters.ChoiceFilter(method="filter_noop", label="Device", choices=[])
    source = django_filters.ChoiceFilter(
        field_name="metrics_source", choices=Variant.Source.choices, label="Accuracy"
    )
    provenance = django_filters.CharFilter(lookup_expr="icontains", label="Provenance", max_length=100)
    size_min = django_filters.NumberFilter(method="filter_size_min", label="Size ≥ (MiB)", min_value=0)
    size_max = django_filters.NumberFilter(method="filter_size_max", label="Size ≤ (MiB)", min_value=0)
    acc_min = django_filters.NumberFilter(
        method="filter_acc_min", label="Accuracy ≥ (%)", min_value=0, max_value=100
    )
    acc_max = django_filters.NumberFilter(
        method="filter_acc_max", label="Accuracy ≤ (%)", min_value=0, max_value=100
    )
    latency_max = django_filters.NumberFilter(
        method="filter_latency_max", label="Latency ≤ (ms, on the device)", min_value=0
    )
    sort = django_filters.OrderingFilter(
        fields=[(field, key) for key, (field, _) in SORT_FIELDS.items()], label="Sort"
    )

    class Meta:
        model = Variant
        fields: list[str] = []

    def __init__(self, *args: Any, devices: list[tuple[str, str]] = (), **kwargs: Any) -> None:  # type: ignore[assignment]
        super().__init__(*args, **kwargs)
        self.filters["device"].extra["choices"] = list(devices)

    def filter_noop(self, queryset: QuerySet[Any], name: str, value: Any) -> QuerySet[Any]:
        return queryset  # the device is applied by the annotations of the base queryset

    def filter_q(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return queryset.filter(
            Q(name__icontains=value) | Q(plan_hash__istartswith=value) | Q(tags__icontains=value)
        )

    def filter_size_min(self, queryset: QuerySet[Any], name: str, value: Decimal) -> QuerySet[Any]:
        return queryset.filter(weight_bytes__gte=int(float(value) * MIB))

    def filter_size_max(self, queryset: QuerySet[Any], name: str, value: Decimal) -> QuerySet[Any]:
        return queryset.filter(weight_bytes__lte=int(float(value) * MIB))

    def filter_acc_min(self, queryset: QuerySet[Any], name: str, value: Decimal) -> QuerySet[Any]:
        return queryset.filter(accuracy__gte=float(value) / 100)

    def filter_acc_max(self, queryset: QuerySet[Any], name: str, value: Decimal) -> QuerySet[Any]:
        return queryset.filter(accuracy__lte=float(value) / 100)

    def filter_latency_max(self, queryset: QuerySet[Any], name: str, value: Decimal) -> QuerySet[Any]:
        return queryset.filter(latency_s__lte=float(value) / 1000)


def filter_variants(
    queryset: QuerySet[Variant],
    data: Mapping[str, Any],
    *,
    devices: list[tuple[str, str]],
    device_chosen: bool,
    notices: list[str],
) -> tuple[QuerySet[Variant], VariantTableFilter]:
    """Apply the table's filters; a malformed value is dropped with a notice (never an error)."""
    params = {k: data.get(k) for k in data if k != "page"}
    queryset = queryset.annotate(latency_s=Coalesce("measured_p50_s", "pred_latency_s"))
    if not device_chosen:
        for key in ("latency_max",):
            if params.get(key):
                notices.append(
                    "Latency filter: pick a device first (latency depends on the device); ignored."
                )
                params.pop(key)
        if str(params.get("sort", "")).lstrip("-") == "latency":
            notices.append("Sort by latency: pick a device first; sorted by size.")
            params["sort"] = "size"
    filterset = VariantTableFilter(params, queryset=queryset, devices=devices)
    if not filterset.is_valid():
        for name, errors in filterset.errors.items():
            label = filterset.filters[name].label if name in filterset.filters else name
            shown = str(params.get(name, ""))[:40]
            notices.append(f"{label}: {shown!r} ignored ({'; '.join(str(e) for e in errors)}).")
            params.pop(name, None)
        filterset = VariantTableFilter(params, queryset=queryset, devices=devices)
        filterset.is_valid()
    result = filterset.qs
    if not params.get("sort"):
        result = result.order_by("weight_bytes", "pk")
    else:
        result = result.order_by(*result.query.order_by, "pk")
    return result, filterset
