from __future__ import annotations

from typing import Any

from rest_framework import serializers

from devices.serializers import StrictFieldsMixin
from registry.models import AuditEntry, BaseModel, Package, PlanningRun, Release, Variant
from registry.planning import MAX_ID, MAX_SEED


class BaseModelSerializer(serializers.ModelSerializer):
    variant_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = BaseModel
        fields = [
            "id",
            "name",
            "slug",
            "kind",
            "adapter",
            "version",
            "description",
            "spec",
            "weights_sha256",
            "eval_dataset",
            "eval_dataset_sha256",
            "fp32_metrics",
            "tags",
            "variant_count",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class VariantSerializer(serializers.ModelSerializer):
    base_model: serializers.SlugRelatedField[BaseModel] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )

    class Meta:
        model = Variant
        fields = [
            "id",
            "base_model",
            "name",
            "plan",
            "plan_hash",
            "weight_bytes",
            "metrics",
            "metrics_source",
            "provenance",
            "tags",
            "created_at",
        ]
        read_only_fields = fields


class PlanningRunSerializer(serializers.ModelSerializer):
    progress_fraction = serializers.FloatField(read_only=True)
    device_profiles: serializers.PrimaryKeyRelatedField[Any] = serializers.PrimaryKeyRelatedField(
        many=True, read_only=True
    )

    class Meta:
        model = PlanningRun
        fields = [
            "id",
            "base_model",
            "device_profiles",
            "policy",
            "trials_per_device",
            "real_eval_budget",
            "sampler",
            "seed",
            "status",
            "cancel_requested",
            "trials_done",
            "trials_planned",
            "real_evaluations",
            "progress_fraction",
            "progress",
            "error",
            "attempts",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class PlanningRunCreateSerializer(StrictFieldsMixin, serializers.Serializer):
    """Input of POST /api/v1/plans/; the service validates the combination."""

    # Ids are bounded to the database's integer range: a bigger one overflows the query (500).
    base_model = serializers.IntegerField(min_value=1, max_value=MAX_ID)
    device_profiles = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID), allow_empty=True
    )
    policy = serializers.DictField()
    trials_per_device = serializers.IntegerField()
    real_eval_budget = serializers.IntegerField()
    sampler = serializers.CharField(default=PlanningRun.Sampler.NSGA2)
    # The search derives Optuna's seed from it, which must stay below 2**32 (see MAX_SEED).
    seed = serializers.IntegerField(default=0, min_value=0, max_value=MAX_SEED)

    def to_representation(self, instance: Any) -> Any:
        return PlanningRunSerializer(instance).data


class PackageSerializer(serializers.ModelSerializer):
    variant_name = serializers.CharField(source="variant.name", read_only=True)
    model = serializers.CharField(source="variant.base_model.slug", read_only=True)
    precision_summary = serializers.DictField(child=serializers.IntegerField(), read_only=True)
    urls = serializers.SerializerMethodField()

    class Meta:
        model = Package
        fields = [
            "id",
            "digest",
            "variant",
            "variant_name",
            "model",
            "blob_bytes",
            "blob_sha256",
            "predicted_bytes",
            "manifest_bytes",
            "signature",
            "key_id",
            "precision_summary",
            "build_seconds",
            "urls",
            "created_at",
        ]
        read_only_fields = fields

    def get_urls(self, package: Package) -> dict[str, str]:
        base = f"/api/v1/packages/{package.digest}"
        return {
            "manifest": f"{base}/manifest.json",
            "signature": f"{base}/manifest.sig",
            "blob": f"{base}/model.safetensors",
        }


class PackageDetailSerializer(PackageSerializer):
    class Meta(PackageSerializer.Meta):
        fields = [*PackageSerializer.Meta.fields, "manifest"]
        read_only_fields = fields


class ReleaseSerializer(serializers.ModelSerializer):
    profile: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )
    package_digest = serializers.CharField(source="package.digest", read_only=True, default=None)
    package_bytes = serializers.IntegerField(source="package.blob_bytes", read_only=True, default=None)
    variant_name = serializers.CharField(source="variant.name", read_only=True)
    created_by = serializers.SerializerMethodField()
    etag = serializers.CharField(read_only=True)

    class Meta:
        model = Release
        fields = [
            "id",
            "profile",
            "alias",
            "variant",
            "variant_name",
            "package_digest",
            "package_bytes",
            "rollout_percent",
            "seed",
            "status",
            "version",
            "etag",
            "previous",
            "error",
            "created_by",
            "created_at",
            "updated_at",
            "activated_at",
        ]
        read_only_fields = fields

    def get_created_by(self, release: Release) -> str | None:
        return release.created_by.get_username() if release.created_by else None


class ReleaseCreateSerializer(StrictFieldsMixin, serializers.Serializer):
    """Input of POST /api/v1/releases/; the service validates the combination."""

    variant = serializers.IntegerField()
    profile = serializers.CharField(help_text="device profile slug (or id)")
    alias = serializers.CharField(default="stable", max_length=40)
    rollout_percent = serializers.IntegerField(default=100)


class ReleasePatchSerializer(StrictFieldsMixin, serializers.Serializer):
    rollout_percent = serializers.IntegerField()


class RollbackSerializer(serializers.Serializer):
    rolled_back = ReleaseSerializer()
    active = ReleaseSerializer(allow_null=True)


class AuditEntrySerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor_label", read_only=True)

    class Meta:
        model = AuditEntry
        fields = [
            "id",
            "at",
            "actor",
            "action",
            "target_type",
            "target_id",
            "target_label",
            "before",
            "after",
        ]
        read_only_fields = fields


class MeasurementBodySerializer(serializers.Serializer):
    """The body of POST /api/v1/device/measurements (docs/delivery.md); validated by
    registry.measurements, which names the broken field."""

    package_digest = serializers.CharField()
    device_id = serializers.UUIDField(required=False)
    batch_size = serializers.IntegerField(min_value=1, max_value=1024)
    latency_p50_ms = serializers.FloatField()
    latency_p90_ms = serializers.FloatField()
    peak_memory_bytes = serializers.IntegerField(required=False, min_value=1, max_value=1 << 40)
    check_accuracy = serializers.FloatField(required=False, min_value=0, max_value=1)
    check_agreement = serializers.FloatField(required=False, min_value=0, max_value=1)
    check_examples = serializers.IntegerField(required=False, min_value=1)
    samples = serializers.ListField(child=serializers.DictField(), min_length=1, max_length=1024)
    runtime = serializers.DictField(required=False)
    measured_at = serializers.DateTimeField()


class MeasurementAcceptedSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    recalibration = serializers.CharField()
