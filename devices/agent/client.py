"""HTTP for the agent over urllib: JSON requests and resumable downloads, with retries.

Retries: 429, 500, 502, 503, 504 and connection errors are retried up to `retries` times.  The
wait before attempt k+1 honours ``Retry-After`` (seconds or an HTTP date, never waiting less
than asked, plus up to 10 % jitter so a fleet does not return in lock-step); without it,
exponential backoff with jitter: half of min(cap, base · 2^k) fixed plus up to the other half
at random.  Other 4xx answers are final.  Redirects are refused, not followed (`_RefuseRedirects`).

A POST is retried too, though the server may have committed an attempt whose answer was lost
(a timeout, a dropped connection, a 5xx from a proxy): every POST therefore carries an
``Idempotency-Key`` that stays the same on all its attempts, and the server answers a repeat
from what the first attempt stored instead of storing it again.  Callers whose request may be
sent again by a later run (`report`) pass a key they keep; otherwise one is made per request.
"""

from __future__ import annotations

import datetime
import email.utils
import http.client
import json
import math
import random
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from devices.agent import __version__
from devices.agent.errors import EXIT_AUTH, EXIT_SERVER, AgentError
from devices.agent.progress import Progress

__all__ = [
    "IDEMPOTENCY_HEADER",
    "RETRY_STATUSES",
    "Client",
    "DownloadResult",
    "Response",
    "SizeMismatchError",
    "new_idempotency_key",
]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
IDEMPOTENCY_HEADER = "Idempotency-Key"
_NETWORK_ERRORS = (
    urllib.error.URLError,
    ConnectionError,
    TimeoutError,
    socket.timeout,
    http.client.HTTPException,
)
_CHUNK = 1 << 16


def new_idempotency_key() -> str:
    """A fresh key: a random UUID (the server takes 1-100 characters of [A-Za-z0-9_.:-])."""
    return str(uuid.uuid4())


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a malformed port
        return (scheme, "", -1)
    return scheme, (parts.hostname or "").lower(), port


def _retry_after_seconds(value: str) -> float | None:
    """Retry-After as seconds (delay-seconds or an HTTP date), or None when it is garbage
    ("nan", "inf", "soon", a malformed date): the caller then backs off on its own."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - time.time()
    return seconds if math.isfinite(seconds) else None


@dataclass(frozen=True)
class Response:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise AgentError(
                "bad-response",
                f"the server answered HTTP {self.status} with a body that is not JSON",
                EXIT_SERVER,
            ) from exc


@dataclass
class DownloadResult:
    bytes_downloaded: int = 0
    resumed_from: int = 0
    requests: int = 0


class SizeMismatchError(Exception):
    """The server's file is not the size the signed manifest says (more bytes were sent, or
    its Content-Length / Content-Range total announces another size)."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are refused, never followed: urllib's handler would send the request's headers,
    `Authorization` included, to wherever `Location` points (another host too), and turn a
    redirected POST into a GET without its body.  The agent speaks to the server it enrolled
    with, at the URL it was given."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Message, newurl: str
    ) -> urllib.request.Request | None:
        fp.close()
        raise AgentError(
            "redirect",
            f"{req.get_method()} {req.full_url}: the server answered HTTP {code}, redirecting to "
            f"{newurl}; the agent follows no redirects (its token goes to the enrolled server "
            "only): give the agent the URL the server is reached at",
            EXIT_SERVER,
            status=code,
        )


@dataclass
class Client:
    """One server, optionally one bearer token; `sleep` and `rand` are injectable for tests."""

    server: str
    token: str | None = None
    timeout: float = 30.0
    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 600.0
    log: Callable[[str], None] | None = None
    sleep: Callable[[float], None] = time.sleep
    rand: Callable[[], float] = random.random
    waits: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        parts = urlsplit(self.server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AgentError(
                "bad-server", f"server URL {self.server!r} must be http(s)://host[:port]", EXIT_SERVER
            )
        self._opener = urllib.request.build_opener(_RefuseRedirects())

    def url(self, path: str) -> str:
        """`path` resolved against the server.  An absolute URL of another origin (scheme,
        host, port) is refused: the bearer token must never leave the enrolled server."""
        url = urljoin(self.server if self.server.endswith("/") else self.server + "/", path)
        if _origin(url) != _origin(self.server):
            raise AgentError(
                "bad-response",
                f"refusing {url!r}: not on the enrolled server {self.server!r}",
                EXIT_SERVER,
            )
        return url

    # ------------------------------------------------------------------ retries

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            seconds = _retry_after_seconds(retry_after)
            if seconds is not None:
                seconds = min(max(seconds, 0.0), self.max_retry_after_s)
                return seconds + self.rand() * min(1.0, 0.1 * seconds)
        cap = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return cap / 2 + self.rand() * cap / 2

    def _wait(self, attempt: int, retry_after: str | None, why: str) -> None:
        delay = self._delay(attempt, retry_after)
        self.waits.append({"attempt": attempt + 1, "reason": why, "seconds": round(delay, 3)})
        if self.log:
            self.log(f"{why}; retrying in {delay:.1f} s ({attempt + 1}/{self.retries})")
        self.sleep(delay)

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = {"User-Agent": f"edgefit-agent/{__version__}", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    # ------------------------------------------------------------------ JSON requests

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> Response:
        """Send one request (retried as the module docstring says); HttpError-style AgentError
        unless the final status is in `ok`.  A POST without an ``Idempotency-Key`` in `headers`
        gets a new one, the same on every attempt."""
        url = self.url(path)
        data = None if body is None else json.dumps(body).encode()
        hdrs = self._headers(headers)
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        if method.upper() == "POST" and not any(k.lower() == "idempotency-key" for k in hdrs):
            hdrs[IDEMPOTENCY_HEADER] = new_idempotency_key()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
            try:
                with self._opener.open(req, timeout=self.timeout) as raw:
                    resp = Response(raw.status, raw.headers, raw.read())
            except urllib.error.HTTPError as exc:
                resp = Response(exc.code, exc.headers, exc.read())
            except _NETWORK_ERRORS as exc:
                if attempt >= self.retries:
                    raise AgentError(
                        "network",
                        f"{method} {url}: {_reason(exc)} (after {attempt + 1} attempts)",
                        EXIT_SERVER,
                    ) from exc
                self._wait(attempt, None, f"{method} {path}: {_reason(exc)}")
                continue
            if resp.status in RETRY_STATUSES and attempt < self.retries:
                self._wait(attempt, resp.headers.get("Retry-After"), f"{method} {path}: HTTP {resp.status}")
                continue
            if resp.status not in ok:
                raise _http_error(method, url, resp)
            return resp
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ downloads

    def download(
        self,
        path: str,
        dest: Path,
        *,
        size: int,
        etag: str | None = None,
        progress: Progress | None = None,
    ) -> DownloadResult:
        """Download `path` into `dest` (a ``.part`` file), resuming what is already there.

        Steps per attempt: (1) keep the bytes already in `dest` (drop them if they exceed
        `size`); (2) ask for the rest with ``Range: bytes=N-`` and ``If-Range: <etag>``;
        (3) 206 appends after checking Content-Range starts at N, 200 starts over, 416 drops
        the part file; a Content-Length / Content-Range total other than `size` is refused at
        once (SizeMismatchError); (4) stream in 64 KiB chunks, never beyond `size`; (5) a
        dropped connection or a short body keeps what arrived and the next attempt resumes
        from there.
        """
        result = DownloadResult()
        url = self.url(path)
        for attempt in range(self.retries + 1):
            have = dest.stat().st_size if dest.exists() else 0
            if have > size:
                dest.unlink()
                have = 0
            if attempt == 0:
                result.resumed_from = have
            if have == size:
                return result
            headers = self._headers({"Accept": "*/*"})
            if have:
                headers["Range"] = f"bytes={have}-"
                if etag:
                    headers["If-Range"] = etag
            req = urllib.request.Request(url, headers=headers, method="GET")
            result.requests += 1
            try:
                with self._opener.open(req, timeout=self.timeout) as raw:
                    status = raw.status
                    if status == 206:
                        start, total = _content_range(raw.headers.get("Content-Range"))
                        if total is not None and total != size:
                            raise SizeMismatchError(
                                f"{path}: the server holds {total} bytes, {size} expected"
                            )
                        if start != have:
                            dest.unlink(missing_ok=True)
                            self._wait(
                                attempt, None, f"GET {path}: range answer starts at {start}, not {have}"
                            )
                            continue
                        mode = "ab"
                    elif status == 200:
                        length = raw.headers.get("Content-Length")
                        if length is not None and length.isdigit() and int(length) != size:
                            raise SizeMismatchError(
                                f"{path}: the server holds {length} bytes, {size} expected"
                            )
                        mode, have = "wb", 0
                        if progress is not None:
                            progress.set(0)
                    else:
                        raise _http_error("GET", url, Response(status, raw.headers, b""))
                    with dest.open(mode) as fh:
                        while True:
                            chunk = raw.read(_CHUNK)
                            if not chunk:
                                break
                            if have + len(chunk) > size:
                                fh.write(chunk[: size - have])
                                raise SizeMismatchError(
                                    f"{path}: the server sent more than the {size} bytes expected"
                                )
                            fh.write(chunk)
                            have += len(chunk)
                            result.bytes_downloaded += len(chunk)
                            if progress is not None:
                                progress.update(len(chunk))
                if have == size:
                    return result
                if attempt >= self.retries:
                    break
                self._wait(attempt, None, f"GET {path}: connection closed at {have}/{size} bytes")
            except urllib.error.HTTPError as exc:
                if exc.code == 416:
                    dest.unlink(missing_ok=True)
                    continue
                if exc.code in RETRY_STATUSES and attempt < self.retries:
                    self._wait(attempt, exc.headers.get("Retry-After"), f"GET {path}: HTTP {exc.code}")
                    continue
                raise _http_error("GET", url, Response(exc.code, exc.headers, exc.read())) from exc
            except _NETWORK_ERRORS as exc:
                if attempt >= self.retries:
                    break
                self._wait(attempt, None, f"GET {path}: {_reason(exc)}")
        got = dest.stat().st_size if dest.exists() else 0
        raise AgentError(
            "network",
            f"GET {url}: download incomplete ({got}/{size} bytes) after {self.retries + 1} attempts; "
            "the next sync resumes it",
            EXIT_SERVER,
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"connection failed ({exc.reason})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes 100-199/200`` header (None if absent)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    try:
        start = int(span.split("-", 1)[0])
    except ValueError:
        start = None
    return start, int(total) if total.strip().isdigit() else None


def _http_error(method: str, url: str, resp: Response) -> AgentError:
    detail = ""
    try:
        body = json.loads(resp.body.decode("utf-8")) if resp.body else None
    except (UnicodeDecodeError, ValueError):
        body = None
    if isinstance(body, dict):
        detail = str(body.get("detail") or "")
        errors = body.get("errors")
        if errors:
            detail = f"{detail} {json.dumps(errors, sort_keys=True)}".strip()
    code = {401: "unauthorized", 403: "forbidden", 404: "not-found", 429: "throttled"}.get(
        resp.status, "server-error" if resp.status >= 500 else "rejected"
    )
    exit_code = EXIT_AUTH if resp.status in (401, 403) else EXIT_SERVER
    message = f"{method} {url}: HTTP {resp.status}" + (f": {detail}" if detail else "")
    return AgentError(code, message, exit_code, status=resp.status)
