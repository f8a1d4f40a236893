"""JAX backend of epbench (``jax-cpu``, ``jax-cuda``). Importing it does not import JAX."""

from epbench_jax.backend import JaxBackend

__all__ = ["JaxBackend"]
