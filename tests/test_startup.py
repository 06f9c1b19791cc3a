"""Django start-up and the URL map must not pull in the engine's heavy libraries."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import os, sys
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
import django; django.setup()
from django.urls import resolve; resolve("/devices/"); resolve("/plans/")
print(",".join(m for m in ("torch", "optuna", "plotly") if m in sys.modules))
"""


def test_startup_does_not_import_torch_optuna_or_plotly():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
