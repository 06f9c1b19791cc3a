from __future__ import annotations

from typing import Any

from rest_framework import serializers

from devices.serializers import StrictFieldsMixin
from registry.models import BaseModel, PlanningRun, Variant


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

    base_model = serializers.IntegerField()
    device_profiles = serializers.ListField(child=serializers.IntegerField(), allow_empty=True)
    policy = serializers.DictField()
    trials_per_device = serializers.IntegerField()
    real_eval_budget = serializers.IntegerField()
    sampler = serializers.CharField(default=PlanningRun.Sampler.NSGA2)
    seed = serializers.IntegerField(default=0, min_value=0)

    def to_representation(self, instance: Any) -> Any:
        return PlanningRunSerializer(instance).data
