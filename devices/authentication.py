"""`Authorization: Bearer efd_…`: devices authenticate with their token on device endpoints.

Person endpoints never list this class, so a device token there is an anonymous caller; device
endpoints list only this class, so a person's session or script token is refused there.
"""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions, permissions

from devices.models import DEVICE_TOKEN_PREFIX, Device, DeviceToken, device_token_digest

__all__ = ["DevicePrincipal", "DeviceTokenAuthentication", "IsDevice", "bearer_token"]


class DevicePrincipal:
    """`request.user` on a device endpoint: the device, never a person (no role at all)."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False
    _edgefit_is_viewer = False  # accounts.roles.is_viewer: a device never reads people's data

    def __init__(self, device: Device, token: DeviceToken) -> None:
        self.device = device
        self.token = token
        self.pk = None
        self.username = f"device:{device.pk}"

    def __str__(self) -> str:
        return self.username


def bearer_token(header: str, prefix: str) -> str | None:
    parts = header.split()
    if len(parts) != 2 or parts[0] != "Bearer" or not parts[1].startswith(prefix):
        return None
    return parts[1]


class DeviceTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Any) -> tuple[DevicePrincipal, DeviceToken] | None:
        header = authentication.get_authorization_header(request).decode(errors="replace")
        raw = bearer_token(header, DEVICE_TOKEN_PREFIX)
        if raw is None:
            return None
        digest = device_token_digest(f"Bearer {raw}")
        token = (
            None
            if digest is None  # malformed: no query
            else DeviceToken.objects.select_related("device__profile")
            .filter(digest=digest, revoked_at__isnull=True, device__revoked_at__isnull=True)
            .first()
        )
        if token is None:
            raise exceptions.AuthenticationFailed("invalid or revoked device token")
        return DevicePrincipal(token.device, token), token

    def authenticate_header(self, request: Any) -> str:
        return self.keyword


class IsDevice(permissions.BasePermission):
    message = "a device token (Authorization: Bearer efd_…) is required"

    def has_permission(self, request: Any, view: Any) -> bool:
        return isinstance(request.user, DevicePrincipal)
