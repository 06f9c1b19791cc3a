"""Middleware of the EdgeFit project."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.core.signals import setting_changed
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.middleware.security import SecurityMiddleware

__all__ = ["DevicePathMiddleware"]


class DevicePathMiddleware:
    """Answer the device config path (and its constant-JSON ceiling, /api/v1/ping) before the
    rest of the stack.

    Fleets poll the config path; it authenticates by device token, reads no session, cookie,
    CSRF token or user, and must stay cheap.  The middleware below it would still build a
    message store, a lazy session and user, resolve the URL and add HTML-page headers on every
    poll — about a fifth of the request's time.  So, first in MIDDLEWARE, this dispatches those
    two exact paths straight to their views (the URLconf routes them too, for reverse() and the
    test client) after the one check of the skipped stack that protects them — the Host header
    against ALLOWED_HOSTS (400, as Django answers) — and adds the headers that matter for a
    JSON answer (nosniff, Content-Length).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        from config.views import ping
        from registry.device_views import device_config

        self.get_response = get_response
        # SecurityMiddleware's HTTPS redirect (SECURE_SSL_REDIRECT), which the skipped stack
        # would have made: without it a device polling over plain HTTP was answered 200, its
        # token in cleartext, while every other path was redirected.
        # Built on first use, and again after a settings change (tests change them).
        self._security: SecurityMiddleware | None = None
        setting_changed.connect(self._forget_security)
        self.routes: dict[str, Callable[[HttpRequest], HttpResponse]] = {
            "/api/v1/device/config": device_config,
            "/api/v1/ping": ping,
        }
        # Under ASGI the chain below is async (static files are served natively there): this
        # middleware then stays async too instead of forcing the rest into a thread.
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._acall(request)
        view = self.routes.get(request.path_info)
        if view is None:
            return self.get_response(request)
        return self._answer(view, request)

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        view = self.routes.get(request.path_info)
        if view is None:
            response: HttpResponseBase = await self.get_response(request)
            return response
        # The views touch the database on a cold cache: run them where sync code runs.
        return await sync_to_async(self._answer)(view, request)

    def _forget_security(self, **kwargs: Any) -> None:
        self._security = None

    def _answer(self, view: Callable[[HttpRequest], HttpResponse], request: HttpRequest) -> HttpResponse:
        # The ALLOWED_HOSTS check CommonMiddleware would make: DisallowedHost becomes Django's
        # own 400 (and security log entry) in the handler's exception conversion.
        request.get_host()
        if self._security is None:
            self._security = SecurityMiddleware(self.get_response)
        redirect = self._security.process_request(request)
        if redirect is not None:
            return redirect
        response = view(request)
        response["X-Content-Type-Options"] = "nosniff"
        # What CommonMiddleware would add: without it an ASGI server frames the body chunked.
        if response.status_code != 304 and not response.has_header("Content-Length"):
            response["Content-Length"] = str(len(response.content))
        return response
