"""The EdgeFit device agent: enroll, profile, sync, bench, report (docs/delivery.md).

Pure client: the standard library's HTTP (urllib) and the engine (`planner`) only — never
Django or any server app (an import-linter contract holds this).  Run it as ``edgefit-agent``
or ``python -m devices.agent``; every command takes ``--json`` for one machine-readable object
on stdout.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
