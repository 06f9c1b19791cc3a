from __future__ import annotations

import io
import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import transaction

from accounts.roles import VIEWER_GROUP


class Command(BaseCommand):
    help = "Load the device catalog and demo data, and create the demo staff and viewer logins."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--skip-catalog", action="store_true")
        parser.add_argument("--skip-model", action="store_true", help="do not register the demo model")
        parser.add_argument(
            "--reset-users",
            action="store_true",
            help="reset the 'demo' and 'viewer' logins (password, role) even if they exist already",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["skip_catalog"]:
            call_command("load_catalog", stdout=self.stdout)
        if not options["skip_model"]:
            call_command("register_model", "minilm-docstrings", stdout=self.stdout)
        with transaction.atomic():
            Group.objects.get_or_create(name=VIEWER_GROUP)
            staff_password = self._demo_password("demo_staff_password")
            viewer_password = self._demo_password("demo_viewer_password")
            staff_line = self._ensure_user("demo", staff_password, staff=True, reset=options["reset_users"])
            viewer_line = self._ensure_user(
                "viewer", viewer_password, staff=False, reset=options["reset_users"]
            )
        self.stdout.write(f"demo staff login:  {staff_line}")
        self.stdout.write(f"demo viewer login: {viewer_line}")
        # Devices enroll with it: python -m devices.agent enroll --key … (kept in ./var).
        key = io.StringIO()
        call_command(
            "enrollment_key", "demo", "--keep-in", str(settings.VAR_DIR / "demo_enrollment_key"), stdout=key
        )
        self.stdout.write(f"demo enrollment key (fleet 'demo'): {key.getvalue().strip()}")

    def _demo_password(self, filename: str) -> str:
        # Kept in ./var so the printed login stays valid across restarts of the embedded setup.
        path = settings.VAR_DIR / filename
        if not path.exists():
            path.write_text(secrets.token_urlsafe(9))
            path.chmod(0o600)
        return path.read_text().strip()

    def _ensure_user(self, username: str, password: str, *, staff: bool, reset: bool) -> str:
        """Create the demo login, or reset it with `reset`; an existing one is left as it is
        (an operator may have changed its password or role: re-running the setup on a real
        stack must not hand the 'demo' name superuser rights again).  Returns what to print."""
        user_model = get_user_model()
        user = user_model.objects.filter(username=username).first()
        if user is not None and not reset:
            if user.check_password(password):
                return f"{username} / {password}"
            return f"{username} exists with another password: left as it is (--reset-users resets it)"
        user = user or user_model(username=username)
        user.is_staff = staff
        user.is_superuser = staff
        user.set_password(password)
        user.save()
        if not staff:
            user.groups.add(Group.objects.get(name=VIEWER_GROUP))
        return f"{username} / {password}"
