"""Errors that the CLI turns into one clear line: exit status 2 for :class:`EpbenchError`,
128 + the signal number for :class:`RunInterrupted`."""

from __future__ import annotations

import signal


class EpbenchError(Exception):
    """A user-facing error: bad input, missing data, unavailable backend, a file that cannot be
    written."""


class BackendUnavailable(EpbenchError):
    pass


class DatasetError(EpbenchError):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt, so that a run stops the same way
    for both (status "interrupted", finished rows kept)."""

    signum = signal.SIGTERM


def signal_number(exc: KeyboardInterrupt) -> int:
    """The signal behind an interruption: SIGTERM for :class:`Terminated`, else SIGINT."""
    return int(getattr(exc, "signum", signal.SIGINT))


class RunInterrupted(Exception):
    """A run stopped by SIGINT or SIGTERM; ``exit_code`` is 128 + the signal number (130, 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class CellsFailed(EpbenchError):
    """A run that finished with failed cells (each recorded with its error): exit status 1."""

    exit_code = 1
