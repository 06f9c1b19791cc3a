from __future__ import annotations

import json
from typing import Any

from rest_framework import serializers

from devices.models import Device, DeviceProfile, EnrollmentKey, profile_slug
from devices.validation import profile_errors


class StrictFieldsMixin:
    """Reject unknown keys: a typo in a field name must not be silently ignored.

    A read-only field may be sent back with the value it has (a PUT of a GET body): it is then
    ignored.  Sent with another value — or on a create, where the server sets it — it is
    refused as read-only, rather than silently not applied."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            errors: dict[str, list[str]] = {}
            for name in sorted(data):
                field = self.fields.get(name)  # type: ignore[attr-defined]
                if field is None:
                    errors[name] = ["unknown field"]
                elif field.read_only:
                    problem = self._read_only_problem(name, field, data[name])
                    if problem:
                        errors[name] = [problem]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)  # type: ignore[misc]

    def _read_only_problem(self, name: str, field: serializers.Field, sent: Any) -> str | None:
        instance = getattr(self, "instance", None)
        if instance is None:
            return "read-only field: the server sets it"
        current = field.get_attribute(instance)
        current = None if current is None else field.to_representation(current)
        try:  # compared as the field reads it: "2026-01-02T03:04:05Z" and "…+00:00" are the same time
            echoed = None if sent is None else field.to_representation(field.to_internal_value(sent))
        except (serializers.ValidationError, NotImplementedError, TypeError, ValueError):
            echoed = sent
        if echoed == current:
            return None
        return f"read-only field: it is {json.dumps(current, default=str)}; send that value or leave it out"


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

    def validate_name(self, name: str) -> str:
        # The slug is derived from the name and unique too: names differing only in case or
        # punctuation ("Pixel 8", "pixel-8") would otherwise fail on the database constraint.
        slug = profile_slug(name)
        clash = DeviceProfile.objects.filter(slug=slug)
        if self.instance is not None:
            clash = clash.exclude(pk=self.instance.pk)
        taken = clash.values_list("name", flat=True).first()
        if taken is not None:
            raise serializers.ValidationError(
                f"its slug {slug!r} is taken by the profile {taken!r}: choose a name that differs in more "
                "than case, spaces or punctuation"
            )
        return name

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # On PATCH, judge the profile as it would be after the change, not the fragment alone.
        values = {f: getattr(self.instance, f) for f in self.Meta.fields if hasattr(self.instance, f)}
        values.update(attrs)
        errors = profile_errors(values)
        if errors:
            raise serializers.ValidationError(errors)
        return attrs

    def update(self, instance: DeviceProfile, validated_data: dict[str, Any]) -> DeviceProfile:
        # Only the fields the request changed (plus what `save` derives from them): saving every
        # field would write back the `cost_params` / `calibration` this request loaded, over a
        # re-fit a worker stored while it ran.
        for name, value in validated_data.items():
            setattr(instance, name, value)
        instance.save(update_fields=[*validated_data, "slug", "updated_at"])
        return instance


class DeviceSerializer(serializers.ModelSerializer):
    """An enrolled device as staff and viewers see it (never its token)."""

    profile: serializers.SlugRelatedField[DeviceProfile] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )
    fleet = serializers.SerializerMethodField()
    enrolled_by = serializers.SerializerMethodField()
    active = serializers.BooleanField(read_only=True)

    class Meta:
        model = Device
        fields = [
            "id",
            "name",
            "profile",
            "channel",
            "fleet",
            "hardware",
            "enrolled_by",
            "active",
            "created_at",
            "last_seen_at",
            "revoked_at",
        ]
        read_only_fields = fields

    def get_fleet(self, device: Device) -> str | None:
        return device.enrollment_key.fleet if device.enrollment_key else None

    def get_enrolled_by(self, device: Device) -> str | None:
        return device.enrolled_by.get_username() if device.enrolled_by else None


class DevicePreregisterSerializer(StrictFieldsMixin, serializers.Serializer):
    name = serializers.CharField(max_length=120)
    profile = serializers.CharField(help_text="device profile slug")
    channel = serializers.CharField(default="stable", max_length=40)


class DeviceCredentialsSerializer(serializers.Serializer):
    """The answer to enrollment and pre-registration: the token is shown this once."""

    device_id = serializers.UUIDField()
    token = serializers.CharField(help_text="efd_…; stored only as a hash, shown once")
    profile = serializers.CharField()
    channel = serializers.CharField()
    config_url = serializers.CharField()


class EnrollSerializer(StrictFieldsMixin, serializers.Serializer):
    # Not required here: without a valid key the answer is a 401, before any field is judged.
    enrollment_key = serializers.CharField(
        required=False, allow_blank=True, help_text="efe_… from POST /api/v1/enrollment-keys/"
    )
    name = serializers.CharField(max_length=120)
    profile = serializers.CharField(
        required=False, allow_blank=True, help_text="slug; optional if the key pins one"
    )
    hardware = serializers.DictField(required=False, help_text="the agent's hardware probe")


class EnrollmentKeySerializer(serializers.ModelSerializer):
    profile: serializers.SlugRelatedField[DeviceProfile] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )
    created_by = serializers.SerializerMethodField()
    active = serializers.BooleanField(read_only=True)
    devices = serializers.IntegerField(read_only=True, source="device_count")

    class Meta:
        model = EnrollmentKey
        fields = [
            "id",
            "fleet",
            "prefix",
            "profile",
            "channel",
            "active",
            "devices",
            "created_by",
            "created_at",
            "revoked_at",
        ]
        read_only_fields = fields

    def get_created_by(self, key: EnrollmentKey) -> str | None:
        return key.created_by.get_username() if key.created_by else None


class EnrollmentKeyCreateSerializer(StrictFieldsMixin, serializers.Serializer):
    fleet = serializers.CharField(max_length=120)
    profile = serializers.CharField(required=False, allow_blank=True, allow_null=True)
    channel = serializers.CharField(default="stable", max_length=40)


class EnrollmentKeyCreatedSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    key = serializers.CharField(help_text="efe_…; stored only as a hash, shown once")
    fleet = serializers.CharField()
    profile = serializers.CharField(allow_null=True)
    channel = serializers.CharField()
