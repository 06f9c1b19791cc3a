"""A real Celery worker process against the test database and the real broker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def database_url_for_tests() -> str:
    """The URL of the database pytest-django created (test_…), for processes we start."""
    from django.db import connection

    s = connection.settings_dict
    auth = s["USER"] or ""
    if s.get("PASSWORD"):
        auth += f":{s['PASSWORD']}"
    host = f"{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}"
    return f"postgres://{auth}@{host}/{s['NAME']}"


class WorkerProcess:
    """`celery worker` in its own process, consuming a queue private to this test."""

    def __init__(self, queue: str, env: dict[str, str], log: Path, *, name: str, beat: bool = False) -> None:
        self.queue = queue
        self.log = log
        self._handle = log.open("w")
        beat_args = ["--beat", "--schedule", str(log.with_suffix(".beat"))] if beat else []
        command = [
            sys.executable, "-m", "celery", "-A", "config", "worker",
            "--pool", "prefork", "--concurrency", "1", "--queues", queue,
            "--hostname", f"{name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat", *beat_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self._handle, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self) -> None:
        """Terminate the worker and every pool child it forked (its own session), so no
        process keeps a connection to the test database after the test."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._handle.close()

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until the worker has answered a ping: its pool child has booted (imported
        Django and torch) and is idle.  A test that times something on this machine calls it
        first, so the worker's start-up does not share the CPU with the measurement."""
        from celery import current_app

        result = current_app.send_task("workers.ping", args=["ready?"], queue=self.queue)
        try:
            result.get(timeout=timeout)
        except Exception:
            pytest.fail(f"the worker never answered a ping; its log:\n{self.output()[-3000:]}")


@pytest.fixture
def task_queue() -> Iterator[str]:
    """A queue private to this test, used by the test process and its workers alike."""
    from celery import current_app

    queue = f"edgefit-test-{uuid.uuid4().hex[:8]}"
    before = current_app.conf.task_default_queue
    current_app.conf.task_default_queue = queue
    yield queue
    current_app.conf.task_default_queue = before


@pytest.fixture
def start_worker(
    require_postgres: str, require_redis: str, transactional_db: None, tmp_path: Path, task_queue: str
) -> Iterator[object]:
    started: list[WorkerProcess] = []

    def start(*, beat: bool = False, **env_overrides: str) -> WorkerProcess:
        from django.conf import settings

        env = dict(
            os.environ,
            DATABASE_URL=database_url_for_tests(),
            DB_CONN_MAX_AGE="0",
            EDGEFIT_TASK_QUEUE=task_queue,
            EDGEFIT_DATA_DIR=str(settings.ENGINE_DATA_DIR),
            **env_overrides,
        )
        name = f"w{len(started)}-{task_queue}"
        worker = WorkerProcess(task_queue, env, tmp_path / f"worker-{len(started)}.log", name=name, beat=beat)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
