"""The three roles people have.

staff  — `is_staff`: may change anything.
viewer — member of the "viewer" group: may read everything.
anyone else who is logged in is an outsider and sees nothing but their own login.
"""

from __future__ import annotations

from typing import Any

VIEWER_GROUP = "viewer"


def is_staff(user: Any) -> bool:
    return bool(user and user.is_authenticated and user.is_active and user.is_staff)


def is_viewer(user: Any) -> bool:
    if not (user and user.is_authenticated and user.is_active):
        return False
    if user.is_staff:
        return True
    cached = getattr(user, "_edgefit_is_viewer", None)
    if cached is None:
        cached = user.groups.filter(name=VIEWER_GROUP).exists()
        user._edgefit_is_viewer = cached
    return bool(cached)
