"""Shared fixtures: the backends under test and the embedded data."""

from __future__ import annotations

import os
import signal

import pytest

# The Ctrl-C tests need SIGINT delivered: a command started in the background of a
# non-interactive shell inherits it ignored, and so would every process the tests start.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread: nothing to restore here
        pass


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


def assert_batched_trials_train_as_alone(batched, alone, spec, atol: float):
    """Three trials trained together on ``batched`` (its ``batch_trials`` on: one mapped program)
    end as each trained alone on ``alone``, in float64 to ``atol`` (a mapped program may sum in
    another order), for EP and BPTT; the third trial, whose first weight is NaN, diverges alone.
    Four full batches of 5 and a short one."""
    import numpy as np

    from epbench import training
    from epbench.spec import PhaseSettings, TrainSettings

    rng = np.random.default_rng(0)
    n_in = int(np.prod(spec.input_shape))
    xs = [rng.uniform(0, 1, (23, n_in)) for _ in range(3)]
    labels = [rng.integers(0, spec.n_out, 23) for _ in range(3)]
    phase = PhaseSettings(T=12, K=4, beta=0.2, dtype="float64")
    train = TrainSettings(lrs=(0.2,) * len(spec.state_shapes), batch_size=5)
    start = [alone.init_params(spec, seed) for seed in range(3)]
    start[2][next(iter(start[2]))].flat[0] = np.nan
    params = [alone.from_numpy(spec, p, "float64") for p in start]
    for algorithm in ("ep", "bptt"):
        together = training.train_epochs(batched, spec, params, xs, labels, phase, train, algorithm)
        one_by_one = [training.train_epochs(alone, spec, [p], [x], [lab], phase, train, algorithm)[0]
                      for p, x, lab in zip(params, xs, labels)]
        assert [r.diverged for r in together] == [r.diverged for r in one_by_one] == [False, False, True]
        for a, b in zip(one_by_one[:2], together[:2]):
            assert a.train_error == b.train_error
            pa, pb = alone.to_numpy(spec, a.params), batched.to_numpy(spec, b.params)
            for k in pa:
                np.testing.assert_allclose(pb[k], pa[k], rtol=0, atol=atol, err_msg=f"{algorithm} {k}")
