"""The ``epbench`` entry point of epbench-lateral: registers the ``eb-lateral`` model."""

from epbench import hookimpl


@hookimpl
def epbench_models():
    from epbench_lateral.model import LateralEB

    return [LateralEB()]
