"""The backend conformance kit (epbench.testing): it passes on the numpy example plugin and on
the built-in CPU backends, and it catches deliberately wrong backends with a message that names
the check, the model and the layer."""

from __future__ import annotations

import importlib.util
import unittest

import numpy as np
import pytest

import epbench.testing as kit
from epbench.spec import ModelSpec
from conftest import load_backend, selected_backends

HAVE_NUMPY_PLUGIN = importlib.util.find_spec("epbench_numpy") is not None
NO_NUMPY_PLUGIN = "epbench_numpy is not importable: pip install -e examples/epbench-numpy"
NEEDS_NUMPY_PLUGIN = pytest.mark.skipif(not HAVE_NUMPY_PLUGIN, reason=NO_NUMPY_PLUGIN)


def _numpy_checks():
    if not HAVE_NUMPY_PLUGIN:
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_NUMPY_PLUGIN), id="numpy-not-installed")]
    return list(kit.generate_checks("numpy"))


# ----- the kit passes on the backends ----------------------------------------------------------
@pytest.mark.parametrize("check", _numpy_checks(), ids=str)
def test_numpy_plugin_conformance(check):
    """The author's three-line form, on the example plugin (reference: torch-cpu when registered)."""
    check()


@pytest.mark.parametrize("name", selected_backends(["torch-cpu", "jax-cpu"]))
def test_builtin_backend_conformance_quick(name):
    """The quick kit (float64, no variants, no symmetric nudging, no β-sweep, no training): the
    full kit takes minutes of XLA compilation on jax-cpu, so it is the slow test below."""
    load_backend(name)
    report = kit.check_backend(name, reference="torch-cpu", quick=True)
    assert report.ok, report.format()
    assert len(report.passed) > 100, report.format(verbose=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", selected_backends(["torch-cpu", "jax-cpu"]))
def test_builtin_backend_conformance_full(name):
    load_backend(name)
    report = kit.check_backend(name, reference="torch-cpu")
    assert report.ok, report.format()
    assert not report.select("theorem1", "skipped"), report.format(verbose=True)


@NEEDS_NUMPY_PLUGIN
def test_numpy_plugin_is_registered(monkeypatch):
    from epbench.plugins import build_registry

    monkeypatch.delenv("EPBENCH_DISABLE_PLUGINS", raising=False)
    backends = build_registry().backends
    assert "numpy" in backends
    numpy = backends["numpy"]
    assert not numpy.capabilities.autodiff and numpy.supports(ModelSpec(kind="pconv"), "float64")


# ----- deliberately wrong backends -------------------------------------------------------------
def _numpy_backend_class():
    from epbench_numpy.backend import NumpyBackend

    return NumpyBackend


def _faulty_numpy(name: str, dynamics_class):
    """A numpy backend whose :meth:`~epbench.backend.Backend.dynamics` is ``dynamics_class``
    (a :class:`~epbench.models.dynamics.ModelDynamics` with one primitive broken)."""

    class Faulty(_numpy_backend_class()):
        def dynamics(self, spec, params, x, alternate=False):
            return dynamics_class(self.ops, spec.model, spec, params, x, alternate)

    Faulty.name = name
    return Faulty()


def _flipped_dphi(layer: str):
    """Dynamics whose ∂Φ/∂θ(s) − ∂Φ/∂θ(q) has the sign of ``layer`` flipped: the EP update of that
    layer (and its EP processes, consistently) point the wrong way."""
    from epbench.models.dynamics import ModelDynamics

    class FlippedDphi(ModelDynamics):
        def dphi_increment(self, s, q, s_at=None, q_at=None, scale=1.0):
            inc = super().dphi_increment(s, q, s_at, q_at, scale)
            return {k: (-v if k == layer else v) for k, v in inc.items()}

    return FlippedDphi


@NEEDS_NUMPY_PLUGIN
def test_kit_catches_a_flipped_ep_update():
    """The EP update of one layer (W1x: input → hidden) with its sign flipped. Σ_t ep_theta(t) still
    equals the update (both come from the same ∂Φ/∂θ differences), so ep_sum passes; the
    differences of Φ in θ (ep_phi) and the reference backend catch it, on that layer only."""
    report = kit.check_backend(_faulty_numpy("numpy-flipped-ep", _flipped_dphi("W1x")), reference="torch-cpu",
                               quick=True, checks=("ep_sum", "ep_phi", "prop4_theta", "reference"))
    assert not report.ok
    failed = {(r.name, r.layer) for r in report.failed}
    assert ("ep_phi", "W1x") in failed and ("reference", "W1x") in failed, report.format()
    assert {r.layer for r in report.failed} == {"W1x"}, report.format()
    assert not report.select("ep_sum", "failed") and not report.select("prop4_theta", "failed")
    msg = next(r.message for r in report.failed if r.name == "ep_phi" and r.model.startswith("eb 20-16-5"))
    for part in ("ep_phi", "eb 20-16-5", "layer W1x", "measured error", "allowed 1e-06", "float64"):
        assert part in msg, msg
    ref = next(r.message for r in report.failed if r.name == "reference" and r.model.startswith("eb 20-16-5"))
    assert "ep_update vs torch-cpu" in ref and "allowed 1e-10" in ref, ref
    with pytest.raises(kit.ConformanceError, match=r"ep_phi: eb 20-16-5 tanh \[paper, float64\] layer W1x"):
        report.raise_for_failures()


@NEEDS_NUMPY_PLUGIN
def test_kit_catches_a_broken_prop4_recursion():
    from epbench.models.dynamics import ModelDynamics

    class LeakyVJP(ModelDynamics):
        """The one-step VJP of hidden layer s1 forgets the leak term (1 − h)·∂L/∂s1'."""

        def vjp(self, s, g):
            g_s, raw = super().vjp(s, g)
            g_s = list(g_s)
            g_s[1] = g_s[1] - (1.0 - self.spec.step) * g[1]
            return g_s, raw

    report = kit.check_backend(_faulty_numpy("numpy-broken-bptt", LeakyVJP), reference=None, quick=True,
                               checks=("prop4_s", "bptt_fd", "prop4_theta", "ep_sum"))
    failed = report.select("prop4_s", "failed")
    assert any(r.model.startswith("eb 20-16-5") and r.layer == "s1" for r in failed), report.format()
    msg = next(r.message for r in failed if r.layer == "s1" and r.model.startswith("eb"))
    for part in ("prop4_s", "eb 20-16-5", "layer s1", "finite differences", "measured error", "allowed 1e-06"):
        assert part in msg, msg
    assert report.select("bptt_fd", "failed"), "the truncated BPTT gradient is wrong too"
    # the sums of its own processes stay consistent, and EP is untouched
    assert not report.select("prop4_theta", "failed") and not report.select("ep_sum", "failed")


@NEEDS_NUMPY_PLUGIN
def test_kit_catches_a_lossy_parameter_round_trip_and_wrong_capabilities():
    from epbench.backend import Capabilities

    class Lossy(_numpy_backend_class()):
        name = "numpy-lossy"
        capabilities = Capabilities(kinds=("eb", "p"), dtypes=("float64",))

        def to_numpy(self, spec, params):
            out = super().to_numpy(spec, params)
            out["W01"] = out["W01"].astype(np.float32)  # drops precision on the way out
            return out

        def supports(self, spec, dtype):
            return None  # claims everything, whatever capabilities say

    report = kit.check_backend(Lossy(), reference=None, checks=("params", "supports"))
    assert {r.layer for r in report.select("params", "failed")} == {"W01"}
    assert "round trip must be exact" in report.select("params", "failed")[0].message
    bad = report.select("supports", "failed")
    assert bad and all("which capabilities do not declare" in r.message for r in bad)
    assert any(r.layer.startswith("toy/") for r in bad)


@NEEDS_NUMPY_PLUGIN
def test_generated_checks_raise_and_skip_like_pytest_expects():
    flipped = _faulty_numpy("numpy-flipped", _flipped_dphi("W12"))
    checks = {str(c): c for c in kit.generate_checks(flipped, reference=None, quick=True)}
    check_id, fn = checks["ep_phi[p-paper-float64]"]  # an (id, callable) pair
    assert check_id == "ep_phi[p-paper-float64]"
    with pytest.raises(kit.ConformanceError, match="ep_phi: p 20-16-16-5 tanh .* layer W12"):
        checks["ep_phi[p-paper-float64]"]()
    with pytest.raises(unittest.SkipTest, match="no analytic step_vjp"):
        checks["ep_phi[pconv-paper-float64]"]()
    assert all(r.passed for r in checks["ep_phi[eb-paper-float64]"]())
    assert callable(fn)


def test_an_unknown_backend_name_yields_one_skipping_check():
    checks = list(kit.generate_checks("no-such-backend"))
    assert len(checks) == 1
    with pytest.raises(unittest.SkipTest, match="no-such-backend"):
        checks[0]()
