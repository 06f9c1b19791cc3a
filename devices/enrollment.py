"""Services for enrolled devices: enrollment keys, enrollment, pre-registration, revocation.

Every write runs in a transaction; the config path's cache entries it affects are dropped once
the transaction commits (`devices.hotpath`).  Secrets (enrollment keys, device tokens) are
returned once and stored only as SHA-256 digests.  Each change is announced on
`devices.signals.audit_event` so the registry's audit log records it (devices never imports
the registry).

Enrollment takes an optional ``Idempotency-Key`` (`devices.idempotency`): the agent retries a
POST whose answer it lost, and a server that had committed the first attempt would otherwise
create a second device with a second token, the first one orphaned.  A repeat with the same key
(under the same enrollment key) and the same body gets the same device — with a *new* token:
the token is stored only as its digest, so the first answer cannot be replayed, and that answer
was lost, so the first token is revoked (nobody holds it).  The same key with another body is a
422; a repeat for a device since revoked, or enrolled more than `ENROLL_REPLAY_WINDOW` ago, is a
409 (a key may not mint tokens for a device forever).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import hash_token
from devices import hotpath
from devices.idempotency import HEADER, body_digest, reused_message
from devices.models import (
    DEVICE_TOKEN_PREFIX,
    ENROLLMENT_KEY_PREFIX,
    Device,
    DeviceProfile,
    DeviceToken,
    EnrollmentKey,
    new_secret,
)
from devices.signals import audit_event

__all__ = [
    "ENROLL_REPLAY_WINDOW",
    "MAX_HARDWARE_BYTES",
    "EnrollmentError",
    "check_enrollment_key",
    "create_enrollment_key",
    "enroll_device",
    "issue_device_token",
    "preregister_device",
    "revoke_device",
    "revoke_enrollment_key",
]

#: The hardware probe a device sends is stored as given, up to this size (JSON bytes).
MAX_HARDWARE_BYTES = 16_384
#: How long after an enrollment a repeat with its Idempotency-Key still gets the device (with a
#: new token): the agent's retries take minutes; a key seen later is a mistake or a replay.
ENROLL_REPLAY_WINDOW = timedelta(hours=24)
_ALIAS = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class EnrollmentError(ValueError):
    """Bad input: `errors` maps each field to the rule it breaks; `status` is the HTTP status."""

    def __init__(self, errors: dict[str, str], status: int = 400) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors
        self.status = status


def _actor(user: Any) -> Any:
    return user if getattr(user, "is_authenticated", False) else None


def _check_name(name: Any, errors: dict[str, str]) -> str:
    if not isinstance(name, str) or not name.strip():
        errors["name"] = "give the device a name (1–120 characters)"
        return ""
    if len(name.strip()) > 120:
        errors["name"] = "at most 120 characters"
    return name.strip()


def _check_channel(channel: Any, errors: dict[str, str]) -> str:
    if not isinstance(channel, str) or not _ALIAS.match(channel):
        errors["channel"] = "an alias: lowercase letters, digits, '-' or '_', at most 40 characters"
        return ""
    return channel


def _profile(value: Any, errors: dict[str, str], field: str = "profile") -> DeviceProfile | None:
    if isinstance(value, DeviceProfile):
        return value
    if isinstance(value, str) and value:
        profile = DeviceProfile.objects.filter(slug=value).first()
    elif isinstance(value, int) and not isinstance(value, bool):
        profile = DeviceProfile.objects.filter(pk=value).first()
    else:
        errors[field] = "name a device profile by its slug"
        return None
    if profile is None:
        errors[field] = f"unknown device profile {value!r}"
    return profile


def issue_device_token(device: Device) -> str:
    """A new token for `device` (the raw value, shown once)."""
    raw = new_secret(DEVICE_TOKEN_PREFIX)
    DeviceToken.objects.create(device=device, digest=hash_token(raw), prefix=raw[:10])
    return raw


def create_enrollment_key(
    *, fleet: str, profile: DeviceProfile | str | int | None = None, channel: str = "stable", created_by: Any
) -> tuple[EnrollmentKey, str]:
    errors: dict[str, str] = {}
    if not isinstance(fleet, str) or not fleet.strip() or len(fleet.strip()) > 120:
        errors["fleet"] = "name the fleet (1–120 characters)"
    pinned = _profile(profile, errors) if profile not in (None, "") else None
    channel = _check_channel(channel, errors)
    if errors:
        raise EnrollmentError(errors)
    raw = new_secret(ENROLLMENT_KEY_PREFIX)
    with transaction.atomic():
        key = EnrollmentKey.objects.create(
            fleet=fleet.strip(),
            digest=hash_token(raw),
            prefix=raw[:10],
            profile=pinned,
            channel=channel,
            created_by=_actor(created_by),
        )
        audit_event.send(
            EnrollmentKey,
            actor=_actor(created_by),
            action="enrollment_key.create",
            target=key,
            before=None,
            after={"fleet": key.fleet, "profile": pinned.slug if pinned else None, "channel": channel},
        )
    return key, raw


def revoke_enrollment_key(key: EnrollmentKey, *, by: Any) -> EnrollmentKey:
    with transaction.atomic():
        if EnrollmentKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now()):
            audit_event.send(
                EnrollmentKey,
                actor=_actor(by),
                action="enrollment_key.revoke",
                target=key,
                before={"revoked": False},
                after={"revoked": True},
            )
    key.refresh_from_db()
    return key


def _device_answer(device: Device, raw_token: str) -> dict[str, Any]:
    return {
        "device_id": str(device.id),
        "token": raw_token,
        "profile": device.profile.slug,
        "channel": device.channel,
        "config_url": "/api/v1/device/config",
    }


def _check_hardware(hardware: Any, errors: dict[str, str]) -> dict[str, Any]:
    import json

    if hardware is None:
        return {}
    if not isinstance(hardware, dict):
        errors["hardware"] = "must be an object (the probe's report)"
        return {}
    if len(json.dumps(hardware)) > MAX_HARDWARE_BYTES:
        errors["hardware"] = f"at most {MAX_HARDWARE_BYTES} bytes of JSON"
    return hardware


def check_enrollment_key(raw: Any) -> EnrollmentKey:
    """The active enrollment key `raw` names; a missing, unknown or revoked one is a 401."""
    if not isinstance(raw, str) or not raw.startswith(ENROLLMENT_KEY_PREFIX):
        raise EnrollmentError({"enrollment_key": "missing or not an enrollment key (efe_…)"}, status=401)
    key = EnrollmentKey.objects.select_related("profile").filter(digest=hash_token(raw)).first()
    if key is None or not key.active:
        raise EnrollmentError({"enrollment_key": "unknown or revoked enrollment key"}, status=401)
    return key


def enroll_device(
    *,
    enrollment_key: Any,
    name: Any,
    profile: Any = None,
    hardware: Any = None,
    idempotency_key: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """A device presents a fleet's enrollment key and gets an id and a token.

    `enrollment_key` is the raw key, or the row `check_enrollment_key` already returned for it.
    A missing, unknown or revoked key is a 401 (`status`), bad fields a 400 naming them.
    Returns (answer, created): with `idempotency_key`, a device already enrolled under it with
    this enrollment key is answered again (created False) as the module docstring says."""
    key = (
        enrollment_key if isinstance(enrollment_key, EnrollmentKey) else check_enrollment_key(enrollment_key)
    )
    digest = ""
    if idempotency_key is not None:
        digest = body_digest({"name": name, "profile": profile, "hardware": hardware})
        device = _enrolled_under(key, idempotency_key, digest)
        if device is not None:
            return _enroll_again(device, revoke_earlier=True), False
    errors: dict[str, str] = {}
    name = _check_name(name, errors)
    hardware = _check_hardware(hardware, errors)
    if key.profile is not None:
        if profile not in (None, "", key.profile.slug):
            errors["profile"] = f"this enrollment key pins the profile {key.profile.slug!r}"
        chosen = key.profile
    elif profile in (None, ""):
        errors["profile"] = "this enrollment key pins no profile: name one (its slug)"
        chosen = None
    else:
        chosen = _profile(profile, errors)
    if errors:
        raise EnrollmentError(errors)
    assert chosen is not None
    try:
        with transaction.atomic():
            device = Device.objects.create(
                name=name,
                profile=chosen,
                channel=key.channel,
                enrollment_key=key,
                hardware=hardware,
                last_seen_at=timezone.now(),
                idempotency_key=idempotency_key,
                request_digest=digest,
            )
            raw = issue_device_token(device)
            audit_event.send(
                Device,
                actor=None,
                action="device.enroll",
                target=device,
                before=None,
                after={"name": name, "profile": chosen.slug, "channel": device.channel, "fleet": key.fleet},
            )
    except IntegrityError:
        # A concurrent repeat with the same key committed its device first (the unique
        # constraint held this insert until it did): answer as a repeat, but keep the winner's
        # token — which of the two answers reaches the agent cannot be known here.
        winner = _enrolled_under(key, idempotency_key, digest) if idempotency_key is not None else None
        if winner is None:
            raise
        return _enroll_again(winner, revoke_earlier=False), False
    return _device_answer(device, raw), True


def _enrolled_under(key: EnrollmentKey, idempotency_key: str, digest: str) -> Device | None:
    """The device enrolled with `key` under `idempotency_key` (None: none); 422 if that was for
    another body, 409 if it was revoked since or enrolled longer than ENROLL_REPLAY_WINDOW ago."""
    device = (
        Device.objects.select_related("profile")
        .filter(enrollment_key=key, idempotency_key=idempotency_key)
        .first()
    )
    if device is None:
        return None
    if device.request_digest != digest:
        raise EnrollmentError({HEADER: reused_message("enrollment")}, status=422)
    if not device.active:
        raise EnrollmentError(
            {HEADER: "the device enrolled with this key was revoked since: enroll with a new key"}, status=409
        )
    if device.created_at < timezone.now() - ENROLL_REPLAY_WINDOW:
        hours = int(ENROLL_REPLAY_WINDOW.total_seconds() // 3600)
        raise EnrollmentError(
            {HEADER: f"this key enrolled a device more than {hours} hours ago: enroll with a new key"},
            status=409,
        )
    return device


def _enroll_again(device: Device, *, revoke_earlier: bool) -> dict[str, Any]:
    """A repeated enrollment: the same device, a new token (the first answer was lost, and its
    raw token is stored nowhere).  `revoke_earlier` revokes the tokens issued before: no one
    holds them, and a credential no one holds is still one more to steal."""
    now = timezone.now()
    with transaction.atomic():
        Device.objects.select_for_update().filter(pk=device.pk).first()  # one repeat at a time
        revoked: list[str] = []
        if revoke_earlier:
            earlier = device.tokens.filter(revoked_at__isnull=True)
            revoked = list(earlier.values_list("digest", flat=True))
            earlier.update(revoked_at=now)
        raw = issue_device_token(device)
        Device.objects.filter(pk=device.pk).update(last_seen_at=now)
        audit_event.send(
            Device,
            actor=None,
            action="device.enroll_repeated",
            target=device,
            before=None,
            after={"tokens_revoked": len(revoked), "token_issued": raw[:10]},
        )
        if revoked:
            hotpath.forget_tokens_on_commit(revoked)
    return _device_answer(device, raw)


def preregister_device(*, name: Any, profile: Any, channel: Any = "stable", by: Any) -> dict[str, Any]:
    """Staff create a device ahead of time; the answer carries its token (shown once)."""
    errors: dict[str, str] = {}
    name = _check_name(name, errors)
    chosen = _profile(profile, errors)
    channel = _check_channel(channel if channel is not None else "stable", errors)
    if errors:
        raise EnrollmentError(errors)
    assert chosen is not None
    with transaction.atomic():
        device = Device.objects.create(name=name, profile=chosen, channel=channel, enrolled_by=_actor(by))
        raw = issue_device_token(device)
        audit_event.send(
            Device,
            actor=_actor(by),
            action="device.preregister",
            target=device,
            before=None,
            after={"name": name, "profile": chosen.slug, "channel": channel},
        )
    return _device_answer(device, raw)


def revoke_device(device: Device, *, by: Any) -> Device:
    """Revoke the device and all its tokens; its next request gets a 401 (the config path's
    cache entries for its tokens are dropped on commit)."""
    now = timezone.now()
    with transaction.atomic():
        digests = list(device.tokens.values_list("digest", flat=True))
        device.tokens.filter(revoked_at__isnull=True).update(revoked_at=now)
        changed = Device.objects.filter(pk=device.pk, revoked_at__isnull=True).update(
            revoked_at=now, revoked_by=_actor(by)
        )
        if changed:
            audit_event.send(
                Device,
                actor=_actor(by),
                action="device.revoke",
                target=device,
                before={"revoked": False},
                after={"revoked": True, "tokens_revoked": len(digests)},
            )
        hotpath.forget_tokens_on_commit(digests)
    device.refresh_from_db()
    return device
