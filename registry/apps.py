from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_save


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Model registry, plans and releases"

    def ready(self) -> None:
        from devices.models import DeviceProfile
        from devices.signals import audit_event
        from registry.audit import record_signal

        audit_event.connect(record_signal, dispatch_uid="registry-audit")
        # A renamed profile changes the slug in its devices' config answers.
        post_save.connect(_profile_saved, sender=DeviceProfile, dispatch_uid="registry-profile-saved")


def _profile_saved(sender: Any, instance: Any, created: bool = False, **kwargs: Any) -> None:
    if created:
        return
    from registry.delivery import forget_profile_on_commit

    forget_profile_on_commit(instance.pk)
