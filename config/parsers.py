"""The API's JSON parser: DRF's, refusing bodies nested too deeply to handle safely."""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

__all__ = ["MAX_DEPTH", "JSONParser"]

#: Arrays and objects nested deeper than this are refused.  No body of this API comes close
#: (a plan is four levels deep); Python's decoder and everything recursive after it (validation,
#: JSON columns, the audit log, the renderer) fail somewhere near 1,000 — as a 500.
MAX_DEPTH = 100


class JSONParser(parsers.JSONParser):
    """`rest_framework.parsers.JSONParser` plus a nesting limit: a body such as 100,000 `[`
    is a 400 "JSON parse error", not a RecursionError (500)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(_too_deep()) from None
        if _depth_exceeds(data, MAX_DEPTH):
            raise ParseError(_too_deep())
        return data


def _too_deep() -> str:
    return f"JSON parse error - the body nests arrays or objects more than {MAX_DEPTH} levels deep"


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests lists/dicts more than `limit` levels deep (iteratively: no recursion
    on the very input that is being checked)."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
