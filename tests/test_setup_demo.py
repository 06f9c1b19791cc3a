"""The demo setup command: creates its logins once and leaves existing ones alone."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def _setup(*flags: str) -> str:
    out = io.StringIO()
    call_command("setup_demo", "--skip-catalog", "--skip-model", *flags, stdout=out)
    return out.getvalue()


def test_setup_demo_creates_its_logins_then_leaves_them_alone(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    first = _setup()
    password = re.search(r"demo staff login:\s+demo / (\S+)", first)[1]
    demo = get_user_model().objects.get(username="demo")
    assert demo.is_superuser and demo.check_password(password)
    assert get_user_model().objects.get(username="viewer").groups.filter(name="viewer").exists()

    # An operator demotes the demo login and changes its password; running the setup again
    # (the README does so on the production stack) changes neither.
    demo.is_staff = demo.is_superuser = False
    demo.set_password("operators-own")
    demo.save()
    again = _setup()
    demo.refresh_from_db()
    assert not demo.is_superuser and not demo.is_staff and demo.check_password("operators-own")
    assert "demo exists with another password: left as it is" in again
    assert password not in again.split("demo viewer login")[0]

    _setup("--reset-users")
    demo.refresh_from_db()
    assert demo.is_superuser and demo.check_password(password)
