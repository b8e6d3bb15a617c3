"""The errors a command ends with, each with the exit code scripts can rely on.

0: done; 1: the API refused or answered an error, or the input is invalid; 2: a usage error
(typer's own: an unknown option, a missing argument); 3: the API cannot be reached.
"""

from __future__ import annotations

EXIT_ERROR = 1
EXIT_UNREACHABLE = 3


class CliError(Exception):
    """Ends the command: ``message`` on stderr, ``code`` as the exit status."""

    code = EXIT_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(CliError):
    """A value the command checked itself and refuses (exit 1)."""


class ApiFailure(CliError):
    """The API answered with an error status (exit 1); the message is its ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status


class NothingDone(CliError):
    """The API answered success, but said that nothing changed and why (exit 1)."""


class Unreachable(CliError):
    """No answer from the API: refused, timed out, not HTTP (exit 3)."""

    code = EXIT_UNREACHABLE
