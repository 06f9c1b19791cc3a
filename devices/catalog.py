"""Load a device catalog (JSON) into DeviceProfile rows: all entries or none.

Each entry is checked with the same rules as the API; the first problem found in any entry
aborts the whole import, and the error names the entry (index and name) and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.db import transaction
from rest_framework.exceptions import ValidationError

from devices.models import DeviceProfile
from devices.serializers import DeviceProfileSerializer

__all__ = ["DEFAULT_CATALOG", "CatalogError", "load_catalog"]

DEFAULT_CATALOG = Path(__file__).resolve().parent / "data" / "devices.json"
CATALOG_FORMAT = "edgefit-device-catalog/1"


class CatalogError(ValueError):
    """The catalog file is malformed; the message names the line or entry and the field."""


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})"
        ) from None
    if not isinstance(document, dict) or document.get("format") != CATALOG_FORMAT:
        raise CatalogError(f'{path}: top level must be an object with "format": "{CATALOG_FORMAT}"')
    entries = document.get("devices")
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f'{path}: "devices" must be a non-empty list')
    return entries


def _flatten(detail: Any) -> str:
    if isinstance(detail, dict):
        return "; ".join(f"{field}: {_flatten(messages)}" for field, messages in detail.items())
    if isinstance(detail, list):
        return " ".join(_flatten(item) for item in detail)
    return str(detail)


@transaction.atomic
def load_catalog(path: Path = DEFAULT_CATALOG) -> dict[str, int]:
    """Create or update one profile per entry, matched by name. Returns counts."""
    entries = _read(path)
    seen: set[str] = set()
    created = updated = 0
    for index, entry in enumerate(entries, start=1):
        label = f"entry {index}" + (f" ({entry.get('name')!r})" if isinstance(entry, dict) else "")
        if not isinstance(entry, dict):
            raise CatalogError(f"{path}: {label}: must be an object")
        name = entry.get("name")
        if name in seen:
            raise CatalogError(f"{path}: {label}: name appears twice in the catalog")
        seen.add(str(name))
        instance = DeviceProfile.objects.filter(name=name).first()
        serializer = DeviceProfileSerializer(instance=instance, data=entry)
        try:
            serializer.is_valid(raise_exception=True)
        except ValidationError as exc:
            raise CatalogError(f"{path}: {label}: {_flatten(exc.detail)}") from None
        serializer.save(origin=DeviceProfile.Origin.CATALOG)
        if instance is None:
            created += 1
        else:
            updated += 1
    return {"created": created, "updated": updated}
