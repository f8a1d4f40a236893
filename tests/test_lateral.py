"""The lateral-connection model plugin (examples/epbench-lateral): registered through its entry
point, the same numbers on every CPU backend, F = ∂Φ/∂s, and Theorem 1 (EP → −BPTT as β → 0)."""

from __future__ import annotations

import numpy as np
import pytest

from epbench import compute
from epbench.plugins import registry
from epbench.spec import ModelSpec, PhaseSettings
from conftest import selected_backends

pytest.importorskip("epbench_lateral")

BACKENDS = [name for name in selected_backends(["torch-cpu", "jax-cpu", "numpy"]) if name in registry().backends
            and registry().backends[name].availability(probe=True).ok]
SPEC = ModelSpec(kind="eb-lateral", hidden=(12, 9), n_in=15, n_out=4, activation="tanh", dt=0.5)


def _batch(spec: ModelSpec, n: int = 5, seed: int = 0):
    r = np.random.default_rng(seed)
    x = r.random((n, *spec.input_shape))
    return x, np.eye(spec.n_out)[r.integers(0, spec.n_out, n)]


def test_lateral_is_registered_by_its_own_distribution():
    info = next(p for p in registry().plugins if p.entry_point == "lateral")
    assert info.distribution == "epbench-lateral" and info.registers == ["eb-lateral"]
    assert set(SPEC.param_shapes) == {"W01", "W12", "W2x", "W11", "W22"}


@pytest.mark.parametrize("flavor", ["paper", "official-code"])
def test_lateral_backends_agree_in_float64(flavor):
    if len(BACKENDS) < 2:
        pytest.skip("needs two backends")
    spec = SPEC.model_copy(update={"flavor": flavor, "clamp": flavor == "official-code"})
    phase = PhaseSettings(T=25, K=6, beta=0.2, dtype="float64")
    x, y = _batch(spec)
    results = {}
    for name in BACKENDS:
        b = registry().backends[name]
        p = b.from_numpy(spec, b.init_params(spec, 3), "float64")
        g = compute.gdu(b, spec, p, x, y, phase)
        results[name] = (compute.gradient(b, spec, p, x, y, phase, "ep"), compute.gradient(b, spec, p, x, y, phase, "bptt"),
                         g.processes["ep"].theta, g.processes["bptt"].theta)
    ref = results[BACKENDS[0]]
    for name in BACKENDS[1:]:
        for a, b in zip(ref, results[name]):
            for k in spec.param_shapes:
                np.testing.assert_allclose(b[k], a[k], rtol=1e-10, atol=1e-13, err_msg=f"{name} {k}")


def test_lateral_step_is_the_gradient_of_phi():
    """F(s) = s + dt·dsdt(s) = ∂Φ/∂s (with σ'(s0)): central differences of Φ along random directions."""
    b = registry().backends[BACKENDS[0]]
    spec = SPEC
    p = b.from_numpy(spec, b.init_params(spec, 1), "float64")
    x, _ = _batch(spec, n=3)
    r = np.random.default_rng(2)
    s = [r.uniform(-0.8, 0.8, (3, *shape)) for shape in spec.state_shapes]
    F = compute.step_function(b, spec, p, x, s)
    for _ in range(3):
        v = [r.standard_normal(a.shape) for a in s]
        eps = 1e-5
        plus = compute.phi(b, spec, p, x, [a + eps * d for a, d in zip(s, v)])
        minus = compute.phi(b, spec, p, x, [a - eps * d for a, d in zip(s, v)])
        assert (plus - minus) / (2 * eps) == pytest.approx(sum(float(np.sum(f * d)) for f, d in zip(F, v)), rel=1e-7)


def test_lateral_theorem1_ep_approaches_bptt():
    b = registry().backends[BACKENDS[0]]
    spec = SPEC
    p = b.from_numpy(spec, b.init_params(spec, 1), "float64")
    x, y = _batch(spec)
    errors = []
    for beta in (1e-2, 1e-4):
        g = compute.gdu(b, spec, p, x, y, PhaseSettings(T=1500, K=10, beta=beta, dtype="float64"))
        assert g.convergence < 1e-12
        ep, bp = g.processes["ep"].theta["W11"], g.processes["bptt"].theta["W11"]
        errors.append(np.sum((ep + bp) ** 2) / np.sum(bp ** 2))
    assert errors[1] < 1e-5 and errors[1] < errors[0] / 100
