"""The embedded defaults work end to end: SQLite database, SQLite broker, a real worker process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEND = """
import django; django.setup()
from celery import current_app
print(current_app.send_task("workers.ping", args=["embedded"]).get(timeout=90)["echo"])
"""


@pytest.mark.integration
def test_a_task_round_trips_on_the_embedded_broker_and_database(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL"}}
    env.update(EDGEFIT_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="config.settings")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        sent = subprocess.run(
            [sys.executable, "-c", SEND], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert sent.returncode == 0, sent.stderr[-2000:] + (tmp_path / "worker.log").read_text()[-2000:]
        assert sent.stdout.strip() == "embedded"
        assert (tmp_path / "celery-broker.sqlite3").exists()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
