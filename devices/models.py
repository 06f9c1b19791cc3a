"""Device profiles: what a class of devices offers the planner, with the source of every number."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models
from django.utils.text import slugify

from devices.validation import KINDS, profile_errors
from planner.specs import DeviceSpec


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
        self.slug = slugify(self.name)[:140] or "device"
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

    @property
    def ram_total_gib(self) -> float:
        return self.ram_total_bytes / 1024**3

    @property
    def ram_budget_gib(self) -> float:
        return self.ram_budget_bytes / 1024**3
