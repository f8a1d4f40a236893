"""Shared fixtures: the backends under test and the embedded data."""

from __future__ import annotations

import os

import pytest


def selected_backends(default: list[str]) -> list[str]:
    """The backends named in ``$EPBENCH_TEST_BACKENDS`` (comma separated, e.g.
    ``torch-cuda,jax-cuda`` on a GPU machine) where it is set, else ``default``: the golden,
    cross-backend and conformance tests run on these."""
    names = [n.strip() for n in os.environ.get("EPBENCH_TEST_BACKENDS", "").split(",") if n.strip()]
    return names or list(default)


#: every backend that the shared, parametrised checks run on (skipped where unavailable)
BACKENDS = selected_backends(["torch-cpu", "jax-cpu"])

#: one small model of each kind (unit tests of the backends' internals)
SMALL_MODELS = {
    "toy": dict(kind="toy", n_in=10, hidden=(12,), n_out=5, activation="tanh", dt=0.08, flavor="official-code"),
    "eb": dict(kind="eb", n_in=20, hidden=(10, 8), n_out=5, activation="sigmoid", dt=0.2, clamp=True),
    "p": dict(kind="p", n_in=20, hidden=(10, 8), n_out=5, activation="tanh", flavor="official-code"),
    "pconv": dict(kind="pconv", n_in=15 * 15, channels=(3, 4), kernel=3, n_out=5, activation="hard_sigmoid",
                  flavor="official-code"),
}

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
