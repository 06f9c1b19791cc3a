from django.contrib import admin

from registry.models import BaseModel, Measurement, Prediction, Variant


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
