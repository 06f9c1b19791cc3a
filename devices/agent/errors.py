"""Agent errors and the exit codes the command line maps them to."""

from __future__ import annotations

from typing import Any

__all__ = [
    "EXIT_AUTH",
    "EXIT_BUSY",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_SERVER",
    "EXIT_STATE",
    "EXIT_USAGE",
    "AgentError",
]

EXIT_OK = 0
#: Anything unexpected (a bug, a disk error).
EXIT_ERROR = 1
#: Bad command-line arguments (argparse's own code).
EXIT_USAGE = 2
#: Local state does not allow the command: not enrolled, no package yet, nothing to report.
EXIT_STATE = 3
#: The server could not be reached or refused the request (after retries).
EXIT_SERVER = 4
#: The server rejected the credentials (401 / 403): revoked token, wrong key.
EXIT_AUTH = 5
#: A package failed verification and was refused; the previous package stays current.
EXIT_REFUSED = 6
#: Another agent command holds the state directory; nothing was done — try again later
#: (sysexits' EX_TEMPFAIL, so a timer can tolerate it without hiding the other failures).
EXIT_BUSY = 75


class AgentError(Exception):
    """A failure the agent reports: a stable `code`, a message for people, an exit code and
    extra fields for the ``--json`` answer (e.g. the refusal `reason`)."""

    def __init__(self, code: str, message: str, exit_code: int = EXIT_ERROR, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code
        self.extra = extra

    def to_dict(self, command: str) -> dict[str, Any]:
        return {"ok": False, "command": command, "error": self.code, "detail": self.message, **self.extra}
