"""Entry point of the JAX backend (``[project.entry-points.epbench] jax``): cheap to import."""

from epbench import hookimpl
from epbench_jax.backend import JaxBackend


@hookimpl
def epbench_backends():
    return [JaxBackend("cpu"), JaxBackend("cuda")]
