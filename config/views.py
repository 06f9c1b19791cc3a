from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.contrib.auth import views as auth_views
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse


def health(request: HttpRequest) -> JsonResponse:
    """Liveness for load balancers and the README's smoke check: database and cache reachable."""
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # report, never raise: this endpoint must answer
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        cache.set("edgefit:health", "1", 5)
        checks["cache"] = "ok" if cache.get("edgefit:health") == "1" else "error: value not read back"
    except Exception as exc:
        checks["cache"] = f"error: {exc.__class__.__name__}"
    healthy = all(v == "ok" for v in checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "degraded", "checks": checks}, status=200 if healthy else 503
    )


PING_BODY = b'{"status":"ok"}'


def ping(request: HttpRequest) -> HttpResponse:
    """GET /api/v1/ping — a constant JSON answer, open to anyone: the ceiling the device config
    endpoint is measured against (same server, same middleware, no work)."""
    return HttpResponse(PING_BODY, content_type="application/json")


class LoginView(auth_views.LoginView):
    """Django's login view, except that a signed-in user sent here with ``next`` pointing back
    at the login page goes to the overview (Django raises "Redirection loop" there: a 500)."""

    def get_redirect_url(self, *args: Any, **kwargs: Any) -> str:
        url = super().get_redirect_url(*args, **kwargs)
        return "" if url and urlsplit(url).path == self.request.path else url
