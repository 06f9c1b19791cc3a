"""Typed readers for settings from the environment.

Every reader records the variable it looked at (so a test can check that docker/compose only
sets variables the settings read) and raises ImproperlyConfigured, naming the variable and the
rule, when a value is set but malformed.  An unset variable returns the embedded default; a
variable with ``required=True`` and no value is an error (production secrets have no default).
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from django.core.exceptions import ImproperlyConfigured

__all__ = ["READ_VARIABLES", "env_bool", "env_float", "env_int", "env_list", "env_str", "env_url"]

#: Every environment variable the settings module reads, in order of first read.
READ_VARIABLES: list[str] = []

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _raw(name: str, required: bool) -> str | None:
    if name not in READ_VARIABLES:
        READ_VARIABLES.append(name)
    value = os.environ.get(name)
    if value is None or value == "":
        if required:
            raise ImproperlyConfigured(f"environment variable {name} is required here and has no default")
        return None
    return value


def env_str(name: str, default: str = "", *, required: bool = False) -> str:
    value = _raw(name, required)
    return default if value is None else value


def env_bool(name: str, default: bool = False) -> bool:
    value = _raw(name, False)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name}={value!r} is not a boolean (use one of 1/0, true/false, yes/no, on/off)"
    )


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name, False)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}={number} is above the maximum {maximum}")
    return number


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    value = _raw(name, False)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
    return number


def env_list(name: str, default: list[str], *, required: bool = False) -> list[str]:
    value = _raw(name, required)
    if value is None:
        return list(default)
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ImproperlyConfigured(f"{name}={value!r} holds no comma-separated items")
    return items


def env_url(name: str, default: str = "", *, schemes: tuple[str, ...], required: bool = False) -> str:
    value = _raw(name, required)
    if value is None:
        return default
    parsed = urlparse(value)
    if parsed.scheme not in schemes:
        raise ImproperlyConfigured(
            f"{name} has scheme {parsed.scheme!r}; expected one of {', '.join(schemes)}"
        )
    return value
