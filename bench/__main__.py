"""`python -m bench NAME [--json PATH] [options]` runs benchmark NAME (a module bench/NAME.py
exposing `add_arguments(parser)` and `run(args) -> dict`), prints its table, and with --json
writes the dict of figures the benchmark's issue names."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

import bench
from planner.specs import PlanError


def _available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = _available()
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in names:
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"bench: unknown benchmark {argv[0]!r}", file=sys.stderr)
        print(f"usage: python -m bench {{{','.join(names)}}} [--json PATH] [options]", file=sys.stderr)
        return 2 if argv and argv[0] not in {"-h", "--help"} else 0
    module = importlib.import_module(f"bench.{argv[0]}")
    parser = argparse.ArgumentParser(prog=f"python -m bench {argv[0]}", description=module.__doc__)
    parser.add_argument("--json", type=Path, help="write the figures as JSON to this path")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        figures = module.run(args)
    except PlanError as exc:  # bad input (a setting, a plan, a model file): its message names it
        print(f"python -m bench {argv[0]}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
