from django.contrib import admin

from devices.models import Device, DeviceProfile, DeviceToken, EnrollmentKey


@admin.register(DeviceProfile)
class DeviceProfileAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "vendor",
        "soc",
        "kind",
        "ram_total_bytes",
        "bandwidth_gbs",
        "int8_tops",
        "origin",
    )
    list_filter = ("vendor", "kind", "origin")
    search_fields = ("name", "vendor", "soc")
    readonly_fields = ("slug", "created_at", "updated_at", "measured_at")


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = ("name", "id", "profile", "channel", "created_at", "last_seen_at", "revoked_at")
    list_filter = ("profile", "channel")
    search_fields = ("name", "id")
    list_select_related = ("profile",)
    readonly_fields = ("id", "created_at", "last_seen_at", "revoked_at", "revoked_by", "enrolled_by")


@admin.register(EnrollmentKey)
class EnrollmentKeyAdmin(admin.ModelAdmin):
    list_display = ("fleet", "prefix", "profile", "channel", "created_at", "revoked_at")
    readonly_fields = ("digest", "prefix", "created_at", "created_by")


@admin.register(DeviceToken)
class DeviceTokenAdmin(admin.ModelAdmin):
    list_display = ("device", "prefix", "created_at", "revoked_at")
    readonly_fields = ("device", "digest", "prefix", "created_at")
