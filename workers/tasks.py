"""Celery tasks: thin, take ids, call one service, safe to run twice (acks_late)."""

from __future__ import annotations

import os
import socket

from celery import shared_task


@shared_task(name="workers.ping")
def ping(payload: str) -> dict[str, object]:
    """Round trip used by health checks and integration tests: proves a worker process runs."""
    return {"echo": payload, "worker_pid": os.getpid(), "host": socket.gethostname()}
