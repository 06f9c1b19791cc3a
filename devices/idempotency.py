"""`Idempotency-Key`: a device's POST retried after a timeout or a 5xx is applied once.

The device agent retries a POST whose answer it did not get (a timeout, a dropped connection,
a 5xx), but the server may have committed it before the answer was lost.  A POST carrying an
``Idempotency-Key`` header is stored with that key; a repeat with the same key (and the same
body) is answered from what was stored instead of being stored again, and the same key with
another body is refused (422: a key names one request, never two).

Keys are 1–100 characters of ``[A-Za-z0-9_.:-]`` (the agent sends a UUID); a malformed one is a
400 naming the header.  The body is compared by `body_digest`, the SHA-256 of its canonical JSON
(sorted keys, no whitespace), so a retry re-serialised with another key order still matches.
Without the header nothing changes: every POST is a new request.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from drf_spectacular.utils import OpenApiParameter
from rest_framework import exceptions

__all__ = [
    "HEADER",
    "REPLAYED_HEADER",
    "RULE",
    "IdempotencyKeyError",
    "body_digest",
    "openapi_parameter",
    "parse_key",
    "request_key",
    "reused_message",
]

HEADER = "Idempotency-Key"
#: On an answer replayed from what a first request with the same key stored (as Stripe does).
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_LENGTH = 100
RULE = f"1 to {MAX_LENGTH} characters of A-Z, a-z, 0-9, '_', '.', ':' or '-' (a UUID, say)"
_KEY = re.compile(rf"^[A-Za-z0-9_.:-]{{1,{MAX_LENGTH}}}$")


class IdempotencyKeyError(ValueError):
    """The header is present but malformed (a 400 naming it)."""

    def __init__(self) -> None:
        super().__init__(f"{HEADER}: {RULE}")
        self.errors = {HEADER: RULE}


def parse_key(headers: Any) -> str | None:
    """The request's idempotency key (None without the header); IdempotencyKeyError when the
    header is there but breaks the rule (an empty value too)."""
    value = headers.get(HEADER)
    if value is None:
        return None
    if not isinstance(value, str) or not _KEY.fullmatch(value):
        raise IdempotencyKeyError()
    return value


def body_digest(data: Any) -> str:
    """SHA-256 (hex) of `data` as canonical JSON: what "the same body" means for a repeat."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def reused_message(what: str) -> str:
    return (
        f"this {HEADER} was already used for another {what} body: a key names one request; "
        "send a new key for a new request"
    )


# --------------------------------------------------------------------------- DRF views


def request_key(request: Any) -> str | None:
    """The DRF request's idempotency key; a malformed header is a 400 naming it and the rule."""
    try:
        return parse_key(request.headers)
    except IdempotencyKeyError as exc:
        raise exceptions.ValidationError({k: [v] for k, v in exc.errors.items()}) from None


def openapi_parameter(what: str, repeat: str) -> OpenApiParameter:
    """The header as drf-spectacular documents it on a POST of `what`; `repeat`: what a repeat
    with the same key and body gets."""
    return OpenApiParameter(
        HEADER,
        {"type": "string", "minLength": 1, "maxLength": MAX_LENGTH, "pattern": _KEY.pattern},
        OpenApiParameter.HEADER,
        required=False,
        description=(
            f"Optional: {RULE}, the same on every retry of one {what}. A repeat with the same key "
            f"and body {repeat}, with `{REPLAYED_HEADER}: true`; the same key with another body is a "
            "422. Without the header every request is a new one."
        ),
    )
