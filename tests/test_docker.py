"""docker/ stays consistent with the settings: every variable it sets is one the settings read."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from config import env

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def _app_environment() -> dict[str, str]:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    variables: dict[str, str] = {}
    for name in ("web", "worker"):
        variables.update(compose["services"][name]["environment"])
    return variables


def test_every_variable_compose_sets_is_read_by_the_settings():
    import config.settings  # noqa: F401  (populates env.READ_VARIABLES)

    unread = sorted(set(_app_environment()) - set(env.READ_VARIABLES))
    assert not unread, f"compose sets variables the settings never read: {unread}"


def test_the_env_example_covers_every_secret_compose_requires():
    text = (DOCKER / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = {
        line.split("=")[0]
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert required and required <= example


def test_compose_runs_the_four_services_of_the_real_stack():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert {"web", "worker", "postgres", "redis"} <= set(compose["services"])
    assert _app_environment()["DATABASE_URL"].startswith("postgres://")
    assert _app_environment()["CELERY_BROKER_URL"].startswith("redis://")
