"""Host probe: RAM from /proc/meminfo, or from sysconf where there is no /proc."""

from __future__ import annotations

import builtins
import os
from typing import Any

import pytest

from planner import hostprobe


def test_ram_total_comes_from_sysconf_when_proc_meminfo_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = builtins.open

    def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert hostprobe._ram_total_bytes() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
