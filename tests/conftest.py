"""Shared fixtures: the fixed cast of people (staff, viewer, outsider), API clients, services.

Service rule: outside CI a test that needs PostgreSQL / Redis / Chromium skips with a message
naming what is missing; with CI=true the same absence fails the test.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def need(condition: bool, what: str) -> None:
    """Skip (locally) or fail (CI) when a real service the test needs is not there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required service missing in CI: {what}")
    pytest.skip(f"needs {what}")


def reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=1
        ):
            return True
    except OSError:
        return False


@pytest.fixture
def require_postgres() -> str:
    url = os.environ.get("DATABASE_URL", "")
    need(url.startswith(("postgres://", "postgresql://")), "DATABASE_URL pointing at PostgreSQL")
    need(reachable(url, 5432), f"PostgreSQL reachable at {urlparse(url).hostname}")
    return url


@pytest.fixture
def require_redis() -> str:
    url = os.environ.get("REDIS_URL", "")
    need(url.startswith("redis://"), "REDIS_URL pointing at Redis")
    need(reachable(url, 6379), f"Redis reachable at {urlparse(url).hostname}")
    return url


@pytest.fixture
def chromium_path() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
    need(os.path.exists(path), "Debian's chromium (apt-get install chromium)")
    return path


@pytest.fixture
def make_user(db: None, django_user_model: type) -> Callable[..., object]:
    from django.contrib.auth.models import Group

    def make(username: str, *, role: str) -> object:
        user = django_user_model.objects.create_user(username=username, password="pw-" + username)
        if role == "staff":
            user.is_staff = True
            user.save()
        elif role == "viewer":
            user.groups.add(Group.objects.get_or_create(name="viewer")[0])
        return user

    return make


@pytest.fixture
def staff(make_user: Callable[..., object]) -> object:
    return make_user("stella", role="staff")


@pytest.fixture
def viewer(make_user: Callable[..., object]) -> object:
    return make_user("victor", role="viewer")


@pytest.fixture
def outsider(make_user: Callable[..., object]) -> object:
    return make_user("oscar", role="none")


@pytest.fixture
def api_as() -> Callable[[object | None], object]:
    from rest_framework.test import APIClient

    def client_for(user: object | None) -> APIClient:
        client = APIClient()
        if user is not None:
            client.force_authenticate(user)
        return client

    return client_for


@pytest.fixture
def catalog(db: None) -> None:
    from devices.catalog import load_catalog

    load_catalog()


@pytest.fixture(scope="session", autouse=True)
def _close_connections_to_the_test_database(request: pytest.FixtureRequest) -> Iterator[None]:
    # Optuna's storage keeps pooled SQLAlchemy connections to the test database; set up after
    # the database, this is torn down before it, so dropping it finds no other session.
    if not request.config.pluginmanager.hasplugin("django"):
        yield
        return
    request.getfixturevalue("django_db_setup")
    yield
    from devices.hotpath import stop_listener
    from registry.studies import dispose_engines

    dispose_engines()
    # The delivery listener thread (Redis runs) looks in the database twice a second: a look
    # in flight at the end would keep the test database from being dropped.
    stop_listener()


@pytest.fixture(autouse=True)
def _fast_password_hashing(request: pytest.FixtureRequest) -> None:
    # PBKDF2's deliberate slowness costs seconds per test user and protects nothing here.
    # (Engine tests may run without pytest-django: `-p no:django`.)
    if not request.config.pluginmanager.hasplugin("django"):
        return
    settings = request.getfixturevalue("settings")
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _private_cache(request: pytest.FixtureRequest) -> None:
    # Each test gets its own empty cache: the device config path keeps entries there (and in
    # a per-process memo, reset with it) keyed by database ids that repeat from test to test.
    # Integration tests keep the configured cache (Redis): other processes must see it.
    if not request.config.pluginmanager.hasplugin("django") or request.node.get_closest_marker("integration"):
        return
    import uuid

    settings = request.getfixturevalue("settings")
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": f"test-{uuid.uuid4().hex}",
        }
    }
