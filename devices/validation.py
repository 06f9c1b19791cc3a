"""The rules a device profile obeys, in one place for the API, the admin and the catalog loader.

`profile_errors(values)` returns {field: [message, …]}; an empty dict means valid.  Messages
name the rule and the unit so a person can fix the input without reading the code.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "ACTIVATION_FORMATS",
    "FORMATS",
    "KINDS",
    "LIMITS",
    "SOURCED_FIELDS",
    "profile_errors",
    "source_error",
]

#: Every number format a profile may name (weights or activations).
FORMATS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8", "int8", "int4", "int3", "int2", "mxfp4")
ACTIVATION_FORMATS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
KINDS: tuple[str, ...] = ("phone", "tablet", "board", "laptop", "desktop", "server", "soc", "other")

GIB = 1024**3
#: (minimum exclusive, maximum inclusive, unit) for every number on a profile.
LIMITS: dict[str, tuple[float, float, str]] = {
    "ram_total_bytes": (0, 2 * 1024 * GIB, "bytes"),
    "ram_budget_bytes": (0, 2 * 1024 * GIB, "bytes"),
    "bandwidth_gbs": (0, 20_000, "GB/s"),
    "fp32_tflops": (0, 10_000, "TFLOPS"),
    "fp16_tflops": (0, 10_000, "TFLOPS"),
    "int8_tops": (0, 10_000, "TOPS"),
    "int4_tops": (0, 10_000, "TOPS"),
}
#: Numbers that must say where they come from when they are set.
SOURCED_FIELDS: tuple[str, ...] = tuple(LIMITS)

_MEASURED = re.compile(r"^measured on \d{4}-\d{2}-\d{2} by \S.*$")
_URL = re.compile(r"https?://\S+")


def source_error(text: Any) -> str | None:
    """A source is a URL (optionally with a note), 'measured on <date> by <command>', or
    'derived: <how, from which sourced numbers>'."""
    if not isinstance(text, str) or not text.strip():
        return "must be a non-empty string"
    text = text.strip()
    if _URL.search(text) or _MEASURED.match(text) or (text.startswith("derived: ") and len(text) > 12):
        return None
    return (
        "must contain an http(s) URL, read 'measured on YYYY-MM-DD by <command>', or start with 'derived: '"
    )


def _add(errors: dict[str, list[str]], field: str, message: str) -> None:
    errors.setdefault(field, []).append(message)


def profile_errors(values: dict[str, Any]) -> dict[str, list[str]]:
    """Check a complete set of profile values (after type conversion)."""
    errors: dict[str, list[str]] = {}
    for field, (low, high, unit) in LIMITS.items():
        value = values.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            _add(errors, field, f"must be a number in {unit}")
        elif not (low < value <= high):
            _add(errors, field, f"must be greater than {low:g} and at most {high:g} {unit} (got {value:g})")
    total, budget = values.get("ram_total_bytes"), values.get("ram_budget_bytes")
    if (
        isinstance(total, int | float)
        and isinstance(budget, int | float)
        and "ram_budget_bytes" not in errors
        and budget > total
    ):
        _add(errors, "ram_budget_bytes", f"must not exceed ram_total_bytes ({total:g} bytes)")
    if not any(values.get(f) for f in ("fp32_tflops", "fp16_tflops", "int8_tops", "int4_tops")):
        _add(
            errors,
            "int8_tops",
            "at least one peak compute figure (fp32/fp16 TFLOPS or int8/int4 TOPS) is required",
        )

    for field, allowed in (("weight_formats", FORMATS), ("activation_formats", ACTIVATION_FORMATS)):
        formats = values.get(field)
        if not isinstance(formats, list) or not formats:
            _add(errors, field, f"must be a non-empty list drawn from {', '.join(allowed)}")
            continue
        unknown = [f for f in formats if f not in allowed]
        if unknown:
            _add(
                errors,
                field,
                f"unknown format(s) {', '.join(map(str, unknown))}; allowed: {', '.join(allowed)}",
            )
        elif len(set(formats)) != len(formats):
            _add(errors, field, "lists a format twice")
    if values.get("int4_tops") and "int4" not in (values.get("weight_formats") or []):
        _add(errors, "int4_tops", "is set but int4 is not among weight_formats")

    share = values.get("fleet_share", 0.0)
    if isinstance(share, bool) or not isinstance(share, int | float) or not (0.0 <= share <= 1.0):
        _add(errors, "fleet_share", "must be a fraction between 0 and 1")
    if values.get("kind") is not None and values.get("kind") not in KINDS:
        _add(errors, "kind", f"must be one of {', '.join(KINDS)}")

    sources = values.get("sources") or {}
    if not isinstance(sources, dict):
        _add(errors, "sources", "must be an object mapping a field name to its source")
        return errors
    for key, text in sources.items():
        if key not in SOURCED_FIELDS:
            _add(errors, "sources", f"{key!r} is not a sourced field ({', '.join(SOURCED_FIELDS)})")
            continue
        problem = source_error(text)
        if problem:
            _add(errors, "sources", f"{key}: {problem}")
    for field in SOURCED_FIELDS:
        if values.get(field) is not None and field not in sources:
            _add(errors, "sources", f"{field} is set but has no source")
    return errors
