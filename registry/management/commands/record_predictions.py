from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from registry.models import PlanningRun
from registry.predictions import record_run_predictions


class Command(BaseCommand):
    help = (
        "Copy the per-device predictions of finished planning runs into Prediction rows (oldest run "
        "first, so the newest run's figures win). Runs finished by workers do this themselves."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        total = 0
        for run in PlanningRun.objects.filter(status=PlanningRun.Status.DONE).order_by("finished_at", "pk"):
            total += record_run_predictions(run)
        self.stdout.write(f"{total} prediction rows written")
