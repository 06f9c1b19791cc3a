"""The REST API's router: one place lists every resource under /api/v1/."""

from rest_framework.routers import DefaultRouter

from devices.api import DeviceProfileViewSet

router = DefaultRouter()
router.register("devices/profiles", DeviceProfileViewSet, basename="deviceprofile")
