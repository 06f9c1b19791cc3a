"""Migration 0007 moves each run's JSON hypervolume history into HypervolumePoint rows."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from registry.models import HypervolumePoint, PlanningRun
from tests.registry.factories import demo_fleet

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("registry", "0006_idempotency_key")]
AFTER = [("registry", "0007_hypervolume_points")]


def _migrate(targets: list[tuple[str, str]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


def test_the_json_history_becomes_rows_in_order_and_leaves_the_json():
    fleet = demo_fleet()
    run, phone, board = fleet["run"], fleet["phone"], fleet["board"]
    try:
        _migrate(BEFORE)
        history = [
            {
                "at": "2026-12-01T10:00:00+00:00",
                "device": phone.pk,
                "trials": 50,
                "hypervolume": 0.1,
                "source": "estimated",
            },
            {
                "at": "2026-12-01T10:00:05+00:00",
                "device": board.pk,
                "trials": 50,
                "hypervolume": 0.2,
                "source": "estimated",
            },
            {"device": phone.pk, "trials": 100, "hypervolume": 0.3},  # an older point without "at"
            {"at": "2026-02-30T10:00:00+00:00", "device": board.pk, "trials": 100, "hypervolume": 0.35},
            {"device": 999_999, "trials": 150, "hypervolume": 0.4},  # its profile was deleted
            {"device": phone.pk, "trials": "many"},  # unreadable: dropped
        ]
        # The run's table is the same in 0006 and 0007 (only the new table differs).
        PlanningRun.objects.filter(pk=run.pk).update(
            progress={"best": {str(phone.pk): {"accuracy": 0.8}}, "hypervolume": history}
        )
        _migrate(AFTER)
        points = list(HypervolumePoint.objects.filter(run=run).order_by("id"))
        assert [(p.device_profile_id, p.trials, p.hypervolume) for p in points] == [
            (phone.pk, 50, 0.1),
            (board.pk, 50, 0.2),
            (phone.pk, 100, 0.3),
            (board.pk, 100, 0.35),  # no such date: the run's start stands in
        ]
        assert points[1].at.isoformat() == "2026-12-01T10:00:05+00:00"
        assert PlanningRun.objects.get(pk=run.pk).progress == {"best": {str(phone.pk): {"accuracy": 0.8}}}
    finally:
        _migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
