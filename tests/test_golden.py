"""The ``official-code`` flavour reproduces the official code's outputs (tests/data/golden).

Everything goes through the core on a backend (``compute.first_phase``, ``compute.gradient`` of
"ep" and "bptt", ``compute.gdu``, ``training.train_epochs``).
The float32 references (``p1h``, ``eb1h``) are checked in float32 and float64 at relative 1e-4;
the float64 references (``float64/p1h``, ``float64/eb1h``, ``float64/pconv``) in float64 at
relative 1e-8, on every backend that supports the model. How the golden arrays relate to the
API (docs/equations.md, last section):

* ``nS[t] = bptt_s[i][t]`` and ``dS[t] = −ep_s[i][t]`` for t = 0..K−1, both forced to 0 for t < i
  (``bptt_s`` = ``processes["bptt"].s``, ``ep_s`` = ``processes["ep"].s`` of ``compute.gdu``);
* ``NT[k] = Σ_{τ=1..k+1} bptt_theta(τ)`` and ``DT[k] = −Σ_{τ=1..k+1} ep_theta(τ)``;
* ``ep/…`` is the EP update Δθ = −``gradient(…, "ep")``, ``bptt/…`` is ``gradient(…, "bptt")``
  (official span: K+1 steps for the fully connected models, K for pconv); so ``DT[k]`` is also
  −Δθ with K = k+1;
* ``s_nudged`` (after K nudged steps) is not returned by the API: it is read back sample by
  sample, for the dense models from the bias part of Δθ,
  ``∂Φ/∂b_i(s^β_K) = ∂Φ/∂b_i(s*) + ep_scale·Δb_i`` with ``∂Φ/∂b_i = h ρ(s_i)`` (EB) or ``s_i`` (P),
  for pconv (whose bias derivatives are channel sums) from the EP state process,
  ``s^β_K = s* + ep_scale·Σ_{t<K} ep_s[i][t]``.

P-conv's conv weight processes pool with the argmax positions of the previous state
(``ModelSpec.late_pool_indices``); :func:`test_pconv_dt_needs_the_late_pool_indices` shows
that the golden ``DT/conv.0.weight`` rules out the positions of the state itself.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import load_backend, selected_backends
from epbench import compute, training
from epbench.spec import ModelSpec, PhaseSettings, TrainSettings

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "data", "golden")
TOL32 = dict(rtol=1e-4, atol=1e-6)
# float64 references: relative 1e-8, with an absolute floor for the references' own cancellation:
# the official code forms every EP array as a difference of two ∂Φ/∂θ's, sums of many products
# of magnitude ≤ 1 scaled by 1/(βB), so an entry carries an absolute rounding error that does not
# shrink with the difference (pconv's DT/conv.1.weight at t = 0 is ~6e-9, since only s0 moves in
# the first nudged step, and is off by up to 6e-14 on every backend). 1e-12 is 17 times the
# largest absolute error measured over the three files and the three backends.
TOL64 = dict(rtol=1e-8, atol=1e-12)
#: backends that the float64 references are checked on (each where it supports the model)
BACKENDS64 = selected_backends(["torch-cpu", "jax-cpu", "numpy"])

#: pconv parameter names of the official code → canonical names (classifier, conv nearest to it,
#: input-side conv)
PCONV_NAMES = {"fc.0.weight": "W01", "fc.0.bias": "b0", "conv.0.weight": "W12", "conv.0.bias": "b1",
               "conv.1.weight": "W2x", "conv.1.bias": "b2"}


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
    """(arrays, spec, phase settings, golden name → canonical name, parameters) of one file,
    ``name`` relative to tests/data/golden without ``.npz``. The spec is built from ``config``."""
    data = np.load(os.path.join(GOLDEN_DIR, f"{name}.npz"))
    cfg = json.loads(str(data["config"]))
    act = {"sigm": "sigmoid", "hardsigm": "hard_sigmoid", "tanh": "tanh"}[cfg["act"]]
    if cfg["cls"] == "convEP":  # C_tab lists the channels output side first, the input's 1 last
        *channels, c_in = cfg["C_tab"]
        assert c_in == 1 and data["x"].shape[1:] == (1, 28, 28)
        spec = ModelSpec(kind="pconv", n_in=28 * 28, channels=tuple(reversed(channels)), n_out=cfg["size_tab"][0],
                         kernel=5, pool=2, activation=act, dt=cfg["dt"], flavor="official-code")
        names = dict(PCONV_NAMES)
    else:
        kind = {"EPdisc": "p", "EPcont": "eb"}[cfg["cls"]]
        n_out, *hidden, n_in = cfg["size_tab"]
        spec = ModelSpec(kind=kind, n_in=n_in, hidden=tuple(hidden), n_out=n_out, activation=act, dt=cfg["dt"],
                         clamp=(kind == "eb" and not cfg.get("no_clamp", False)), flavor="official-code")
        L = spec.n_layers - 1
        names = {}
        for i in range(L + 1):
            names[f"w.{2 * i}.weight"] = f"W{i}{i + 1}" if i < L else f"W{L}x"
            names[f"w.{2 * i}.bias"] = f"b{i}"
    phase = dict(T=cfg["T"], K=cfg["Kmax"], beta=cfg["beta"])
    params = {names[k[len("params/"):]]: data[k] for k in data.files if k.startswith("params/")}
    assert set(params) == set(spec.param_shapes)
    return data, spec, phase, names, params


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-4.0 * (x - 0.5)))


def dphi_db(spec, s):
    """∂Φ/∂b_i per sample: h ρ(s_i) for EB (sigmoid golden models), s_i for P."""
    assert spec.activation == "sigmoid"
    return spec.step * sigmoid(s) if spec.energy_based else s


def weight_names(names):
    return {g: n for g, n in names.items() if g.endswith(".weight")}


def ep_update(backend, spec, P, x, y, phase):
    """The EP update Δθ (added to θ in training): minus EP's gradient estimate."""
    return {k: -v for k, v in compute.gradient(backend, spec, P, x, y, phase, "ep").items()}


def check_reproduced(backend, golden, dtype, tol):
    """Every array of one golden file through the Backend API."""
    data, spec, ph, names, p_np = golden
    phase = PhaseSettings(**ph, dtype=dtype)
    P = backend.from_numpy(spec, p_np, dtype)
    x, y = data["x"], data["y"]
    K, L = phase.K, spec.n_layers - 1

    s_free = compute.first_phase(backend, spec, P, x, phase.T)
    for i in range(L + 1):
        np.testing.assert_allclose(s_free[i], data[f"s_free/{i}"], **tol, err_msg=f"s_free/{i}")

    ep = ep_update(backend, spec, P, x, y, phase)
    bp = compute.gradient(backend, spec, P, x, y, phase, "bptt")
    for gname, name in names.items():
        np.testing.assert_allclose(ep[name], data[f"ep/{gname}"], **tol, err_msg=f"ep/{gname}")
        np.testing.assert_allclose(bp[name], data[f"bptt/{gname}"], **tol, err_msg=f"bptt/{gname}")

    g = compute.gdu(backend, spec, P, x, y, phase, algorithms=("ep",))
    ep_p, bp_p = g.processes["ep"], g.processes["bptt"]
    for i in range(L + 1):
        np.testing.assert_allclose(g.s_free[i], data[f"s_free/{i}"], **tol)
        nS = np.array(bp_p.s[i][:K], dtype=np.float64)
        dS = -np.array(ep_p.s[i][:K], dtype=np.float64)
        nS[:i] = 0.0  # the plotting convention of the official code
        dS[:i] = 0.0
        np.testing.assert_allclose(nS, data[f"nS/{i}"][:, 0], **tol, err_msg=f"nS/{i}")
        np.testing.assert_allclose(dS, data[f"dS/{i}"][:, 0], **tol, err_msg=f"dS/{i}")
    for gname, name in weight_names(names).items():
        NT = np.cumsum(np.asarray(bp_p.theta[name][1:], dtype=np.float64), axis=0)
        DT = -np.cumsum(np.asarray(ep_p.theta[name][1:], dtype=np.float64), axis=0)
        np.testing.assert_allclose(NT, data[f"NT/{gname}"], **tol, err_msg=f"NT/{gname}")
        np.testing.assert_allclose(DT, data[f"DT/{gname}"], **tol, err_msg=f"DT/{gname}")


def check_nudged_states(backend, golden, tol):
    """s_nudged (K nudged steps from s*), read back per sample (float64 runs)."""
    data, spec, ph, _, p_np = golden
    phase = PhaseSettings(**ph, dtype="float64")
    P = backend.from_numpy(spec, p_np, "float64")
    x, y = data["x"], data["y"]
    scale = spec.ep_scale(phase.beta)
    for j in range(x.shape[0]):
        xj, yj = x[j:j + 1], y[j:j + 1]
        if spec.kind == "pconv":  # not clamped: the EP state process sums to s^β_K − s*
            g = compute.gdu(backend, spec, P, xj, yj, phase, algorithms=("ep",))
            for i in range(spec.n_layers):
                got = g.s_free[i][0] + scale * np.sum(g.processes["ep"].s[i][:phase.K], axis=0)
                np.testing.assert_allclose(got, data[f"s_nudged/{i}"][j], **tol, err_msg=f"s_nudged/{i}, sample {j}")
            continue
        s_star = compute.first_phase(backend, spec, P, xj, phase.T)
        delta = ep_update(backend, spec, P, xj, yj, phase)
        for i in range(spec.n_layers):
            got = dphi_db(spec, s_star[i][0].astype(np.float64)) + scale * delta[f"b{i}"]
            want = dphi_db(spec, data[f"s_nudged/{i}"][j].astype(np.float64))
            np.testing.assert_allclose(got, want, **tol, err_msg=f"s_nudged/{i}, sample {j}")


# ----- float32 references --------------------------------------------------------------------
@pytest.fixture(params=["p1h", "eb1h"])
def golden(request):
    return load_golden(request.param)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_golden_reproduced(backend, golden, dtype):
    check_reproduced(backend, golden, dtype, TOL32)


def test_golden_nudged_states(backend, golden):
    check_nudged_states(backend, golden, TOL32)


# ----- float64 references --------------------------------------------------------------------
@pytest.fixture(params=BACKENDS64)
def backend64(request):
    return load_backend(request.param)


@pytest.fixture(params=["p1h", "eb1h", "pconv"])
def golden64(request, backend64):
    golden = load_golden(f"float64/{request.param}")
    reason = backend64.supports(golden[1], "float64")
    if reason:
        pytest.skip(reason)
    return golden


def test_golden64_reproduced(backend64, golden64):
    check_reproduced(backend64, golden64, "float64", TOL64)


def test_golden64_nudged_states(backend64, golden64):
    check_nudged_states(backend64, golden64, TOL64)


def test_pconv_ep_update_and_training_follow_the_late_pool_indices(backend):
    """The EP update and one EP training step with K nudged steps are −DT[K−1]; at K = 3 the
    argmax positions of s^β_{K−1} and s^β_K differ (see the next test), so the update itself
    depends on the rule, whether asked for (the EP update) or applied with learning rate 1
    (one training epoch of one batch)."""
    K = 3
    data, spec, ph, names, p_np = load_golden("float64/pconv")
    reason = backend.supports(spec, "float64")
    if reason:
        pytest.skip(reason)
    phase = PhaseSettings(**dict(ph, K=K), dtype="float64")
    P = backend.from_numpy(spec, p_np, "float64")
    x, y = data["x"], data["y"]
    ep = ep_update(backend, spec, P, x, y, phase)
    train = TrainSettings(lrs=(1.0,) * spec.n_layers, batch_size=x.shape[0])
    res = training.train_epochs(backend, spec, [P], [x], [y.argmax(1)], phase, train, "ep")[0]
    trained = backend.to_numpy(spec, res.params)
    for gname, name in weight_names(names).items():
        want = -data[f"DT/{gname}"][K - 1]
        np.testing.assert_allclose(ep[name], want, **TOL64, err_msg=f"ep_update {gname}")
        np.testing.assert_allclose(trained[name] - p_np[name], want, **TOL64, err_msg=f"train_epoch {gname}")


# ----- the pooling-index rule -----------------------------------------------------------------
def _dt_w12_both_rules(spec, p_np, x, y, phase):
    """DT[t] of W12 for t = 0..K−1 from torch-cpu's own nudged trajectory and ∂Φ/∂θ (the
    core's pconv model on its dynamics), with the argmax positions of the previous state (the
    rule) and of the state itself (Lemma 5)."""
    import torch

    from epbench.phases import first_phase, last

    backend = load_backend("torch-cpu")
    K, scale = phase.K, spec.ep_scale(phase.beta)
    P = backend.from_numpy(spec, p_np, "float64")
    xt, yt = backend.asarray(x, "float64"), backend.asarray(y, "float64")
    with torch.no_grad():
        dyn = backend.dynamics(spec, P, xt)
        s_T, hist = first_phase(backend.ops, dyn, phase.T, 1)
        traj = [last(backend.ops, hist), s_T]
        for _ in range(K):
            traj.append(dyn.step(traj[-1], (phase.beta, yt)))

        def dt(t, late):  # traj[0] = s_{T−1}, traj[1] = s*, traj[t + 2] = s^β_{t+1}
            at = (traj[t + 1], traj[0]) if late else (None, None)
            return -dyn.dphi_increment(traj[t + 2], traj[1], *at)["W12"].numpy() / scale

        return [np.stack([dt(t, late) for t in range(K)]) for late in (True, False)]


def test_pconv_dt_needs_the_late_pool_indices():
    """DT/conv.0.weight of the official code is matched at every step with the argmax positions
    of the previous state, and missed at some step with those of the state itself: the two
    rules are distinguishable on this batch, so the golden comparison can fail (on torch-cpu's
    dynamics and ∂Φ/∂θ; every backend's are compared with the golden arrays above)."""
    load_backend("torch-cpu")
    data, spec, ph, _, p_np = load_golden("float64/pconv")
    assert spec.late_pool_indices
    phase = PhaseSettings(**ph, dtype="float64")
    late, own = _dt_w12_both_rules(spec, p_np, data["x"], data["y"], phase)
    want = data["DT/conv.0.weight"]
    np.testing.assert_allclose(late, want, **TOL64)
    off = [t for t in range(phase.K) if not np.allclose(own[t], want[t], **TOL64)]
    assert off, "the state's own argmax positions reproduce DT/conv.0.weight too"
    worst = max(np.abs(own[t] - want[t]).max() / np.abs(want[t]).max() for t in off)
    assert worst > 0.1, worst
