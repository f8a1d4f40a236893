"""The ``official-code`` flavour reproduces the official code's outputs (tests/data/golden).

Everything goes through the Backend API (first_phase, ep_update, bptt_grad, gdu), in float32
and in float64, with the golden tolerance (relative 1e-4, absolute 1e-6). How the golden arrays
relate to the API (docs/equations.md, last section):

* ``nS[t] = bptt_s[i][t]`` and ``dS[t] = −ep_s[i][t]`` for t = 0..K−1, both forced to 0 for t < i;
* ``NT[k] = Σ_{τ=1..k+1} bptt_theta(τ)`` and ``DT[k] = −Σ_{τ=1..k+1} ep_theta(τ)``;
* ``ep/…`` is ``ep_update``, ``bptt/…`` is ``bptt_grad`` (official span: K+1 steps);
* ``s_nudged`` (after K nudged steps) is not returned by the API: it is read back, sample by
  sample, from the bias part of ``ep_update``, ``∂Φ/∂b_i(s^β_K) = ∂Φ/∂b_i(s*) + ep_scale·Δb_i``
  with ``∂Φ/∂b_i = h ρ(s_i)`` (EB) or ``s_i`` (P), and compared with ∂Φ/∂b_i of the golden state.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from epbench.spec import ModelSpec, PhaseSettings

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "data", "golden")
TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: torch runs them faster on one intra-op thread, busy machine or not."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_golden(name):
    data = np.load(os.path.join(GOLDEN_DIR, f"{name}.npz"))
    cfg = json.loads(str(data["config"]))
    kind = {"EPdisc": "p", "EPcont": "eb"}[cfg["cls"]]
    act = {"sigm": "sigmoid", "hardsigm": "hard_sigmoid", "tanh": "tanh"}[cfg["act"]]
    n_out, *hidden, n_in = cfg["size_tab"]
    spec = ModelSpec(kind=kind, n_in=n_in, hidden=tuple(hidden), n_out=n_out, activation=act, dt=cfg["dt"],
                     clamp=(kind == "eb" and not cfg.get("no_clamp", False)), flavor="official-code")
    phase = dict(T=cfg["T"], K=cfg["Kmax"], beta=cfg["beta"])
    L = spec.n_layers - 1
    names = {}  # golden name -> canonical name
    for i in range(L + 1):
        names[f"w.{2 * i}.weight"] = f"W{i}{i + 1}" if i < L else f"W{L}x"
        names[f"w.{2 * i}.bias"] = f"b{i}"
    params = {names[k[len("params/"):]]: data[k] for k in data.files if k.startswith("params/")}
    return data, spec, phase, names, params


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-4.0 * (x - 0.5)))


def dphi_db(spec, s):
    """∂Φ/∂b_i per sample: h ρ(s_i) for EB (sigmoid golden models), s_i for P."""
    assert spec.activation == "sigmoid"
    return spec.step * sigmoid(s) if spec.energy_based else s


@pytest.fixture(params=["p1h", "eb1h"])
def golden(request):
    return load_golden(request.param)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_golden_reproduced(backend, golden, dtype):
    data, spec, ph, names, p_np = golden
    phase = PhaseSettings(**ph, dtype=dtype)
    P = backend.from_numpy(spec, p_np, dtype)
    x, y = data["x"], data["y"]
    K, L = phase.K, spec.n_layers - 1

    s_free = backend.first_phase(spec, P, x, phase.T)
    for i in range(L + 1):
        np.testing.assert_allclose(s_free[i], data[f"s_free/{i}"], **TOL, err_msg=f"s_free/{i}")

    ep = backend.ep_update(spec, P, x, y, phase)
    bp = backend.bptt_grad(spec, P, x, y, phase)
    for gname, name in names.items():
        np.testing.assert_allclose(ep[name], data[f"ep/{gname}"], **TOL, err_msg=f"ep/{gname}")
        np.testing.assert_allclose(bp[name], data[f"bptt/{gname}"], **TOL, err_msg=f"bptt/{gname}")

    g = backend.gdu(spec, P, x, y, phase)
    for i in range(L + 1):
        np.testing.assert_allclose(g.s_free[i], data[f"s_free/{i}"], **TOL)
        nS = np.array(g.bptt_s[i][:K], dtype=np.float64)
        dS = -np.array(g.ep_s[i][:K], dtype=np.float64)
        nS[:i] = 0.0  # the plotting convention of the official code
        dS[:i] = 0.0
        np.testing.assert_allclose(nS, data[f"nS/{i}"][:, 0], **TOL, err_msg=f"nS/{i}")
        np.testing.assert_allclose(dS, data[f"dS/{i}"][:, 0], **TOL, err_msg=f"dS/{i}")
    for gname, name in names.items():
        if gname.endswith(".weight"):
            NT = np.cumsum(np.asarray(g.bptt_theta[name][1:], dtype=np.float64), axis=0)
            DT = -np.cumsum(np.asarray(g.ep_theta[name][1:], dtype=np.float64), axis=0)
            np.testing.assert_allclose(NT, data[f"NT/{gname}"], **TOL, err_msg=f"NT/{gname}")
            np.testing.assert_allclose(DT, data[f"DT/{gname}"], **TOL, err_msg=f"DT/{gname}")


def test_golden_nudged_states(backend, golden):
    """s_nudged (K nudged steps), read back per sample from the bias part of ep_update."""
    data, spec, ph, _, p_np = golden
    phase = PhaseSettings(**ph, dtype="float64")
    P = backend.from_numpy(spec, p_np, "float64")
    x, y = data["x"], data["y"]
    scale = spec.ep_scale(phase.beta)
    for j in range(x.shape[0]):
        s_star = backend.first_phase(spec, P, x[j:j + 1], phase.T)
        delta = backend.ep_update(spec, P, x[j:j + 1], y[j:j + 1], phase)
        for i in range(spec.n_layers):
            got = dphi_db(spec, s_star[i][0].astype(np.float64)) + scale * delta[f"b{i}"]
            want = dphi_db(spec, data[f"s_nudged/{i}"][j].astype(np.float64))
            np.testing.assert_allclose(got, want, **TOL, err_msg=f"s_nudged/{i}, sample {j}")
