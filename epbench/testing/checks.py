"""The checks of the conformance kit.

Each check is a function ``check(ctx, unit, out)`` that calls the backend through ``ctx`` and
records verdicts (per layer or parameter) on ``out``. The relations checked are those of
docs/equations.md; every comparison is a norm-relative error per array,
``‖a − b‖ / max(‖a‖, ‖b‖, floor)``, against an allowed value stated in the message.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import typing
from typing import Callable

import numpy as np

from epbench import compute, training
from epbench.backend import Availability, Backend, Capabilities
from epbench.training import EpochResult
from epbench.metrics import error_rate, relmse
from epbench.spec import Activation, DType, Flavor, ModelSpec, TrainSettings, alternation_problem
from epbench.testing.cases import CASES, PARAM_SEED, THEOREM_BETAS, THEOREM_K, THEOREM_PHASE, Case
from epbench.testing.report import FAILED, PASSED, SKIPPED, CheckResult

#: agreement with the reference backend (norm-relative, per array)
REFERENCE_TOL = {"float64": 1e-10, "float32": 1e-4}
#: agreement of two computations of the same quantity by the backend itself
SELF_TOL = {"float64": 1e-9, "float32": 1e-4}
#: central finite differences in float64 (step, allowed error, floor of the norms)
FD_EPS, FD_TOL, FD_FLOOR = 1e-5, 1e-6, 1e-4
#: random directions per layer in the F / ∂Φ/∂s check
STEP_PHI_DIRECTIONS = 4
#: Theorem 1: allowed log-log slope of RelMSE(β) and the largest RelMSE at the smallest β
SLOPE_RANGE, THEOREM_MAX = (0.8, 1.2), 1e-3

REQUIRED_METHODS = ("availability", "from_numpy", "to_numpy", "cast", "dtype_of", "asarray", "dynamics", "run",
                    "synchronize", "pop_implementation")


# ----- the core's computations on a backend, under the names the checks use ---------------------
class GDUView:
    """A :class:`epbench.compute.GDUProcesses` of EP and BPTT as the checks read it: ``ep_s`` /
    ``ep_theta`` (ΔEP), ``bptt_s`` / ``bptt_theta`` (∇BPTT), ``s_free``, ``convergence``."""

    def __init__(self, procs: compute.GDUProcesses):
        self.procs = procs
        self.ep_s, self.ep_theta = procs.processes["ep"].s, procs.processes["ep"].theta
        self.bptt_s, self.bptt_theta = procs.processes["bptt"].s, procs.processes["bptt"].theta
        self.s_free, self.convergence, self.timings = procs.s_free, procs.convergence, procs.timings


class Core:
    """The core's computations (:mod:`epbench.compute`, :mod:`epbench.training`) run on one
    backend: ``ep_update`` = Δθ of eq. 10 (−EP's gradient estimate), ``bptt_grad`` = ∂L/∂θ by
    Prop. 4, ``gdu``, ``first_phase``, ``step_function``, ``phi``, ``train_epoch(s)``,
    ``evaluate``; every other attribute is the backend's."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def first_phase(self, spec, params, x, T):
        return compute.first_phase(self.backend, spec, params, x, T)

    def ep_update(self, spec, params, x, y, phase):
        return {k: -v for k, v in compute.gradient(self.backend, spec, params, x, y, phase, "ep").items()}

    def bptt_grad(self, spec, params, x, y, phase):
        return compute.gradient(self.backend, spec, params, x, y, phase, "bptt")

    def gdu(self, spec, params, x, y, phase):
        return GDUView(compute.gdu(self.backend, spec, params, x, y, phase, algorithms=("ep",)))

    def step_function(self, spec, params, x, states):
        return compute.step_function(self.backend, spec, params, x, states)

    def phi(self, spec, params, x, states):
        return compute.phi(self.backend, spec, params, x, states)

    def train_epochs(self, spec, params, xs, labels, phase, train, algorithm):
        return training.train_epochs(self.backend, spec, params, xs, labels, phase, train, algorithm)

    def train_epoch(self, spec, params, x, labels, phase, train, algorithm):
        return self.train_epochs(spec, [params], [x], [labels], phase, train, algorithm)[0]

    def evaluate(self, spec, params, x, labels, T, batch_size=1000):
        return training.evaluate(self.backend, spec, params, x, labels, T, batch_size)


def core(backend: Backend) -> Core:
    return backend if isinstance(backend, Core) else Core(backend)


def _model_kinds() -> tuple[str, ...]:
    """The registered model kinds (``epbench_models`` hook)."""
    from epbench.plugins import models

    return tuple(models())


def _declared_kinds(caps: Capabilities) -> tuple[str, ...]:
    """The model kinds a backend declares (``None``: every registered one)."""
    return _model_kinds() if caps.kinds is None else tuple(caps.kinds)


class SkipCheck(Exception):
    """Raised inside a check: the check does not apply (the message says why)."""


# ----- units and results ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Unit:
    """One runnable check: a check name, and the case and dtype it runs on (or none)."""

    check: str
    case: Case | None = None
    dtype: str = ""

    @property
    def id(self) -> str:
        if self.case is None:
            return self.check
        return f"{self.check}[{self.case.key}-{self.dtype}]"


class Recorder:
    """Collects the verdicts of one unit."""

    def __init__(self, unit: Unit):
        self.unit = unit
        self.results: list[CheckResult] = []
        self.doing = ""
        case = unit.case
        self.model = case.label if case else ""
        self.flavor = case.flavor if case else ""

    def _add(self, status: str, layer: str, message: str) -> None:
        self.results.append(CheckResult(self.unit.check, self.model, self.flavor, self.unit.dtype,
                                        layer, status, message))

    def where(self, layer: str) -> str:
        parts = [f"{self.unit.check}:"]
        if self.model:
            parts.append(self.model)
        if self.flavor or self.unit.dtype:
            parts.append(f"[{', '.join(p for p in (self.flavor, self.unit.dtype) if p)}]")
        if layer:
            parts.append(f"layer {layer}")
        return " ".join(parts)

    def ok(self, layer: str = "", detail: str = "") -> None:
        self._add(PASSED, layer, detail)

    def fail(self, layer: str, detail: str) -> None:
        self._add(FAILED, layer, f"{self.where(layer)}: {detail}")

    def skip(self, reason: str, layer: str = "") -> None:
        self._add(SKIPPED, layer, reason)

    def expect(self, condition: bool, layer: str, detail: str) -> bool:
        if condition:
            self.ok(layer, detail)
        else:
            self.fail(layer, detail)
        return bool(condition)

    def close(self, layer: str, got, want, tol: float, what: str, floor: float = 0.0) -> float:
        """Pass if ‖got − want‖ / max(‖got‖, ‖want‖, floor) ≤ tol."""
        got, want = _f64(got), _f64(want)
        if got.shape != want.shape:
            self.fail(layer, f"{what}: shape {got.shape}, expected {want.shape}")
            return float("inf")
        err = norm_rel(got, want, floor)
        if err <= tol:
            self.ok(layer, f"{what}: error {err:.1e} <= {tol:.0e}")
        else:
            self.fail(layer, f"{what}: measured error {err:.2e} > allowed {tol:.0e} "
                             f"(norms {np.linalg.norm(got):.3e} vs {np.linalg.norm(want):.3e})")
        return err


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def norm_rel(a, b, floor: float = 0.0) -> float:
    """‖a − b‖ / max(‖a‖, ‖b‖, floor); 0 when both are 0, inf on NaN."""
    a, b = _f64(a), _f64(b)
    num = float(np.linalg.norm(a - b))
    den = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)), floor)
    if not np.isfinite(num) or not np.isfinite(den):
        return float("inf")
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


# ----- the context: the backend, the reference, and a cache of their results -------------------
class Context:
    """The backend under test, the reference backend (or why there is none) and a cache."""

    def __init__(self, backend: Backend, reference: Backend | None, reference_reason: str,
                 registered_name: str = "", quick: bool = False):
        self.backend = backend
        self.reference = reference
        self.reference_reason = reference_reason
        self.registered_name = registered_name
        self.quick = quick
        self._cache: dict = {}
        self._available: Availability | None = None

    def available(self) -> Availability:
        if self._available is None:
            try:
                self._available = self.backend.availability(probe=True)
            except Exception as exc:  # noqa: BLE001 - reported as unavailability
                self._available = Availability(False, f"availability(probe=True) raised {exc!r}")
        return self._available

    def native(self, out: Recorder, who: Backend, case: Case, dtype: str, seed: int = PARAM_SEED):
        out.doing = f"{who.name}.from_numpy"
        return who.from_numpy(case.spec, case.params(seed), dtype)

    def call(self, out: Recorder, who: Backend, method: str, case: Case, dtype: str, phase=None,
             cached: bool = True, **extra):
        """``who.<method>`` on the case's parameters and batch (cached by arguments)."""
        key = (id(who), method, case.key, dtype, phase, tuple(sorted(extra.items())))
        if cached and key in self._cache:
            return self._cache[key]
        spec = case.spec
        x, y, _ = case.batch_data()
        params = self.native(out, who, case, dtype)
        out.doing = f"{who.name}.{method}"
        if method == "first_phase":
            result = core(who).first_phase(spec, params, x, extra.get("T", case.T))
        else:
            result = getattr(core(who), method)(spec, params, x, y, phase)
        out.doing = ""
        if cached:
            self._cache[key] = result
        return result


# ----- helpers ----------------------------------------------------------------------------------
def _rho(name: str, x: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - 0.5)))
    if name == "hard_sigmoid":
        return np.clip(x, 0.0, 1.0)
    return np.tanh(x)


def _drho(name: str, x: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        r = _rho(name, x)
        return 4.0 * r * (1.0 - r)
    if name == "hard_sigmoid":
        return ((x >= 0) & (x <= 1)).astype(np.float64)
    return 1.0 - np.tanh(x) ** 2


def _states(spec: ModelSpec, states, batch: int, what: str) -> list[np.ndarray]:
    if states is None:
        raise SkipCheck(f"{what} returned None")
    states = list(states)
    if len(states) != spec.n_layers:
        raise AssertionError(f"{what} returned {len(states)} layers, expected {spec.n_layers}")
    return [np.array(s, dtype=np.float64).reshape(batch, *shape) for s, shape in zip(states, spec.state_shapes)]


def _need_float64(ctx: Context, unit: Unit) -> None:
    if "float64" not in ctx.backend.capabilities.dtypes:
        raise SkipCheck(f"{ctx.backend.name} does not declare float64, which finite differences need")
    if unit.dtype != "float64":
        raise SkipCheck("finite differences run in float64 only")


class _Dynamics:
    """The core's step_function and phi on the backend, composed in float64 for finite differences.

    One step of the first phase is ``step_function`` followed by the clip to [0, 1] when
    ``spec.clamp`` (harmless if the backend's step_function already clips). Samples are
    independent, so many perturbed copies of the batch run through one call (``x`` tiled).
    """

    def __init__(self, ctx: Context, out: Recorder, case: Case):
        self.ctx, self.out, self.case = ctx, out, case
        self.spec = case.spec
        self.x, self.y, _ = case.batch_data()
        self.B = len(self.x)
        self.backend = ctx.backend
        self.params = self.native(case.params())
        out.doing = f"{self.backend.name}.step_function"
        probe = core(self.backend).step_function(self.spec, self.params, self.x, self.zeros())
        if probe is None:
            raise SkipCheck(f"{self.backend.name} does not provide the optional step_function")

    def native(self, params_np: dict):
        self.out.doing = f"{self.backend.name}.from_numpy"
        return self.backend.from_numpy(self.spec, params_np, "float64")

    def zeros(self, copies: int = 1) -> list[np.ndarray]:
        return [np.zeros((copies * self.B, *shape)) for shape in self.spec.state_shapes]

    def tiled_x(self, copies: int) -> np.ndarray:
        return np.concatenate([self.x] * copies) if copies > 1 else self.x

    def step(self, s, params=None) -> list[np.ndarray]:
        n = len(s[0])
        x = self.tiled_x(n // self.B)
        self.out.doing = f"{self.backend.name}.step_function"
        new = core(self.backend).step_function(self.spec, self.params if params is None else params, x, s)
        new = _states(self.spec, new, n, "step_function")
        return [np.clip(a, 0.0, 1.0) for a in new] if self.spec.clamp else new

    def run(self, s, n: int, params=None) -> list[np.ndarray]:
        for _ in range(n):
            s = self.step(s, params)
        return s

    def trajectory(self, T: int) -> list[list[np.ndarray]]:
        """[s_0 = 0, s_1, ..., s_T] (cached per backend and case)."""
        key = ("trajectory", id(self.backend), self.case.key, T)
        if key not in self.ctx._cache:
            traj = [self.zeros()]
            for _ in range(T):
                traj.append(self.step(traj[-1]))
            self.ctx._cache[key] = traj
        return self.ctx._cache[key]

    def phi(self, s, params=None) -> float:
        self.out.doing = f"{self.backend.name}.phi"
        value = core(self.backend).phi(self.spec, self.params if params is None else params, self.x, s)
        if value is None:
            raise SkipCheck(f"{self.backend.name} does not provide the optional phi")
        return float(value)

    def losses(self, s) -> np.ndarray:
        """L = ‖s0 − y‖² / (2B) of every copy of the batch in ``s``."""
        copies = len(s[0]) // self.B
        d = s[0].reshape(copies, self.B, -1) - self.y[None]
        return np.sum(d * d, axis=(1, 2)) / (2 * self.B)


def _trajectory_if_any(ctx: Context, out: Recorder, case: Case, dtype: str):
    """The float64 step_function trajectory [s_0, ..., s_T], or None where there is none."""
    if dtype != "float64":
        return None
    try:
        return _Dynamics(ctx, out, case).trajectory(case.T)
    except SkipCheck:
        return None


def _param_dict(out: Recorder, spec: ModelSpec, got, what: str) -> dict | None:
    """Check that ``got`` is a dict with the canonical names and shapes; return it as float64."""
    if not isinstance(got, dict):
        out.fail("", f"{what} returned {type(got).__name__}, expected a dict of NumPy arrays")
        return None
    expected = spec.param_shapes
    if set(got) != set(expected):
        out.fail("", f"{what} names {sorted(got)} differ from the canonical {sorted(expected)}")
        return None
    result = {}
    for name, shape in expected.items():
        value = np.asarray(got[name])
        if value.shape != tuple(shape):
            out.fail(name, f"{what} has shape {value.shape}, expected {tuple(shape)}")
            return None
        result[name] = _f64(value)
    return result


# ----- contract checks --------------------------------------------------------------------------
def check_contract(ctx: Context, unit: Unit, out: Recorder) -> None:
    """The class implements the contract: methods, name, framework, capabilities."""
    b = ctx.backend
    out.expect(isinstance(b, Backend), "class", f"{type(b).__name__} subclasses epbench.backend.Backend")
    abstract = sorted(getattr(type(b), "__abstractmethods__", ()) or ())
    out.expect(not abstract, "abstract methods",
               "no abstract method left" if not abstract else f"abstract methods not implemented: {abstract}")
    for method in REQUIRED_METHODS:
        fn = getattr(b, method, None)
        out.expect(callable(fn), method, f"{method} is callable")
    try:
        from epbench.ops import Ops

        ops = b.ops
        out.expect(isinstance(ops, Ops), "ops", f"ops is {type(ops).__name__}, an epbench.ops.Ops")
    except Exception as exc:  # noqa: BLE001
        out.fail("ops", f"the ops property raised {type(exc).__name__}: {exc}")
    name_ok = isinstance(b.name, str) and bool(b.name) and not any(c.isspace() for c in b.name)
    out.expect(name_ok, "name", f"name {b.name!r} is a non-empty string without spaces")
    if ctx.registered_name:
        out.expect(b.name == ctx.registered_name, "name",
                   f"registered as {ctx.registered_name!r}, name attribute {b.name!r}")
    out.expect(isinstance(b.framework, str), "framework", f"framework {b.framework!r} is a string")
    caps = b.capabilities
    if not isinstance(caps, Capabilities):
        out.fail("capabilities", f"capabilities is {type(caps).__name__}, expected epbench.backend.Capabilities")
        return
    allowed = {"kinds": _model_kinds(), "flavors": typing.get_args(Flavor), "dtypes": typing.get_args(DType),
               "activations": typing.get_args(Activation)}
    for field, names in allowed.items():
        values = tuple(_declared_kinds(caps) if field == "kinds" else getattr(caps, field))
        legal = set(names)
        bad = [v for v in values if v not in legal]
        out.expect(bool(values) and not bad, f"capabilities.{field}",
                   f"capabilities.{field} = {values}" + (f": unknown {bad}, allowed {sorted(legal)}" if bad else "")
                   + ("" if values else ": empty"))
    try:
        version = b.framework_version()
        out.expect(isinstance(version, str), "framework_version", f"framework_version() = {version!r}")
    except Exception as exc:  # noqa: BLE001
        out.fail("framework_version", f"framework_version() raised {type(exc).__name__}: {exc}")


_LAZY_IMPORT_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
import epbench.backend, epbench.plugins, epbench.spec
core = {fw!r} in sys.modules
registry = epbench.plugins.build_registry()
loaded = {fw!r} in sys.modules
registry.backends[{name!r}].availability()
print(json.dumps([core, loaded, {fw!r} in sys.modules]))
"""


def check_availability(ctx: Context, unit: Unit, out: Recorder) -> None:
    """availability() answers without probing (and without importing the framework)."""
    b = ctx.backend
    for probe in (False, True):
        label = f"availability(probe={probe})"
        out.doing = f"{b.name}.{label}"
        a = b.availability(probe=probe)
        if not isinstance(a, Availability):
            out.fail(label, f"{label} returned {type(a).__name__}, expected epbench.backend.Availability")
            continue
        good = isinstance(a.ok, bool) and isinstance(a.reason, str) and isinstance(a.device, str)
        good = good and (a.ok or bool(a.reason))
        out.expect(good, label, f"{label} = {a!r}" + ("" if good else " (ok must be a bool, and a reason "
                                                                    "given when not ok)"))
    fw = b.framework
    if not ctx.registered_name or not fw:
        out.skip("the lazy-import check needs a backend given by its registered name, with a framework",
                 "lazy import")
        return
    module = fw.replace("-", "_")
    script = _LAZY_IMPORT_SCRIPT.format(fw=module, name=ctx.registered_name)
    out.doing = "a subprocess loading the plugins"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        out.fail("lazy import", f"loading the plugins in a fresh interpreter failed: {proc.stderr[-500:]}")
        return
    core, loaded, after = json.loads(proc.stdout.strip().splitlines()[-1])
    if core:
        out.skip(f"the core itself imports {module!r}", "lazy import")
    elif loaded:
        out.fail("lazy import", f"loading the plugins imported {module!r}: import it inside the backend's methods")
    else:
        out.expect(not after, "lazy import",
                   f"availability() without probe {'imported' if after else 'did not import'} {module!r}")


def check_supports(ctx: Context, unit: Unit, out: Recorder) -> None:
    """supports() rejects (with a reason) exactly what capabilities do not declare."""
    b = ctx.backend
    caps = b.capabilities
    problems = 0
    shapes = {"toy": dict(n_in=10, hidden=(12,), n_out=5), "eb": dict(n_in=20, hidden=(16,), n_out=5),
              "p": dict(n_in=20, hidden=(16, 16), n_out=5),
              "pconv": dict(n_in=196, n_out=10, channels=(2, 3), kernel=3)}
    for kind in (k for k in _model_kinds() if k in shapes):
        for flavor in typing.get_args(Flavor):
            for act in typing.get_args(Activation):
                spec = ModelSpec(kind=kind, flavor=flavor, activation=act, **shapes[kind])
                for dtype in typing.get_args(DType):
                    declared = (kind in _declared_kinds(caps) and flavor in caps.flavors and dtype in caps.dtypes
                                and act in caps.activations)
                    out.doing = f"{b.name}.supports"
                    reason = b.supports(spec, dtype)
                    what = f"{kind}/{flavor}/{act}/{dtype}"
                    # kinds=None: every registered model the primitives allow, so a kind may be refused
                    undecided = caps.kinds is None and isinstance(reason, str) and bool(reason)
                    if declared and reason is not None and not undecided:
                        problems += 1
                        out.fail(what, f"supports() rejects {what} although capabilities declare it: {reason}")
                    elif not declared and not (isinstance(reason, str) and reason):
                        problems += 1
                        out.fail(what, f"supports() accepts {what}, which capabilities do not declare "
                                       "(it must return the reason)")
    if not problems:
        out.ok("", f"supports() agrees with {caps}")


# ----- parameters and outputs -------------------------------------------------------------------
def check_params(ctx: Context, unit: Unit, out: Recorder) -> None:
    """to_numpy(from_numpy(p)) returns p (cast to the dtype) exactly, with canonical names and shapes."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    spec = case.spec
    p = case.params()
    native = ctx.native(out, b, case, dtype)
    out.doing = f"{b.name}.to_numpy"
    back = _param_dict(out, spec, b.to_numpy(spec, native), "to_numpy(from_numpy(p))")
    if back is None:
        return
    for name in spec.param_shapes:
        want = p[name].astype(dtype).astype(np.float64)
        if not isinstance(b.to_numpy(spec, native)[name], np.ndarray):
            out.fail(name, "to_numpy must return NumPy arrays")
        elif not np.array_equal(back[name], want):
            out.fail(name, f"to_numpy(from_numpy(p)) differs from p cast to {dtype}: max abs difference "
                           f"{np.max(np.abs(back[name] - want)):.2e} (allowed 0: the round trip must be exact)")
        else:
            out.ok(name, "round trip exact")
    again = _param_dict(out, spec, b.to_numpy(spec, b.from_numpy(spec, b.to_numpy(spec, native), dtype)),
                        "a second round trip")
    if again is not None:
        same = all(np.array_equal(again[k], back[k]) for k in back)
        out.expect(same, "", "a second round trip changes nothing" if same else
                   "a second round trip through from_numpy/to_numpy changed the parameters")


def check_outputs(ctx: Context, unit: Unit, out: Recorder) -> None:
    """Names, shapes and finiteness of every output; gdu's own bookkeeping (t = 0 entries,
    s_free = first_phase, convergence = max_i ‖s_T − s_{T−1}‖_∞, bptt_s(0) = Σ_batch (s0_T − y)/B)."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    spec = case.spec
    phase = case.phase(dtype)
    x, y, _ = case.batch_data()
    B, K = len(x), phase.K
    tol = SELF_TOL[dtype]

    s_free = ctx.call(out, b, "first_phase", case, dtype)
    if not isinstance(s_free, (list, tuple)) or len(s_free) != spec.n_layers:
        out.fail("", f"first_phase returned {type(s_free).__name__} of length "
                     f"{len(s_free) if hasattr(s_free, '__len__') else '?'}, expected a list of {spec.n_layers} arrays")
        return
    for i, (s, shape) in enumerate(zip(s_free, spec.state_shapes)):
        s = np.asarray(s)
        ok = s.shape == (B, *shape) and bool(np.all(np.isfinite(s)))
        out.expect(ok, f"s{i}", f"first_phase layer shape {s.shape} (expected {(B, *shape)}), finite")
    for method in ("ep_update", "bptt_grad"):
        d = _param_dict(out, spec, ctx.call(out, b, method, case, dtype, phase), method)
        if d is not None:
            bad = [k for k, v in d.items() if not np.all(np.isfinite(v))]
            out.expect(not bad, "", f"{method}: canonical names and shapes" + (f", non-finite in {bad}" if bad else
                                                                               ", finite"))
    g = ctx.call(out, b, "gdu", case, dtype, phase)
    if not isinstance(g.procs, compute.GDUProcesses):
        out.fail("", f"gdu returned {type(g.procs).__name__}, expected epbench.compute.GDUProcesses")
        return
    for field in ("ep_s", "bptt_s", "s_free"):
        arrays = list(getattr(g, field))
        if len(arrays) != spec.n_layers:
            out.fail("", f"gdu.{field} has {len(arrays)} layers, expected {spec.n_layers}")
            return
        for i, (a, shape) in enumerate(zip(arrays, spec.state_shapes)):
            want = (B, *shape) if field == "s_free" else (K + 1, *shape)
            a = np.asarray(a)
            out.expect(a.shape == want and bool(np.all(np.isfinite(a))), f"s{i}",
                       f"gdu.{field} shape {a.shape} (expected {want}), finite")
    for field in ("ep_theta", "bptt_theta"):
        d = getattr(g, field)
        if not isinstance(d, dict) or set(d) != set(spec.param_shapes):
            out.fail("", f"gdu.{field} names {sorted(d) if isinstance(d, dict) else d!r} differ from "
                         f"the canonical {sorted(spec.param_shapes)}")
            continue
        for name, shape in spec.param_shapes.items():
            a = np.asarray(d[name])
            if a.shape != (K + 1, *shape):
                out.fail(name, f"gdu.{field} shape {a.shape}, expected {(K + 1, *shape)}")
            elif np.linalg.norm(a[0]) > tol * np.linalg.norm(a):
                out.fail(name, f"gdu.{field}[0] must be 0: measured ‖{field}[0]‖ / ‖{field}‖ = "
                               f"{np.linalg.norm(a[0]) / np.linalg.norm(a):.2e} > allowed {tol:.0e}")
            else:
                out.ok(name, f"gdu.{field}: shape and t = 0 entry")
    for i, (a, s) in enumerate(zip(g.s_free, s_free)):
        out.close(f"s{i}", a, s, tol, "gdu.s_free vs first_phase")
    # convergence = max_i ‖s_T − s_{T−1}‖_∞, from the step_function trajectory (float64 only)
    traj = _trajectory_if_any(ctx, out, case, dtype)
    if traj is None:
        out.skip("convergence is checked in float64 with the optional step_function", "convergence")
    else:
        conv = max(float(np.max(np.abs(a - c))) for a, c in zip(traj[-1], traj[-2]))
        slack = 1e-12 + 1e-6 * conv
        ok = isinstance(g.convergence, (float, int, np.floating)) and abs(float(g.convergence) - conv) <= slack
        out.expect(ok, "convergence", f"gdu.convergence {g.convergence!r} vs max_i ‖s_T − s_(T−1)‖_∞ = {conv:.3e} "
                                      f"from step_function (allowed difference {slack:.1e})")
    # bptt_s(0) = Σ_batch ∂L/∂s_T
    for i in range(spec.n_layers):
        want = np.sum(_f64(g.s_free[0]) - y, axis=0) / B if i == 0 else np.zeros(spec.state_shapes[i])
        out.close(f"s{i}", np.asarray(g.bptt_s[i])[0], want, tol, "bptt_s[t=0] vs Σ_batch (s0_T − y)/B",
                  floor=1e-30 if i == 0 else 1.0)


def check_determinism(ctx: Context, unit: Unit, out: Recorder) -> None:
    """Same seed → identical parameters and bit-identical gdu/ep_update/bptt_grad; other seed → other parameters."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    spec = case.spec
    out.doing = f"{b.name}.init_params"
    p1, p2, p3 = (b.init_params(spec, s) for s in (PARAM_SEED, PARAM_SEED, PARAM_SEED + 1))
    if _param_dict(out, spec, p1, "init_params") is None:
        return
    for name in spec.param_shapes:
        if not np.array_equal(p1[name], p2[name]):
            out.fail(name, "init_params with the same seed gave different values")
        elif np.array_equal(p1[name], p3[name]):
            out.fail(name, "init_params with different seeds gave identical values")
        else:
            out.ok(name, "init_params: same seed identical, other seed different")
    x, y, _ = case.batch_data()
    phase = case.phase(dtype)
    results = []
    for _ in range(2):
        native = b.from_numpy(spec, {k: np.array(v) for k, v in p1.items()}, dtype)
        out.doing = f"{b.name}.gdu"
        g = core(b).gdu(spec, native, x, y, phase)
        out.doing = f"{b.name}.ep_update"
        e = core(b).ep_update(spec, native, x, y, phase)
        out.doing = f"{b.name}.bptt_grad"
        bg = core(b).bptt_grad(spec, native, x, y, phase)
        results.append((g, e, bg))
    (g1, e1, b1), (g2, e2, b2) = results
    for i in range(spec.n_layers):
        for field in ("ep_s", "bptt_s", "s_free"):
            a1, a2 = _f64(getattr(g1, field)[i]), _f64(getattr(g2, field)[i])
            if not np.array_equal(a1, a2):
                out.fail(f"s{i}", f"gdu.{field} differs between two identical calls "
                                  f"(max abs {np.max(np.abs(a1 - a2)):.2e}, allowed 0)")
    for name in spec.param_shapes:
        for label, d1, d2 in (("gdu.ep_theta", g1.ep_theta, g2.ep_theta), ("gdu.bptt_theta", g1.bptt_theta,
                              g2.bptt_theta), ("ep_update", e1, e2), ("bptt_grad", b1, b2)):
            a1, a2 = _f64(d1[name]), _f64(d2[name])
            if not np.array_equal(a1, a2):
                out.fail(name, f"{label} differs between two identical calls "
                               f"(max abs {np.max(np.abs(a1 - a2)):.2e}, allowed 0)")
    if not any(r.failed for r in out.results):
        out.ok("", "gdu, ep_update and bptt_grad are bit-identical across calls")


# ----- dynamics: the step, Φ and the first phase ------------------------------------------------
def check_first_phase(ctx: Context, unit: Unit, out: Recorder) -> None:
    """first_phase(T) = T steps (step_function, clipped if ``clamp``) from s = 0."""
    case, dtype = unit.case, unit.dtype
    _need_float64(ctx, unit)
    dyn = _Dynamics(ctx, out, case)
    s = dyn.trajectory(case.T)[-1]
    got = _states(case.spec, ctx.call(out, ctx.backend, "first_phase", case, dtype), dyn.B, "first_phase")
    for i, (a, c) in enumerate(zip(got, s)):
        out.close(f"s{i}", a, c, SELF_TOL[dtype], f"first_phase(T={case.T}) vs step_function composed T times")


def _inverse_rho(name: str, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ρ⁻¹(r), mask of the well-conditioned coordinates where ρ' is not small)."""
    if name == "tanh":
        mask = np.abs(r) < 0.99
        return np.arctanh(np.where(mask, r, 0.0)), mask
    if name == "sigmoid":
        mask = (r > 0.01) & (r < 0.99)
        rr = np.where(mask, r, 0.5)
        return 0.5 + 0.25 * np.log(rr / (1.0 - rr)), mask
    mask = (r > 1e-6) & (r < 1.0 - 1e-6)
    return np.where(mask, r, 0.0), mask


def check_step_phi(ctx: Context, unit: Unit, out: Recorder) -> None:
    """EB/toy: F = ∂Φ/∂s (official-code EB output: ∂Φ/∂s0 = (1−h)s0 + ρ'(s0)(F0 − (1−h)s0));
    P/pconv: F = (1−h)s + h·ρ(∂Φ/∂s), i.e. ∂Φ/∂s = ρ⁻¹((F − (1−h)s)/h) where ρ is invertible.
    Checked along random directions v of each layer: ⟨∂Φ/∂s, v⟩ against central differences of phi."""
    case = unit.case
    spec = case.spec
    _need_float64(ctx, unit)
    if spec.clamp:
        raise SkipCheck("clamping makes the step piecewise: the relation holds without it")
    if not case.smooth:
        raise SkipCheck("hard-sigmoid pconv: saturated states tie in the pooling windows, finite differences "
                        "are unreliable")
    dyn = _Dynamics(ctx, out, case)
    rng = np.random.default_rng(case.seed + 1)
    lo, hi = (0.05, 0.95) if spec.activation == "hard_sigmoid" else (-0.6, 1.1)
    s = [rng.uniform(lo, hi, size=z.shape) for z in dyn.zeros()]
    out.doing = f"{ctx.backend.name}.step_function"
    F = _states(spec, core(ctx.backend).step_function(spec, dyn.params, dyn.x, s), dyn.B, "step_function")
    h = spec.step
    for i in range(spec.n_layers):
        mask = np.ones_like(s[i], dtype=bool)
        if spec.energy_based:
            if i == 0 and not spec.output_sigma_prime:
                grad = (1 - h) * s[0] + _drho(spec.activation, s[0]) * (F[0] - (1 - h) * s[0])
                what = "∂Φ/∂s0 = (1−h)s0 + ρ'(s0)(F0 − (1−h)s0) (official code: no ρ'(s0))"
            else:
                grad, what = F[i], "F = ∂Φ/∂s"
        else:
            grad, mask = _inverse_rho(spec.activation, (F[i] - (1 - h) * s[i]) / h)
            what = "F = (1−h)s + h·ρ(∂Φ/∂s)"
        got, want = [], []
        for _ in range(STEP_PHI_DIRECTIONS):
            v = rng.standard_normal(s[i].shape) * mask
            vals = []
            for sign in (1.0, -1.0):
                sp = [a.copy() for a in s]
                sp[i] = sp[i] + sign * FD_EPS * v
                vals.append(dyn.phi(sp))
            got.append(float(np.sum(grad * v)))
            want.append((vals[0] - vals[1]) / (2 * FD_EPS))
        out.close(f"s{i}", got, want, FD_TOL, f"{what}: ⟨∂Φ/∂s, v⟩ along {STEP_PHI_DIRECTIONS} random v "
                  "vs central differences of phi", floor=FD_FLOOR)


# ----- BPTT: the Prop. 4 recursion ---------------------------------------------------------------
def check_prop4_theta(ctx: Context, unit: Unit, out: Recorder) -> None:
    """Σ_{t=1..span} bptt_theta(t) = bptt_grad, with span = spec.bptt_span(K)."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    spec = case.spec
    phase = case.phase(dtype)
    span = spec.bptt_span(phase.K)
    if span > phase.T:
        raise SkipCheck(f"span {span} exceeds T {phase.T}")
    g = ctx.call(out, b, "gdu", case, dtype, case.phase(dtype, K=span))
    grad = _param_dict(out, spec, ctx.call(out, b, "bptt_grad", case, dtype, phase), "bptt_grad")
    if grad is None:
        return
    for name in spec.param_shapes:
        total = _f64(g.bptt_theta[name])[1:span + 1].sum(axis=0)
        out.close(name, total, grad[name], SELF_TOL[dtype],
                  f"Σ_(t=1..{span}) bptt_theta(t) (gdu with K={span}) vs bptt_grad (K={phase.K})")


def _smooth_dynamics(ctx: Context, unit: Unit, out: Recorder) -> "_Dynamics":
    """The float64 dynamics for a finite-difference check (skips without float64, or where
    pooling ties make the step non-differentiable)."""
    _need_float64(ctx, unit)
    if not unit.case.smooth:
        raise SkipCheck("hard-sigmoid pconv: pooling ties make finite differences unreliable")
    return _Dynamics(ctx, out, unit.case)


def check_prop4_s(ctx: Context, unit: Unit, out: Recorder) -> None:
    """bptt_s[i][t] = Σ_batch ∂L/∂s^i_{T−t}, against central differences of
    L(step^t(s_{T−t} ± ε e_j)) with e_j the unit j of layer i in every sample of the batch."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    spec = case.spec
    dyn = _smooth_dynamics(ctx, unit, out)
    phase = case.phase(dtype)
    K, T, B = phase.K, phase.T, dyn.B
    traj = dyn.trajectory(T)
    g = ctx.call(out, b, "gdu", case, dtype, phase)
    sizes = [int(np.prod(shape)) for shape in spec.state_shapes]
    per_t = 2 * sum(sizes)  # one copy of the batch per (layer, unit, sign)
    copies = per_t * (K + 1)
    # One sweep of K steps from s_{T−K}: the copies for time t receive their perturbation just
    # before step K − t (their state is then s_{T−t}), so all of them end at time T.
    big = [np.concatenate([a] * copies) for a in traj[T - K]]
    for k in range(K + 1):
        t = K - k
        c = t * per_t
        for i, n in enumerate(sizes):
            flat = big[i].reshape(copies, B, n)
            for j in range(n):
                flat[c, :, j] += FD_EPS
                flat[c + 1, :, j] -= FD_EPS
                c += 2
        if k < K:
            big = dyn.step(big)
    losses = dyn.losses(big)
    fd = [np.zeros((K + 1, n)) for n in sizes]
    for t in range(K + 1):
        c = t * per_t
        for i, n in enumerate(sizes):
            fd[i][t] = (losses[c:c + 2 * n:2] - losses[c + 1:c + 2 * n:2]) / (2 * FD_EPS)
            c += 2 * n
    for i in range(spec.n_layers):
        got = _f64(g.bptt_s[i]).reshape(K + 1, -1) if np.size(g.bptt_s[i]) == fd[i].size else _f64(g.bptt_s[i])
        worst = int(np.argmax(np.linalg.norm(got - fd[i], axis=1))) if got.shape == fd[i].shape else 0
        out.close(f"s{i}", got, fd[i], FD_TOL,
                  f"bptt_s(t), t=0..{K}, vs finite differences of L through t steps of step_function "
                  f"(largest gap at t={worst})", floor=FD_FLOOR)


def check_bptt_fd(ctx: Context, unit: Unit, out: Recorder) -> None:
    """bptt_grad·v = d/dε L(θ + εv) with s_{T−span} held fixed (truncated BPTT), central differences."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    spec = case.spec
    dyn = _smooth_dynamics(ctx, unit, out)
    phase = case.phase(dtype)
    grad = _param_dict(out, spec, ctx.call(out, b, "bptt_grad", case, dtype, phase), "bptt_grad")
    if grad is None:
        return
    fd_gradient(dyn, out, phase, grad, "bptt_grad")


def fd_gradient(dyn: "_Dynamics", out: Recorder, phase, grad: dict, what: str) -> None:
    """grad·v = d/dε L(θ + εv), L = ‖s0_T − y‖²/(2B) through the last span = spec.bptt_span(K)
    steps from s_{T−span} held fixed (truncated BPTT), by central differences along a random v
    per parameter (float64 ``dyn``)."""
    case, spec = dyn.case, dyn.spec
    span = min(spec.bptt_span(phase.K), phase.T)
    start = dyn.trajectory(phase.T)[phase.T - span]
    p = case.params()
    rng = np.random.default_rng(case.seed + 2)
    for name in spec.param_shapes:
        v = rng.standard_normal(p[name].shape)
        vals = []
        for sign in (1.0, -1.0):
            q = dict(p)
            q[name] = p[name] + sign * FD_EPS * v
            vals.append(float(dyn.losses(dyn.run(start, span, dyn.native(q)))[0]))
        fd = (vals[0] - vals[1]) / (2 * FD_EPS)
        out.close(name, np.sum(grad[name] * v), fd, FD_TOL,
                  f"{what}·v vs central differences of L through the last {span} steps along a random v",
                  floor=FD_FLOOR)


# ----- EP ----------------------------------------------------------------------------------------
def check_ep_sum(ctx: Context, unit: Unit, out: Recorder) -> None:
    """Σ_{t=1..K} ep_theta(t) = ep_update, one-sided and symmetric nudging."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    spec = case.spec
    for symmetric in (False,) if ctx.quick else (False, True):
        phase = case.phase(dtype, symmetric=symmetric)
        g = ctx.call(out, b, "gdu", case, dtype, phase)
        upd = _param_dict(out, spec, ctx.call(out, b, "ep_update", case, dtype, phase), "ep_update")
        if upd is None:
            return
        label = "symmetric ±β" if symmetric else "one-sided β"
        for name in spec.param_shapes:
            total = _f64(g.ep_theta[name])[1:].sum(axis=0)
            out.close(name, total, upd[name], SELF_TOL[dtype],
                      f"Σ_(t=1..{phase.K}) ep_theta(t) vs ep_update ({label})")


def check_ep_phi(ctx: Context, unit: Unit, out: Recorder) -> None:
    """The nudged phase rebuilt from step_function (s^β_{t+1} = F(s^β_t) + h·β(y − s0) on the output):
    ep_s[i][t] = Σ_batch (s^β_{t+1} − s^β_t)/(B·ep_scale), and ep_update·v =
    c·(Φ(s^β_K, θ+εv) − Φ(s^β_K, θ−εv) − Φ(s*, θ+εv) + Φ(s*, θ−εv)) / (2ε·B·ep_scale) with
    c = ``spec.ep_phi_factor`` (1 for energy-based models, dt for prototypical ones)."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    spec = case.spec
    _need_float64(ctx, unit)
    if spec.clamp:
        raise SkipCheck("with clamping the nudge acts before the clip: step_function cannot rebuild it")
    dyn = _Dynamics(ctx, out, case)
    phase = case.phase(dtype)
    K, h, beta = phase.K, spec.step, phase.beta
    scale = spec.ep_scale(beta)
    s_star = dyn.trajectory(phase.T)[-1]
    traj = [s_star]
    for _ in range(K + 1):
        s = dyn.step(traj[-1])
        s[0] = s[0] + h * beta * (dyn.y - traj[-1][0])
        traj.append(s)
    g = ctx.call(out, b, "gdu", case, dtype, phase)
    for i in range(spec.n_layers):
        want = np.stack([np.sum(traj[t + 1][i] - traj[t][i], axis=0) for t in range(K + 1)]) / (dyn.B * scale)
        out.close(f"s{i}", g.ep_s[i], want, 1e-7, "ep_s vs the nudged phase rebuilt from step_function")
    upd = _param_dict(out, spec, ctx.call(out, b, "ep_update", case, dtype, phase), "ep_update")
    if upd is None:
        return
    p = case.params()
    rng = np.random.default_rng(case.seed + 3)
    eps = 1e-4
    for name in spec.param_shapes:
        v = rng.standard_normal(p[name].shape)
        diff = 0.0
        for sign in (1.0, -1.0):
            q = dict(p)
            q[name] = p[name] + sign * eps * v
            nq = dyn.native(q)
            diff += sign * (dyn.phi(traj[K], nq) - dyn.phi(s_star, nq))
        want = spec.ep_phi_factor * diff / (2 * eps * dyn.B * scale)
        out.close(name, np.sum(upd[name] * v), want, 1e-6,
                  "ep_update·v vs differences of phi in θ at s^β_K and s* along a random v", floor=1e-8)


def check_theorem1(ctx: Context, unit: Unit, out: Recorder) -> None:
    """Theorem 1 in float64 with F = ∂Φ/∂s: RelMSE(ΔEP, −∇BPTT) ∝ β as β → 0 (log-log slope
    in [0.8, 1.2], below 1e-3 at the smallest β), for every layer and parameter."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    spec = case.spec
    _need_float64(ctx, unit)
    kw = dict(T=case.theorem_T, K=THEOREM_K) if case.theorem_T else THEOREM_PHASE[spec.kind]
    curves: dict[str, list[float]] = {}
    conv = 0.0
    for beta in THEOREM_BETAS:
        phase = case.phase(dtype, beta=beta, **kw)
        g = ctx.call(out, b, "gdu", case, dtype, phase, cached=False)
        conv = max(conv, float(g.convergence))
        for i in range(spec.n_layers):
            curves.setdefault(f"s{i}", []).append(relmse(g.ep_s[i], -_f64(g.bptt_s[i])))
        for name in spec.param_shapes:
            curves.setdefault(name, []).append(relmse(g.ep_theta[name], -_f64(g.bptt_theta[name])))
    if conv > 1e-12:
        out.fail("", f"first phase not converged after T={kw['T']} steps: convergence {conv:.1e} > 1e-12")
    logb = np.log10(THEOREM_BETAS)
    lo, hi = SLOPE_RANGE
    for layer, values in curves.items():
        vals = np.array(values)
        shown = ", ".join(f"{v:.1e}" for v in vals)
        if np.any(vals <= 0) or not np.all(np.isfinite(vals)):
            out.fail(layer, f"RelMSE(ΔEP, −∇BPTT) at β = {THEOREM_BETAS}: [{shown}] must be finite and positive")
            continue
        slope = float(np.polyfit(logb, np.log10(vals), 1)[0])
        good = lo <= slope <= hi and vals[-1] < THEOREM_MAX
        detail = (f"RelMSE(ΔEP, −∇BPTT) at β = 1e-2..1e-5: [{shown}]; measured log-log slope {slope:.2f} "
                  f"(allowed [{lo}, {hi}]), RelMSE {vals[-1]:.1e} at β = 1e-5 (allowed < {THEOREM_MAX:.0e})")
        out.expect(good, layer, detail)


# ----- training and evaluation -------------------------------------------------------------------
def check_train(ctx: Context, unit: Unit, out: Recorder) -> None:
    """train_epoch = consecutive batches (the last one short) of θ += lr·ep_update (EP) or
    θ −= lr·bptt_grad (BPTT) per layer, with the online error before each update; evaluate = error
    of first_phase in batches; a NaN parameter gives diverged=True."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    spec = case.spec
    phase = case.phase(dtype)
    bs = case.batch
    x, _, labels = case.batch_data(bs + 1)  # batches of bs (the usual shapes) and 1
    n_layers = spec.n_layers
    train = TrainSettings(lrs=tuple(0.02 * (k + 1) for k in range(n_layers)), epochs=1, batch_size=bs)
    lr = train.lr_of_layer(spec)
    p0 = {k: v.astype(dtype) for k, v in case.params().items()}
    for algorithm, method, sign in (("ep", "ep_update", 1.0), ("bptt", "bptt_grad", -1.0)):
        p = {k: v.copy() for k, v in p0.items()}
        wrong = 0
        for lo in range(0, len(x), train.batch_size):
            xb, lb = x[lo:lo + bs], labels[lo:lo + bs]
            yb = np.eye(spec.n_out)[lb]
            native = b.from_numpy(spec, p, dtype)
            out.doing = f"{b.name}.first_phase"
            s0 = _f64(core(b).first_phase(spec, native, xb, phase.T)[0])
            wrong += int(np.sum(np.argmax(s0, axis=1) != lb))
            out.doing = f"{b.name}.{method}"
            d = getattr(core(b), method)(spec, native, xb, yb, phase)
            p = {k: (v + sign * lr[spec.param_layer(k)] * np.asarray(d[k])).astype(dtype) for k, v in p.items()}
        native = b.from_numpy(spec, p0, dtype)
        out.doing = f"{b.name}.train_epoch"
        res = core(b).train_epoch(spec, native, x, labels, phase, train, algorithm)
        if not isinstance(res, EpochResult):
            out.fail("", f"train_epoch returned {type(res).__name__}, expected EpochResult")
            continue
        out.expect(not res.diverged, "diverged", f"train_epoch ({algorithm}) diverged={res.diverged!r} on a tame batch")
        got = _param_dict(out, spec, b.to_numpy(spec, res.params), f"train_epoch ({algorithm}) params")
        if got is None:
            continue
        for name in spec.param_shapes:
            out.close(name, got[name] - p0[name], _f64(p[name]) - p0[name], SELF_TOL[dtype],
                      f"train_epoch ({algorithm}) change of θ vs {'+' if sign > 0 else '−'}lr·{method} over "
                      f"batches of {bs} and 1")
        want_err = 100.0 * wrong / len(labels)
        out.expect(abs(float(res.train_error) - want_err) < 1e-9, "train_error",
                   f"train_epoch ({algorithm}) train_error {res.train_error!r} vs {want_err} from first_phase")
        out.doing = f"{b.name}.train_epochs"
        pair = core(b).train_epochs(spec, [b.from_numpy(spec, p0, dtype) for _ in range(2)], [x, x], [labels, labels],
                              phase, train, algorithm)
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(r, EpochResult) for r in pair)):
            out.fail("train_epochs", f"train_epochs of 2 trials returned {pair!r:.80}, expected 2 EpochResults")
            continue
        for r in pair:
            both = _param_dict(out, spec, b.to_numpy(spec, r.params), f"train_epochs ({algorithm}) params")
            for name in spec.param_shapes if both is not None else ():
                out.close(name, both[name] - p0[name], got[name] - p0[name], SELF_TOL[dtype],
                          f"train_epochs ({algorithm}) of two identical trials vs train_epoch")
    native = b.from_numpy(spec, p0, dtype)
    out.doing = f"{b.name}.evaluate"
    err = core(b).evaluate(spec, native, x, labels, phase.T, batch_size=bs)
    want = error_rate(np.concatenate([_f64(core(b).first_phase(spec, native, x[lo:lo + bs], phase.T)[0])
                                      for lo in range(0, len(x), bs)]), labels)
    out.expect(abs(float(err) - want) < 1e-9, "evaluate",
               f"evaluate (batches of {bs}) = {err!r}, first_phase gives {want}")
    bad = {k: v.copy() for k, v in p0.items()}
    first = spec.weight_names()[0]
    bad[first] = bad[first].copy()
    bad[first].flat[0] = np.nan
    out.doing = f"{b.name}.train_epoch"
    res = core(b).train_epoch(spec, b.from_numpy(spec, bad, dtype), x, labels, phase, train, "ep")
    out.expect(bool(getattr(res, "diverged", False)), "diverged",
               f"train_epoch with a NaN in {first}: diverged={getattr(res, 'diverged', None)!r} (expected True)")


# ----- the even/odd alternation (PhaseSettings.alternate) ---------------------------------------
def check_alternate(ctx: Context, unit: Unit, out: Recorder) -> None:
    """Where capabilities declare ``alternate``: for a P model with dt = 1, bptt_grad under the
    alternation equals the synchronous bptt_grad (the loss sees one zig-zag half of the graph
    only), and ep_update under it returns finite canonical arrays."""
    b, case, dtype = ctx.backend, unit.case, unit.dtype
    if not getattr(b.capabilities, "alternate", True):
        raise SkipCheck("capabilities do not declare alternate")
    sync = case.phase(dtype, T=case.T + case.T % 2, K=case.K + case.K % 2)
    alt = sync.model_copy(update={"alternate": True})
    problem = alternation_problem(case.spec, alt)
    if problem:
        raise SkipCheck(problem)
    spec = case.spec
    want = _param_dict(out, spec, ctx.call(out, b, "bptt_grad", case, dtype, sync), "bptt_grad")
    got = _param_dict(out, spec, ctx.call(out, b, "bptt_grad", case, dtype, alt), "bptt_grad (alternate)")
    ep = _param_dict(out, spec, ctx.call(out, b, "ep_update", case, dtype, alt), "ep_update (alternate)")
    if want is None or got is None or ep is None:
        return
    for name in spec.param_shapes:
        out.close(name, got[name], want[name], SELF_TOL[dtype],
                  f"bptt_grad with phase.alternate vs synchronous (T={sync.T}, K={sync.K})")
        out.expect(bool(np.all(np.isfinite(ep[name]))), name,
                   "ep_update with phase.alternate returns finite values")


# ----- agreement with the reference backend -----------------------------------------------------
def check_reference(ctx: Context, unit: Unit, out: Recorder) -> None:
    """Same parameters and batch → the reference's first phase, ep_update (one-sided and symmetric),
    bptt_grad and every GDU process, to 1e-10 (float64) / 1e-4 (float32) norm-relative per array."""
    b, ref, case, dtype = ctx.backend, ctx.reference, unit.case, unit.dtype
    spec = case.spec
    if ref is None:
        raise SkipCheck(ctx.reference_reason)
    reason = ref.supports(spec, dtype)
    if reason:
        raise SkipCheck(f"reference {reason}")
    tol = REFERENCE_TOL[dtype]
    phase = case.phase(dtype)
    mine = _states(spec, ctx.call(out, b, "first_phase", case, dtype), case.batch, "first_phase")
    theirs = _states(spec, ctx.call(out, ref, "first_phase", case, dtype), case.batch, f"{ref.name}.first_phase")
    for i in range(spec.n_layers):
        out.close(f"s{i}", mine[i], theirs[i], tol, f"first_phase vs {ref.name}")
    calls = [("ep_update", phase, "ep_update"), ("bptt_grad", phase, "bptt_grad")]
    if not ctx.quick:
        calls.append(("ep_update", case.phase(dtype, symmetric=True), "ep_update (symmetric)"))
    for method, ph, label in calls:
        d1 = _param_dict(out, spec, ctx.call(out, b, method, case, dtype, ph), label)
        d2 = ctx.call(out, ref, method, case, dtype, ph)
        if d1 is None:
            continue
        for name in spec.param_shapes:
            out.close(name, d1[name], d2[name], tol, f"{label} vs {ref.name}")
    g1 = ctx.call(out, b, "gdu", case, dtype, phase)
    g2 = ctx.call(out, ref, "gdu", case, dtype, phase)
    for field in ("ep_s", "bptt_s"):
        for i in range(spec.n_layers):
            out.close(f"s{i}", getattr(g1, field)[i], getattr(g2, field)[i], tol, f"gdu.{field} vs {ref.name}")
    for field in ("ep_theta", "bptt_theta"):
        for name in spec.param_shapes:
            out.close(name, getattr(g1, field)[name], getattr(g2, field)[name], tol, f"gdu.{field} vs {ref.name}")


# ----- the plan ----------------------------------------------------------------------------------
CHECKS: dict[str, Callable[[Context, Unit, Recorder], None]] = {
    "contract": check_contract,
    "availability": check_availability,
    "supports": check_supports,
    "params": check_params,
    "outputs": check_outputs,
    "determinism": check_determinism,
    "first_phase": check_first_phase,
    "step_phi": check_step_phi,
    "prop4_theta": check_prop4_theta,
    "prop4_s": check_prop4_s,
    "bptt_fd": check_bptt_fd,
    "ep_sum": check_ep_sum,
    "ep_phi": check_ep_phi,
    "train": check_train,
    "alternate": check_alternate,
    "reference": check_reference,
    "theorem1": check_theorem1,
}

#: checks run in every declared dtype; the others run once, in float64 where declared
ALL_DTYPES = ("params", "outputs", "reference")
#: left out of quick runs
SLOW = ("theorem1", "train")


def plan(capabilities: Capabilities, quick: bool = False, cases: tuple[str, ...] | None = None) -> list[Unit]:
    """Every unit of the kit for a backend with these capabilities (skips are decided at run
    time); ``cases`` restricts the per-model units to these case keys."""
    dtypes = [d for d in ("float64", "float32") if d in capabilities.dtypes] or ["float64"]
    units = [Unit("contract"), Unit("availability"), Unit("supports")]
    unknown = set(cases or ()) - {c.key for c in CASES}
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; known: {[c.key for c in CASES]}")
    for case in CASES:
        if (quick and case.variant) or (cases is not None and case.key not in cases):
            continue
        for check in CHECKS:
            if check in ("contract", "availability", "supports"):
                continue
            if quick and check in SLOW:
                continue
            if check == "theorem1" and not case.theorem:
                continue
            for dtype in (dtypes if check in ALL_DTYPES and not quick else dtypes[:1]):
                units.append(Unit(check, case, dtype))
    return units


def run_unit(ctx: Context, unit: Unit) -> list[CheckResult]:
    """Run one unit; a skip condition or an exception becomes a verdict, never propagates."""
    out = Recorder(unit)
    try:
        reason = _skip_reason(ctx, unit)
        if reason:
            out.skip(reason)
        else:
            CHECKS[unit.check](ctx, unit, out)
    except SkipCheck as exc:
        out.skip(str(exc))
    except Exception as exc:  # noqa: BLE001 - a crash is a failure of the backend under test
        where = f" in {out.doing}" if out.doing else ""
        frame = _last_frame(exc)
        out.fail("", f"raised {type(exc).__name__}{where}: {exc}{frame}")
    if not out.results:
        out.ok()
    return out.results


def _last_frame(exc: BaseException) -> str:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return ""
    code = last.tb_frame.f_code
    return f" ({inspect.getfile(code).rsplit('/', 1)[-1]}:{last.tb_lineno} in {code.co_name})"


def _skip_reason(ctx: Context, unit: Unit) -> str:
    if unit.case is None:
        return ""
    avail = ctx.available()
    if not avail.ok:
        return f"{ctx.backend.name} is unavailable: {avail.reason}"
    return ctx.backend.supports(unit.case.spec, unit.dtype) or ""
