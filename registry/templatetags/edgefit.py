"""Number formatting for the dashboard: units always shown, provenance as a small badge."""

from __future__ import annotations

from typing import Any

from django import template
from django.utils.html import format_html

register = template.Library()


def _num(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


@register.filter
def pct(value: Any, digits: int = 2) -> str:
    """0.7324 → '73.24 %'."""
    v = _num(value)
    return "—" if v is None else f"{v * 100:.{int(digits)}f} %"


@register.filter
def ms(value: Any, digits: int = 2) -> str:
    v = _num(value)
    if v is None:
        return "—"
    if v < 1:
        return f"{v:.3f} ms"
    return f"{v:.{int(digits)}f} ms"


@register.filter
def mib(value: Any) -> str:
    """Bytes → MiB."""
    v = _num(value)
    return "—" if v is None else f"{v / 2**20:.1f} MiB"


@register.filter
def points(value: Any) -> str:
    v = _num(value)
    return "—" if v is None else f"{v:+.2f} pt"


@register.filter
def src(value: Any) -> str:
    """A provenance badge: measured / predicted / estimated."""
    text = str(value or "")
    if not text:
        return ""
    return format_html('<span class="src src-{}">{}</span>', text.split()[0], text)


@register.filter
def get(mapping: Any, key: Any) -> Any:
    try:
        return mapping.get(key)
    except AttributeError:
        return None
