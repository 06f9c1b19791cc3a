"""Device profiles: what a class of devices offers the planner, with the source of every number."""

from __future__ import annotations

import re
import secrets
import uuid
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone
from django.utils.text import slugify

from accounts.models import hash_token
from devices.validation import KINDS, profile_errors
from planner.specs import DeviceSpec

if TYPE_CHECKING:
    from planner.cost import CostParams


def profile_slug(name: str) -> str:
    """The slug a profile named `name` gets (unique: "Pixel 8" and "pixel-8" collide)."""
    return slugify(name)[:140] or "device"


class DeviceProfile(models.Model):
    class Origin(models.TextChoices):
        CATALOG = "catalog", "catalog (public spec sheets)"
        MEASURED = "measured", "measured on the device"
        MANUAL = "manual", "entered by hand"

    name = models.CharField(max_length=120, unique=True)
    slug = models.SlugField(max_length=140, unique=True, editable=False)
    vendor = models.CharField(max_length=80)
    soc = models.CharField("SoC", max_length=120, blank=True)
    kind = models.CharField(max_length=16, choices=[(k, k) for k in KINDS], default="phone")
    ram_total_bytes = models.PositiveBigIntegerField("total RAM", help_text="installed RAM, bytes")
    ram_budget_bytes = models.PositiveBigIntegerField(
        "RAM budget for the model", help_text="RAM the model may use, bytes"
    )
    bandwidth_gbs = models.FloatField("memory bandwidth (GB/s)", help_text="peak DRAM bandwidth, 1e9 bytes/s")
    fp32_tflops = models.FloatField("fp32 TFLOPS", null=True, blank=True)
    fp16_tflops = models.FloatField("fp16 TFLOPS", null=True, blank=True)
    int8_tops = models.FloatField("int8 TOPS", null=True, blank=True)
    int4_tops = models.FloatField("int4 TOPS", null=True, blank=True)
    weight_formats = models.JSONField(default=list, help_text="weight formats the device runs natively")
    activation_formats = models.JSONField(
        default=list, help_text="activation formats the device runs natively"
    )
    fleet_share = models.FloatField(default=0.0, help_text="fraction of the active fleet (0–1)")
    sources = models.JSONField(
        default=dict, help_text="field name → URL or 'measured on <date> by <command>'"
    )
    notes = models.TextField(blank=True)
    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.MANUAL)
    measured_at = models.DateTimeField(null=True, blank=True)
    cost_params = models.JSONField(
        null=True,
        blank=True,
        help_text="fitted planner.cost.CostParams (to_dict form); empty = the uncalibrated defaults",
    )
    calibration = models.JSONField(
        default=dict,
        blank=True,
        help_text="last fit: observations, MAPE before/after, fitted_at, cost model version",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(ram_budget_bytes__lte=models.F("ram_total_bytes")),
                name="budget_within_total_ram",
            ),
            models.CheckConstraint(
                condition=models.Q(fleet_share__gte=0) & models.Q(fleet_share__lte=1),
                name="fleet_share_is_a_fraction",
            ),
            models.CheckConstraint(condition=models.Q(bandwidth_gbs__gt=0), name="bandwidth_positive"),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: object, **kwargs: object) -> None:
        self.slug = profile_slug(self.name)
        super().save(*args, **kwargs)  # type: ignore[arg-type]

    def clean(self) -> None:
        values = {f.name: getattr(self, f.name) for f in self._meta.concrete_fields}
        errors = profile_errors(values)
        if errors:
            raise ValidationError(errors)

    def to_device_spec(self) -> DeviceSpec:
        return DeviceSpec(
            name=self.name,
            ram_total_bytes=self.ram_total_bytes,
            ram_budget_bytes=self.ram_budget_bytes,
            bandwidth_gbs=self.bandwidth_gbs,
            fp32_tflops=self.fp32_tflops,
            fp16_tflops=self.fp16_tflops,
            int8_tops=self.int8_tops,
            int4_tops=self.int4_tops,
            weight_formats=tuple(self.weight_formats),
            activation_formats=tuple(self.activation_formats),
        )

    def cost_params_or_default(self) -> CostParams:
        """The profile's fitted cost-model parameters, or the uncalibrated defaults."""
        from planner.cost import CostParams  # pulls in torch: only where a cost is computed

        return CostParams.from_dict(self.cost_params) if self.cost_params else CostParams()

    @property
    def calibrated(self) -> bool:
        return bool(self.cost_params)

    @property
    def ram_total_gib(self) -> float:
        return self.ram_total_bytes / 1024**3

    @property
    def ram_budget_gib(self) -> float:
        return self.ram_budget_bytes / 1024**3


# --------------------------------------------------------------------------- enrolled devices

#: Raw secrets are shown once and stored only as SHA-256 digests (like accounts.ApiToken).
DEVICE_TOKEN_PREFIX = "efd_"
ENROLLMENT_KEY_PREFIX = "efe_"


#: A device token as `new_secret` makes it: the prefix and 43 URL-safe base64 characters.
DEVICE_TOKEN_RE = re.compile(r"efd_[A-Za-z0-9_-]{43}")
_BEARER = "Bearer "


def device_token_digest(header: str) -> str | None:
    """`hash_token` of the device token an `Authorization` header value carries, or None when
    it carries no well-formed one — checked before hashing, so garbage costs no lookup."""
    if not header.startswith(_BEARER):
        return None
    raw = header[len(_BEARER) :].strip()
    return hash_token(raw) if DEVICE_TOKEN_RE.fullmatch(raw) else None


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


class EnrollmentKey(models.Model):
    """Lets devices of one fleet enroll themselves; optionally pins the profile they get."""

    fleet = models.CharField(max_length=120, help_text="fleet the key enrolls devices into")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=12, editable=False, help_text="first characters, to recognise it")
    profile = models.ForeignKey(
        DeviceProfile,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="enrollment_keys",
        help_text="devices enrolled with this key get this profile (else they name one)",
    )
    channel = models.SlugField(max_length=40, default="stable", help_text="alias the devices follow")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.fleet} ({self.prefix}…)"

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class Device(models.Model):
    """One enrolled device: a member of a profile's fleet that fetches its config with a token.

    `last_seen_at` is written when the device reports (measurements, enrollment), never on the
    config path, which must not touch the database."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=120)
    profile = models.ForeignKey(DeviceProfile, on_delete=models.PROTECT, related_name="devices")
    channel = models.SlugField(max_length=40, default="stable", help_text="alias the device follows")
    enrollment_key = models.ForeignKey(
        EnrollmentKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="devices"
    )
    hardware = models.JSONField(default=dict, blank=True, help_text="what the device's probe reported")
    enrolled_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="staff member who pre-registered it (empty: enrolled with a key)",
    )
    created_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # NULL, not "": no key (the unique constraint below is partial on it).
    idempotency_key = models.CharField(  # noqa: DJ001
        max_length=100,
        null=True,
        blank=True,
        help_text="the enrollment's Idempotency-Key header: a retry with it gets this device",
    )
    request_digest = models.CharField(
        max_length=64, blank=True, default="", help_text="SHA-256 of the enrollment's canonical JSON body"
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["profile", "channel"])]
        constraints = [
            # Scoped by the enrollment key (the fleet): enrollment needs no token, so the key the
            # request proves it holds is what a repeat is looked up under.
            models.UniqueConstraint(
                fields=["enrollment_key", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="one_device_per_enrollment_idempotency_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class DeviceToken(models.Model):
    """`Authorization: Bearer efd_…`: what a device authenticates with. Revocable."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="tokens")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=12, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.device_id}: {self.prefix}…"

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class PendingInvalidation(models.Model):
    """A change to what the device config path serves whose cache invalidation is not known to
    be done: written in the change's own transaction (`devices.hotpath.note_change`), deleted
    once the shared cache's marker was replaced after the change committed.  A row that stays
    (the cache failed on commit, or the process died) is found by the web processes' periodic
    check, which replaces the marker then (`devices.hotpath.Store.verify`) — so an invalidation
    the cache missed is never lost, and no entry built before the change is served."""

    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"pending delivery invalidation {self.pk} ({self.created_at:%Y-%m-%d %H:%M:%S})"
