"""jax-cpu and torch-cpu agree: same parameters, same batch, every kind and both flavours.

First-phase states, the EP and BPTT gradients (``compute.gradient``) and every GDU process
(``compute.gdu``) must agree to 1e-10
(norm-relative, ‖a − b‖ / ‖b‖) in float64 and to 1e-4 in float32.

float32 runs use β = 1: EP processes are differences of nearby quantities divided by ep_scale,
so their float32 rounding is amplified by 1/β. Both backends form the EP parameter differences
∂Φ/∂θ(s) − ∂Φ/∂θ(s') from the state increments (no cancellation of two large products), which is
what keeps them within 1e-4 of each other in float32.

With ``$EPBENCH_TEST_BACKENDS`` set (e.g. ``torch-cuda,jax-cuda``), each backend named there is
checked against torch-cpu instead of jax-cpu.
"""

from __future__ import annotations

import numpy as np
import pytest

from epbench import compute
from epbench.spec import ModelSpec, PhaseSettings
from conftest import load_backend, selected_backends

TOL = {"float64": 1e-10, "float32": 1e-4}

#: id -> (model kwargs, T, K, β, batch, symmetric)
CASES = {
    "toy": (dict(kind="toy", n_in=10, hidden=(50,), n_out=5, activation="tanh", dt=0.08), 300, 20, 0.05, 4, False),
    "eb-1h": (dict(kind="eb", hidden=(40,), activation="sigmoid", dt=0.2, clamp=True), 40, 8, 0.5, 5, False),
    "eb-2h": (dict(kind="eb", hidden=(32, 24), activation="tanh", dt=0.08), 120, 15, 0.2, 4, True),
    "p-1h": (dict(kind="p", hidden=(40,), activation="sigmoid"), 30, 8, 0.2, 5, False),
    "p-2h": (dict(kind="p", hidden=(32, 24), activation="tanh"), 40, 10, 0.2, 4, True),
    "pconv": (dict(kind="pconv", activation="hard_sigmoid"), 12, 4, 0.4, 2, False),
}
BETA_F32 = 1.0


#: the backends checked against REFERENCE ($EPBENCH_TEST_BACKENDS, e.g. torch-cuda,jax-cuda)
CANDIDATES = selected_backends(["jax-cpu"])
REFERENCE = "torch-cpu"


@pytest.fixture(scope="module", params=CANDIDATES)
def pair(request):
    return load_backend(request.param), load_backend(REFERENCE)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: torch is faster on one intra-op thread (and steadier on a busy machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def setting(case: str, flavor: str, dtype: str):
    kw, T, K, beta, B, symmetric = CASES[case]
    spec = ModelSpec(**kw, flavor=flavor)
    phase = PhaseSettings(T=T, K=K, beta=beta if dtype == "float64" else max(beta, BETA_F32),
                          symmetric=symmetric, dtype=dtype)
    rng = np.random.default_rng(7)
    x = rng.uniform(0.0, 1.0, size=(B, *spec.input_shape))
    y = np.eye(spec.n_out)[rng.integers(0, spec.n_out, B)]
    return spec, phase, x, y


def compare(jax_out, torch_out, tol, label):
    """Norm-relative agreement of every array."""
    bad = {k: rel(jax_out[k], b) for k, b in torch_out.items() if rel(jax_out[k], b) > tol}
    assert not bad, f"{label}: the backend and {REFERENCE} differ: {bad}"


def flat(g) -> dict:
    out = {f"s_free[{i}]": v for i, v in enumerate(g.s_free)}
    for name, procs in g.processes.items():
        out.update({f"{name}_s[{i}]": v for i, v in enumerate(procs.s)})
        out.update({f"{name}_theta[{k}]": v for k, v in procs.theta.items()})
    return out


def skip_unsupported(backends, spec, dtype):
    for b in backends:
        reason = b.supports(spec, dtype)
        if reason:
            pytest.skip(reason)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("flavor", ["paper", "official-code"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_backends_agree(pair, case, flavor, dtype):
    J, T = pair
    spec, phase, x, y = setting(case, flavor, dtype)
    skip_unsupported(pair, spec, dtype)
    p_np = J.init_params(spec, 3)
    pj, pt = J.from_numpy(spec, p_np, dtype), T.from_numpy(spec, p_np, dtype)
    tol = TOL[dtype]

    gj, gt = compute.gdu(J, spec, pj, x, y, phase), compute.gdu(T, spec, pt, x, y, phase)
    assert gj.s_free[0].dtype == np.dtype(dtype)
    fj, ft = flat(gj), flat(gt)
    assert set(fj) == set(ft)
    compare(fj, ft, tol, "gdu")
    assert gj.convergence == pytest.approx(gt.convergence, rel=1e-6 if dtype == "float64" else 1e-2, abs=1e-7)

    for alg in ("ep", "bptt"):
        compare(compute.gradient(J, spec, pj, x, y, phase, alg), compute.gradient(T, spec, pt, x, y, phase, alg),
                tol, f"gradient {alg}")


def test_first_phase_and_parameters_round_trip(pair):
    """first_phase agrees, and parameters go through from_numpy/to_numpy unchanged."""
    J, T = pair
    spec, phase, x, _ = setting("p-2h", "official-code", "float64")
    p_np = J.init_params(spec, 5)
    pj = J.from_numpy(spec, p_np, "float64")
    back = J.to_numpy(spec, pj)
    assert set(back) == set(p_np) and all(np.array_equal(back[k], p_np[k]) for k in p_np)
    sj = compute.first_phase(J, spec, pj, x, 25)
    st = compute.first_phase(T, spec, T.from_numpy(spec, p_np, "float64"), x, 25)
    for a, b in zip(sj, st):
        assert rel(a, b) <= TOL["float64"]
