"""Write a file so that readers see the old content or the new, and concurrent writers never collide."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["replacing"]


@contextmanager
def replacing(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write; on success rename it over
    `path` (atomic on one file system), on failure remove it.

    The temporary name carries the process and thread id: planning workers share the engine's
    cache directory and may store the same entry at once, and with one temporary name per entry
    one writer's rename took the other's file away mid-write.  `suffix` ends the temporary name
    (np.save / np.savez append their extension to a name without it)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
