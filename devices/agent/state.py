"""The agent's state directory (default ``~/.edgefit-agent``).

Layout::

    state.json          enrollment (server, device id, profile, pinned public key), last ETag/config
    token               the device token, mode 0600
    hardware.json       the last `profile` probe
    packages/<digest>/  installed, verified packages (manifest.json, manifest.sig, model.safetensors)
    staging/<digest>/   downloads in progress (model.safetensors.part resumes with HTTP Range)
    current             symlink to packages/<digest>: switched atomically (rename over it)
    last_bench.json     the last `bench` result, and the measurement id once reported
    .lock               held by the state-changing command running (`exclusive`)

Every file is written to a temporary name and renamed, so a crash leaves the old or the new
version, never half of one.  The directory is 0700, the token and state files 0600.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from devices.agent.errors import EXIT_BUSY, EXIT_STATE, AgentError

__all__ = ["DEFAULT_STATE_DIR", "AgentState"]

DEFAULT_STATE_DIR = "~/.edgefit-agent"


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed or (with O_CREAT on an old file) kept bits
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class AgentState:
    """Paths and atomic reads/writes of one state directory."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(os.path.expanduser(str(root or DEFAULT_STATE_DIR)))

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def token_path(self) -> Path:
        return self.root / "token"

    @property
    def hardware_path(self) -> Path:
        return self.root / "hardware.json"

    @property
    def bench_path(self) -> Path:
        return self.root / "last_bench.json"

    @property
    def packages_dir(self) -> Path:
        return self.root / "packages"

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    @property
    def current_link(self) -> Path:
        return self.root / "current"

    @contextmanager
    def exclusive(self, command: str) -> Iterator[None]:
        """Hold the state directory for one state-changing command (enroll, profile, sync,
        bench, report), or refuse at once with ``busy`` (exit 75) if another holds it.

        Why: two syncs at once (a timer's and one run by hand) each pruned the other's
        partial download from staging/ and raced to switch `current`; a sync during a bench
        could delete the package being measured.  Refusing suits a timer: its next tick
        syncs.  (`profile` too: it saturates the CPU a bench is timing.)  The directory is
        made first if need be (0700): two first enrollments at once each registered a device."""
        self._make_root()
        lock = FileLock(self.root / ".lock", mode=0o600)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise AgentError(
                "busy",
                f"another edgefit-agent command is using {self.root}; {command} waits its turn: "
                "enroll, profile, sync, bench and report run one at a time — try again when it "
                "has finished",
                EXIT_BUSY,
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _make_root(self) -> None:
        if not self.root.exists():
            self.root.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)  # whatever the umask; an existing directory is left as it is

    def ensure(self) -> None:
        self._make_root()
        self.packages_dir.mkdir(exist_ok=True)
        self.staging_dir.mkdir(exist_ok=True)

    # ------------------------------------------------------------------ JSON files

    def read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise AgentError("state-corrupt", f"{path} is unreadable: {exc}", EXIT_STATE) from exc
        if not isinstance(value, dict):
            raise AgentError("state-corrupt", f"{path} does not hold a JSON object", EXIT_STATE)
        return value

    def write_json(self, path: Path, value: dict[str, Any]) -> None:
        self.ensure()
        _write_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    def enrolled(self) -> bool:
        return self.state_path.is_file() and self.token_path.is_file()

    def load(self) -> dict[str, Any]:
        """The enrollment state; AgentError(not-enrolled) when there is none."""
        state = self.read_json(self.state_path)
        if state is None or not self.token_path.is_file():
            raise AgentError(
                "not-enrolled",
                f"no enrollment in {self.root}: "
                "run `edgefit-agent enroll --server URL --key efe_… --name NAME`",
                EXIT_STATE,
            )
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.write_json(self.state_path, state)

    def token(self) -> str:
        try:
            return self.token_path.read_text().strip()
        except FileNotFoundError as exc:
            raise AgentError("not-enrolled", f"no device token in {self.root}", EXIT_STATE) from exc

    def save_token(self, token: str) -> None:
        self.ensure()
        _write_atomic(self.token_path, token.encode() + b"\n", 0o600)

    # ------------------------------------------------------------------ packages

    def package_dir(self, digest: str) -> Path:
        return self.packages_dir / digest

    def staging(self, digest: str) -> Path:
        return self.staging_dir / digest

    def current_digest(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except OSError:
            return None
        digest = Path(target).name
        return digest if self.package_dir(digest).is_dir() else None

    def switch_current(self, digest: str) -> None:
        """Point `current` at packages/<digest> atomically (a new symlink renamed over the old)."""
        tmp = self.root / f".current.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.join("packages", digest), tmp)
        os.replace(tmp, self.current_link)

    def install(self, staged: Path, digest: str) -> Path:
        """Move a verified staging directory to packages/<digest> (atomic rename)."""
        final = self.package_dir(digest)
        if final.exists():
            shutil.rmtree(staged, ignore_errors=True)
            return final
        os.rename(staged, final)
        return final

    def prune(self, keep: set[str], downloading: str | None = None) -> list[str]:
        """Delete installed packages not in `keep` (current and previous stay for rollback) and
        the partial downloads of every digest but `downloading` (`prune_staging`).  Returns
        the package digests and ``staging/<digest>`` entries removed."""
        removed: list[str] = []
        if self.packages_dir.is_dir():
            for entry in self.packages_dir.iterdir():
                if entry.name not in keep and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
        return sorted(removed + self.prune_staging(downloading))

    def prune_staging(self, downloading: str | None) -> list[str]:
        """Delete staging/<digest> directories but the one of `downloading`: a partial download
        of a digest the config no longer names would otherwise stay on disk for good (it is
        resumed only while that digest is the one wanted).  Returns ``staging/<digest>`` of
        each removed."""
        removed: list[str] = []
        if not self.staging_dir.is_dir():
            return removed
        for entry in self.staging_dir.iterdir():
            if entry.name != downloading and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(f"staging/{entry.name}")
        return sorted(removed)
