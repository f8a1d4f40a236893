"""epbench: the reference benchmark harness for Equilibrium Propagation."""

from epbench.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
