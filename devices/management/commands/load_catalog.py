from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from devices.catalog import DEFAULT_CATALOG, CatalogError, load_catalog


class Command(BaseCommand):
    help = "Load a device catalog (JSON); all entries or none."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("path", nargs="?", default=str(DEFAULT_CATALOG))

    def handle(self, *args: Any, path: str, **options: Any) -> None:
        try:
            counts = load_catalog(Path(path))
        except CatalogError as exc:
            raise CommandError(f"{exc} — nothing was imported") from None
        self.stdout.write(f"catalog {path}: {counts['created']} created, {counts['updated']} updated")
