from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts.roles import is_viewer


def viewer_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Dashboard pages: anonymous → login page; logged in without a role → 403 page."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not is_viewer(request.user):
            return render(request, "403.html", status=403)
        return view(request, *args, **kwargs)

    return wrapper
