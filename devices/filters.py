from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet

from devices.models import DeviceProfile
from devices.validation import FORMATS, KINDS


class DeviceProfileFilter(django_filters.FilterSet):
    vendor = django_filters.CharFilter(lookup_expr="iexact")
    kind = django_filters.ChoiceFilter(choices=[(k, k) for k in KINDS])
    origin = django_filters.ChoiceFilter(choices=DeviceProfile.Origin.choices)
    weight_format = django_filters.ChoiceFilter(
        choices=[(f, f) for f in FORMATS], method="filter_weight_format", label="supports weight format"
    )
    activation_format = django_filters.ChoiceFilter(
        choices=[(f, f) for f in FORMATS],
        method="filter_activation_format",
        label="supports activation format",
    )
    ram_total_bytes__gte = django_filters.NumberFilter(field_name="ram_total_bytes", lookup_expr="gte")
    ram_total_bytes__lte = django_filters.NumberFilter(field_name="ram_total_bytes", lookup_expr="lte")
    bandwidth_gbs__gte = django_filters.NumberFilter(field_name="bandwidth_gbs", lookup_expr="gte")
    int8_tops__gte = django_filters.NumberFilter(field_name="int8_tops", lookup_expr="gte")

    class Meta:
        model = DeviceProfile
        fields = ["vendor", "kind", "origin"]

    # JSON lists are matched on their quoted member so one query works on SQLite and PostgreSQL;
    # no format name is a quoted substring of another.
    def filter_weight_format(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return queryset.filter(weight_formats__icontains=f'"{value}"')

    def filter_activation_format(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return queryset.filter(activation_formats__icontains=f'"{value}"')
