"""End to end through the CLI on a tiny suite: results table, provenance, run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from epbench.results import COLUMNS
from epbench.suites import load_suite, parse_assignment

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name: tiny
defaults:
  dataset: mnist-5k
  seed: 3
  phase: {dtype: float64}
experiments:
  - name: p-small-gdu
    task: gdu
    batch_size: 4
    model: {kind: p, hidden: [16], activation: tanh, dt: 1.0, flavor: official-code}
    phase: {T: 40, K: 6, beta: 0.01}
  - name: p-small-train
    task: train
    trials: 2
    n_train: 200
    n_test: 100
    model: {kind: p, hidden: [16], activation: sigmoid, dt: 1.0}
    phase: {T: 20, K: 5, beta: 0.1}
    train: {epochs: 2, lrs: [0.08, 0.04]}
"""


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "epbench.cli", "-q", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    suite = root / "tiny.yaml"
    suite.write_text(TINY)
    out = run_cli("run", str(suite), "--backend", "torch-cpu", "--out", str(root / "results"), cwd=root)
    assert out.returncode == 0, out.stderr
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    return root, suite, run_dir


def test_table_has_every_column_and_provenance(tiny_run):
    _, _, run_dir = tiny_run
    table = pd.read_parquet(run_dir / "results.parquet")
    assert list(table.columns) == COLUMNS
    csv = pd.read_csv(run_dir / "results.csv.gz")
    assert len(csv) == len(table)
    assert (table["backend"] == "torch-cpu").all()
    assert table["framework_version"].str.startswith("2.").all()
    assert (table["suite"] == "tiny").all() and table["suite_hash"].str.len().eq(64).all()
    assert table["git_commit"].str.len().ge(7).all() and (table["wall_time_s"] > 0).all()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["command"].startswith("epbench ")


def test_gdu_rows(tiny_run):
    _, _, run_dir = tiny_run
    table = pd.read_parquet(run_dir / "results.parquet")
    gdu = table[(table["experiment"] == "p-small-gdu") & (table["metric"] == "relmse")]
    assert set(gdu["layer"]) == {"s0", "s1", "W01", "W1x", "b0", "b1"}
    assert gdu["value"].between(0, 2).all()
    # P models do not satisfy F = ∂Φ/∂s: the processes differ, but stay close at the output
    assert gdu.set_index("layer").loc["s0", "value"] < 0.2
    process = table[table["metric"] == "process"]
    assert set(process["algorithm"]) == {"ep", "bptt"} and process["t"].max() == 6


def test_training_rows_same_initial_weights(tiny_run):
    _, _, run_dir = tiny_run
    table = pd.read_parquet(run_dir / "results.parquet")
    train = table[table["experiment"] == "p-small-train"]
    assert sorted(train["trial"].unique()) == [0, 1]
    assert sorted(train["seed"].unique()) == [3, 4]
    errors = train[train["metric"] == "test_error"]
    assert len(errors) == 2 * 2 * 2  # trials x algorithms x epochs
    assert errors["value"].between(0, 100).all()
    assert (train["lrs"] == "0.08-0.04").all()


def test_report_written(tiny_run):
    _, _, run_dir = tiny_run
    report = (run_dir / "report.md").read_text()
    assert "torch-cpu" in report and "p-small-train" in report


def test_never_overwrites_and_bad_input_leaves_results_alone(tiny_run):
    root, suite, run_dir = tiny_run
    before = sorted(p.name for p in (root / "results").iterdir())
    snapshot = (run_dir / "results.parquet").read_bytes()
    bad = run_cli("run", str(suite), "--set", "phase.K=500", "--out", str(root / "results"), cwd=root)
    assert bad.returncode == 2 and "must not exceed T" in bad.stderr
    again = run_cli("run", str(suite), "--only", "p-small-gdu", "--out", str(root / "results"), cwd=root)
    assert again.returncode == 0, again.stderr
    after = sorted(p.name for p in (root / "results").iterdir())
    assert len(after) == len(before) + 1 and set(before) <= set(after)
    assert (run_dir / "results.parquet").read_bytes() == snapshot


def test_set_targets_one_experiment():
    suite, _ = load_suite(ROOT / "suites" / "table3.yaml", [parse_assignment("toy.phase.T=123"),
                                                            parse_assignment("phase.dtype=float64")])
    by_name = {e.name: e for e in suite.experiments}
    assert by_name["toy"].phase.T == 123 and by_name["eb-1h"].phase.T == 800
    assert all(e.phase.dtype == "float64" for e in suite.experiments)


def test_compare_two_backends_on_one_suite(tiny_run):
    """`epbench compare`: the same suite on torch-cpu and numpy in float64 gives the same GDU
    metrics; the timing table lists both run times; a tolerance below the difference exits 1."""
    root, suite, run_dir = tiny_run
    other = run_cli("run", str(suite), "--backend", "numpy", "--only", "p-small-gdu",
                    "--out", str(root / "results-numpy"), cwd=root)
    assert other.returncode == 0, other.stderr
    other_dir = other.stdout.strip().splitlines()[-1]
    from epbench.compare import compare_runs

    c = compare_runs(run_dir, other_dir)
    assert set(c.gdu["metric"]) == {"relmse", "sign_agreement", "cosine"}
    assert set(c.gdu["layer"]) >= {"s0", "s1", "W01", "W1x"}
    assert c.max_gdu_difference("relmse") < 1e-8
    assert list(c.timing["experiment"]) == ["p-small-gdu"]
    assert (c.timing["run_s_a"] > 0).all() and (c.timing["run_s_b"] > 0).all()
    ok = run_cli("compare", str(run_dir), other_dir, "--tolerance", "1e-6", cwd=root)
    assert ok.returncode == 0, ok.stderr
    assert "torch-cpu" in ok.stdout and "numpy" in ok.stdout and "| p-small-gdu |" in ok.stdout
    assert "**no**" not in ok.stdout
    # identical runs differ by exactly 0; a run against itself passes any tolerance
    assert compare_runs(run_dir, run_dir).max_gdu_difference("cosine") == 0.0
    # against a reference run: the distance of each run to it
    with_ref = compare_runs(run_dir, other_dir, reference=run_dir)
    assert (with_ref.gdu["err_a"] == 0).all()
    assert np.allclose(with_ref.gdu["err_b"], with_ref.gdu["abs_diff"])
    shown = run_cli("compare", str(run_dir), other_dir, "--reference", str(run_dir), cwd=root)
    assert shown.returncode == 0 and "|A − ref|" in shown.stdout and "**ref**" in shown.stdout
    bad = run_cli("compare", str(run_dir), str(root / "nowhere"), cwd=root)
    assert bad.returncode != 0 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr


def test_short_gdu_measurements_are_timed_best_of_several(monkeypatch):
    from epbench import runner

    class Timed:
        def __init__(self, times):
            self.times, self.calls = list(times), 0

        def gdu(self, *_args, **_kwargs):
            self.calls += 1
            return type("P", (), {"timings": {"run_s": self.times.pop(0)}})()

    class Exp:
        model = phase = None
        algorithms = ["ep", "bptt"]

    monkeypatch.setattr(runner.compute, "gdu", lambda backend, *args, **kwargs: backend.gdu(*args, **kwargs))
    fast = Timed([0.01, 0.004, 0.02, 0.03])
    assert runner._gdu_run_s(fast, Exp, None, None, None, 0.05) == 0.004
    assert fast.calls == runner.MAX_TIMING_RUNS - 1
    slow = Timed([])
    assert runner._gdu_run_s(slow, Exp, None, None, None, 2.0) == 2.0 and slow.calls == 0
