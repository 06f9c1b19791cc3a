from __future__ import annotations

from typing import Any

from rest_framework import serializers

from devices.models import DeviceProfile
from devices.validation import profile_errors


class StrictFieldsMixin:
    """Reject unknown keys: a typo in a field name must not be silently ignored."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            writable = {name for name, field in self.fields.items() if not field.read_only}  # type: ignore[attr-defined]
            unknown = sorted(set(data) - writable)
            if unknown:
                raise serializers.ValidationError({name: ["unknown field"] for name in unknown})
        return super().to_internal_value(data)  # type: ignore[misc]


class DeviceProfileSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    ram_total_gib = serializers.FloatField(read_only=True)
    ram_budget_gib = serializers.FloatField(read_only=True)

    class Meta:
        model = DeviceProfile
        fields = [
            "id",
            "name",
            "slug",
            "vendor",
            "soc",
            "kind",
            "ram_total_bytes",
            "ram_budget_bytes",
            "ram_total_gib",
            "ram_budget_gib",
            "bandwidth_gbs",
            "fp32_tflops",
            "fp16_tflops",
            "int8_tops",
            "int4_tops",
            "weight_formats",
            "activation_formats",
            "fleet_share",
            "sources",
            "notes",
            "origin",
            "measured_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["slug", "origin", "measured_at", "created_at", "updated_at"]
        extra_kwargs = {
            "ram_total_bytes": {"min_value": 1},
            "ram_budget_bytes": {"min_value": 1},
            "weight_formats": {"required": True},
            "activation_formats": {"required": True},
            "sources": {"required": True},
        }

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # On PATCH, judge the profile as it would be after the change, not the fragment alone.
        values = {f: getattr(self.instance, f) for f in self.Meta.fields if hasattr(self.instance, f)}
        values.update(attrs)
        errors = profile_errors(values)
        if errors:
            raise serializers.ValidationError(errors)
        return attrs
