from __future__ import annotations

import math
from typing import Any

import django_filters
from django.db.models import Count
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, Throttled, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from devices import hotpath, idempotency
from devices.api_errors import raise_for
from devices.authentication import DevicePrincipal, DeviceTokenAuthentication, IsDevice
from registry.measurements import MeasurementError, record_measurement
from registry.models import AuditEntry, BaseModel, Package, PlanningRun, Release, Variant
from registry.planning import MAX_ID, RunInputError, cancel_run, create_run
from registry.releases import ReleaseError, publish, rollback, set_rollout
from registry.serializers import (
    AuditEntrySerializer,
    BaseModelSerializer,
    MeasurementAcceptedSerializer,
    MeasurementBodySerializer,
    PackageDetailSerializer,
    PackageSerializer,
    PlanningRunCreateSerializer,
    PlanningRunSerializer,
    ReleaseCreateSerializer,
    ReleasePatchSerializer,
    ReleaseSerializer,
    RollbackSerializer,
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
        if after > MAX_ID:  # it becomes a SQL OFFSET (a bigint)
            raise ValidationError({"after": [f"must be at most {MAX_ID}"]})
        points = run.hypervolume_points.order_by("id")[after:]
        data["progress"] = {
            **(run.progress or {}),
            "hypervolume": [p.to_dict() for p in points],
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


class PackageViewSet(viewsets.ReadOnlyModelViewSet):
    """Built packages (content-addressed by the SHA-256 of their manifest). The files are at
    /api/v1/packages/<digest>/{manifest.json,manifest.sig,model.safetensors}."""

    queryset = Package.objects.select_related("variant__base_model")
    lookup_field = "digest"
    lookup_value_regex = "[0-9a-f]{64}"
    filterset_fields = ["variant"]
    ordering_fields = ["created_at", "blob_bytes"]
    ordering = ["-created_at"]

    def get_serializer_class(self) -> Any:
        return PackageDetailSerializer if self.action == "retrieve" else PackageSerializer


class ReleaseViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    """Releases: a variant published to a device profile under an alias with a rollout
    percentage. Staff publish, change the rollout (PATCH with `If-Match: "<version>"`) and
    roll back; viewers read. Every change is in /api/v1/audit/."""

    queryset = Release.objects.select_related("profile", "variant", "package", "created_by")
    serializer_class = ReleaseSerializer
    filterset_fields = ["profile", "alias", "status", "variant"]
    ordering_fields = ["created_at", "updated_at"]
    ordering = ["-created_at"]

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        release = self.get_object()
        return Response(ReleaseSerializer(release).data, headers={"ETag": release.etag})

    @extend_schema(request=ReleaseCreateSerializer, responses={201: ReleaseSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = ReleaseCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        profile: str | int = data.pop("profile")
        raw = request.data.get("profile") if isinstance(request.data, dict) else None
        if isinstance(raw, int) and not isinstance(raw, bool):
            profile = raw  # a JSON number is a profile id; a string is always a slug ("2024" too)
        try:
            release = publish(profile=profile, by=request.user, **data)
        except ReleaseError as exc:
            raise_for(exc.status, exc.errors)
        return Response(
            ReleaseSerializer(release).data, status=status.HTTP_201_CREATED, headers={"ETag": release.etag}
        )

    @extend_schema(
        request=ReleasePatchSerializer,
        responses=ReleaseSerializer,
        parameters=[
            OpenApiParameter(
                "If-Match", str, OpenApiParameter.HEADER, required=True, description='"<version>" (the ETag)'
            )
        ],
    )
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Change the rollout percentage. `If-Match` must carry the release's current ETag:
        a stale one gets 412, a missing one 428."""
        release = self.get_object()
        serializer = ReleasePatchSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            release = set_rollout(
                release,
                serializer.validated_data["rollout_percent"],
                if_match=request.headers.get("If-Match"),
                by=request.user,
            )
        except ReleaseError as exc:
            raise_for(exc.status, exc.errors)
        release = self.get_queryset().get(pk=release.pk)
        return Response(ReleaseSerializer(release).data, headers={"ETag": release.etag})

    @extend_schema(request=None, responses=RollbackSerializer)
    @action(detail=True, methods=["post"])
    def rollback(self, request: Request, pk: str | None = None) -> Response:
        """Roll the alias back to the release before this one (this one must be the head).
        An `If-Match` header, when sent, must name the current version."""
        try:
            rolled, active = rollback(
                self.get_object(), by=request.user, if_match=request.headers.get("If-Match")
            )
        except ReleaseError as exc:
            raise_for(exc.status, exc.errors)
        queryset = self.get_queryset()
        return Response(
            {
                "rolled_back": ReleaseSerializer(queryset.get(pk=rolled.pk)).data,
                "active": ReleaseSerializer(queryset.get(pk=active.pk)).data if active else None,
            }
        )


class AuditViewSet(viewsets.ReadOnlyModelViewSet):
    """The audit log: who changed what, when, before → after. Filter with ?action=,
    ?target_type=release&target_id=3."""

    queryset = AuditEntry.objects.all()
    serializer_class = AuditEntrySerializer
    filterset_fields = ["action", "target_type", "target_id"]
    ordering = ["-at", "-id"]
    ordering_fields = ["at"]


class MeasurementView(APIView):
    """A device reports what it measured running its package. Device token only; the device's
    own data only (a `device_id` naming another device is a 403)."""

    authentication_classes = [DeviceTokenAuthentication]
    permission_classes = [IsDevice]

    @extend_schema(
        request=MeasurementBodySerializer,
        parameters=[
            idempotency.openapi_parameter(
                "report", "is answered 200 with the stored measurement's id, nothing stored again"
            )
        ],
        responses={
            201: MeasurementAcceptedSerializer,
            200: OpenApiResponse(
                MeasurementAcceptedSerializer,
                description="a repeat of a stored report (same Idempotency-Key, same body): its answer",
            ),
            422: OpenApiResponse(description="the Idempotency-Key was already used for another body"),
        },
    )
    def post(self, request: Request) -> Response:
        principal = request.user
        assert isinstance(principal, DevicePrincipal)
        wait = hotpath.rate.hit(principal.token.digest)
        if wait is not None:
            raise Throttled(wait=max(1, math.ceil(wait)))
        key = idempotency.request_key(request)
        try:
            measurement, created = record_measurement(principal.device, request.data, idempotency_key=key)
        except MeasurementError as exc:
            raise_for(exc.status, exc.errors)
        answer = {"id": measurement.pk, "recalibration": "queued"}
        if not created:  # the first answer again: its re-fit was queued then
            return Response(answer, status=status.HTTP_200_OK, headers={idempotency.REPLAYED_HEADER: "true"})
        return Response(answer, status=status.HTTP_201_CREATED)
