from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from accounts.models import hash_token
from devices.enrollment import EnrollmentError, create_enrollment_key
from devices.models import EnrollmentKey


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read, from its first byte (no window in which
    the key sits in a world-readable file)."""
    path.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


class Command(BaseCommand):
    help = (
        "Create an enrollment key for a fleet and print it (shown once, stored hashed). Devices "
        "enroll with it: POST /api/v1/device/enroll."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("fleet", help="fleet name, e.g. 'lab boards'")
        parser.add_argument("--profile", default=None, help="pin the device profile (slug)")
        parser.add_argument("--channel", default="stable", help="alias the devices follow")
        parser.add_argument(
            "--keep-in",
            type=Path,
            default=None,
            help="file holding the key: reused while it is valid, else replaced (the demo setup)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        keep: Path | None = options["keep_in"]
        if keep is not None and keep.exists():
            raw = keep.read_text().strip()
            if EnrollmentKey.objects.filter(digest=hash_token(raw), revoked_at__isnull=True).exists():
                self.stdout.write(raw)
                return
        try:
            _, raw = create_enrollment_key(
                fleet=options["fleet"],
                profile=options["profile"],
                channel=options["channel"],
                created_by=None,
            )
        except EnrollmentError as exc:
            raise CommandError(str(exc)) from None
        if keep is not None:
            _write_private(keep, raw)
        self.stdout.write(raw)
