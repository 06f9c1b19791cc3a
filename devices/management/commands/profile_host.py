from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from devices.selfprofile import save_host_profile
from planner.hostprobe import probe_host


class Command(BaseCommand):
    help = (
        "Measure this machine (RAM, copy bandwidth, fp32 and int8 matmul throughput; median of "
        "repeats) and create or update its device profile, marked measured."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--name", help="profile name (default: 'host <hostname>')")
        parser.add_argument("--repeats", type=int, default=5)
        parser.add_argument("--quick", action="store_true", help="small buffers: seconds, less exact")
        parser.add_argument("--budget-fraction", type=float, default=0.5)

    def handle(self, *args: Any, **options: Any) -> None:
        quick = options["quick"]
        probe = probe_host(
            repeats=options["repeats"],
            copy_bytes=(32 if quick else 256) * 1024**2,
            matmul_size=256 if quick else 1024,
        )
        command = "manage.py profile_host" + (" --quick" if quick else "")
        profile = save_host_profile(
            probe, command=command, name=options["name"], budget_fraction=options["budget_fraction"]
        )
        self.stdout.write(
            f"{profile.name}: RAM {probe.ram_total_bytes / 1024**3:.1f} GiB, "
            f"bandwidth {probe.bandwidth_gbs:.1f} GB/s, fp32 {probe.fp32_tflops * 1000:.1f} GFLOPS, "
            f"int8 {probe.int8_tops * 1000:.1f} GOPS (measured, median of {probe.repeats})"
        )
