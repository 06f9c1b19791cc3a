from typing import Any

from accounts.roles import is_staff, is_viewer


def roles(request: Any) -> dict[str, bool]:
    user = getattr(request, "user", None)
    return {"user_is_staff": is_staff(user), "user_is_viewer": is_viewer(user)}
