"""``edgefit-agent``: the device agent's command line.

Every command prints a short human summary to stderr, or with ``--json`` exactly one JSON
object to stdout: ``{"ok": true, "command": …, …}`` on success, ``{"ok": false, "command": …,
"error": code, "detail": message, …}`` on failure (a refused package adds ``reason``,
``digest`` and ``current``).  Exit codes: 0 ok, 1 unexpected error, 2 bad arguments,
3 local state (not enrolled, no package, nothing to report), 4 server / network, 5 credentials
rejected (401/403), 6 package refused, 75 busy (another agent command holds the state directory:
nothing was done, try again later).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from devices.agent import __version__, commands
from devices.agent.errors import EXIT_ERROR, EXIT_OK, AgentError
from devices.agent.state import DEFAULT_STATE_DIR, AgentState

__all__ = ["build_parser", "main"]

_DEFAULTS: dict[str, Any] = {
    "state_dir": None,
    "json": False,
    "quiet": False,
    "retries": 5,
    "timeout": 30.0,
}


#: Commands that write the state directory (or, `profile`, load the CPU a bench times): one of
#: them runs at a time (`AgentState.exclusive`).
_STATE_CHANGING = frozenset({"enroll", "profile", "sync", "bench", "report"})


def _common() -> argparse.ArgumentParser:
    # SUPPRESS defaults: an option given before or after the command name both count.
    common = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    common.add_argument("--state-dir", default=s, help=f"state directory (default {DEFAULT_STATE_DIR})")
    common.add_argument("--json", action="store_true", default=s, help="print one JSON object to stdout")
    common.add_argument("--quiet", "-q", action="store_true", default=s, help="no progress bars or messages")
    common.add_argument(
        "--retries", type=int, default=s, help="retries on 429/5xx/connection errors (default 5)"
    )
    common.add_argument("--timeout", type=float, default=s, help="seconds per HTTP request (default 30)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="edgefit-agent",
        description="EdgeFit device agent: enroll, profile, sync, bench, report.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"edgefit-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enroll", parents=[common], help="enroll this device and pin the server's signing key")
    p.add_argument("--server", required=True, help="server base URL, e.g. https://edgefit.example.com")
    p.add_argument("--key", required=True, help="fleet enrollment key (efe_…)")
    p.add_argument("--name", required=True, help="device name shown on the dashboard")
    p.add_argument("--profile", help="device profile slug (optional if the key pins one)")
    p.add_argument("--probe", action="store_true", help="send a quick hardware probe with the enrollment")
    p.add_argument("--force", action="store_true", help="replace an existing enrollment in the state dir")

    p = sub.add_parser(
        "profile", parents=[common], help="measure this host (RAM, bandwidth, matmul throughput)"
    )
    p.add_argument("--quick", action="store_true", help="small, fast probe (less exact)")
    p.add_argument("--repeats", type=int, help="timed repeats per figure (median taken)")

    sub.add_parser(
        "sync", parents=[common], help="fetch the config; download, verify and install its package"
    )

    p = sub.add_parser("bench", parents=[common], help="run the current package's check set and measure it")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per text (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")

    p = sub.add_parser("report", parents=[common], help="send the last bench result to the server")
    p.add_argument(
        "--force",
        action="store_true",
        help="send it again even if already reported (same Idempotency-Key: stored once)",
    )

    sub.add_parser("status", parents=[common], help="show the enrollment and installed packages (no network)")
    return parser


def _run(args: argparse.Namespace, ctx: commands.Context) -> dict[str, Any]:
    handlers: dict[str, Callable[[], dict[str, Any]]] = {
        "enroll": lambda: commands.enroll(
            ctx,
            server=args.server,
            key=args.key,
            name=args.name,
            profile=args.profile,
            probe=args.probe,
            force=args.force,
        ),
        "profile": lambda: commands.profile(ctx, quick=args.quick, repeats=args.repeats),
        "sync": lambda: commands.sync(ctx),
        "bench": lambda: commands.bench(ctx, rounds=args.rounds, warmup=args.warmup, threads=args.threads),
        "report": lambda: commands.report(ctx, force=args.force),
        "status": lambda: commands.status(ctx),
    }
    if args.command in _STATE_CHANGING:
        with ctx.state.exclusive(args.command):
            return handlers[args.command]()
    return handlers[args.command]()


def main(argv: Sequence[str] | None = None, *, sleep: Callable[[float], None] | None = None) -> int:
    """Parse `argv`, run the command, print its answer; the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    for name, value in _DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    as_json = bool(args.json)

    def log(message: str) -> None:
        if not args.quiet and not as_json:
            print(message, file=sys.stderr, flush=True)

    ctx = commands.Context(
        state=AgentState(args.state_dir),
        quiet=bool(args.quiet),
        retries=max(int(args.retries), 0),
        timeout=float(args.timeout),
        log=log,
        sleep=sleep,
    )
    try:
        result = _run(args, ctx)
    except AgentError as exc:
        print(f"edgefit-agent {args.command}: {exc.message}", file=sys.stderr, flush=True)
        if as_json:
            print(json.dumps(exc.to_dict(args.command), sort_keys=True))
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"edgefit-agent {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an OS error: say so plainly, with the traceback on stderr
        traceback.print_exc()
        if as_json:
            print(json.dumps({"ok": False, "command": args.command, "error": "internal", "detail": str(exc)}))
        return EXIT_ERROR
    if as_json:
        print(json.dumps({"ok": True, "command": args.command, **result}, sort_keys=True))
    elif args.command in ("profile", "status") and not args.quiet:
        print(json.dumps(result, indent=2, sort_keys=True))
    return EXIT_OK
