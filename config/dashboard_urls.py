from django.urls import path

from devices import views as device_views
from registry import views as registry_views

urlpatterns = [
    path("devices/", device_views.device_list, name="devices"),
    path("devices/<slug:slug>/", device_views.device_detail, name="device"),
    path("models/", registry_views.model_list, name="models"),
    path("plans/", registry_views.plan_list, name="plans"),
    path("plans/<int:pk>/", registry_views.plan_detail, name="plan"),
    path("plans/<int:pk>/figures/", registry_views.plan_figures, name="plan-figures"),
    path("releases/", registry_views.release_list, name="releases"),
]
