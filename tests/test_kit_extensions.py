"""The model and algorithm kits (epbench.testing.check_model / check_algorithm): they pass on the
built-in and example plugins, and they catch deliberately wrong models and algorithms with a
message that names the check, the model and the layer or parameter."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

import epbench.testing as kit
from epbench.algorithms.bptt import BPTT
from epbench.algorithms.ep import EP
from epbench.models.dense import EB
from epbench.plugins import registry
from conftest import selected_backends

BACKENDS = [name for name in selected_backends(["torch-cpu", "numpy"]) if name in registry().backends
            and registry().backends[name].availability(probe=True).ok]
TORCH = [name for name in BACKENDS if name == "torch-cpu"] or BACKENDS[:1]
HAVE_NUMPY = "numpy" in BACKENDS
HAVE_RBP = importlib.util.find_spec("epbench_rbp") is not None
HAVE_LATERAL = importlib.util.find_spec("epbench_lateral") is not None


def _failures(report, check: str) -> list:
    return [r for r in report.failed if r.name == check]


# ----- the kits pass on the registered plugins ----------------------------------------------
@pytest.mark.parametrize("kind", ["toy", "eb", "p", "pconv",
                                  pytest.param("eb-lateral", marks=pytest.mark.skipif(
                                      not HAVE_LATERAL, reason="epbench_lateral is not installed"))])
def test_model_kit_passes(kind):
    report = kit.check_model(kind, backends=BACKENDS)
    assert report.ok, report.format()
    checks = {r.name for r in report.passed}
    assert {"structure", "step_phi"} <= checks, report.format(verbose=True)
    if len(BACKENDS) > 1 and kind != "pconv":
        assert "agreement" in checks, report.format(verbose=True)
    if kind in ("toy", "eb", "eb-lateral"):
        assert report.select("theorem1", "passed"), report.format(verbose=True)
        assert not [r for r in report.select("theorem1", "skipped") if r.flavor == "paper"]


@pytest.mark.skipif(not HAVE_NUMPY, reason="needs the numpy backend")
def test_model_kit_skips_pconv_on_numpy_with_the_reason():
    report = kit.check_model("pconv", backends=BACKENDS)
    on_numpy = [r for r in report.skipped if r.model.endswith("on numpy")]
    assert on_numpy and all("numpy" in r.message and "pconv" in r.message for r in on_numpy)
    assert {r.name for r in on_numpy} >= {"structure", "agreement", "step_phi"}
    if "torch-cpu" in BACKENDS:
        alone = [r for r in report.select("agreement", "skipped") if r.model.endswith("on torch-cpu")]
        assert alone and "no other backend" in alone[0].message


@pytest.mark.parametrize("name", ["ep", "bptt", pytest.param("rbp", marks=pytest.mark.skipif(
    not HAVE_RBP, reason="epbench_rbp is not installed"))])
def test_algorithm_kit_passes(name):
    report = kit.check_algorithm(name, backends=BACKENDS)
    assert report.ok, report.format()
    declared = registry().algorithm(name).agrees_with_bptt
    applied = report.select(f"{name} {declared}", "passed")
    assert applied, report.format(verbose=True)
    assert {r.model.split()[0] for r in applied} >= ({"toy", "eb"} if declared == "small-beta" else {"toy", "eb", "p"})
    assert report.select(f"{name} gradient", "passed") and report.select(f"{name} processes", "passed")


# ----- wrong algorithms -----------------------------------------------------------------------
def _register(monkeypatch, table: str, key: str, value) -> None:
    monkeypatch.setitem(getattr(registry(), table), key, value)


class FlippedEP(EP):
    """EP whose gradient has the wrong sign (it would climb the loss)."""

    name = "ep-flipped"

    def gradient(self, ops, dyn, free, y, beta, steps, phase):
        return {k: -v for k, v in super().gradient(ops, dyn, free, y, beta, steps, phase).items()}


class OffBPTT(BPTT):
    """BPTT with one parameter's gradient 1 % off, still declaring itself exact."""

    name = "bptt-off"

    def gradient(self, ops, dyn, free, y, beta, steps, phase):
        g = dict(super().gradient(ops, dyn, free, y, beta, steps, phase))
        g["W01"] = g["W01"] * 1.01
        return g


class LateBPTT(BPTT):
    """BPTT's processes with a nonzero θ(0) row and BPTT's sign flipped: claims fixed-point agreement."""

    name = "bptt-late"
    agrees_with_bptt = "fixed-point"

    def processes(self, ops, dyn, free, y, beta, K, phase):
        s, theta = super().processes(ops, dyn, free, y, beta, K, phase)
        return s, {k: v + 1.0 for k, v in theta.items()}


def test_algorithm_kit_catches_a_flipped_gradient(monkeypatch):
    _register(monkeypatch, "algorithms", "ep-flipped", FlippedEP())
    report = kit.check_algorithm("ep-flipped", backends=TORCH, quick=True)
    bad = _failures(report, "ep-flipped small-beta")
    assert bad, report.format()
    hit = next(r for r in bad if r.model.startswith("eb ") and r.layer == "W01")
    assert hit.message.startswith("ep-flipped small-beta: eb 15-9-12-4")
    assert "layer W01" in hit.message and "relative error" in hit.message
    assert not _failures(report, "ep-flipped gradient")  # shapes are fine: only the values are wrong


def test_algorithm_kit_catches_a_wrong_exact_gradient(monkeypatch):
    _register(monkeypatch, "algorithms", "bptt-off", OffBPTT())
    report = kit.check_algorithm("bptt-off", backends=TORCH, quick=True)
    bad = _failures(report, "bptt-off exact")
    assert bad and {r.layer for r in bad} == {"W01"}, report.format()
    assert "central differences" in bad[0].message
    assert {r.model.split()[0] for r in bad} >= {"toy", "eb", "p", "pconv"}


def test_algorithm_kit_catches_wrong_processes(monkeypatch):
    _register(monkeypatch, "algorithms", "bptt-late", LateBPTT())
    report = kit.check_algorithm("bptt-late", backends=TORCH, quick=True)
    rows = _failures(report, "bptt-late processes")
    assert rows and all("t = 0 must be exactly 0" in r.message for r in rows), report.format()
    assert _failures(report, "bptt-late fixed-point")
    assert not _failures(report, "bptt-late gradient")


def test_algorithm_kit_rejects_an_unknown_declaration(monkeypatch):
    class Vague(BPTT):
        name = "bptt-vague"
        agrees_with_bptt = "roughly"

    _register(monkeypatch, "algorithms", "bptt-vague", Vague())
    report = kit.check_algorithm("bptt-vague", backends=TORCH[:1], quick=True)
    assert [r for r in report.failed if "agrees_with_bptt = 'roughly'" in r.message], report.format()


# ----- wrong models ---------------------------------------------------------------------------
class PhiOffEB(EB):
    """EB whose Φ has an extra term: its step is no longer ∂Φ/∂s."""

    kind = "eb-phi-off"

    def phi(self, ops, spec, params, x, s):
        xp = ops.xp
        return super().phi(ops, spec, params, x, s) + 0.05 * xp.sum(s[1] ** 3)


class DphiOffEB(EB):
    """EB whose ∂Φ/∂θ increment of W12 is 10 % too large: EP's updates miss BPTT's as β → 0."""

    kind = "eb-dphi-off"

    def dphi_increment(self, ops, spec, params, ctx, s, q, s_at=None, q_at=None, scale=1.0):
        d = dict(super().dphi_increment(ops, spec, params, ctx, s, q, s_at, q_at, scale))
        d["W12"] = d["W12"] * 1.1
        return d


class VjpOffEB(EB):
    """EB whose analytic one-step VJP (used where there is no autodiff) is wrong for W2x."""

    kind = "eb-vjp-off"

    def step_vjp(self, ops, spec, params, inputs, ctx, s, a, layers=None):
        g_s, g_theta = super().step_vjp(ops, spec, params, inputs, ctx, s, a, layers)
        g_theta = dict(g_theta)
        g_theta["W2x"] = g_theta["W2x"] * 0.9
        return g_s, g_theta


def test_model_kit_catches_a_step_that_is_not_the_gradient_of_phi(monkeypatch):
    _register(monkeypatch, "models", "eb-phi-off", PhiOffEB())
    report = kit.check_model("eb-phi-off", backends=TORCH, quick=True)
    bad = _failures(report, "step_phi")
    assert bad and {r.layer for r in bad} == {"s1"}, report.format()
    assert bad[0].message.startswith("step_phi: eb-phi-off 15-9-12-4 sigmoid on ")
    assert "layer s1" in bad[0].message and "F = ∂Φ/∂s" in bad[0].message
    assert not _failures(report, "structure")


def test_model_kit_catches_a_wrong_dphi_by_theorem1(monkeypatch):
    _register(monkeypatch, "models", "eb-dphi-off", DphiOffEB())
    report = kit.check_model("eb-dphi-off", backends=TORCH)
    bad = _failures(report, "theorem1")
    assert bad and {r.layer for r in bad} == {"W12"}, report.format()
    assert all(r.flavor == "paper" for r in bad)
    assert not _failures(report, "step_phi")


@pytest.mark.skipif(not (HAVE_NUMPY and "torch-cpu" in BACKENDS), reason="needs torch-cpu and numpy")
def test_model_kit_catches_backends_that_disagree(monkeypatch):
    _register(monkeypatch, "models", "eb-vjp-off", VjpOffEB())
    report = kit.check_model("eb-vjp-off", backends=["torch-cpu", "numpy"], quick=True)
    bad = _failures(report, "agreement")
    assert bad and {r.layer for r in bad} == {"W2x"}, report.format()
    assert all(r.model.endswith("on numpy") for r in bad)
    assert any("bptt_grad vs torch-cpu" in r.message for r in bad)


def test_model_kit_reports_an_invalid_example_spec(monkeypatch):
    class Tiny(EB):
        kind = "eb-tiny"

        def example_spec(self):
            return dict(kind=self.kind, hidden=(), n_in=15, n_out=4)

    _register(monkeypatch, "models", "eb-tiny", Tiny())
    report = kit.check_model("eb-tiny", backends=TORCH, quick=True)
    assert [r for r in report.failed if "eb-tiny example_spec()" in r.message], report.format()


def test_example_spec_defaults():
    models = registry().models
    assert models["eb"].example_spec() == dict(kind="eb", hidden=(12, 9), n_in=15, n_out=4)
    assert models["toy"].example_spec()["hidden"] == (12,)
    assert models["pconv"].example_spec() == dict(kind="pconv", n_in=225, n_out=4, channels=(3, 4), kernel=3)


# ----- the command line -----------------------------------------------------------------------
def test_cli_check_model_and_algorithm(monkeypatch, capsys):
    from epbench.cli import cli, main

    calls = []

    def fake(kind_or_name, quick=False, failing=False):
        results = [kit.CheckResult("step_phi", "m", "paper", "float64", "s1", kit.FAILED, "step_phi: m layer s1: off")]
        calls.append((kind_or_name, quick))
        return kit.Report("x", "", results if failing else [])

    monkeypatch.setattr(kit, "check_model", lambda kind, quick=False: fake(kind, quick, failing=True))
    monkeypatch.setattr(kit, "check_algorithm", lambda name, quick=False: fake(name, quick))
    runner = CliRunner()
    res = runner.invoke(cli, ["check", "--model", "eb", "--quick"])
    assert res.exit_code == 1 and "step_phi: m layer s1: off" in res.output
    res = runner.invoke(cli, ["check", "--algorithm", "bptt"])
    assert res.exit_code == 0, res.output
    assert calls == [("eb", True), ("bptt", False)]
    capsys.readouterr()
    assert main(["check", "--model", "no-such-model"]) == 2
    assert "unknown model kind 'no-such-model'" in capsys.readouterr().err
    assert main(["check", "--algorithm", "no-such-algorithm"]) == 2
    assert "unknown algorithm 'no-such-algorithm'" in capsys.readouterr().err
    assert main(["check", "torch-cpu", "--algorithm", "ep"]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert calls == [("eb", True), ("bptt", False)]
