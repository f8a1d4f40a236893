"""The backend conformance kit: does a backend implement docs/equations.md?

One call::

    from epbench.testing import check_backend
    report = check_backend("mybackend")          # or a Backend instance
    print(report.format(verbose=True))
    report.raise_for_failures()

or, in a test file::

    import pytest, epbench.testing

    @pytest.mark.parametrize("check", epbench.testing.generate_checks("mybackend"), ids=str)
    def test_conformance(check):
        check()

The checks (see :mod:`epbench.testing.checks`): the class contract, ``supports()`` against the
declared :class:`~epbench.backend.Capabilities`, exact parameter round trips with the canonical
names and shapes, determinism from a seed, F = ∂Φ/∂s (EB, toy) and F = (1−h)s + h·ρ(∂Φ/∂s) (P) by
finite differences of ``phi``, the Prop. 4 recursion (Σ_t bptt_theta(t) = bptt_grad, bptt_s
against finite differences through ``step_function``), Σ_t ep_theta(t) = ep_update, the nudged
phase and ep_update rebuilt from ``step_function`` and ``phi``, the Theorem-1 β-sweep in float64,
training and evaluation, and agreement with a reference backend (``torch-cpu`` by default):
1e-10 in float64, 1e-4 in float32, norm-relative per array. What a backend does not declare
(a model kind, a flavour, a dtype, an activation) is
skipped with the reason, never failed.

Models and algorithms registered by plugins have their own kits, run on every available CPU
backend in float64 on each model's ``example_spec()``: :func:`check_model` (structure, agreement
between backends, F against Φ, Theorem 1; :mod:`epbench.testing.models`) and
:func:`check_algorithm` (shapes of the gradient and processes, and the agreement with BPTT that
the algorithm declares; :mod:`epbench.testing.algorithms`). Both return a :class:`Report`.
"""

from __future__ import annotations

import time
import unittest
from typing import Callable, Iterator, NamedTuple

from epbench.backend import Backend
from epbench.testing.cases import CASES, Case
from epbench.testing.checks import CHECKS, Context, Unit, plan, run_unit
from epbench.testing.algorithms import check_algorithm
from epbench.testing.models import check_model
from epbench.testing.report import FAILED, PASSED, SKIPPED, CheckResult, ConformanceError, Report

__all__ = [
    "CASES", "CHECKS", "Case", "Check", "CheckResult", "ConformanceError", "Report",
    "assert_conformant", "check_algorithm", "check_backend", "check_model", "generate_checks", "parametrize_checks",
    "PASSED", "FAILED", "SKIPPED",
]

DEFAULT_REFERENCE = "torch-cpu"


def _registry():
    from epbench.plugins import registry

    return registry()


def _resolve(backend_or_name: Backend | str) -> tuple[Backend, str]:
    """(backend, its registered name or "") from an instance or a registry name."""
    if isinstance(backend_or_name, str):
        return _registry().backend(backend_or_name), backend_or_name
    return backend_or_name, ""


def _resolve_reference(reference: Backend | str | None, backend: Backend) -> tuple[Backend | None, str]:
    """(reference backend or None, and why there is none)."""
    if reference is None:
        return None, "no reference backend was given"
    if isinstance(reference, str):
        if reference == backend.name:
            return None, f"{backend.name} is the reference backend"
        reg = _registry()
        if reference not in reg.backends:
            return None, f"reference backend {reference!r} is not registered"
        reference = reg.backends[reference]
    elif reference is backend:
        return None, f"{backend.name} is the reference backend"
    try:
        avail = reference.availability(probe=True)
    except Exception as exc:  # noqa: BLE001
        return None, f"reference backend {reference.name!r} failed availability(): {exc!r}"
    if not avail.ok:
        return None, f"reference backend {reference.name!r} is unavailable: {avail.reason}"
    return reference, ""


def _context(backend_or_name, reference, quick: bool) -> Context:
    backend, registered = _resolve(backend_or_name)
    ref, why = _resolve_reference(reference, backend)
    return Context(backend, ref, why, registered_name=registered, quick=quick)


def check_backend(backend_or_name: Backend | str, reference: Backend | str | None = DEFAULT_REFERENCE,
                  quick: bool = False, checks: tuple[str, ...] | None = None,
                  cases: tuple[str, ...] | None = None) -> Report:
    """Run every check of the kit on a backend (an instance or a registered name) and return
    the :class:`Report`. ``quick`` runs one dtype (float64 where declared), no variants
    (clamping, hard sigmoid), no symmetric nudging, no β-sweep and no training; ``checks`` restricts the run to these
    check names and ``cases`` to these configurations (keys of :data:`CASES`)."""
    ctx = _context(backend_or_name, reference, quick)
    start = time.perf_counter()
    results: list[CheckResult] = []
    for unit in plan(ctx.backend.capabilities, quick, cases):
        if checks is None or unit.check in checks:
            results.extend(run_unit(ctx, unit))
    ref_name = ctx.reference.name if ctx.reference is not None else ""
    return Report(ctx.backend.name, ref_name, results, time.perf_counter() - start)


def assert_conformant(backend_or_name: Backend | str, reference: Backend | str | None = DEFAULT_REFERENCE,
                      quick: bool = False, checks: tuple[str, ...] | None = None,
                      cases: tuple[str, ...] | None = None) -> Report:
    """:func:`check_backend`, then raise :class:`ConformanceError` on any failure."""
    report = check_backend(backend_or_name, reference=reference, quick=quick, checks=checks, cases=cases)
    report.raise_for_failures()
    return report


class Check(NamedTuple):
    """One runnable check: a ``(id, callable)`` pair that is itself callable, and whose ``str``
    is its id (so ``ids=str`` names the pytest cases). Calling it raises
    :class:`ConformanceError` on a failure and :class:`unittest.SkipTest` when nothing applied."""

    id: str
    run: Callable[[], list[CheckResult]]

    def __call__(self) -> list[CheckResult]:
        results = self.run()
        failed = [r for r in results if r.failed]
        if failed:
            raise ConformanceError("\n".join(r.message for r in failed))
        if results and all(r.skipped for r in results):
            raise unittest.SkipTest("; ".join(sorted({r.message for r in results})))
        return results

    def __str__(self) -> str:
        return self.id


def _skipping(check_id: str, reason: str) -> Check:
    def run() -> list[CheckResult]:
        raise unittest.SkipTest(reason)

    return Check(check_id, run)


def generate_checks(backend: Backend | str, reference: Backend | str | None = DEFAULT_REFERENCE,
                    quick: bool = False, cases: tuple[str, ...] | None = None) -> Iterator[Check]:
    """Yield one :class:`Check` per check, case and dtype (results are shared through one cache).
    A backend name that is not registered, or a backend unavailable here, yields a single
    check that skips with the reason."""
    label = backend if isinstance(backend, str) else getattr(backend, "name", "backend")
    try:
        ctx = _context(backend, reference, quick)
    except Exception as exc:  # noqa: BLE001 - e.g. an unknown name
        yield _skipping(f"{label}-unavailable", f"backend {label!r} cannot be loaded: {exc}")
        return
    try:
        avail = ctx.available()
    except Exception as exc:  # noqa: BLE001
        yield _skipping(f"{label}-unavailable", f"availability() raised {exc!r}")
        return
    if not avail.ok:
        yield _skipping(f"{label}-unavailable", f"backend {label!r} is unavailable: {avail.reason}")
        return
    for unit in plan(ctx.backend.capabilities, quick, cases):
        yield Check(unit.id, _bind(ctx, unit))


def _bind(ctx: Context, unit: Unit) -> Callable[[], list[CheckResult]]:
    return lambda: run_unit(ctx, unit)


def parametrize_checks(backend: Backend | str, reference: Backend | str | None = DEFAULT_REFERENCE,
                       quick: bool = False, cases: tuple[str, ...] | None = None, argname: str = "check"):
    """``pytest.mark.parametrize(argname, generate_checks(...), ids=str)``."""
    import pytest

    return pytest.mark.parametrize(argname, list(generate_checks(backend, reference, quick, cases)), ids=str)
