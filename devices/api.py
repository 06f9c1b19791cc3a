from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Count, ProtectedError, RestrictedError
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, mixins, permissions, status, views, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from devices import idempotency
from devices.api_errors import Conflict, raise_for
from devices.enrollment import (
    EnrollmentError,
    check_enrollment_key,
    create_enrollment_key,
    enroll_device,
    preregister_device,
    revoke_device,
    revoke_enrollment_key,
)
from devices.filters import DeviceProfileFilter
from devices.models import Device, DeviceProfile, EnrollmentKey
from devices.serializers import (
    DeviceCredentialsSerializer,
    DevicePreregisterSerializer,
    DeviceProfileSerializer,
    DeviceSerializer,
    EnrollmentKeyCreatedSerializer,
    EnrollmentKeyCreateSerializer,
    EnrollmentKeySerializer,
    EnrollSerializer,
)

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

    def perform_create(self, serializer: Any) -> None:
        _save_profile(serializer)

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """PUT / PATCH: the request is validated and saved with the profile's row locked, against
        the row as it is then — a change committed meanwhile is judged with, never against a
        copy loaded before it (two PATCHes each valid alone may not be valid together)."""
        partial = kwargs.pop("partial", False)
        profile = self.get_object()  # permissions, 404
        with transaction.atomic():
            locked = DeviceProfile.objects.select_for_update().filter(pk=profile.pk).first()
            if locked is None:  # deleted meanwhile
                raise exceptions.NotFound()
            serializer = self.get_serializer(locked, data=request.data, partial=partial)
            serializer.is_valid(raise_exception=True)
            _save_profile(serializer)
        return Response(serializer.data)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Delete an unused profile; 409 naming what still uses it otherwise."""
        profile = self.get_object()
        with transaction.atomic():
            refused = _references(profile)
            if not refused:
                try:
                    profile.delete()
                except (ProtectedError, RestrictedError):
                    # A device enrolled between the check and the delete.
                    refused = _references(profile) or ["rows added meanwhile"]
        if refused:
            raise Conflict({"profile": [f"still used by {', '.join(refused)}: remove or move those first"]})
        return Response(status=status.HTTP_204_NO_CONTENT)


#: A profile's database constraints that validation checks too: one broken at save time was
#: broken together with a request that committed in between.  (constraint, field, message)
_NAME_TAKEN = "a profile with this name (or its slug) was created at the same moment"
_CONSTRAINTS = [
    ("budget_within_total_ram", "ram_budget_bytes", "must not exceed ram_total_bytes (changed meanwhile)"),
    ("fleet_share_is_a_fraction", "fleet_share", "must be a fraction from 0 to 1"),
    ("bandwidth_positive", "bandwidth_gbs", "must be greater than 0"),
    # Unique columns: PostgreSQL names the constraint <table>_<column>_key, SQLite <table>.<column>.
    ("devices_deviceprofile_name", "name", _NAME_TAKEN),
    ("devices_deviceprofile.name", "name", _NAME_TAKEN),
    ("devices_deviceprofile_slug", "name", _NAME_TAKEN),
    ("devices_deviceprofile.slug", "name", _NAME_TAKEN),
]


def _save_profile(serializer: Any) -> None:
    try:
        with transaction.atomic():
            serializer.save()
    except IntegrityError as exc:
        found = _broken_constraint(exc)
        if found is None:
            raise  # not one validation knows about: a bug to see, not a message to guess
        field, message = found
        raise exceptions.ValidationError({field: [message]}) from None


def _broken_constraint(exc: IntegrityError) -> tuple[str, str] | None:
    """The field and message of the profile constraint `exc` reports: by the constraint's name
    (PostgreSQL's diagnostics), else as the message names it (SQLite)."""
    diag = getattr(exc.__cause__, "diag", None)
    text = f"{getattr(diag, 'constraint_name', None) or ''} {exc}"
    for constraint, field, message in _CONSTRAINTS:
        if constraint in text:
            return field, message
    return None


def _references(profile: DeviceProfile) -> list[str]:
    """What deleting `profile` would break: devices and enrollment keys protect it; releases,
    planning runs and predictions would be silently deleted (or lose the device) with it."""
    counts = [
        (profile.devices.count(), "enrolled device(s)"),
        (profile.enrollment_keys.count(), "enrollment key(s) that pin it"),
        (profile.releases.count(), "release(s), which would be deleted with it"),
        (profile.planning_runs.count(), "planning run(s), which would lose its results"),
        (profile.predictions.count(), "prediction(s), which would be deleted with it"),
    ]
    return [f"{n} {what}" for n, what in counts if n]


class DeviceViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    """Enrolled devices. Staff pre-register (the answer carries the token, shown once) and
    revoke; viewers read. Filter with ?profile=<id>, ?channel=, ?revoked=true|false."""

    queryset = Device.objects.select_related("profile", "enrollment_key", "enrolled_by")
    serializer_class = DeviceSerializer
    lookup_value_regex = "[0-9a-fA-F-]{36}"
    filterset_fields = ["profile", "channel"]
    ordering_fields = ["created_at", "last_seen_at", "name"]
    ordering = ["-created_at"]
    search_fields = ["name"]

    def get_queryset(self) -> Any:
        queryset = super().get_queryset()
        revoked = self.request.query_params.get("revoked")
        if revoked in ("true", "false"):
            queryset = queryset.filter(revoked_at__isnull=revoked == "false")
        return queryset

    @extend_schema(request=DevicePreregisterSerializer, responses={201: DeviceCredentialsSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = DevicePreregisterSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            answer = preregister_device(**serializer.validated_data, by=request.user)
        except EnrollmentError as exc:
            raise_for(exc.status, exc.errors)
        return Response(answer, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=DeviceSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        """Revoke the device and all its tokens: its next request gets a 401."""
        device = revoke_device(self.get_object(), by=request.user)
        return Response(DeviceSerializer(device).data)


class EnrollmentKeyViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    """Enrollment keys, one per fleet (the key is shown once, at creation). Staff create and
    revoke; viewers read."""

    queryset = EnrollmentKey.objects.select_related("profile", "created_by").annotate(
        device_count=Count("devices")
    )
    serializer_class = EnrollmentKeySerializer
    ordering = ["-created_at"]
    ordering_fields = ["created_at", "fleet"]
    filterset_fields = ["profile"]

    @extend_schema(request=EnrollmentKeyCreateSerializer, responses={201: EnrollmentKeyCreatedSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = EnrollmentKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            key, raw = create_enrollment_key(**serializer.validated_data, created_by=request.user)
        except EnrollmentError as exc:
            raise_for(exc.status, exc.errors)
        body = {
            "id": key.pk,
            "key": raw,
            "fleet": key.fleet,
            "profile": key.profile.slug if key.profile else None,
            "channel": key.channel,
        }
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=EnrollmentKeySerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        """Revoke the key: no new device enrolls with it (enrolled devices keep their tokens)."""
        revoke_enrollment_key(self.get_object(), by=request.user)
        return Response(EnrollmentKeySerializer(self.get_object()).data)


class EnrollView(views.APIView):
    """A device enrolls with its fleet's enrollment key and receives its id and token."""

    authentication_classes: list[Any] = []
    permission_classes = [permissions.AllowAny]

    @extend_schema(
        request=EnrollSerializer,
        parameters=[
            idempotency.openapi_parameter(
                "enrollment",
                "within 24 hours is answered 200 with the same device and a new token (the first "
                "token is revoked: its answer was lost, and tokens are stored only hashed)",
            )
        ],
        responses={
            201: DeviceCredentialsSerializer,
            200: OpenApiResponse(
                DeviceCredentialsSerializer,
                description=(
                    "a repeat (same Idempotency-Key, same body): the same device with a new token; "
                    "the token of the first answer is revoked"
                ),
            ),
            409: OpenApiResponse(
                description="the Idempotency-Key's device was revoked, or enrolled over 24 hours ago"
            ),
            422: OpenApiResponse(description="the Idempotency-Key was already used for another body"),
        },
        auth=[],
    )
    def post(self, request: Request) -> Response:
        serializer = EnrollSerializer(data=request.data)
        try:
            # The key first (a 401 before any field is judged), checked once: its row is handed on.
            key = check_enrollment_key(
                request.data.get("enrollment_key") if isinstance(request.data, dict) else None
            )
            idempotency_key = idempotency.request_key(request)
            serializer.is_valid(raise_exception=True)
            answer, created = enroll_device(
                **{**serializer.validated_data, "enrollment_key": key, "idempotency_key": idempotency_key}
            )
        except EnrollmentError as exc:
            if exc.status == 401:
                # (DRF would turn AuthenticationFailed into 403: this view has no authenticator.)
                errors = {k: [v] for k, v in exc.errors.items()}
                return Response(
                    {"detail": next(iter(exc.errors.values())), "errors": errors},
                    status=status.HTTP_401_UNAUTHORIZED,
                    headers={"WWW-Authenticate": 'Bearer realm="enrollment"'},
                )
            raise_for(exc.status, exc.errors)
        if not created:
            return Response(answer, status=status.HTTP_200_OK, headers={idempotency.REPLAYED_HEADER: "true"})
        return Response(answer, status=status.HTTP_201_CREATED)
