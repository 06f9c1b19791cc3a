"""Self-profiling measures this host and stores the figures as a measured profile."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from devices.models import DeviceProfile
from planner.hostprobe import probe_host

pytestmark = pytest.mark.django_db


def test_the_probe_measures_plausible_figures():
    probe = probe_host(repeats=2, copy_bytes=8 * 1024**2, matmul_size=128)
    assert probe.ram_total_bytes > 256 * 1024**2
    assert 0.05 < probe.bandwidth_gbs < 2000
    assert 0 < probe.fp32_tflops < 100
    assert 0 < probe.int8_tops < 100


def test_profile_host_creates_then_updates_a_measured_profile():
    out = io.StringIO()
    call_command("profile_host", "--quick", "--repeats", "2", "--name", "ci host", stdout=out)
    assert "measured, median of 2" in out.getvalue()
    profile = DeviceProfile.objects.get(name="ci host")
    assert profile.origin == "measured" and profile.measured_at is not None
    assert profile.sources["bandwidth_gbs"].startswith("measured on ")
    assert "profile_host --quick" in profile.sources["int8_tops"]
    assert profile.ram_budget_bytes <= profile.ram_total_bytes
    first_measurement = profile.measured_at

    call_command("profile_host", "--quick", "--repeats", "2", "--name", "ci host", stdout=io.StringIO())
    assert DeviceProfile.objects.filter(name="ci host").count() == 1
    assert DeviceProfile.objects.get(name="ci host").measured_at > first_measurement
