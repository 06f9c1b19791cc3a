"""A broker that refuses a message after the commit (down, Redis restarting): the stored row is
answered as stored, never as a 500, and the periodic sweep sends the work again."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.core.cache import cache
from django.utils import timezone

from registry.models import PlanningRun, Release


class _Broker:
    """Stands in for `current_app.signature(name, args=…)`: records sends, or refuses them."""

    def __init__(self, down: bool) -> None:
        self.down = down
        self.sent: list[tuple[str, list[int]]] = []

    def signature(self, name: str, args: list[int]) -> _Broker._Signature:
        return self._Signature(self, name, args)

    class _Signature:
        def __init__(self, broker: _Broker, name: str, args: list[int]) -> None:
            self.broker, self.name, self.args = broker, name, args

        def delay(self) -> None:
            if self.broker.down:
                raise ConnectionError("broker down")
            self.broker.sent.append((self.name, self.args))


@pytest.mark.django_db(transaction=True)
def test_a_run_and_a_release_stored_while_the_broker_is_down_are_201_and_swept_later(
    api_as, staff, profile, model, variant, package_dir, settings
):
    client = api_as(staff)
    client.raise_request_exception = False  # a 500 must show as one, as a real client sees it
    broker = _Broker(down=True)
    with mock.patch("celery.current_app.signature", broker.signature):
        plan = client.post(
            "/api/v1/plans/",
            {
                "base_model": model.pk,
                "device_profiles": [profile.pk],
                "policy": {"kind": "max_accuracy"},
                "trials_per_device": 5,
                "real_eval_budget": 2,
            },
            format="json",
        )
        release = client.post(
            "/api/v1/releases/", {"variant": variant.pk, "profile": profile.slug}, format="json"
        )
    assert plan.status_code == 201, plan.content[:300]
    assert release.status_code == 201, release.content[:300]
    assert PlanningRun.objects.get().status == "queued"
    assert Release.objects.get().status == "pending"

    # One stale period later the sweep sends both again.
    from workers import tasks

    settings.EDGEFIT_STALE_SECONDS = 60
    old = timezone.now() - timedelta(seconds=61)
    PlanningRun.objects.update(created_at=old)
    Release.objects.update(updated_at=old)  # auto_now: only a queryset update sets it back
    with (
        mock.patch.object(tasks.run_plan, "delay") as run_plan,
        mock.patch.object(tasks.build_package, "delay") as build_package,
    ):
        work = tasks.requeue_stale()
    run_plan.assert_called_once_with(plan.json()["id"])
    build_package.assert_called_once_with(variant.pk)
    assert work["builds"] == [variant.pk]


def test_a_pending_release_is_swept_once_per_stale_period_and_a_fresh_one_not_at_all(
    profile, make_variant, staff, settings, django_capture_on_commit_callbacks
):
    from registry.releases import publish, stale_pending

    settings.EDGEFIT_STALE_SECONDS = 60
    with django_capture_on_commit_callbacks(execute=False):  # the build message is "lost"
        lost = publish(variant=make_variant("lost", precision="int8"), profile=profile, by=staff)
        publish(variant=make_variant("fresh", precision="int4"), profile=profile, alias="beta", by=staff)
    old = timezone.now() - timedelta(seconds=61)
    Release.objects.filter(pk=lost.pk).update(updated_at=old)
    assert stale_pending() == [lost.variant_id]
    assert stale_pending() == []  # just sent again: a slow build is not sent at every sweep
    assert Release.objects.get(pk=lost.pk).version == lost.version  # clients see no change


@pytest.fixture
def device(profile, package, make_device, publish):
    publish(package.variant, profile)
    return make_device(profile)


def test_a_measurement_stored_while_the_broker_is_down_does_not_block_later_refits(
    client, profile, package, device, django_capture_on_commit_callbacks
):
    from tests.delivery.test_measurements_api import good, post

    broker = _Broker(down=True)
    with (
        mock.patch("celery.current_app.signature", broker.signature),
        django_capture_on_commit_callbacks(execute=True),
    ):
        response = post(client, device["token"], good(package))
    assert response.status_code == 201
    # Nothing was queued, so no "re-fit queued" flag may stay behind for 10 minutes.
    assert cache.get(f"recalibration-queued:{profile.pk}") is None

    broker.down = False
    with (
        mock.patch("celery.current_app.signature", broker.signature),
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert post(client, device["token"], good(package)).status_code == 201
    assert broker.sent == [("workers.recalibrate_profile", [profile.pk])]


def test_the_enqueue_failure_is_logged_naming_the_task(caplog):
    from registry.dispatch import enqueue

    with mock.patch("celery.current_app.signature", _Broker(down=True).signature):
        assert enqueue("workers.run_plan", 7) is False
    assert "workers.run_plan(7,)" in caplog.text and "broker down" in caplog.text


def test_a_refit_whose_message_was_lost_is_enqueued_again_by_the_sweep(
    client, profile, package, device, settings, django_capture_on_commit_callbacks
):
    from registry.models import RecalibrationRequest
    from tests.delivery.test_measurements_api import good, post
    from workers import tasks

    broker = _Broker(down=True)
    with (
        mock.patch("celery.current_app.signature", broker.signature),
        django_capture_on_commit_callbacks(execute=True),
    ):
        response = post(client, device["token"], good(package))
    assert response.status_code == 201 and response.json()["recalibration"] == "queued"
    assert broker.sent == []  # the message is lost

    settings.EDGEFIT_STALE_SECONDS = 60
    with mock.patch.object(tasks.recalibrate_profile, "delay") as recalibrate:
        assert tasks.requeue_stale()["recalibrations"] == []  # just reported: its message may be on its way
        recalibrate.assert_not_called()
        RecalibrationRequest.objects.update(requested_at=timezone.now() - timedelta(seconds=61))
        assert tasks.requeue_stale()["recalibrations"] == [profile.pk]
        recalibrate.assert_called_once_with(profile.pk)
        assert tasks.requeue_stale()["recalibrations"] == []  # once per stale period, not every sweep


def test_a_refit_that_ran_leaves_nothing_for_the_sweep_unless_a_report_came_in_meanwhile(
    client, profile, package, device, settings, django_capture_on_commit_callbacks
):
    from registry import calibration
    from registry.models import RecalibrationRequest
    from tests.delivery.test_measurements_api import good, post

    with django_capture_on_commit_callbacks(execute=False):
        assert post(client, device["token"], good(package)).status_code == 201
    real_measurements = calibration._device_measurements

    def a_report_arrives_meanwhile(profile_obj):
        found = real_measurements(profile_obj)
        with django_capture_on_commit_callbacks(execute=False):
            assert post(client, device["token"], good(package)).status_code == 201
        return found

    with mock.patch.object(calibration, "_device_measurements", a_report_arrives_meanwhile):
        assert calibration.recalibrate_profile(profile.pk)["n_measurements"] == 1
    assert RecalibrationRequest.objects.filter(profile=profile).exists()  # the second report's re-fit
    assert calibration.recalibrate_profile(profile.pk)["n_measurements"] == 2
    assert not RecalibrationRequest.objects.exists()
