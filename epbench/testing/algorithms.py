"""The algorithm kit: does a registered algorithm (``epbench_algorithms`` hook) compute what it
declares?

:func:`check_algorithm` runs, on every available CPU backend and every registered model that
backend supports (the model's :meth:`~epbench.models.Model.example_spec`, float64):

* ``gradient``: its gradient has the canonical names and shapes (``spec.param_shapes``), finite;
* ``processes`` (where it has them): ``s[i]`` of shape ``(K+1, *state_shapes[i])``, ``θ[p]`` of
  shape ``(K+1, *param_shapes[p])`` with row 0 exactly 0, finite;
* what it declares in ``agrees_with_bptt``:

  - ``"exact"``: gradient·v = d/dε L(θ + εv) through the BPTT span, by central differences;
  - ``"fixed-point"``: from a first phase converged to 1e-13, sign·processes and the gradient
    equal BPTT's (1e-8 norm-relative per array);
  - ``"small-beta"``: where F = ∂Φ/∂s (energy-based with σ'(s0)), from a converged first
    phase, ‖g(β) − ∇BPTT‖/‖∇BPTT‖ < 1e-3 at β = 1e-4, and below its value at β = 1e-2;
  - ``""``: nothing beyond the shapes.
"""

from __future__ import annotations

import time

import numpy as np

from epbench import compute
from epbench.algorithms import Algorithm
from epbench.testing.cases import Case
from epbench.testing.checks import (Context, Recorder, SkipCheck, Unit, _Dynamics, _f64, _param_dict,
                                    fd_gradient, norm_rel)
from epbench.testing.models import cpu_backends, converged_T, example_cases, failed, run_check, skipped
from epbench.testing.report import Report

#: values of ``Algorithm.agrees_with_bptt`` the kit knows
DECLARATIONS = ("exact", "fixed-point", "small-beta", "")
#: fixed point: sign·processes and gradient against BPTT's (norm-relative per array)
FIXED_POINT_TOL = 1e-8
#: small β: the two β and the largest relative error allowed at the smaller one
SMALL_BETAS, SMALL_BETA_MAX = (1e-2, 1e-4), 1e-3


def _registry():
    from epbench.plugins import registry

    return registry()


def has_processes(alg) -> bool:
    method = getattr(type(alg), "processes", None)
    return callable(method) and method is not Algorithm.processes


def _gradient(ctx: Context, out: Recorder, case: Case, name: str, phase) -> dict:
    """``compute.gradient`` of algorithm ``name`` on the case (float64; cached)."""
    key = ("gradient", id(ctx.backend), case.key, name, phase)
    if key not in ctx._cache:
        b, spec = ctx.backend, case.spec
        x, y, _ = case.batch_data()
        out.doing = f"{name}'s gradient on {b.name}"
        ctx._cache[key] = compute.gradient(b, spec, b.from_numpy(spec, case.params(), "float64"), x, y, phase, name)
        out.doing = ""
    return ctx._cache[key]


def _gdu(ctx: Context, out: Recorder, case: Case, name: str, phase) -> compute.GDUProcesses:
    key = ("gdu", id(ctx.backend), case.key, name, phase)
    if key not in ctx._cache:
        b, spec = ctx.backend, case.spec
        x, y, _ = case.batch_data()
        out.doing = f"{name}'s processes on {b.name}"
        ctx._cache[key] = compute.gdu(b, spec, b.from_numpy(spec, case.params(), "float64"), x, y, phase,
                                      algorithms=(name,))
        out.doing = ""
    return ctx._cache[key]


def _converged_phase(ctx: Context, out: Recorder, case: Case, **changes):
    out.doing = f"{ctx.backend.name}.first_phase (convergence)"
    T, conv = converged_T(ctx, case)
    if conv >= 1e-13:
        raise SkipCheck(f"the first phase does not converge here: max_i ‖s_T − s_(T−1)‖_∞ = {conv:.1e} "
                        f"after T={T} steps (1e-13 needed)")
    return case.phase("float64", T=T, **changes)


class AlgorithmChecks:
    """The checks of one algorithm, as ``check(ctx, unit, out)`` functions of the backend kit."""

    def __init__(self, alg):
        self.alg = alg
        self.name = alg.name

    def gradient(self, ctx: Context, unit: Unit, out: Recorder) -> None:
        """Canonical names and shapes, finite values."""
        case = unit.case
        g = _param_dict(out, case.spec, _gradient(ctx, out, case, self.name, case.phase("float64")),
                        f"{self.name}'s gradient")
        if g is None:
            return
        for k, v in g.items():
            out.expect(bool(np.all(np.isfinite(v))), k, f"{self.name}'s gradient: shape {v.shape}, finite")

    def processes(self, ctx: Context, unit: Unit, out: Recorder) -> None:
        """K+1 rows per layer and parameter, row 0 of θ exactly 0, finite."""
        if not has_processes(self.alg):
            raise SkipCheck(f"{self.name} has no per-step processes")
        case = unit.case
        spec, phase = case.spec, case.phase("float64")
        K = phase.K
        procs = _gdu(ctx, out, case, self.name, phase).processes[self.name]
        if len(procs.s) != spec.n_layers:
            out.fail("", f"{self.name}'s processes have {len(procs.s)} state layers, expected {spec.n_layers}")
            return
        for i, (a, shape) in enumerate(zip(procs.s, spec.state_shapes)):
            a = np.asarray(a)
            want = (K + 1, *shape)
            out.expect(a.shape == want and bool(np.all(np.isfinite(a))), f"s{i}",
                       f"{self.name}'s process s{i}: shape {a.shape} (expected {want}), finite")
        if set(procs.theta) != set(spec.param_shapes):
            out.fail("", f"{self.name}'s θ processes name {sorted(procs.theta)}, expected {sorted(spec.param_shapes)}")
            return
        for p, shape in spec.param_shapes.items():
            a = np.asarray(procs.theta[p])
            want = (K + 1, *shape)
            if a.shape != want:
                out.fail(p, f"{self.name}'s θ process: shape {a.shape}, expected {want}")
            elif not np.all(np.isfinite(a)):
                out.fail(p, f"{self.name}'s θ process has non-finite values")
            elif np.any(a[0] != 0):
                out.fail(p, f"{self.name}'s θ process at t = 0 must be exactly 0: max |θ(0)| = "
                            f"{np.max(np.abs(a[0])):.2e}")
            else:
                out.ok(p, f"{self.name}'s θ process: shape {a.shape}, row 0 exactly 0, finite")

    def exact(self, ctx: Context, unit: Unit, out: Recorder) -> None:
        """gradient·v = d/dε L(θ + εv) through the BPTT span (central differences, float64)."""
        case = unit.case
        if case.spec.clamp:
            raise SkipCheck("with clamping the step is piecewise: finite differences need it off")
        if not case.smooth:
            raise SkipCheck("pooling ties under the hard sigmoid make finite differences unreliable")
        phase = case.phase("float64")
        dyn = _Dynamics(ctx, out, case)
        g = _param_dict(out, case.spec, _gradient(ctx, out, case, self.name, phase), f"{self.name}'s gradient")
        if g is not None:
            fd_gradient(dyn, out, phase, g, f"{self.name}'s gradient")

    def fixed_point(self, ctx: Context, unit: Unit, out: Recorder) -> None:
        """From a converged first phase: sign·processes = BPTT's and gradient = BPTT's (1e-8)."""
        case = unit.case
        spec = case.spec
        phase = _converged_phase(ctx, out, case)
        if has_processes(self.alg):
            g = _gdu(ctx, out, case, self.name, phase)
            mine, ref = g.processes[self.name], g.processes["bptt"]
            for i in range(spec.n_layers):
                out.close(f"s{i}", mine.sign * _f64(mine.s[i]), ref.s[i], FIXED_POINT_TOL,
                          f"sign·{self.name}'s process s{i} vs BPTT's at a fixed point (T={phase.T})")
            for p in spec.param_shapes:
                out.close(p, mine.sign * _f64(mine.theta[p]), ref.theta[p], FIXED_POINT_TOL,
                          f"sign·{self.name}'s θ process vs BPTT's at a fixed point (T={phase.T})")
        got = _param_dict(out, spec, _gradient(ctx, out, case, self.name, phase), f"{self.name}'s gradient")
        want = _gradient(ctx, out, case, "bptt", phase)
        if got is None:
            return
        for p in spec.param_shapes:
            out.close(p, got[p], want[p], FIXED_POINT_TOL,
                      f"{self.name}'s gradient vs BPTT's at a fixed point (T={phase.T}, K={phase.K})")

    def small_beta(self, ctx: Context, unit: Unit, out: Recorder) -> None:
        """From a converged first phase: ‖g(β) − ∇BPTT‖/‖∇BPTT‖ < 1e-3 at β = 1e-4 and below
        its value at β = 1e-2, per parameter."""
        case = unit.case
        spec = case.spec
        if not case.theorem:
            raise SkipCheck("agreement as β → 0 needs F = ∂Φ/∂s: an energy-based model with σ'(s0) "
                            "(paper flavour), without clamping")
        errors: dict[str, list[float]] = {p: [] for p in spec.param_shapes}
        want = None
        for beta in SMALL_BETAS:
            phase = _converged_phase(ctx, out, case, beta=beta)
            if want is None:
                want = _gradient(ctx, out, case, "bptt", phase)
            got = _param_dict(out, spec, _gradient(ctx, out, case, self.name, phase),
                              f"{self.name}'s gradient (β = {beta:g})")
            if got is None:
                return
            for p in spec.param_shapes:
                errors[p].append(norm_rel(got[p], want[p]))
        hi, lo = SMALL_BETAS
        for p, (e_hi, e_lo) in errors.items():
            good = e_lo < SMALL_BETA_MAX and e_lo < e_hi
            out.expect(good, p, f"relative error of {self.name}'s gradient vs BPTT's: {e_hi:.1e} at β = {hi:g}, "
                                f"{e_lo:.1e} at β = {lo:g} (allowed < {SMALL_BETA_MAX:.0e} and decreasing)")

    def declared(self):
        return {"exact": ("exact", self.exact), "fixed-point": ("fixed-point", self.fixed_point),
                "small-beta": ("small-beta", self.small_beta)}.get(getattr(self.alg, "agrees_with_bptt", ""))


def check_algorithm(name: str, backends=None, quick: bool = False) -> Report:
    """Run the algorithm kit on the registered algorithm ``name``: on every available CPU backend
    (``backends``: names or instances) and every registered model it supports, in each flavour
    (``quick``: paper only), float64: its gradient's names and shapes, its processes' shapes, and
    what it declares in ``agrees_with_bptt``. What a backend does not support is skipped with
    its reason."""
    start = time.perf_counter()
    reg = _registry()
    alg = reg.algorithm(name)
    checks = AlgorithmChecks(alg)
    declared = getattr(alg, "agrees_with_bptt", "")
    chosen, results = cpu_backends(backends)
    if declared not in DECLARATIONS:
        results.append(failed(f"{name} declaration", "", "", f"agrees_with_bptt = {declared!r}, expected one of "
                                                              f"{DECLARATIONS}"))
    plan = [("gradient", checks.gradient), ("processes", checks.processes)]
    if checks.declared():
        plan.append(checks.declared())
    cases = [c for model in reg.models.values() for c in example_cases(model, quick, results, f"{name} gradient")]
    for b in chosen:
        cache: dict = {}
        for case in cases:
            reason = b.supports(case.spec, "float64")
            if reason:
                results.extend(skipped(f"{name} {check}", case, b, reason) for check, _ in plan)
                continue
            ctx = Context(b, None, "", quick=quick)
            ctx._cache = cache
            for check, fn in plan:
                results.extend(run_check(fn, ctx, Unit(f"{name} {check}", case, "float64")))
    names = ", ".join(b.name for b in chosen) or "no backend"
    return Report(f"algorithm {name} on {names}", "", results, time.perf_counter() - start)
