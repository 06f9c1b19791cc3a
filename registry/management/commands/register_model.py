from __future__ import annotations

import time
from typing import Any

from celery import current_app
from django.core.management.base import BaseCommand, CommandError

from planner.builtin import BUNDLES
from registry.engine import register_bundle


class Command(BaseCommand):
    help = (
        "Register a built-in runnable model: its spec, weight and data hashes, FP32 and uniform-int8 "
        "accuracy measured on the held-out split; then queue its sensitivity profiling for a worker."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("bundle", help=f"one of: {', '.join(sorted(BUNDLES))}")
        parser.add_argument("--no-profile", action="store_true", help="do not queue sensitivity profiling")

    def handle(self, *args: Any, bundle: str, **options: Any) -> None:
        if bundle not in BUNDLES:
            raise CommandError(f"bundle: unknown {bundle!r}; known: {', '.join(sorted(BUNDLES))}")
        started = time.perf_counter()
        model = register_bundle(bundle)
        fp32 = model.fp32_metrics
        self.stdout.write(
            f"model {model.name!r}: FP32 accuracy {fp32['accuracy']:.4f} on {fp32['n_examples']} held-out "
            f"examples (measured; {time.perf_counter() - started:.0f} s, exit heads trained on first run)"
        )
        if model.sensitivity:
            self.stdout.write("sensitivity profile: already stored")
        elif not options["no_profile"]:
            current_app.signature("workers.profile_sensitivity", args=[model.pk]).delay()
            self.stdout.write("sensitivity profile: queued for the worker (a few minutes on 2 cores)")
