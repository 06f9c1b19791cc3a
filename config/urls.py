from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from config.api import router
from config.views import LoginView, health, ping
from devices.api import EnrollView
from registry.api import MeasurementView
from registry.device_views import device_config, package_file, signing_key

urlpatterns = [
    # The device hot path first: the fewest patterns tried before it matches.
    # (DevicePathMiddleware answers the first two before URL resolution; listed for reverse().)
    path("api/v1/device/config", device_config, name="device-config"),
    path("api/v1/ping", ping, name="ping"),
    path("api/v1/device/enroll", EnrollView.as_view(), name="device-enroll"),
    path("api/v1/device/measurements", MeasurementView.as_view(), name="device-measurements"),
    path("api/v1/signing-key", signing_key, name="signing-key"),
    re_path(
        r"^api/v1/packages/(?P<digest>[0-9a-f]{64})/(?P<name>manifest\.json|manifest\.sig|model\.safetensors)$",
        package_file,
        name="package-file",
    ),
    path("", RedirectView.as_view(pattern_name="dashboard:overview", permanent=False)),
    path("login/", LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("health/", health, name="health"),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/v1/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/v1/redoc/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-redoc"),
    path("api/v1/", include(router.urls)),
    path("", include(("config.dashboard_urls", "dashboard"))),
]
