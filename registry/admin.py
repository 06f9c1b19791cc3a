from typing import Any

from django.contrib import admin

from registry.models import AuditEntry, BaseModel, Measurement, Package, Prediction, Release, Variant


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "adapter", "version", "updated_at")
    list_filter = ("kind",)
    search_fields = ("name",)
    readonly_fields = ("slug", "created_at", "updated_at")


@admin.register(Variant)
class VariantAdmin(admin.ModelAdmin):
    list_display = ("name", "base_model", "weight_bytes", "metrics_source", "created_at")
    list_filter = ("base_model", "metrics_source")
    search_fields = ("name", "plan_hash")
    list_select_related = ("base_model",)


@admin.register(Measurement)
class MeasurementAdmin(admin.ModelAdmin):
    list_display = ("variant", "kind", "host", "batch_size", "latency_p50_s", "measured_at")
    list_filter = ("kind",)
    list_select_related = ("variant", "variant__base_model")


@admin.register(Prediction)
class PredictionAdmin(admin.ModelAdmin):
    list_display = (
        "variant",
        "device_profile",
        "batch_size",
        "latency_s",
        "memory_bytes",
        "cost_model_version",
    )
    list_select_related = ("variant", "device_profile")


@admin.register(Package)
class PackageAdmin(admin.ModelAdmin):
    list_display = ("digest", "variant", "blob_bytes", "key_id", "build_seconds", "created_at")
    list_select_related = ("variant",)
    search_fields = ("digest",)
    readonly_fields = [f.name for f in Package._meta.fields]

    # Content-addressed and referenced by releases, measurements and devices' downloads.
    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Release)
class ReleaseAdmin(admin.ModelAdmin):
    """Read-only here: release changes go through the API or the releases page (audited)."""

    list_display = ("pk", "profile", "alias", "variant", "rollout_percent", "status", "version", "created_at")
    list_filter = ("status", "alias", "profile")
    list_select_related = ("profile", "variant")
    readonly_fields = [f.name for f in Release._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False

    # A deletion would be unaudited, leave devices' cached config stale and break the
    # `previous` chain rollbacks follow: retire a release by rolling it back instead.
    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ("at", "actor_label", "action", "target_type", "target_id")
    list_filter = ("action", "target_type")
    readonly_fields = [f.name for f in AuditEntry._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False
