"""Plain Django views of the delivery protocol's hot and heavy paths (docs/delivery.md).

`device_config` is the busiest endpoint of a fleet: no DRF, no session, no SQL (see
`devices.hotpath` and `registry.delivery`), the answer's bytes and ETag rendered once per
profile state.  Package files stream from disk with HTTP Range support and immutable caching.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
from collections.abc import AsyncIterator, Generator
from typing import Any, NamedTuple

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.http import require_safe
from rest_framework.exceptions import AuthenticationFailed

from accounts.authentication import ApiTokenAuthentication
from accounts.models import TOKEN_PREFIX
from accounts.roles import is_viewer
from devices import hotpath
from devices.models import DEVICE_TOKEN_PREFIX, device_token_digest
from registry import delivery
from registry.models import Package, Release
from registry.packages import DIGEST_RE, FILES, file_path, signing_key_info
from registry.releases import etag_matches

__all__ = ["MemoryAnswer", "config_from_memory", "device_config", "package_file", "signing_key"]

_JSON = "application/json"
_CHUNK = 256 * 1024
_IMMUTABLE = "public, max-age=31536000, immutable"
_CONTENT_TYPES = {
    "manifest.json": _JSON,
    "manifest.sig": "application/octet-stream",
    "model.safetensors": "application/octet-stream",
}
_BEARER_DEVICE = "Bearer " + DEVICE_TOKEN_PREFIX


def _error(status: int, detail: str, **headers: str) -> HttpResponse:
    response = JsonResponse({"detail": detail, "errors": {}}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _unauthorized(detail: str) -> HttpResponse:
    return _error(401, detail, WWW_Authenticate='Bearer realm="device"')


def device_config(request: HttpRequest) -> HttpResponse:
    """GET /api/v1/device/config — the caller's package, poll interval, strong ETag / 304.

    Per request: check the token's form, hash it and look up dictionaries of this process (plus
    a read of the invalidation marker: every request when the process is not subscribed to the
    Redis channel, at most once a second when it is).  No SQL once the entries are warm, but for
    one small query per process per `DURABLE_RECHECK_S` (missed invalidations, `devices.hotpath`).
    While the shared cache is unreachable every request is answered from the database instead,
    with the same statuses, bodies and ETags."""
    if request.method not in ("GET", "HEAD"):
        return _error(405, f"method {request.method} not allowed", Allow="GET, HEAD")
    digest = device_token_digest(request.META.get("HTTP_AUTHORIZATION", ""))
    if digest is None:  # no or malformed token: refused before any lookup
        return _unauthorized("a device token is required: Authorization: Bearer efd_…")
    hotpath.store().check()
    epoch = hotpath.memo.epoch
    entry = hotpath.resolve_token(digest, epoch)
    if entry is None:
        return _unauthorized("invalid or revoked device token")
    wait = hotpath.rate.hit(digest)
    if wait is not None:
        return _error(
            429,
            f"more than {settings.EDGEFIT_DEVICE_RATE_LIMIT} requests in "
            f"{settings.EDGEFIT_DEVICE_RATE_WINDOW_S} s from this device",
            Retry_After=str(max(1, math.ceil(wait))),
        )
    state = delivery.profile_state(entry.profile_id, epoch)
    rendered = hotpath.memo.bodies.get(entry.device_id)
    if rendered is None or rendered.state is not state:
        rendered = delivery.render_config(entry.device_id, entry.channel, state)
        hotpath.memo.remember("bodies", entry.device_id, rendered, epoch)
    etag = rendered.etag
    inm = request.META.get("HTTP_IF_NONE_MATCH")
    if inm is not None and (inm == etag or etag_matches(inm, etag)):
        response = HttpResponse(status=304)
    else:
        response = HttpResponse(rendered.body, content_type=_JSON)
    response["ETag"] = etag
    response["Cache-Control"] = "private, no-cache"
    return response


class MemoryAnswer(NamedTuple):
    """What `device_config` answers a GET, found without leaving the process."""

    not_modified: bool  # 304 (the body is then not sent)
    etag: str
    body: bytes


def config_from_memory(authorization: str, if_none_match: str | None) -> MemoryAnswer | None:
    """The answer `device_config` would give a GET, if this process's memory alone gives it:
    the invalidation marker is fresh (`Store.fresh`), the token is known, the device's rendered
    body is current for its profile's state, and the request stays within the process's share
    of the rate limit.  Anything else → None, and the caller runs `device_config` (which reads
    the shared cache or the database and answers every other case: 401, 429, …).  The ASGI
    entry point (`config.asgi`) calls this for the busiest path without building a request."""
    digest = device_token_digest(authorization)
    if digest is None or not hotpath.store().fresh():
        return None
    memo = hotpath.memo
    entry = memo.tokens.get(digest)
    if entry is None:
        return None
    state = memo.profiles.get(entry.profile_id)
    rendered = memo.bodies.get(entry.device_id)
    if state is None or rendered is None or rendered.state is not state:
        return None
    if not hotpath.rate.hit_locally(digest):  # counted only when answered here
        return None
    etag = rendered.etag
    inm = if_none_match
    not_modified = inm is not None and (inm == etag or etag_matches(inm, etag))
    return MemoryAnswer(not_modified, etag, rendered.body)


@require_safe
def signing_key(request: HttpRequest) -> HttpResponse:
    """GET /api/v1/signing-key — the Ed25519 public key that verifies package manifests."""
    response = JsonResponse(signing_key_info())
    response["Cache-Control"] = "public, max-age=300"
    return response


# --------------------------------------------------------------------------- package files


def _reader(request: HttpRequest) -> tuple[str, Any] | None:
    """Who is downloading: ("device", TokenEntry) or ("person", user).  A device token resolves
    as on the config path (from the database while the shared cache is unreachable)."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if header.startswith(_BEARER_DEVICE):
        digest = device_token_digest(header)
        if digest is None:
            return None
        hotpath.store().check()
        entry = hotpath.resolve_token(digest, hotpath.memo.epoch)
        return ("device", entry) if entry else None
    if header.startswith("Bearer " + TOKEN_PREFIX):
        try:  # the API's own authentication (it also records last_used_at)
            found = ApiTokenAuthentication().authenticate(request)
        except AuthenticationFailed:
            return None
        return ("person", found[0]) if found else None
    user = getattr(request, "user", None)
    return ("person", user) if user is not None and user.is_authenticated else None


def _file_etag(package: Package, name: str) -> str:
    if name == "manifest.json":
        return f'"{package.digest}"'
    if name == "model.safetensors":
        return f'"{package.blob_sha256}"'
    return '"' + hashlib.sha256(bytes.fromhex(package.signature)).hexdigest() + '"'


def _parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """One byte range → (first, last) inclusive; None = ignore the header (serve everything);
    False = unsatisfiable (416)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # other units and multiple ranges: answer with the whole file
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first_s == "":
            suffix = int(last_s)
            if suffix <= 0:
                return False
            first, last = max(0, size - suffix), size - 1
        else:
            first = int(first_s)
            last = int(last_s) if last_s else size - 1
    except ValueError:
        return None
    if last_s and first > last:
        return None  # not a valid range: ignore the header
    if first >= size:
        return False
    return first, min(last, size - 1)


def _stream(path: str, first: int, length: int) -> Generator[bytes, None, None]:
    with open(path, "rb") as handle:
        handle.seek(first)
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


async def _astream(path: str, first: int, length: int) -> AsyncIterator[bytes]:
    """`_stream` for the ASGI handler: Django would read a synchronous iterator whole into
    memory before sending it there, so each chunk is read in a thread instead."""
    chunks = _stream(path, first, length)
    try:
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        chunks.close()


def _file_body(request: HttpRequest, path: str, first: int, length: int) -> Any:
    """Chunks of the file, read as they are sent, under either handler."""
    if isinstance(request, ASGIRequest):
        return _astream(path, first, length)
    return _stream(path, first, length)


@require_safe
def package_file(request: HttpRequest, digest: str, name: str) -> HttpResponseBase:
    """GET /api/v1/packages/<digest>/<file> — streamed from disk, immutable, Range → 206.

    Devices may fetch the packages released to their profile; staff and viewers any package."""
    reader = _reader(request)
    if reader is None:
        return _unauthorized("a device token, a script token or a session is required")
    if name not in FILES or not DIGEST_RE.match(digest):
        return _error(404, "no such package file")
    package = Package.objects.filter(digest=digest).first()
    if package is None:
        return _error(404, "no such package")
    kind, who = reader
    if kind == "device":
        if not Release.objects.filter(profile_id=who.profile_id, package=package).exists():
            return _error(404, "no such package for this device")
    elif not is_viewer(who):
        return _error(403, "viewer role required to download packages")
    path = str(file_path(package, name))
    try:
        size = os.path.getsize(path)
    except OSError:
        return _error(410, "the package's files are no longer on disk")
    etag = _file_etag(package, name)
    headers = {
        "ETag": etag,
        "Cache-Control": _IMMUTABLE,
        "Accept-Ranges": "bytes",
    }
    inm = request.META.get("HTTP_IF_NONE_MATCH")
    if inm is not None and etag_matches(inm, etag):
        response = HttpResponse(status=304)
        for key, value in headers.items():
            response[key] = value
        return response
    wanted = request.META.get("HTTP_RANGE")
    if_range = request.META.get("HTTP_IF_RANGE")
    if wanted and if_range and if_range.strip() != etag:
        wanted = None  # the client's partial copy is of another version: send it all
    span = _parse_range(wanted, size) if wanted else None
    if span is False:
        response = _error(416, f"range not satisfiable: the file has {size} bytes")
        response["Content-Range"] = f"bytes */{size}"
        for key, value in headers.items():
            response[key] = value
        return response
    if not isinstance(span, tuple):
        full = StreamingHttpResponse(_file_body(request, path, 0, size), content_type=_CONTENT_TYPES[name])
        full["Content-Length"] = str(size)
        for key, value in headers.items():
            full[key] = value
        return full
    first, last = span
    partial = StreamingHttpResponse(
        _file_body(request, path, first, last - first + 1), status=206, content_type=_CONTENT_TYPES[name]
    )
    partial["Content-Range"] = f"bytes {first}-{last}/{size}"
    partial["Content-Length"] = str(last - first + 1)
    for key, value in headers.items():
        partial[key] = value
    return partial
