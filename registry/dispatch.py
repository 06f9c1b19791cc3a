"""Enqueueing Celery tasks by name (services never import `workers`) from on-commit callbacks.

The row a task works on is already committed when the callback runs, so a broker that refuses
the message (Redis restarting, down at commit) must not turn the stored row into a 500: the
failure is logged and `workers.requeue_stale` finds the row again (queued runs, pending
releases, due profile re-fits) and re-enqueues it.
"""

from __future__ import annotations

import logging

from celery import current_app

__all__ = ["enqueue"]

log = logging.getLogger(__name__)


def enqueue(task: str, *args: int) -> bool:
    """Send `task(*args)`; False (and logged) when the broker did not take it."""
    try:
        # A signature (not send_task) honours eager mode in tests.
        current_app.signature(task, args=list(args)).delay()
    except Exception:
        log.exception("could not enqueue %s%r; the periodic sweep enqueues it again", task, tuple(args))
        return False
    return True
