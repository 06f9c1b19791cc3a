"""One mapping from a service error's (status, {field: message}) to DRF's answer.

The services (`devices.enrollment`, `registry.releases`, `registry.measurements`) raise errors
that carry an HTTP status and the messages per field; the API views turn them into DRF
exceptions here, so every status is answered the same way wherever it comes from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NoReturn

from rest_framework import exceptions, status

__all__ = ["Conflict", "PreconditionFailed", "PreconditionRequired", "Unprocessable", "raise_for"]


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "conflict"


class PreconditionFailed(exceptions.APIException):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    default_detail = "If-Match does not name the current version"


class PreconditionRequired(exceptions.APIException):
    status_code = status.HTTP_428_PRECONDITION_REQUIRED
    default_detail = "If-Match is required"


class Unprocessable(exceptions.APIException):
    """422 (e.g. an Idempotency-Key already used for another body: the IETF draft's code)."""

    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "unprocessable"


_BY_STATUS: dict[int, type[exceptions.APIException]] = {
    409: Conflict,
    412: PreconditionFailed,
    422: Unprocessable,
    428: PreconditionRequired,
}
#: Statuses answered with the first message alone (DRF's own exceptions for them).
_SINGLE: dict[int, type[exceptions.APIException]] = {
    401: exceptions.AuthenticationFailed,
    403: exceptions.PermissionDenied,
    404: exceptions.NotFound,
}


def raise_for(code: int, errors: Mapping[str, str]) -> NoReturn:
    """Raise the DRF exception for a service error: 401/403/404 with its first message, 409,
    412, 422 and 428 with every field's message, anything else a 400 naming the fields."""
    if code in _SINGLE:
        raise _SINGLE[code](next(iter(errors.values())))
    detail = {field: [message] for field, message in errors.items()}
    raise _BY_STATUS.get(code, exceptions.ValidationError)(detail)
