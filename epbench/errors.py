"""Errors that the CLI turns into one clear line and exit status 2."""


class EpbenchError(Exception):
    """A user-facing error: bad input, missing data, unavailable backend."""


class BackendUnavailable(EpbenchError):
    pass


class DatasetError(EpbenchError):
    pass
