from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class DevicesConfig(AppConfig):
    name = "devices"
    verbose_name = "Devices"

    def ready(self) -> None:
        from devices import schema  # noqa: F401  (registers the OpenAPI auth extension)
        from devices.models import Device, DeviceToken

        # The services invalidate what they change; these catch edits made elsewhere (the
        # admin, a shell) to a device or token the config path may have cached.  Creations
        # need nothing: a new token is not cached anywhere yet.
        post_save.connect(_device_changed, sender=Device, dispatch_uid="devices-device-saved")
        post_delete.connect(_device_changed, sender=Device, dispatch_uid="devices-device-deleted")
        post_save.connect(_token_changed, sender=DeviceToken, dispatch_uid="devices-token-saved")
        post_delete.connect(_token_changed, sender=DeviceToken, dispatch_uid="devices-token-deleted")


def _device_changed(sender: Any, instance: Any, created: bool = False, **kwargs: Any) -> None:
    if created:
        return
    from devices import hotpath
    from devices.models import DeviceToken

    digests = list(DeviceToken.objects.filter(device_id=instance.pk).values_list("digest", flat=True))
    hotpath.forget_tokens_on_commit(digests)


def _token_changed(sender: Any, instance: Any, created: bool = False, **kwargs: Any) -> None:
    if created:
        return
    from devices import hotpath

    digest = instance.digest
    hotpath.forget_tokens_on_commit([digest])
