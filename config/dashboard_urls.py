from django.urls import path

from devices import views as device_views
from registry import pages
from registry import views as registry_views

urlpatterns = [
    path("overview/", pages.overview, name="overview"),
    path("overview.csv", pages.overview_csv, name="overview-csv"),
    path("devices/", device_views.device_list, name="devices"),
    path("devices/<slug:slug>/", pages.device_detail, name="device"),
    path("devices/<slug:slug>/recommendations.csv", pages.device_csv, name="device-csv"),
    path("models/", registry_views.model_list, name="models"),
    path("models/<slug:slug>/", pages.model_detail, name="model"),
    path("models/<slug:slug>/variants.csv", pages.model_variants_csv, name="model-variants-csv"),
    path("variants/<int:pk>/", pages.variant_detail, name="variant"),
    path("variants/<int:pk>/devices.csv", pages.variant_devices_csv, name="variant-devices-csv"),
    path("variants/<int:pk>/plan.csv", pages.variant_plan_csv, name="variant-plan-csv"),
    path("compare/", pages.compare, name="compare"),
    path("compare.csv", pages.compare_csv, name="compare-csv"),
    path("plans/", registry_views.plan_list, name="plans"),
    path("plans/<int:pk>/", registry_views.plan_detail, name="plan"),
    path("plans/<int:pk>/figures/", registry_views.plan_figures, name="plan-figures"),
    path("releases/", registry_views.release_list, name="releases"),
]
