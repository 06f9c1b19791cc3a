"""Celery tasks: thin, take ids, call one service, safe to run twice (acks_late).

A run fans out: `run_plan` → one `search_device` per device (several workers share a run) →
the last search enqueues `confirm_run`.  `requeue_stale` (every minute, and when a worker
starts) re-enqueues the stage a killed worker left behind, the runs, package builds and profile
re-fits whose message the broker lost, and finishes cancelled runs whose worker died.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from registry import calibration, fleet, measurements, packages, releases
from registry.engine import compute_sensitivity
from registry.models import BaseModel

log = logging.getLogger(__name__)


@shared_task(name="workers.ping")
def ping(payload: str) -> dict[str, object]:
    """Round trip used by health checks and integration tests: proves a worker process runs."""
    return {"echo": payload, "worker_pid": os.getpid(), "host": socket.gethostname()}


@shared_task(name="workers.run_plan")
def run_plan(run_id: int) -> None:
    searches, confirm = fleet.start_run(run_id)
    for search_id in searches:
        search_device.delay(search_id)
    if confirm:
        confirm_run.delay(run_id)


@shared_task(name="workers.search_device")
def search_device(search_id: int) -> None:
    finished_run = fleet.search_device(search_id)
    if finished_run is not None:
        confirm_run.delay(finished_run)


@shared_task(name="workers.confirm_run")
def confirm_run(run_id: int) -> None:
    fleet.confirm_run(run_id)


@shared_task(name="workers.profile_sensitivity")
def profile_sensitivity(model_id: int) -> None:
    model = BaseModel.objects.filter(pk=model_id).first()
    if model is not None and not model.sensitivity:
        compute_sensitivity(model)


@shared_task(name="workers.requeue_stale")
def requeue_stale() -> dict[str, list[int]]:
    work = fleet.stale_work()
    for search_id in work["searches"]:
        search_device.delay(search_id)
    for run_id in work["confirms"]:
        confirm_run.delay(run_id)
    for run_id in [*work["starts"], *work["queued"]]:
        run_plan.delay(run_id)
    work["builds"] = releases.stale_pending()
    for variant_id in work["builds"]:
        build_package.delay(variant_id)
    work["recalibrations"] = measurements.stale_recalibrations()
    for profile_id in work["recalibrations"]:
        recalibrate_profile.delay(profile_id)
    if any(work.values()):
        log.warning("re-enqueued stale work: %s", work)
    return work


@worker_ready.connect
def _recover_on_start(sender: Any = None, **kwargs: Any) -> None:
    # A worker that starts after another died picks up what that one left behind.
    requeue_stale.delay()


@shared_task(name="workers.build_package")
def build_package(variant_id: int) -> dict[str, object] | None:
    """Build (or reuse) the variant's signed package and activate the releases waiting for it."""
    package = packages.build_for_variant(variant_id)
    return None if package is None else {"digest": package.digest, "bytes": package.blob_bytes}


@shared_task(name="workers.recalibrate_profile")
def recalibrate_profile(profile_id: int) -> dict[str, object] | None:
    """Re-fit the profile's cost model to its devices' measurements; re-predict and re-rank."""
    return calibration.recalibrate_profile(profile_id)
