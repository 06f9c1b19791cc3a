"""The REST API's router: one place lists every resource under /api/v1/."""

from rest_framework.routers import DefaultRouter

from devices.api import DeviceProfileViewSet
from registry.api import BaseModelViewSet, PlanningRunViewSet, VariantViewSet

router = DefaultRouter()
router.register("devices/profiles", DeviceProfileViewSet, basename="deviceprofile")
router.register("models", BaseModelViewSet, basename="basemodel")
router.register("variants", VariantViewSet, basename="variant")
router.register("plans", PlanningRunViewSet, basename="planningrun")
