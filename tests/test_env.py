"""Settings helpers fail loudly on malformed values and fall back to defaults when unset."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from config import env


def test_unset_variables_give_the_default(monkeypatch):
    monkeypatch.delenv("EDGEFIT_TEST_X", raising=False)
    assert env.env_int("EDGEFIT_TEST_X", 7) == 7
    assert env.env_bool("EDGEFIT_TEST_X", True) is True
    assert env.env_list("EDGEFIT_TEST_X", ["a"]) == ["a"]
    assert "EDGEFIT_TEST_X" in env.READ_VARIABLES


@pytest.mark.parametrize(
    ("reader", "value", "message"),
    [
        (lambda: env.env_int("EDGEFIT_TEST_X", 1), "many", "is not an integer"),
        (lambda: env.env_int("EDGEFIT_TEST_X", 1, minimum=5), "3", "below the minimum 5"),
        (lambda: env.env_bool("EDGEFIT_TEST_X"), "maybe", "is not a boolean"),
        (lambda: env.env_float("EDGEFIT_TEST_X", 1.0), "1,5", "is not a number"),
        (lambda: env.env_list("EDGEFIT_TEST_X", []), " , ", "holds no comma-separated items"),
        (lambda: env.env_url("EDGEFIT_TEST_X", schemes=("redis",)), "http://x", "expected one of redis"),
    ],
)
def test_malformed_values_raise_naming_the_variable(monkeypatch, reader, value, message):
    monkeypatch.setenv("EDGEFIT_TEST_X", value)
    with pytest.raises(ImproperlyConfigured, match=message) as caught:
        reader()
    assert "EDGEFIT_TEST_X" in str(caught.value)


def test_a_required_secret_has_no_default(monkeypatch):
    monkeypatch.delenv("EDGEFIT_TEST_SECRET", raising=False)
    with pytest.raises(ImproperlyConfigured, match="EDGEFIT_TEST_SECRET is required"):
        env.env_str("EDGEFIT_TEST_SECRET", required=True)


def test_production_mode_refuses_to_start_without_its_secrets(tmp_path):
    import os
    import subprocess
    import sys

    environment = {
        k: v for k, v in os.environ.items() if k not in {"DJANGO_SECRET_KEY", "EDGEFIT_SIGNING_KEY"}
    }
    environment.update(
        EDGEFIT_PRODUCTION="true", EDGEFIT_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="config.settings"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env=environment,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required" in result.stderr


def _deploy_check(tmp_path, **extra: str) -> str:
    import os
    import subprocess
    import sys

    environment = dict(os.environ)
    environment.pop("EDGEFIT_HTTPS", None)
    environment.update(
        # Production requires the real stack's URLs; the checks below connect to none of them.
        DATABASE_URL="postgres://edgefit@127.0.0.1:5432/edgefit",
        REDIS_URL="redis://127.0.0.1:6379/0",
        CELERY_BROKER_URL="redis://127.0.0.1:6379/1",
        EDGEFIT_PRODUCTION="true",
        EDGEFIT_VAR_DIR=str(tmp_path),
        DJANGO_SETTINGS_MODULE="config.settings",
        DJANGO_SECRET_KEY="x" * 30 + "-a-long-random-test-secret-value-0123456789",
        EDGEFIT_SIGNING_KEY="11" * 32,
        DJANGO_ALLOWED_HOSTS="edgefit.example",
        **extra,
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"], env=environment, capture_output=True, text=True
    )
    out = result.stdout + result.stderr
    assert "System check identified" in out, out  # the checks ran (settings loaded)
    return out


def test_production_settings_enforce_https(tmp_path):
    # Django's deployment checks: no HSTS (W004) and no redirect to HTTPS (W008) were missing.
    out = _deploy_check(tmp_path)
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning not in out, out
    # The plain-HTTP opt-out (the compose demo on localhost) is visible to the same checks.
    assert "security.W008" in _deploy_check(tmp_path, EDGEFIT_HTTPS="false")
