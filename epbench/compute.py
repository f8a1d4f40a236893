"""The core's computations run on a backend: NumPy in, NumPy out.

Each function builds one pure program from the phases (:mod:`epbench.phases`) and an algorithm
(:mod:`epbench.algorithms`) over the backend's :class:`~epbench.backend.Dynamics` and
:class:`~epbench.ops.Ops`, and runs it with :meth:`Backend.run` (one compiled program per
call on a compiling backend). Step counts and β are static or traced as the backend needs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from epbench.algorithms import Algorithm, FreePhase, Steps
from epbench.backend import Backend, NDict, Params
from epbench.phases import convergence, first_phase as _first_phase, last
from epbench.spec import ModelSpec, PhaseSettings, check_alternation


@dataclasses.dataclass
class Processes:
    """Per-step processes of one algorithm, t = 0..K (appendix eqs 29-36), batch-averaged:
    ``s[i]`` of shape ``(K+1, *state_shape)``, ``theta[p]`` of shape ``(K+1, *param_shape)``;
    ``sign``: with which sign they estimate BPTT's (EP's ΔEP → −∇BPTT: −1)."""

    s: list[np.ndarray]
    theta: NDict
    sign: float = 1.0


@dataclasses.dataclass
class GDUProcesses:
    """The GDU processes of one batch: each algorithm's and BPTT's (``"bptt"``, the reference),
    the first phase's end and its convergence.

    BPTT (eqs 29-33): ``s[i][t] = Σ_batch ∂L/∂s^i_{T−t}`` with ``L = ‖s0_T − y‖² / (2B)``,
    ``theta[p][t] = ∂L/∂θ_{T−t}``, ``theta[p][0] = 0``. EP (eqs 35-36): ``s[i][t] =
    Σ_batch (s^β_{t+1} − s^β_t) / (B·ep_scale)``, ``theta[p][t] = (∂Φ/∂θ(s^β_t) − ∂Φ/∂θ(s^β_{t−1}))
    / ep_scale``. Theorem 1: EP's → −BPTT's as β → 0 when F = ∂Φ/∂s."""

    processes: dict[str, Processes]
    s_free: list[np.ndarray]  # first-phase states s_T, (B, *state_shape)
    convergence: float  # max_i ‖s^i_T − s^i_{T−1}‖_∞ over the batch
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def algorithm(name: str) -> Algorithm:
    """The registered algorithm ``name`` (``epbench plugins`` lists them)."""
    from epbench.plugins import get_algorithm

    return get_algorithm(name)


def steps(spec: ModelSpec, phase: PhaseSettings) -> Steps:
    """Step counts in units of the dynamics' step: time steps, or double steps under
    ``phase.alternate`` (its counts are even, ``spec.alternation_problem``)."""
    span = min(spec.bptt_span(phase.K), phase.T)
    if phase.alternate:
        return Steps(phase.T // 2, phase.K // 2, span // 2)
    return Steps(phase.T, phase.K, span)


def _batch(backend: Backend, spec: ModelSpec, x, dtype: str):
    x = np.asarray(x)
    return backend.asarray(x.reshape((x.shape[0],) + tuple(spec.input_shape)), dtype)


def first_phase(backend: Backend, spec: ModelSpec, params: Params, x: np.ndarray, T: int,
                dtype: str | None = None) -> list[np.ndarray]:
    """States s_T after T free steps from s = 0 (canonical layout), in the parameters' dtype
    unless ``dtype`` is given."""
    dtype = dtype or backend.dtype_of(params)
    with backend.precision(dtype):
        def build():
            def program(p, xb):
                dyn = backend.dynamics(spec, p, xb)
                return dyn.external(_first_phase(backend.ops, dyn, T)[0])
            return program

        out, _ = backend.run(("first_phase", spec, T), build, backend.cast(params, dtype), _batch(backend, spec, x, dtype))
        return [np.asarray(v) for v in backend.to_host(out)]


def gradient(backend: Backend, spec: ModelSpec, params: Params, x: np.ndarray, y: np.ndarray,
             phase: PhaseSettings, algorithm_name: str) -> NDict:
    """The algorithm's estimate of ∂L/∂θ on one batch (θ ← θ − lr·g in training)."""
    check_alternation(spec, phase)
    alg = algorithm(algorithm_name)
    st = steps(spec, phase)
    dtype = phase.dtype
    with backend.precision(dtype):
        def build():
            def program(p, xb, yb, beta):
                dyn = backend.dynamics(spec, p, xb, phase.alternate)
                s_T, hist = _first_phase(backend.ops, dyn, st.T, alg.history(st, spec))
                return alg.gradient(backend.ops, dyn, FreePhase(s_T, hist), yb, beta, st, phase)
            return program

        out, _ = backend.run(("gradient", spec, phase.model_copy(update={"beta": 1.0}), alg.name), build,
                             backend.cast(params, dtype), _batch(backend, spec, x, dtype),
                             backend.asarray(np.asarray(y), dtype), backend.asarray(np.asarray(phase.beta), dtype))
        return {k: np.asarray(v) for k, v in backend.to_host(out).items()}


def gdu(backend: Backend, spec: ModelSpec, params: Params, x: np.ndarray, y: np.ndarray,
        phase: PhaseSettings, algorithms: tuple[str, ...] = ("ep",)) -> GDUProcesses:
    """First phase (keeping its last K states), then the per-step processes of each algorithm
    that has them and of BPTT (Prop. 4), t = 0..K, in one program."""
    check_alternation(spec, phase, gdu=True)
    names = tuple(dict.fromkeys((*algorithms, "bptt")))
    algs = [algorithm(n) for n in names]
    missing = [a.name for a in algs if type(a).processes is Algorithm.processes]
    if missing:
        raise ValueError(f"algorithm {missing[0]!r} has no per-step processes for the GDU comparison")
    K, dtype = phase.K, phase.dtype
    with backend.precision(dtype):
        def build():
            def program(p, xb, yb, beta):
                ops = backend.ops
                dyn = backend.dynamics(spec, p, xb)
                s_T, hist = _first_phase(ops, dyn, phase.T, K)
                free = FreePhase(s_T, hist)
                procs = {a.name: a.processes(ops, dyn, free, yb, beta, K, phase) for a in algs}
                procs = {n: (dyn.external(ps), pt) for n, (ps, pt) in procs.items()}
                return procs, dyn.external(s_T), convergence(ops, s_T, last(ops, hist))
            return program

        out, timings = backend.run(("gdu", spec, phase.model_copy(update={"beta": 1.0}), names), build,
                                   backend.cast(params, dtype), _batch(backend, spec, x, dtype),
                                   backend.asarray(np.asarray(y), dtype),
                                   backend.asarray(np.asarray(phase.beta), dtype))
        procs, s_free, conv = backend.to_host(out)
    return GDUProcesses(
        processes={a.name: Processes([np.asarray(v) for v in procs[a.name][0]],
                                     {k: np.asarray(procs[a.name][1][k]) for k in spec.param_shapes},
                                     a.process_sign) for a in algs},
        s_free=[np.asarray(v) for v in s_free], convergence=float(conv), timings=timings)


def _states(backend: Backend, spec: ModelSpec, states, batch: int, dtype: str) -> list:
    return [backend.asarray(np.asarray(v).reshape((batch,) + tuple(shape)), dtype)
            for v, shape in zip(states, spec.state_shapes)]


def step_function(backend: Backend, spec: ModelSpec, params: Params, x: np.ndarray, states: list[np.ndarray],
                  dtype: str | None = None) -> list[np.ndarray]:
    """F(x, s, θ) = s + dt·dsdt(s) for one free step, *without* the clamp (so that F = ∂Φ/∂s for
    the energy-based models with σ'(s0)); ``states`` in the canonical layout."""
    spec = spec.model_copy(update={"clamp": False})
    dtype = dtype or backend.dtype_of(params)
    with backend.precision(dtype):
        def build():
            def program(p, xb, s):
                dyn = backend.dynamics(spec, p, xb)
                return dyn.external(dyn.step(dyn.internal(s)))
            return program

        xb = _batch(backend, spec, x, dtype)
        out, _ = backend.run(("step", spec), build, backend.cast(params, dtype), xb,
                             _states(backend, spec, states, np.shape(x)[0], dtype))
        return [np.asarray(v) for v in backend.to_host(out)]


def phi(backend: Backend, spec: ModelSpec, params: Params, x: np.ndarray, states: list[np.ndarray],
        dtype: str | None = None) -> float:
    """Φ(x, s, θ) summed over the batch (its per-sample gradient in s is F, Theorem 1)."""
    dtype = dtype or backend.dtype_of(params)
    with backend.precision(dtype):
        def build():
            def program(p, xb, s):
                dyn = backend.dynamics(spec, p, xb)
                return dyn.phi(dyn.internal(s))
            return program

        out, _ = backend.run(("phi", spec), build, backend.cast(params, dtype), _batch(backend, spec, x, dtype),
                             _states(backend, spec, states, np.shape(x)[0], dtype))
        return float(np.asarray(backend.to_host(out)))
