"""Shared fixtures: the backends under test and the embedded data."""

from __future__ import annotations

import os

import pytest

#: every backend that the shared, parametrised checks run on (skipped where unavailable)
BACKENDS = ["torch-cpu", "jax-cpu"]

#: reference outputs of the official code (a copy of shared/golden, see its README.md)
GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "data", "golden")


def load_backend(name: str):
    from epbench.plugins import registry

    reg = registry()
    if name not in reg.backends:
        pytest.skip(f"backend {name} is not registered")
    backend = reg.backends[name]
    avail = backend.availability(probe=True)
    if not avail.ok:
        pytest.skip(f"backend {name} unavailable: {avail.reason}")
    return backend


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each built-in CPU backend in turn."""
    return load_backend(request.param)
