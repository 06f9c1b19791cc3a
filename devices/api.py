from __future__ import annotations

from rest_framework import viewsets

from devices.filters import DeviceProfileFilter
from devices.models import DeviceProfile
from devices.serializers import DeviceProfileSerializer

ORDERING_FIELDS = [
    "name",
    "vendor",
    "kind",
    "ram_total_bytes",
    "ram_budget_bytes",
    "bandwidth_gbs",
    "fp16_tflops",
    "int8_tops",
    "int4_tops",
    "fleet_share",
    "updated_at",
]


class DeviceProfileViewSet(viewsets.ModelViewSet):
    """Device profiles. Staff write; viewers read. Filter with ?vendor=, ?kind=, ?weight_format=,
    ?ram_total_bytes__gte=…; order with ?ordering=-bandwidth_gbs; search with ?search=."""

    queryset = DeviceProfile.objects.all()
    serializer_class = DeviceProfileSerializer
    filterset_class = DeviceProfileFilter
    ordering_fields = ORDERING_FIELDS
    ordering = ["name"]
    search_fields = ["name", "vendor", "soc"]
