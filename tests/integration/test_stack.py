"""The real stack: PostgreSQL, Redis (cache and broker) and a Celery worker process."""

from __future__ import annotations

import os

import pytest
from django.conf import settings
from django.core.cache import cache
from django.db import connection

pytestmark = pytest.mark.integration


def test_the_suite_runs_on_postgresql_and_redis(require_postgres, require_redis, db):
    assert connection.vendor == "postgresql"
    assert "redis" in settings.CACHES["default"]["BACKEND"].lower()
    cache.set("edgefit:test", {"x": 1}, 10)
    assert cache.get("edgefit:test") == {"x": 1}


def test_a_task_round_trips_through_a_real_worker_process(start_worker):
    from celery import current_app

    assert settings.CELERY_BROKER_URL.startswith("redis://"), "integration tests need the Redis broker"
    worker = start_worker()
    result = current_app.send_task("workers.ping", args=["hello"], queue=worker.queue)
    try:
        answer = result.get(timeout=90)
    except Exception:
        pytest.fail(f"no answer from the worker; its log:\n{worker.output()[-3000:]}")
    assert answer["echo"] == "hello"
    assert answer["worker_pid"] != os.getpid()
    from django_celery_results.models import TaskResult

    stored = TaskResult.objects.get(task_id=result.id)
    assert stored.status == "SUCCESS" and stored.task_name == "workers.ping"
