"""The periodic sweep (`workers.requeue_stale`): queued runs whose message was lost are sent
again, and a cancelled run whose worker died is finished as cancelled."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from registry import fleet
from registry.models import DeviceSearch, PlanningRun
from registry.planning import cancel_run
from tests.registry.factories import make_model, make_profile

pytestmark = pytest.mark.django_db


@pytest.fixture
def stale_after(settings):
    settings.EDGEFIT_STALE_SECONDS = 60
    return timezone.now() - timedelta(seconds=61)


def _run(status: str, *, age, **fields) -> PlanningRun:
    run = PlanningRun.objects.create(
        base_model=make_model(f"model {PlanningRun.objects.count()}"),
        policy={"kind": "max_accuracy"},
        trials_per_device=5,
        real_eval_budget=1,
        status=status,
        **fields,
    )
    run.device_profiles.set([make_profile(f"phone {run.pk}")])
    PlanningRun.objects.filter(pk=run.pk).update(created_at=age)  # auto_now_add ignores the argument
    return run


def test_a_queued_run_whose_message_was_lost_is_enqueued_again_once_per_stale_period(stale_after):
    lost = _run("queued", age=stale_after)
    fresh = _run("queued", age=timezone.now())
    assert fleet.stale_work()["queued"] == [lost.pk]
    # Sent again just now: the next sweep leaves it alone unless it waits another period.
    assert fleet.stale_work()["queued"] == []
    PlanningRun.objects.filter(pk=lost.pk).update(heartbeat_at=stale_after)
    assert fleet.stale_work()["queued"] == [lost.pk]
    assert fresh.pk not in fleet.stale_work()["queued"]


def test_the_sweep_task_enqueues_run_plan_for_lost_queued_runs(stale_after):
    from workers import tasks

    lost = _run("queued", age=stale_after)
    with (
        mock.patch.object(tasks.run_plan, "delay") as run_plan,
        mock.patch.object(tasks.build_package, "delay"),
    ):
        work = tasks.requeue_stale()
    run_plan.assert_called_once_with(lost.pk)
    assert work["queued"] == [lost.pk]


def test_a_cancelled_run_whose_worker_died_is_finished_as_cancelled(stale_after):
    run = _run("running", age=stale_after, heartbeat_at=stale_after, started_at=stale_after)
    search = DeviceSearch.objects.create(
        run=run, device_profile=run.device_profiles.get(), status="running", heartbeat_at=stale_after
    )
    cancel_run(run)
    assert PlanningRun.objects.get(pk=run.pk).status == "running"  # its worker would finish it

    work = fleet.stale_work()

    run.refresh_from_db()
    assert run.status == "cancelled" and run.finished_at is not None
    assert "cancelled on request" in run.error
    assert DeviceSearch.objects.get(pk=search.pk).status == "cancelled"
    assert work["cancelled"] == [run.pk]
    assert run.pk not in work["starts"] + work["confirms"] and search.pk not in work["searches"]


def test_a_cancelled_run_whose_worker_still_beats_is_left_to_it(stale_after):
    run = _run("running", age=stale_after, heartbeat_at=timezone.now(), started_at=stale_after)
    cancel_run(run)
    assert fleet.stale_work()["cancelled"] == []
    assert PlanningRun.objects.get(pk=run.pk).status == "running"
