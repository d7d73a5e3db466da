"""Errors of the compose harness. Messages name the file, key path or service at fault."""

from __future__ import annotations

__all__ = [
    "ComposeError",
    "ComposeFileError",
    "LeftoverProcesses",
    "ServiceFailed",
    "UnknownService",
]


class ComposeError(Exception):
    """Base class for every error the harness raises on purpose."""


class ComposeFileError(ComposeError):
    """The compose file is malformed or uses something the harness does not support."""


class UnknownService(ComposeError):
    """A service name that the compose file does not declare (or whose profile is off)."""


class ServiceFailed(ComposeError):
    """A service exited, never became healthy, or failed a dependency condition.

    ``service`` names it; the message ends with the tail of its log.
    """

    def __init__(self, service: str, message: str) -> None:
        super().__init__(message)
        self.service = service


class LeftoverProcesses(ComposeError):
    """``down()`` could not make every process of the run disappear; ``pids`` lists them."""

    def __init__(self, pids: list[int], message: str) -> None:
        super().__init__(message)
        self.pids = pids
