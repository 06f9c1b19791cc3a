from django.contrib import admin

from devices.models import DeviceProfile


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
