"""A small progress bar on stderr (no dependency): off with --quiet or when stderr is not a TTY."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]

_WIDTH = 28


def _human(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:.0f}"
    for suffix in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or suffix == "GB":
            return f"{n:.1f} {suffix}" if suffix != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """``label [#####.....]  45%  10.2 MB/22.9 MB  5.1 MB/s``, redrawn at most 10 times a second."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        enabled: bool,
        unit: str = "B",
        initial: int = 0,
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.total = max(int(total), 0)
        self.done = int(initial)
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._started = time.monotonic()
        self._first = self.done
        self._drawn = 0.0
        if enabled:
            self._draw(force=True)

    @staticmethod
    def wanted(quiet: bool, stream: TextIO | None = None) -> bool:
        s = stream if stream is not None else sys.stderr
        return not quiet and bool(getattr(s, "isatty", lambda: False)())

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            self._draw()

    def set(self, done: int) -> None:
        self.done = done
        if self.enabled:
            self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.1 and self.done < self.total:
            return
        self._drawn = now
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        bar = "#" * int(frac * _WIDTH) + "." * (_WIDTH - int(frac * _WIDTH))
        rate = (self.done - self._first) / max(now - self._started, 1e-9)
        tail = f"{_human(self.done, self.unit)}/{_human(self.total, self.unit)}"
        speed = f"  {_human(rate, self.unit)}/s" if self.unit == "B" else f"  {rate:.1f}/s"
        self.stream.write(f"\r{self.label} [{bar}] {frac * 100:3.0f}%  {tail}{speed}  ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False
