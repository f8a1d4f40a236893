"""The ``epbench`` entry point of epbench-rbp: registers the ``rbp`` algorithm."""

from epbench import hookimpl


@hookimpl
def epbench_algorithms():
    from epbench_rbp.algorithm import RBP

    return [RBP()]
