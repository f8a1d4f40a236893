"""The model kit: does a registered model (``epbench_models`` hook) implement its equations?

:func:`check_model` runs, on the model's :meth:`~epbench.models.Model.example_spec` in each
flavour and float64, on every available CPU backend whose ``supports()`` accepts it:

* ``structure``: ``init_params`` gives the names and shapes of ``param_shapes``, every parameter
  drives a layer, and the first phase gives finite states of ``state_shapes``;
* ``agreement``: the first phase, EP's and BPTT's gradients (one-sided and symmetric nudging)
  and every GDU process equal the reference backend's (torch-cpu where it runs the model) to
  1e-10 norm-relative per array (the backend kit's ``reference`` check);
* ``step_phi``: F = ∂Φ/∂s (energy-based) or F = (1−dt)s + dt·ρ(∂Φ/∂s) (prototypical) against
  central differences of Φ (the backend kit's ``step_phi`` check);
* ``theorem1``: where F = ∂Φ/∂s (energy-based with σ'(s0)), RelMSE(ΔEP, −∇BPTT) ∝ β as β → 0
  from a first phase converged to 1e-13 (the backend kit's ``theorem1`` check), on the reference.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from epbench import compute
from epbench.backend import Backend
from epbench.testing.cases import PARAM_SEED, Case, example_case
from epbench.testing.checks import (Context, Recorder, SkipCheck, Unit, _last_frame, _param_dict, _states,
                                    check_reference, check_step_phi, check_theorem1)
from epbench.testing.report import CheckResult, Report

#: the backend the others are compared with, where it runs the model
PREFERRED_REFERENCE = "torch-cpu"
#: the first phase counts as converged when max_i ‖s_T − s_{T−1}‖_∞ is below this
CONVERGED = 1e-13
#: first-phase lengths tried, in turn, until it converges
CONVERGENCE_T = (100, 200, 400, 800, 1600, 3200, 6400)
FLAVORS = ("paper", "official-code")


def _registry():
    from epbench.plugins import registry

    return registry()


class KitRecorder(Recorder):
    """A :class:`Recorder` whose messages name the model (and the backend it ran on)."""

    def __init__(self, unit: Unit, model: str):
        super().__init__(unit)
        self.model = model


def label(case: Case, backend: Backend) -> str:
    return f"{case.label} on {backend.name}"


def run_check(fn: Callable[[Context, Unit, Recorder], None], ctx: Context, unit: Unit) -> list[CheckResult]:
    """Run one check function; a skip or an exception becomes a verdict (on one line)."""
    out = KitRecorder(unit, label(unit.case, ctx.backend))
    try:
        fn(ctx, unit, out)
    except SkipCheck as exc:
        out.skip(str(exc))
    except Exception as exc:  # noqa: BLE001 - a crash is a failure of the plugin under test
        where = f" in {out.doing}" if out.doing else ""
        text = " ".join(str(exc).split())
        out.fail("", f"raised {type(exc).__name__}{where}: {text}{_last_frame(exc)}")
    if not out.results:
        out.ok()
    return out.results


def skipped(check: str, case: Case | None, backend: Backend | None, reason: str, model: str = "") -> CheckResult:
    where = model or (label(case, backend) if case is not None and backend is not None else "")
    return CheckResult(check, where, case.flavor if case else "", "float64", "", "skipped", reason)


def failed(check: str, model: str, flavor: str, message: str) -> CheckResult:
    return CheckResult(check, model, flavor, "float64", "", "failed", f"{check}: {model} [{flavor}]: {message}")


def cpu_backends(backends=None) -> tuple[list[Backend], list[CheckResult]]:
    """The available CPU backends (instances or registered names; default: every registered
    backend on a CPU, ``torch-cpu`` first), and a skip for each given one that is unavailable."""
    reg = _registry()
    notes: list[CheckResult] = []
    if backends is None:
        names = sorted(reg.backends, key=lambda n: (n != PREFERRED_REFERENCE, n))
        candidates = []
        for name in names:
            try:
                avail = reg.backends[name].availability()
            except Exception:  # noqa: BLE001 - an unavailable backend is left out
                continue
            if avail.ok and (avail.device.lower().startswith("cpu") or name.endswith("-cpu")):
                candidates.append(reg.backends[name])
    else:
        candidates = [reg.backend(b) if isinstance(b, str) else b for b in backends]
    chosen = []
    for b in candidates:
        try:
            avail = b.availability(probe=True)
        except Exception as exc:  # noqa: BLE001
            notes.append(skipped("backends", None, None, f"{b.name}: availability() raised {exc!r}"))
            continue
        if avail.ok:
            chosen.append(b)
        else:
            notes.append(skipped("backends", None, None, f"{b.name} is unavailable: {avail.reason}"))
    return chosen, notes


def reference_of(supported: list[Backend]) -> Backend:
    return next((b for b in supported if b.name == PREFERRED_REFERENCE), supported[0])


def converged_T(ctx: Context, case: Case) -> tuple[int, float]:
    """The first T of :data:`CONVERGENCE_T` with max_i ‖s_T − s_{T−1}‖_∞ < :data:`CONVERGED`
    (float64, on ``ctx.backend``; cached), and that measure; the last T when none converges."""
    key = ("converged_T", id(ctx.backend), case.key)
    if key not in ctx._cache:
        b, spec = ctx.backend, case.spec
        x, _, _ = case.batch_data()
        params = b.from_numpy(spec, case.params(), "float64")
        conv = float("inf")
        for T in CONVERGENCE_T:
            s = compute.first_phase(b, spec, params, x, T - 1)
            f = compute.step_function(b, spec, params, x, s)
            if spec.clamp:
                f = [np.clip(a, 0.0, 1.0) for a in f]
            conv = max(float(np.max(np.abs(a - c))) for a, c in zip(f, s))
            if conv < CONVERGED:
                break
        ctx._cache[key] = (T, conv)
    return ctx._cache[key]


# ----- the checks ---------------------------------------------------------------------------
def check_structure(ctx: Context, unit: Unit, out: Recorder) -> None:
    """init_params names/shapes = param_shapes; param_layer in range; first_phase shapes, finite."""
    b, case = ctx.backend, unit.case
    spec = case.spec
    out.doing = f"{b.name}.init_params"
    p = _param_dict(out, spec, b.init_params(spec, PARAM_SEED), "init_params")
    if p is None:
        return
    for name in spec.param_shapes:
        layer = spec.param_layer(name)
        if not (isinstance(layer, int) and 0 <= layer < spec.n_layers):
            out.fail(name, f"param_layer({name!r}) = {layer!r}, expected a layer index in 0..{spec.n_layers - 1}")
        elif not np.all(np.isfinite(p[name])):
            out.fail(name, "init_params gives non-finite values")
        else:
            out.ok(name, f"init_params shape {p[name].shape}, finite, drives layer s{layer}")
    x, _, _ = case.batch_data()
    out.doing = f"{b.name}.first_phase"
    s = compute.first_phase(b, spec, b.from_numpy(spec, p, "float64"), x, case.T)
    s = _states(spec, s, len(x), "first_phase")
    for i, a in enumerate(s):
        out.expect(bool(np.all(np.isfinite(a))), f"s{i}",
                   f"first_phase(T={case.T}) layer of shape {a.shape[1:]} = state_shapes[{i}], finite")


def check_agreement(ctx: Context, unit: Unit, out: Recorder) -> None:
    """The backend kit's ``reference`` check on the example spec."""
    check_reference(ctx, unit, out)


def check_step(ctx: Context, unit: Unit, out: Recorder) -> None:
    """The backend kit's ``step_phi`` check on the example spec."""
    check_step_phi(ctx, unit, out)


def check_theorem(ctx: Context, unit: Unit, out: Recorder) -> None:
    """The backend kit's ``theorem1`` check, T the first of :data:`CONVERGENCE_T` that converges."""
    case = unit.case
    if not case.theorem:
        raise SkipCheck("Theorem 1 needs F = ∂Φ/∂s: an energy-based model with σ'(s0) (paper flavour), "
                        "without clamping")
    out.doing = f"{ctx.backend.name}.first_phase (convergence)"
    T, _ = converged_T(ctx, case)
    check_theorem1(ctx, Unit(unit.check, dataclasses.replace(case, theorem_T=T), unit.dtype), out)


MODEL_CHECKS: dict[str, Callable[[Context, Unit, Recorder], None]] = {
    "structure": check_structure,
    "agreement": check_agreement,
    "step_phi": check_step,
    "theorem1": check_theorem,
}


def example_cases(model, quick: bool, out: list[CheckResult], check: str) -> list[Case]:
    """The example cases of a model in each flavour (quick: the first); an invalid example spec
    is a failure of ``check``."""
    cases = []
    for flavor in FLAVORS[:1] if quick else FLAVORS:
        try:
            case = example_case(model, flavor)
        except Exception as exc:  # noqa: BLE001 - e.g. validation errors of the example spec
            text = " ".join(str(exc).split())
            out.append(failed(check, f"{model.kind} example_spec()", flavor,
                              f"no valid ModelSpec: {type(exc).__name__}: {text}"))
            continue
        if case.key not in {c.key for c in cases}:
            cases.append(case)
    return cases


def check_model(kind: str, backends=None, quick: bool = False) -> Report:
    """Run the model kit on the registered model ``kind``: every check of :data:`MODEL_CHECKS`
    on its example spec in each flavour (``quick``: paper only, no Theorem-1 sweep), on every
    available CPU backend that supports it (``backends``: names or instances), float64. What a
    backend does not support is skipped with its reason."""
    start = time.perf_counter()
    model = _registry().model(kind)
    chosen, results = cpu_backends(backends)
    for case in example_cases(model, quick, results, "structure"):
        spec = case.spec
        supported = []
        for b in chosen:
            reason = b.supports(spec, "float64")
            if reason:
                results.extend(skipped(check, case, b, reason) for check in MODEL_CHECKS)
            else:
                supported.append(b)
        if not supported:
            continue
        ref = reference_of(supported)
        cache: dict = {}
        for b in supported:
            ctx = Context(b, None if b is ref else ref, "", quick=quick)
            ctx._cache = cache
            unit = lambda check: Unit(check, case, "float64")  # noqa: E731
            results.extend(run_check(check_structure, ctx, unit("structure")))
            if b is ref:
                others = [o.name for o in supported if o is not ref]
                if not others:
                    results.append(skipped("agreement", case, b, f"no other backend runs it here "
                                                                 f"(of {[c.name for c in chosen]})"))
            else:
                results.extend(run_check(check_agreement, ctx, unit("agreement")))
            results.extend(run_check(check_step, ctx, unit("step_phi")))
            if b is ref and not quick:
                results.extend(run_check(check_theorem, ctx, unit("theorem1")))
    names = ", ".join(b.name for b in chosen) or "no backend"
    return Report(f"model {kind} on {names}", "", results, time.perf_counter() - start)
