"""One error shape for the whole API: {"errors": {field: [messages]}, "detail": summary}."""

from __future__ import annotations

from typing import Any

from rest_framework.response import Response
from rest_framework.views import exception_handler


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    response = exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    if isinstance(data, dict) and set(data) == {"detail"}:
        response.data = {"detail": data["detail"], "errors": {}}
    elif isinstance(data, dict):
        fields = ", ".join(sorted(data))
        response.data = {"detail": f"invalid input in: {fields}", "errors": data}
    elif isinstance(data, list):
        response.data = {
            "detail": "; ".join(str(item) for item in data),
            "errors": {"non_field_errors": data},
        }
    return response
