from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import Count
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from registry.models import BaseModel, PlanningRun, Variant
from registry.planning import RunInputError, cancel_run, create_run
from registry.serializers import (
    BaseModelSerializer,
    PlanningRunCreateSerializer,
    PlanningRunSerializer,
    VariantSerializer,
)


class BaseModelViewSet(viewsets.ReadOnlyModelViewSet):
    """Registered base models with their spec and measured FP32 metrics."""

    queryset = BaseModel.objects.annotate(variant_count=Count("variants")).order_by("name")
    serializer_class = BaseModelSerializer
    filterset_fields = ["kind"]
    search_fields = ["name", "description"]
    ordering_fields = ["name", "created_at", "updated_at"]


class VariantFilter(django_filters.FilterSet):
    weight_bytes__lte = django_filters.NumberFilter(field_name="weight_bytes", lookup_expr="lte")
    weight_bytes__gte = django_filters.NumberFilter(field_name="weight_bytes", lookup_expr="gte")

    class Meta:
        model = Variant
        fields = ["base_model", "metrics_source"]


class VariantViewSet(viewsets.ReadOnlyModelViewSet):
    """Variants: a plan (precision per tensor, exit threshold) with its metrics and provenance."""

    queryset = Variant.objects.select_related("base_model")
    serializer_class = VariantSerializer
    filterset_class = VariantFilter
    ordering_fields = ["weight_bytes", "created_at", "name"]
    ordering = ["base_model", "weight_bytes"]
    search_fields = ["name", "plan_hash"]


class PlanningRunViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    """Fleet planning runs: create, list, retrieve, cancel, progress, per-device fronts."""

    queryset = PlanningRun.objects.select_related("base_model").prefetch_related("device_profiles")
    filterset_fields = ["status", "base_model"]
    ordering_fields = ["created_at", "status"]
    ordering = ["-created_at"]

    def get_serializer_class(self) -> Any:
        return PlanningRunCreateSerializer if self.action == "create" else PlanningRunSerializer

    @extend_schema(request=PlanningRunCreateSerializer, responses={201: PlanningRunSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = PlanningRunCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            run = create_run(**serializer.validated_data, created_by=request.user)
        except RunInputError as exc:
            raise ValidationError({k: [v] for k, v in exc.errors.items()}) from None
        return Response(PlanningRunSerializer(run).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=PlanningRunSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        run = cancel_run(self.get_object())
        return Response(PlanningRunSerializer(run).data)

    @extend_schema(responses=PlanningRunSerializer)
    @action(detail=True, methods=["get"])
    def progress(self, request: Request, pk: str | None = None) -> Response:
        """Progress only; `?after=N` returns hypervolume points after the N-th (live views)."""
        run = self.get_object()
        data = dict(PlanningRunSerializer(run).data)
        try:
            after = max(0, int(request.query_params.get("after", 0)))
        except ValueError:
            raise ValidationError({"after": ["must be a whole number"]}) from None
        history = (run.progress or {}).get("hypervolume", [])
        data["progress"] = {
            **(run.progress or {}),
            "hypervolume": history[after:],
            "hypervolume_offset": after,
        }
        return Response(data)

    @action(detail=True, methods=["get"], url_path=r"devices/(?P<device_id>\d+)")
    def device(self, request: Request, pk: str | None = None, device_id: str | None = None) -> Response:
        """The device's Pareto front and recommendation in this run."""
        run = self.get_object()
        per_device = (run.result or {}).get("devices", {})
        entry = per_device.get(str(device_id))
        if entry is None:
            if not run.device_profiles.filter(pk=device_id).exists():
                raise NotFound("this run does not plan for that device profile")
            return Response({"device_profile": int(device_id or 0), "status": run.status, "front": None})
        return Response(entry)
