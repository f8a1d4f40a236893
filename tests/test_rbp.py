"""The RBP example plugin (examples/epbench-rbp): registered through its entry point, and at a
converged first phase its per-step processes are BPTT's (Prop. 4 at a fixed point)."""

from __future__ import annotations

import numpy as np
import pytest

from epbench import compute
from epbench.plugins import registry
from epbench.spec import ModelSpec, PhaseSettings
from conftest import selected_backends

pytest.importorskip("epbench_rbp")

BACKENDS = [name for name in selected_backends(["torch-cpu", "jax-cpu", "numpy"]) if name in registry().backends
            and registry().backends[name].availability(probe=True).ok]


def test_rbp_is_registered_by_its_own_distribution():
    info = next(p for p in registry().plugins if p.entry_point == "rbp")
    assert info.distribution == "epbench-rbp" and info.registers == ["rbp"]
    assert registry().algorithm("rbp").name == "rbp"


def _batch(spec: ModelSpec, seed: int = 0):
    r = np.random.default_rng(seed)
    x = r.random((6, *spec.input_shape))
    return x, np.eye(spec.n_out)[r.integers(0, spec.n_out, 6)]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("kind", ["eb", "p"])
def test_rbp_processes_equal_bptt_at_a_fixed_point(backend_name, kind):
    backend = registry().backends[backend_name]
    spec = ModelSpec(kind=kind, hidden=(20,), n_in=30, dt=0.5 if kind == "eb" else 1.0)
    converged = PhaseSettings(T=400, K=8, beta=0.1, dtype="float64")
    params = backend.from_numpy(spec, backend.init_params(spec, 1), "float64")
    x, y = _batch(spec)
    procs = compute.gdu(backend, spec, params, x, y, converged, algorithms=("rbp",))
    assert procs.convergence < 1e-12
    rbp, bptt = procs.processes["rbp"], procs.processes["bptt"]
    for a, b in zip(rbp.s, bptt.s):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)
    for k in spec.param_shapes:
        np.testing.assert_allclose(rbp.theta[k], bptt.theta[k], rtol=1e-9, atol=1e-14)
    g_rbp = compute.gradient(backend, spec, params, x, y, converged, "rbp")
    g_bptt = compute.gradient(backend, spec, params, x, y, converged, "bptt")
    for k in spec.param_shapes:
        np.testing.assert_allclose(g_rbp[k], g_bptt[k], rtol=1e-9, atol=1e-14)


def test_rbp_differs_from_bptt_before_the_fixed_point():
    """The test above can fail: far from the fixed point the two recursions differ."""
    backend = registry().backends[BACKENDS[0]]
    spec = ModelSpec(kind="eb", hidden=(20,), n_in=30, dt=0.5)
    early = PhaseSettings(T=4, K=4, beta=0.1, dtype="float64")
    params = backend.from_numpy(spec, backend.init_params(spec, 1), "float64")
    x, y = _batch(spec)
    procs = compute.gdu(backend, spec, params, x, y, early, algorithms=("rbp",))
    gap = max(np.max(np.abs(procs.processes["rbp"].theta[k] - procs.processes["bptt"].theta[k]))
              for k in spec.param_shapes)
    assert gap > 1e-6
