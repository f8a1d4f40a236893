"""The ``epbench`` entry point of epbench-numpy: registers the ``numpy`` backend.

This module is imported whenever epbench builds its registry, so it stays cheap: the backend
class is imported inside the hook.
"""

from epbench import hookimpl


@hookimpl
def epbench_backends():
    from epbench_numpy.backend import NumpyBackend

    return [NumpyBackend()]
