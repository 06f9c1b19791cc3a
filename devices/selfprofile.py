"""Turn a measurement of this host into its DeviceProfile (created or updated, marked measured)."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from devices.models import DeviceProfile
from planner.hostprobe import HostProbe

# What torch on a CPU runs natively: fp32 everywhere, int8 through its int8 matmul kernels.
HOST_WEIGHT_FORMATS = ["fp32", "fp16", "bf16", "int8", "int4"]
HOST_ACTIVATION_FORMATS = ["fp32", "bf16", "int8"]


@transaction.atomic
def save_host_profile(
    probe: HostProbe, *, command: str, name: str | None = None, budget_fraction: float = 0.5
) -> DeviceProfile:
    today = timezone.now().date().isoformat()
    measured = f"measured on {today} by {command}"
    profile = DeviceProfile.objects.filter(name=name or f"host {probe.hostname}").first()
    if profile is None:
        profile = DeviceProfile(name=name or f"host {probe.hostname}", fleet_share=0.0)
    profile.vendor = "this host"
    profile.soc = f"{probe.processor} ({probe.cpu_count} CPUs, {probe.machine})"
    profile.kind = "server" if probe.ram_total_bytes > 64 * 1024**3 else "desktop"
    profile.ram_total_bytes = probe.ram_total_bytes
    profile.ram_budget_bytes = int(probe.ram_total_bytes * budget_fraction)
    profile.bandwidth_gbs = probe.bandwidth_gbs
    profile.fp32_tflops = probe.fp32_tflops
    profile.fp16_tflops = None
    profile.int8_tops = probe.int8_tops
    profile.int4_tops = None
    profile.weight_formats = HOST_WEIGHT_FORMATS
    profile.activation_formats = HOST_ACTIVATION_FORMATS
    profile.sources = {
        "ram_total_bytes": measured,
        "ram_budget_bytes": f"derived: {budget_fraction:.0%} of ram_total_bytes ({command})",
        "bandwidth_gbs": measured,
        "fp32_tflops": measured,
        "int8_tops": measured,
    }
    profile.notes = (
        f"Self-profile: median of {probe.repeats} repeats with {probe.torch_threads} torch threads. "
        "Bandwidth is a numpy copy (bytes read + written); throughput is torch.mm (fp32) and "
        "torch._int_mm (int8) on square matrices."
    )
    profile.origin = DeviceProfile.Origin.MEASURED
    profile.measured_at = timezone.now()
    profile.full_clean()
    profile.save()
    return profile
