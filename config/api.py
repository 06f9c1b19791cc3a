"""The REST API's router: one place lists every resource under /api/v1/."""

from rest_framework.routers import DefaultRouter

from devices.api import DeviceProfileViewSet, DeviceViewSet, EnrollmentKeyViewSet
from registry.api import (
    AuditViewSet,
    BaseModelViewSet,
    PackageViewSet,
    PlanningRunViewSet,
    ReleaseViewSet,
    VariantViewSet,
)

router = DefaultRouter()
router.register("devices/profiles", DeviceProfileViewSet, basename="deviceprofile")
router.register("devices", DeviceViewSet, basename="device")
router.register("enrollment-keys", EnrollmentKeyViewSet, basename="enrollmentkey")
router.register("models", BaseModelViewSet, basename="basemodel")
router.register("variants", VariantViewSet, basename="variant")
router.register("plans", PlanningRunViewSet, basename="planningrun")
router.register("packages", PackageViewSet, basename="package")
router.register("releases", ReleaseViewSet, basename="release")
router.register("audit", AuditViewSet, basename="audit")
