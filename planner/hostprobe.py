"""Measure the machine this runs on: RAM, memory bandwidth, fp32 and int8 matmul throughput.

Used by the server's `profile_host` command and by the device agent's `profile`.  Every figure
is the median of a few timed repeats around real work (numpy copies, torch matmuls); nothing
is looked up.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["HostProbe", "probe_host"]


@dataclass(frozen=True)
class HostProbe:
    hostname: str
    machine: str
    processor: str
    cpu_count: int
    ram_total_bytes: int
    bandwidth_gbs: float
    fp32_tflops: float
    int8_tops: float
    repeats: int
    torch_threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ram_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # no /proc (not Linux): sysconf knows
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _median_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up: page faults, kernel selection
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _bandwidth_gbs(nbytes: int, repeats: int) -> float:
    # A copy reads and writes every byte once; counting both is how STREAM's "copy" reports.
    source = np.ones(nbytes // 8, dtype=np.float64)
    target = np.empty_like(source)
    seconds = _median_seconds(lambda: np.copyto(target, source), repeats)
    return 2 * source.nbytes / seconds / 1e9


def _matmul_rates(size: int, repeats: int) -> tuple[float, float]:
    import torch

    from planner.models.linear import onednn_linear

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    # The fp32 kernel the runtime's Linears use (oneDNN on non-Intel CPUs, where MKL's sgemm
    # runs AVX2 code, ~2.3× slower; MKL on Intel), so the cost model's fp32 peak is that path's.
    with torch.inference_mode():
        fp32_seconds = _median_seconds(lambda: onednn_linear(a, b), repeats)
    ai = torch.randint(-128, 127, (size, size), dtype=torch.int8)
    bi = torch.randint(-128, 127, (size, size), dtype=torch.int8)
    int8_seconds = _median_seconds(lambda: torch._int_mm(ai, bi), repeats)
    ops = 2 * size**3
    return ops / fp32_seconds / 1e12, ops / int8_seconds / 1e12


def probe_host(*, repeats: int = 5, copy_bytes: int = 256 * 1024**2, matmul_size: int = 1024) -> HostProbe:
    """Measure this host. Small `copy_bytes`/`matmul_size` make a quick (less exact) probe."""
    import torch

    fp32_tflops, int8_tops = _matmul_rates(matmul_size, repeats)
    return HostProbe(
        hostname=platform.node(),
        machine=platform.machine(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count() or 1,
        ram_total_bytes=_ram_total_bytes(),
        bandwidth_gbs=round(_bandwidth_gbs(copy_bytes, repeats), 3),
        fp32_tflops=round(fp32_tflops, 5),
        int8_tops=round(int8_tops, 5),
        repeats=repeats,
        torch_threads=torch.get_num_threads(),
    )
