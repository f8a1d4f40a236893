"""What is specific to the JAX backend: lazy import, the scoped float64 switch, compile time
reported apart from run time, a clear error for a missing CUDA device, the convolution and
pooling primitives, and the Prop. 4 BPTT processes against ``jax.grad`` through the unrolled
last K steps with one copy of θ per step."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from epbench import compute, training
from epbench.errors import BackendUnavailable
from epbench.spec import ModelSpec, PhaseSettings, TrainSettings
from conftest import SMALL_MODELS, assert_batched_trials_train_as_alone, load_backend

jax = pytest.importorskip("jax")
jnp = jax.numpy


@pytest.fixture(scope="module")
def jb():
    return load_backend("jax-cpu")


def small_batch(spec, B, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(B, *spec.input_shape))
    y = np.eye(spec.n_out)[rng.integers(0, spec.n_out, B)]
    return x, y


def test_plugin_import_is_cheap():
    """Importing the plugin and asking for availability without probing does not import JAX."""
    code = ("import sys, epbench_jax.plugin as p; b = p.epbench_backends(); "
            "print([x.availability().ok for x in b][0], 'jax' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["True", "False"]


def test_float64_switch_does_not_leak(jb):
    spec = ModelSpec(kind="p", n_in=12, hidden=(8,), n_out=4, activation="tanh")
    x, y = small_batch(spec, 3, 0)
    if jax.config.jax_enable_x64:
        pytest.skip("float64 is switched on globally in this process (JAX_ENABLE_X64)")
    p64 = jb.from_numpy(spec, jb.init_params(spec, 0), "float64")
    assert all(v.dtype == jnp.float64 for v in p64.values())
    g = compute.gdu(jb, spec, p64, x, y, PhaseSettings(T=10, K=3, beta=0.1, dtype="float64"))
    assert g.s_free[0].dtype == np.float64 and g.processes["ep"].theta["W01"].dtype == np.float64
    # the rest of the process still has JAX's float32 default
    assert not jax.config.jax_enable_x64
    assert jnp.ones(3).dtype == jnp.float32
    assert jnp.asarray(np.zeros(2, np.float64)).dtype == jnp.float32
    assert (jnp.ones(2, jnp.float32) * 2.0).dtype == jnp.float32
    # and a float32 call after a float64 one is float32 through and through
    p32 = jb.from_numpy(spec, jb.init_params(spec, 0), "float32")
    assert compute.first_phase(jb, spec, p32, x, 10)[0].dtype == np.float32
    assert compute.gradient(jb, spec, p32, x, y, PhaseSettings(T=10, K=3, beta=0.1), "ep")["W01"].dtype == np.float32
    # float64 parameters stay float64 between calls
    assert compute.first_phase(jb, spec, p64, x, 10)[0].dtype == np.float64


def test_compile_time_is_reported_apart_from_run_time(jb):
    spec = ModelSpec(kind="eb", n_in=12, hidden=(8,), n_out=4, activation="tanh", dt=0.2)
    x, y = small_batch(spec, 3, 1)
    P = jb.from_numpy(spec, jb.init_params(spec, 1), "float32")
    phase = PhaseSettings(T=13, K=4, beta=0.1)
    first = compute.gdu(jb, spec, P, x, y, phase).timings
    again = compute.gdu(jb, spec, P, x, y, phase).timings
    assert set(first) == {"compile_s", "run_s"}
    assert first["compile_s"] > 0 and first["run_s"] > 0
    assert again["compile_s"] == 0.0 and again["run_s"] > 0  # the compiled program is cached
    # another T is another program; β is an argument, so a new β is not
    assert compute.gdu(jb, spec, P, x, y, phase.model_copy(update={"T": 14})).timings["compile_s"] > 0
    assert compute.gdu(jb, spec, P, x, y, phase.model_copy(update={"beta": 0.05})).timings["compile_s"] == 0.0
    (res,) = training.train_epochs(jb, spec, [P], [np.tile(x, (4, 1))], [np.arange(12) % 4], phase,
                                   TrainSettings(lrs=(0.1, 0.1), batch_size=3), "ep")
    assert set(res.timings) == {"compile_s", "run_s"} and res.timings["compile_s"] > 0


def test_jax_cuda_unavailable_is_a_clear_error():
    from epbench.plugins import registry

    backend = registry().backends.get("jax-cuda")
    if backend is None:
        pytest.skip("jax-cuda is not registered")
    if backend.availability(probe=True).ok:
        pytest.skip("a CUDA device is available here")
    spec = ModelSpec(kind="p", n_in=12, hidden=(8,), n_out=4)
    with pytest.raises(BackendUnavailable) as err:
        backend.from_numpy(spec, backend.init_params(spec, 0), "float32")
    message = str(err.value)
    assert "jax-cuda" in message and "\n" not in message
    x, y = small_batch(spec, 2, 0)
    with pytest.raises(BackendUnavailable):
        compute.gdu(backend, spec, {}, x, y, PhaseSettings(T=3, K=1, beta=0.1))


def test_divergence_stops_the_epoch(jb):
    spec = ModelSpec(kind="p", n_in=12, hidden=(8,), n_out=4, activation="tanh")
    rng = np.random.default_rng(2)
    x, labels = rng.uniform(0, 1, (40, 12)), rng.integers(0, 4, 40)
    P = jb.from_numpy(spec, jb.init_params(spec, 2), "float32")
    (res,) = training.train_epochs(jb, spec, [P], [x], [labels], PhaseSettings(T=5, K=2, beta=0.5),
                                   TrainSettings(lrs=(float("inf"), 0.1), batch_size=10), "ep")
    assert res.diverged
    assert not all(np.isfinite(v).all() for v in jb.to_numpy(spec, res.params).values())
    # weights that turn non-finite in the last batch: no later first phase sees them, the check
    # at the end of the chunk does
    (last,) = training.train_epochs(jb, spec, [P], [x], [labels], PhaseSettings(T=5, K=2, beta=0.5),
                                    TrainSettings(lrs=(float("inf"), 0.1), batch_size=40), "ep")
    assert last.diverged


# ----- primitives ---------------------------------------------------------------------------
def test_convolution_and_pooling_primitives():
    """Conv is torch's conv2d, ConvT its adjoint, the weight correlation its weight transpose,
    and max-pooling keeps the first maximum of a window (row-major), as torch does."""
    from jax import lax

    from epbench_jax import ops as M
    from epbench_jax.ops import OPS

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        z = jnp.asarray(rng.normal(size=(3, 4, 11, 11)))
        w = jnp.asarray(rng.normal(size=(5, 4, 3, 3)))
        g = jnp.asarray(rng.normal(size=(3, 5, 9, 9)))

        def ref(v, k):
            return lax.conv_general_dilated(v, k, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))

        nhwc, nchw = (lambda a: jnp.moveaxis(a, 1, -1)), (lambda a: jnp.moveaxis(a, -1, 1))
        np.testing.assert_allclose(nchw(M.conv(nhwc(z), w)), ref(z, w), rtol=1e-12, atol=1e-12)
        gz, gw = jax.vjp(ref, z, w)[1](g)
        np.testing.assert_allclose(nchw(M.conv_t(nhwc(g), w)), gz, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(M.conv_weight_grad(nhwc(z), nhwc(g), w.shape), gw, rtol=1e-12, atol=1e-12)
        # the custom derivatives of both products are the exact ones
        gz2, gw2 = jax.vjp(lambda a, b: M.conv(a, b), nhwc(z), w)[1](nhwc(g))
        np.testing.assert_allclose(nchw(gz2), gz, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gw2, gw, rtol=1e-12, atol=1e-12)
        h = jnp.asarray(rng.normal(size=(3, 11, 11, 4)))
        dz, dw = jax.vjp(lambda a, b: M.conv_t(a, b), nhwc(g), w)[1](h)
        rz, rw = jax.vjp(lambda a, b: jax.vjp(lambda v: ref(v, b), z)[1](a)[0], g, w)[1](nchw(h))
        np.testing.assert_allclose(nchw(dz), rz, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw, rw, rtol=1e-12, atol=1e-12)
        # the Ops' forms: the kernel taken once, the layouts, the weight adjoint, Σ over channels
        kernel = OPS.conv_kernel(w)
        np.testing.assert_array_equal(OPS.conv2d(nhwc(z), kernel), M.conv(nhwc(z), w))
        np.testing.assert_array_equal(OPS.conv_transpose2d(nhwc(g), kernel), M.conv_t(nhwc(g), w))
        np.testing.assert_allclose(OPS.maps_to_canonical(OPS.conv2d(OPS.maps_from_canonical(z), kernel, w[:, 0, 0, 0])),
                                   ref(z, w) + w[:, 0, 0, 0][:, None, None], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(OPS.conv2d_weight(nhwc(z), nhwc(g), w.shape), gw, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(OPS.flatten_maps(nhwc(z)), z.reshape(3, -1))
        np.testing.assert_array_equal(OPS.unflatten_maps(z.reshape(3, -1), (4, 11, 11)), nhwc(z))
        np.testing.assert_allclose(OPS.channel_sum(nhwc(z)), z.sum((0, 2, 3)), rtol=1e-12)
        assert OPS.map_shape((4, 11, 9)) == (11, 9, 4)
        # pooling: ties go to the first maximum, odd sides drop the last row/column
        tie = jnp.asarray([[[[1.0], [1.0]], [[1.0], [0.0]]]])  # (1, 2, 2, 1): all but one equal
        val, idx = M.pool(tie, 2)
        assert float(val[0, 0, 0, 0]) == 1.0 and int(idx[0, 0, 0, 0]) == 0
        odd = jnp.asarray(rng.normal(size=(2, 7, 7, 3)))
        val, idx = M.pool(odd, 2)
        up = M.unpool(val, idx, 2, 7)
        assert up.shape == odd.shape and float(jnp.abs(up[:, 6]).max()) == 0.0
        np.testing.assert_array_equal(jnp.sum(up, (1, 2)), jnp.sum(val, (1, 2)))
        # its derivative goes to the argmax only
        gpool = jax.grad(lambda a: jnp.sum(M.pool(a, 2)[0] * 3.0))(odd)
        np.testing.assert_array_equal(gpool, 3.0 * (up != 0))
        np.testing.assert_array_equal(OPS.max_unpool(val, idx, 2, 7), up)
    # hard-sigmoid clip: derivative 1 on the closed interval [0, 1], as torch.clamp
    d = jax.vmap(jax.grad(OPS.clip01))(jnp.asarray([-0.5, 0.0, 0.5, 1.0, 1.5]))
    np.testing.assert_array_equal(d, [0.0, 1.0, 1.0, 1.0, 0.0])
    d = jax.vmap(jax.grad(lambda v: OPS.rho("hard_sigmoid", v)))(jnp.asarray([-0.5, 0.0, 0.5, 1.0, 1.5]))
    np.testing.assert_array_equal(d, [0.0, 1.0, 1.0, 1.0, 0.0])


def test_products_at_full_precision():
    """matmul, linear and matmul_add ask XLA for Precision.HIGHEST (IEEE float32 on GPUs)."""
    from epbench_jax.ops import OPS

    a, w, c = jnp.ones((2, 3)), jnp.ones((4, 3)), jnp.ones((2, 4))
    for f in (lambda: OPS.matmul(a, w.T), lambda: OPS.linear(a, w, c[0]), lambda: OPS.matmul_add(c, a, w.T)):
        text = jax.jit(f).lower().as_text()
        assert "HIGHEST" in text, text


def test_vjp_takes_any_sequence_of_cotangents():
    """ops.vjp is jax.vjp (with has_aux); the pullback takes a list where the output is a tuple."""
    from epbench_jax.ops import OPS

    x = jnp.arange(3.0)
    out, pull = OPS.vjp(lambda a: (a * 2.0, a * a), x)
    (g,) = pull([jnp.ones(3), jnp.ones(3)])
    np.testing.assert_array_equal(g, 2.0 + 2.0 * x)
    out, pull, aux = OPS.vjp(lambda a: ([a * 3.0], "aux"), x, has_aux=True)
    assert aux == "aux"
    np.testing.assert_array_equal(pull((jnp.ones(3),))[0], jnp.full(3, 3.0))


# ----- Prop. 4 against the unrolled graph ---------------------------------------------------
def unrolled_bptt(spec, params, x, y, s_start, K):
    """∂L/∂s_{T−t} and ∂L/∂θ_{T−t} (one copy θ_t per step, drive included) by jax.grad through
    K unrolled steps from s_start = s_{T−K}; the model supplies the step only."""
    from epbench_jax.ops import OPS

    model = spec.model
    x = jnp.asarray(x)
    s0 = model.internal(OPS, spec, [jnp.asarray(v) for v in s_start])
    y = jnp.asarray(y)

    def loss(thetas, eps):
        s = [a + e for a, e in zip(s0, eps[0])]
        for t in range(K):
            inputs, ctx = model.prepare(OPS, spec, thetas[t], x)
            s = model.step(OPS, spec, inputs, ctx, s)
            s = [a + e for a, e in zip(s, eps[t + 1])]
        return jnp.sum((s[0] - y) ** 2) / (2 * y.shape[0])

    thetas = [{k: jnp.asarray(v) for k, v in params.items()} for _ in range(K)]
    eps = [[jnp.zeros_like(v) for v in s0] for _ in range(K + 1)]
    g_theta, g_eps = jax.jit(jax.grad(loss, argnums=(0, 1)))(thetas, eps)
    # t = 0..K: s_{T−t} is eps index K − t; θ_{T−t} (step s_{T−t} → s_{T−t+1}) is thetas[K − t]
    bptt_s = [np.stack([np.asarray(model.external(OPS, spec, g_eps[K - t])[i]).sum(0) for t in range(K + 1)])
              for i in range(spec.n_layers)]
    bptt_theta = {k: np.stack([np.zeros(np.shape(params[k]))]
                              + [np.asarray(g_theta[K - t][k]) for t in range(1, K + 1)]) for k in params}
    return bptt_s, bptt_theta


PROP4 = SMALL_MODELS


@pytest.mark.parametrize("kind", sorted(PROP4))
def test_prop4_processes_match_unrolled_grad(jb, kind):
    spec = ModelSpec(**PROP4[kind])
    T, K, B = 14, 5, 3
    p_np = jb.init_params(spec, 4)
    x, y = small_batch(spec, B, 5)
    with jax.enable_x64(True):
        P = jb.from_numpy(spec, p_np, "float64")
        g = compute.gdu(jb, spec, P, x, y, PhaseSettings(T=T, K=K, beta=0.1, dtype="float64")).processes["bptt"]
        s_start = compute.first_phase(jb, spec, P, x, T - K)
        ref_s, ref_theta = unrolled_bptt(spec, p_np, x, y, s_start, K)
    for i in range(spec.n_layers):
        np.testing.assert_allclose(g.s[i], ref_s[i], rtol=1e-10, atol=1e-14, err_msg=f"bptt_s[{i}]")
    for k in p_np:
        assert g.theta[k].shape == (K + 1, *p_np[k].shape)
        np.testing.assert_allclose(g.theta[k], ref_theta[k], rtol=1e-10, atol=1e-14, err_msg=f"bptt_theta[{k}]")
    # the training gradient is the sum of the per-step processes over bptt_span(K) steps
    span = spec.bptt_span(K)
    g_span = g if span == K else compute.gdu(jb, spec, P, x, y, PhaseSettings(T=T, K=span, beta=0.1,
                                                                             dtype="float64")).processes["bptt"]
    grad = compute.gradient(jb, spec, P, x, y, PhaseSettings(T=T, K=K, beta=0.1, dtype="float64"), "bptt")
    for k in p_np:
        np.testing.assert_allclose(grad[k], g_span.theta[k].sum(0), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", sorted(PROP4))
def test_dphi_increment_is_the_difference_of_dphi(kind):
    """The EP processes use ∂Φ/∂θ(s) − ∂Φ/∂θ(s') written with increments; with the JAX ops it
    is the difference of jax.grad of ``spec.ep_phi_factor``·Φ (batch-averaged), and exactly 0
    when s = s'."""
    from epbench_jax.dynamics import JaxDynamics
    from epbench_jax.ops import OPS

    spec = ModelSpec(**PROP4[kind])
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        params = {k: jnp.asarray(rng.uniform(-0.5, 0.5, size=shape)) for k, shape in spec.param_shapes.items()}
        x, _ = small_batch(spec, 3, 7)
        dyn = JaxDynamics(OPS, spec.model, spec, params, jnp.asarray(x))
        a = [jnp.asarray(rng.uniform(-0.3, 1.1, size=v.shape)) for v in dyn.zeros()]
        b = [v + jnp.asarray(rng.normal(scale=0.05, size=v.shape)) for v in a]
        inc = dyn.dphi_increment(a, b, scale=0.5)

        def dphi(s):
            return jax.grad(lambda p: spec.model.phi(OPS, spec, p, dyn.x, s))(params)

        da, db = dphi(a), dphi(b)
        zero = dyn.dphi_increment(a, a)
        inc, da, db, zero = jax.tree.map(np.asarray, (inc, da, db, zero))
    assert set(inc) == set(params)
    # the increments of κ·Φ, κ = 1 for energy-based models, dt for prototypical ones
    kappa = spec.ep_phi_factor
    for k in params:
        np.testing.assert_allclose(inc[k], kappa * (da[k] - db[k]) / (3 * 0.5), rtol=1e-9, atol=1e-12, err_msg=k)
        assert not np.any(np.asarray(zero[k])), k


def test_batched_trials_equal_one_after_the_other(jb, monkeypatch):
    """train_epochs with batch_trials (EPBENCH_BATCH_TRIALS=1, one vmapped program) gives each
    trial what it gets trained alone; a trial that diverges stops alone."""
    spec = ModelSpec(kind="p", n_in=30, hidden=(24,), n_out=6, activation="sigmoid", dt=1.0)
    monkeypatch.setattr(jb, "batch_trials", True)
    assert_batched_trials_train_as_alone(jb, jb, spec, atol=1e-13)


# ----- the fused CPU phases of the one-hidden-layer models (epbench_jax.native) -----------------
FUSED_CASES = {
    "eb-sigmoid-clamp": dict(kind="eb", hidden=(48,), activation="sigmoid", dt=0.2, clamp=True),
    "eb-hard": dict(kind="eb", hidden=(32,), n_out=17, activation="hard_sigmoid", dt=0.3),
    "eb-official": dict(kind="eb", hidden=(48,), activation="sigmoid", dt=0.2, clamp=True, flavor="official-code"),
    "p-sigmoid": dict(kind="p", hidden=(48,), activation="sigmoid"),
    "p-hard-official": dict(kind="p", hidden=(48,), activation="hard_sigmoid", flavor="official-code"),
}


@pytest.fixture
def fused(monkeypatch):
    """The kernel module, with the kernel forced (EPBENCH_JAX_NATIVE=1) where it applies."""
    from epbench_jax import native

    if native.build.compiler() is None:
        pytest.skip("no C++ compiler: jax-cpu uses its XLA loops")
    assert native.available(), native.unavailable_reason()
    monkeypatch.setenv("EPBENCH_JAX_NATIVE", "1")
    return native


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_phases_equal_the_xla_loop(fused, case, monkeypatch):
    """float32: first phase, EP update (plain and symmetric nudging) and BPTT gradient with the
    fused kernel agree with the XLA loop of the model's step to float32 rounding."""
    spec = ModelSpec(**FUSED_CASES[case])
    x, y = small_batch(spec, 7, seed=3)
    results = {}
    for on in (False, True):
        jb = load_backend("jax-cpu").__class__("cpu")       # a fresh backend: nothing compiled yet
        monkeypatch.setenv("EPBENCH_JAX_NATIVE", "1" if on else "0")
        P = jb.from_numpy(spec, jb.init_params(spec, 1), "float32")
        phase = PhaseSettings(T=30, K=8, beta=0.3, dtype="float32")
        results[on] = (compute.first_phase(jb, spec, P, x, 30),
                       compute.gradient(jb, spec, P, x, y, phase, "ep"),
                       compute.gradient(jb, spec, P, x, y, phase.model_copy(update={"symmetric": True}), "ep"),
                       compute.gradient(jb, spec, P, x, y, phase, "bptt"))
        assert jb.pop_implementation() == ("fused-cpp" if on else "xla-loop")
    (s_a, ep_a, sym_a, bp_a), (s_b, ep_b, sym_b, bp_b) = results[False], results[True]
    for a, b in zip(s_a, s_b):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    for name, da, db, tol in (("ep", ep_a, ep_b, 2e-5), ("symmetric ep", sym_a, sym_b, 2e-5), ("bptt", bp_a, bp_b, 1e-6)):
        for k in da:
            rel = np.linalg.norm(db[k] - da[k]) / max(np.linalg.norm(da[k]), 1e-30)
            assert rel < tol, f"{name} {k}: {rel:.1e}"


def test_fused_phases_are_used_where_they_apply(fused):
    """The compiled jax-cpu programs call the kernel for a one-hidden-layer model in float32,
    and keep the XLA loop in float64, for two hidden layers, under the alternation, for tanh and
    for a hidden layer that is not a multiple of 16 units."""
    from epbench.algorithms import FreePhase
    from epbench.phases import first_phase
    from epbench_jax.dynamics import JaxDynamics, fused_phases
    from epbench_jax.ops import OPS

    alg = compute.algorithm("ep")

    def calls_kernel(spec, dtype, alternate=False):
        phase = PhaseSettings(T=10, K=4, beta=0.5, dtype=dtype, alternate=alternate)
        st = compute.steps(spec, phase)

        def program(p, x, y, beta):
            dyn = JaxDynamics(OPS, spec.model, spec, p, x, alternate)
            s_T, hist = first_phase(OPS, dyn, st.T, alg.history(st, spec))
            return alg.gradient(OPS, dyn, FreePhase(s_T, hist), y, beta, st, phase)

        with jax.enable_x64(dtype == "float64"), fused_phases(True):
            x = jnp.zeros((4, *spec.input_shape), dtype)
            P = {k: jnp.asarray(v, dtype) for k, v in load_backend("jax-cpu").init_params(spec, 0).items()}
            text = jax.jit(program).lower(P, x, jnp.zeros((4, spec.n_out), dtype), jnp.asarray(0.5, dtype)).as_text()
        return fused.TARGET in text

    one = ModelSpec(kind="p", hidden=(16,), activation="sigmoid")
    assert calls_kernel(one, "float32")
    assert not calls_kernel(one, "float64")
    assert not calls_kernel(one, "float32", alternate=True)
    assert not calls_kernel(ModelSpec(kind="p", hidden=(16, 12), activation="sigmoid"), "float32")
    assert not calls_kernel(ModelSpec(kind="p", hidden=(16,), activation="tanh"), "float32")
    assert not calls_kernel(ModelSpec(kind="p", hidden=(20,), activation="sigmoid"), "float32")


def test_fused_phases_under_batched_trials(fused, monkeypatch):
    """The kernel call under jax.vmap (EPBENCH_BATCH_TRIALS=1) trains each trial as alone."""
    jb = load_backend("jax-cpu").__class__("cpu")
    spec = ModelSpec(kind="eb", n_in=30, hidden=(32,), n_out=6, activation="sigmoid", dt=0.2, clamp=True)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(0, 1, (40, 30)) for _ in range(2)]
    labels = [rng.integers(0, 6, 40) for _ in range(2)]
    phase = PhaseSettings(T=20, K=6, beta=0.5, dtype="float32")
    train = TrainSettings(lrs=(0.2, 0.1), batch_size=5)
    params = [jb.from_numpy(spec, jb.init_params(spec, seed), "float32") for seed in range(2)]
    monkeypatch.setattr(jb, "batch_trials", True)
    together = training.train_epochs(jb, spec, params, xs, labels, phase, train, "ep")
    alone = [training.train_epochs(jb, spec, [p], [x], [lab], phase, train, "ep")[0]
             for p, x, lab in zip(params, xs, labels)]
    for a, b in zip(alone, together):
        assert a.train_error == b.train_error
        pa, pb = jb.to_numpy(spec, a.params), jb.to_numpy(spec, b.params)
        for k in pa:
            np.testing.assert_allclose(pb[k], pa[k], rtol=0, atol=1e-6, err_msg=k)


# ----- EPBENCH_JAX_UNROLL: steps per loop iteration of the phases ----------------------------------
UNROLL_MODELS = {"toy": SMALL_MODELS["toy"], "eb": SMALL_MODELS["eb"]}


def _gdu_and_gradient(jb, spec, x, y):
    """The GDU processes of EP and BPTT (with the first phase's state) and EP's training
    gradient, in float64 at a small T and K."""
    phase = PhaseSettings(T=11, K=4, beta=0.1, dtype="float64")
    P = jb.from_numpy(spec, jb.init_params(spec, 2), "float64")
    g = compute.gdu(jb, spec, P, x, y, phase)
    return g.s_free, g.processes, compute.gradient(jb, spec, P, x, y, phase, "ep")


@pytest.mark.parametrize("kind", sorted(UNROLL_MODELS))
def test_unroll_setting_changes_nothing_but_the_loop(kind, monkeypatch):
    """EPBENCH_JAX_UNROLL=1, 3 and full give the default's first phase, GDU processes (EP's and
    BPTT's) and EP training gradient to 1e-12 in float64, and the backend's implementation
    label names the setting (unset: the plain label)."""
    spec = ModelSpec(**UNROLL_MODELS[kind])
    x, y = small_batch(spec, 3, 8)
    monkeypatch.delenv("EPBENCH_JAX_UNROLL", raising=False)
    jb = load_backend("jax-cpu").__class__("cpu")  # one backend for all settings: the setting is in the cache key
    ref_s, ref_p, ref_g = _gdu_and_gradient(jb, spec, x, y)
    assert jb.pop_implementation() == "xla-loop"
    for value in ("1", "3", "full"):
        monkeypatch.setenv("EPBENCH_JAX_UNROLL", value)
        s, processes, grad = _gdu_and_gradient(jb, spec, x, y)
        assert jb.pop_implementation() == f"xla-loop:unroll={value}"
        for a, b in zip(s, ref_s):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=f"{value} first phase")
        for alg in ("ep", "bptt"):
            for i, (a, b) in enumerate(zip(processes[alg].s, ref_p[alg].s)):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=f"{value} {alg} s[{i}]")
            for k in processes[alg].theta:
                np.testing.assert_allclose(processes[alg].theta[k], ref_p[alg].theta[k], rtol=0, atol=1e-12,
                                           err_msg=f"{value} {alg} theta[{k}]")
        for k in grad:
            np.testing.assert_allclose(grad[k], ref_g[k], rtol=0, atol=1e-12, err_msg=f"{value} ep gradient[{k}]")


def test_unroll_setting_values_and_full_leaves_no_loop(monkeypatch):
    """JaxOps.unroll: the defaults (free 4, pconv 2, nudged 1) when unset; N for every phase;
    ``full`` at least any step count, and a phase traced with it has no while loop left."""
    from epbench_jax.ops import FULL_UNROLL, OPS

    p, pconv = ModelSpec(**SMALL_MODELS["p"]), ModelSpec(**SMALL_MODELS["pconv"])
    monkeypatch.delenv("EPBENCH_JAX_UNROLL", raising=False)
    assert [OPS.unroll(p, True), OPS.unroll(pconv, True), OPS.unroll(p, False)] == [4, 2, 1]
    monkeypatch.setenv("EPBENCH_JAX_UNROLL", "8")
    assert [OPS.unroll(p, True), OPS.unroll(pconv, True), OPS.unroll(p, False)] == [8, 8, 8]
    monkeypatch.setenv("EPBENCH_JAX_UNROLL", " FULL ")
    assert OPS.unroll(p, True) == OPS.unroll(p, False) == FULL_UNROLL

    def traced() -> str:
        def phase(s):  # a new function each time: jax.jit caches traces by function
            return OPS.fori(25, lambda c: jnp.tanh(c) * 0.5 + 0.1, s, unroll=OPS.unroll(p, True))

        return jax.jit(phase).lower(jnp.zeros(3)).as_text()

    assert "while" not in traced()
    monkeypatch.setenv("EPBENCH_JAX_UNROLL", "4")
    assert "while" in traced()


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "fast", "4x"])
def test_bad_unroll_setting_is_a_clear_error(value, monkeypatch, capsys):
    """A bad EPBENCH_JAX_UNROLL raises EpbenchError naming the variable (before any tracing),
    which the CLI prints as one line with exit status 2."""
    from epbench.cli import main
    from epbench.errors import EpbenchError
    from epbench_jax.ops import OPS

    monkeypatch.setenv("EPBENCH_JAX_UNROLL", value)
    spec = ModelSpec(**SMALL_MODELS["toy"])
    with pytest.raises(EpbenchError, match=r"EPBENCH_JAX_UNROLL=.*positive integer.*'full'"):
        OPS.unroll(spec, True)
    jb = load_backend("jax-cpu").__class__("cpu")
    x, _ = small_batch(spec, 2, 0)
    with pytest.raises(EpbenchError, match="EPBENCH_JAX_UNROLL"):
        compute.first_phase(jb, spec, jb.from_numpy(spec, jb.init_params(spec, 0), "float64"), x, 5)
    if value != "0":
        return  # the CLI once is enough
    capsys.readouterr()
    assert main(["bench", "-b", "jax-cpu", "-m", "p-1h", "-a", "ep", "--batches", "1", "--out", "/nonexistent-unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: EPBENCH_JAX_UNROLL='0': expected a positive integer")
