"""The audit log: who changed what, when, before → after.

`record` is called by the registry's services inside the transaction of the change; changes
made in `devices` arrive through `devices.signals.audit_event` (connected in RegistryConfig).
"""

from __future__ import annotations

from typing import Any

from django.db import models

from registry.models import AuditEntry

__all__ = ["record", "record_signal"]


def _actor(actor: Any) -> tuple[Any, str]:
    if actor is None or not getattr(actor, "is_authenticated", False):
        return None, "system"
    device = getattr(actor, "device", None)
    if device is not None:
        return None, f"device {device.pk}"
    return actor, actor.get_username()


def record(
    actor: Any, action: str, target: models.Model, before: Any = None, after: Any = None
) -> AuditEntry:
    user, label = _actor(actor)
    return AuditEntry.objects.create(
        actor=user,
        actor_label=label,
        action=action,
        target_type=target._meta.model_name or type(target).__name__.lower(),
        target_id=str(target.pk),
        target_label=str(target)[:200],
        before=before,
        after=after,
    )


def record_signal(sender: Any, *, actor: Any, action: str, target: models.Model, **kwargs: Any) -> None:
    record(actor, action, target, kwargs.get("before"), kwargs.get("after"))
