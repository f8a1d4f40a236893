"""First-phase convergence of GDU measurements (epbench.convergence): the report flags rows and β
points whose first phase has not converged; Theorem 1's β sweeps fall like β (one-sided) and β²
(symmetric) where F = ∂Φ/∂s; the committed Table 3 and Theorem 1 runs are converged.

Every table here comes from a real run of the harness (torch-cpu unless said otherwise)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from epbench import compute
from epbench.convergence import DRIFT_SHARE, converged, drift_ratio
from epbench.report import render_report, summarize_gdu, summarize_theorem1
from epbench.results import read_table, to_frame
from epbench.runner import DataCache, RunOptions, experiment_columns, gdu_algorithms, gdu_batch, gdu_rows, run_suite
from epbench.suites import expand_sweeps, load_suite

from conftest import load_backend

ROOT = Path(__file__).resolve().parents[1]
THEOREM1 = ROOT / "suites" / "theorem1.yaml"
#: the committed runs of `epbench run suites/table3.yaml --backend jax-cpu` and `epbench run theorem1 --backend jax-cpu`
TABLE3_RUN = ROOT / "results" / "20261203T084937Z-table3-jax-cpu"
THEOREM1_RUN = ROOT / "results" / "20261203T085416Z-theorem1-jax-cpu"

#: a toy model of the test size, once with a first phase far too short to converge
SHORT_AND_LONG = """
name: convergence-check
defaults:
  task: gdu
  dataset: synthetic
  batch_size: 4
  seed: 0
  model: {kind: toy, n_in: 10, hidden: [12], n_out: 5, activation: tanh, eps: 0.08, flavor: paper}
  phase: {K: 10, beta: 0.01, dtype: float64}
experiments:
  - {name: short, phase: {T: 12}}
  - {name: long, phase: {T: 3000}}
"""


def _run(tmp_path: Path, suite_path: Path, assignments=(), only=(), backend: str = "torch-cpu") -> Path:
    load_backend(backend)
    suite, digest = load_suite(suite_path, list(assignments))
    return run_suite(suite, str(suite_path), digest, RunOptions(backend=backend, out=str(tmp_path / "out"),
                                                                only=tuple(only)))


def test_drift_rule():
    # r = d / ep_scale: εβ for EB and toy, β for P
    assert drift_ratio(8e-7, "eb", 0.08, 1e-5) == pytest.approx(1.0)
    assert drift_ratio(1.5e-2, "p", 1.0, 0.015) == pytest.approx(1.0)
    assert drift_ratio(8e-7, "eb", 0.08, 1e-5, symmetric=True) == pytest.approx(1e-5)  # d / ε: no 1/β
    assert math.isnan(drift_ratio(1e-6, "eb", float("nan"), 1e-3))  # unknown dt
    assert converged(DRIFT_SHARE * 0.1, 0.1) and not converged(DRIFT_SHARE * 0.1 * 1.01, 0.1)
    assert converged(0.0, 0.0) and converged(float("nan"), 0.1) is None


def test_report_flags_unconverged_row(tmp_path):
    """A real run with one row stopped after 12 steps: the summary, the table and the text flag it,
    and only it."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(SHORT_AND_LONG)
    run_dir = _run(tmp_path, suite)
    summary = summarize_gdu(read_table(run_dir)).set_index("experiment")
    assert summary.loc["short", "convergence_max"] > 1e-4  # really not converged
    assert summary.loc["short", "converged"] == False  # noqa: E712 (numpy bool)
    assert summary.loc["long", "converged"] == True  # noqa: E712
    report = render_report(run_dir).read_text()
    short = next(line for line in report.splitlines() if line.startswith("| short |"))
    long = next(line for line in report.splitlines() if line.startswith("| long |"))
    # the RelMSE cells of the unconverged row are marked, the converged row's are plain numbers
    header = next(line for line in report.splitlines() if line.startswith("| experiment | algorithm |"))
    cols = [c.strip() for c in header.split("|")]
    cells = dict(zip(cols, (c.strip() for c in short.split("|"))))
    assert cells["RelMSE neurons"].startswith("**not converged**")
    assert cells["RelMSE weights"].startswith("**not converged**")
    assert "| **no** (r " in short and "| yes (r " in long and "not converged" not in long
    assert any(line.startswith("**Not converged: short (EP, paper, β = 0.01)") and line.endswith("**")
               for line in report.splitlines())
    assert "Not converged: long" not in report


def _slopes(t1, family_start: str) -> dict:
    rows = t1[t1["family"].str.startswith(family_start)]
    assert not rows.empty, family_start
    return {(f, bool(s)): g for (f, s), g in rows.groupby(["flavor", "symmetric"])}


def _check_theorem1(t1, family_start: str, flavours=("paper",)) -> None:
    lines = _slopes(t1, family_start)
    for flavor in flavours:
        one, sym = lines[(flavor, False)], lines[(flavor, True)]
        assert len(one) == len(sym) == 5
        assert one["slope"].iloc[0] == pytest.approx(1.0, abs=0.1), (family_start, flavor, one)
        assert sym["slope"].iloc[0] == pytest.approx(2.0, abs=0.2), (family_start, flavor, sym)
        assert one["converged"].all() and sym["converged"].all(), (one, sym)


def _measure(suite_path: Path, assignments, only, backend: str = "torch-cpu"):
    """The table `epbench run` makes of these experiments (runner.run_gdu's rows and columns),
    without its repeated runs for timing."""
    be = load_backend(backend)
    suite, _ = load_suite(suite_path, list(assignments))
    rows, data = [], DataCache(None)
    for exp in expand_sweeps([e for e in suite.experiments if e.name in only]):
        params = be.from_numpy(exp.model, be.init_params(exp.model, exp.seed), exp.dtype)
        x, y = gdu_batch(exp, exp.seed, data)
        procs = compute.gdu(be, exp.model, params, x, y, exp.phase, algorithms=gdu_algorithms(exp))
        rows += [{**experiment_columns(exp, 0), **row} for row in gdu_rows(procs, exp.model, 0, gdu_algorithms(exp))]
    return to_frame(rows)


def test_theorem1_slopes_reduced():
    """The theorem1 suite's toy row as it is, and its EB-1h row with 32 hidden units and a batch of 4
    (same T, K, β sweep, float64), paper flavour: slopes 1 ± 0.1 one-sided, 2 ± 0.2 symmetric, every
    point converged."""
    t1 = summarize_theorem1(_measure(THEOREM1, [("sweep.flavor", ["paper"]), ("eb-1h.model.hidden", [32]),
                                                ("eb-1h.batch_size", 4)], only=("toy", "eb-1h")))
    _check_theorem1(t1, "toy ")
    _check_theorem1(t1, "eb-1h ")


@pytest.mark.skipif(not TABLE3_RUN.is_dir(), reason="committed Table 3 run not present")
def test_committed_table3_run_converged():
    summary = summarize_gdu(read_table(TABLE3_RUN))
    assert len(summary) == 10
    assert summary["converged"].all(), summary.loc[~summary["converged"].astype(bool), ["experiment", "drift_ratio"]]
    p3h = summary.set_index("experiment").loc["p-3h"]
    assert (p3h["T"], p3h["K"], p3h["beta"], p3h["batch_size"]) == (5000, 40, 0.015, 1)


@pytest.mark.skipif(not THEOREM1_RUN.is_dir(), reason="committed Theorem 1 run not present")
def test_committed_theorem1_run():
    t1 = summarize_theorem1(read_table(THEOREM1_RUN))
    assert t1["converged"].all()
    _check_theorem1(t1, "toy ", ("paper", "official-code"))
    _check_theorem1(t1, "eb-1h ")
    for family, flavor in (("eb-1h ", "official-code"), ("p-1h ", "paper"), ("p-1h ", "official-code")):
        for symmetric in (False, True):  # a floor where F is not ∂Φ/∂s
            assert _slopes(t1, family)[(flavor, symmetric)]["slope"].iloc[0] < 0.2


@pytest.mark.slow
def test_theorem1_slopes_full_suite(tmp_path):
    """`epbench run theorem1 --backend jax-cpu --only toy --only eb-1h` at full size (minutes on 2 cores)."""
    run_dir = _run(tmp_path, THEOREM1, only=("toy", "eb-1h"), backend="jax-cpu")
    t1 = summarize_theorem1(read_table(run_dir))
    _check_theorem1(t1, "toy ", ("paper", "official-code"))
    _check_theorem1(t1, "eb-1h ")


def test_algorithms_without_beta_are_judged_by_the_fixed_point():
    """RBP divides nothing by β: its rows count as converged when the leftover step is at the
    dtype's rounding, whatever its (drift-sized) RelMSE; EP keeps the drift-ratio rule."""
    from epbench.convergence import converged_for

    pytest.importorskip("epbench_rbp")
    assert converged_for("rbp", ratio=6e-6, relmse=2e-8, convergence=6e-8, dtype="float32") is True
    assert converged_for("rbp", ratio=1.0, relmse=2e-8, convergence=1e-3, dtype="float32") is False
    assert converged_for("rbp", ratio=0.0, relmse=0.0, convergence=1e-12, dtype="float64") is False
    assert converged_for("ep", ratio=6e-6, relmse=2e-8, convergence=6e-8, dtype="float32") is False
