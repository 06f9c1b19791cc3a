from __future__ import annotations

from typing import Any

from rest_framework import permissions

from accounts.roles import is_staff, is_viewer


class StaffWriteViewerRead(permissions.BasePermission):
    """Viewers (and staff) read; only staff write; outsiders and anonymous get nothing."""

    message = "staff role required to change data; viewer role required to read it"

    def has_permission(self, request: Any, view: Any) -> bool:
        if request.method in permissions.SAFE_METHODS:
            return is_viewer(request.user)
        return is_staff(request.user)
