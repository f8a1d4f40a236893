"""Runs that survive interruption and scale out (:mod:`epbench.cells`, :mod:`epbench.executors`),
through the real command line in child processes: a run killed (SIGKILL) at several points and
continued gives the table of an uninterrupted run, bit for bit on torch-cpu, each cell once;
``-j 2``, Dask on a LocalCluster and Dask on a scheduler with two workers started here give the
same table as the in-process run, even when a worker dies mid-cell; a cell that raises is
recorded as failed, the others finish, and ``--resume`` re-runs only it. Loopback only, no sleeps.

The kill points are the test hook of :func:`epbench.cells.test_hook` (``EPBENCH_TEST_KILL_AT``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SUITE = """
name: cells
defaults:
  dataset: mnist-5k
  seed: 3
experiments:
  - name: g
    task: gdu
    trials: 2
    batch_size: 4
    model: {kind: p, hidden: [16], activation: tanh, dt: 1.0, flavor: official-code}
    phase: {T: 30, K: 5, beta: 0.01, dtype: float64}
  - name: t
    task: train
    trials: 2
    n_train: 200
    n_test: 100
    model: {kind: p, hidden: [32], activation: sigmoid, dt: 1.0}
    phase: {T: 20, K: 5, beta: 0.1}
    train: {epochs: 3, lrs: [0.08, 0.04]}
"""
#: 2 GDU cells, then 2 trials x 2 algorithms of training
N_CELLS = 6
#: columns that differ between two runs of the same cells: timings and the run's own identity
VARYING = ["run_id", "start_time", "compile_s", "run_s", "wall_time_s", "git_commit", "git_dirty"]


def env(**extra: str) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith("EPBENCH_TEST_")}
    return {**out, "OMP_NUM_THREADS": "1", **extra}


def epbench(*args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epbench.cli", "-q", *args], capture_output=True, text=True,
                          cwd=cwd, env=env(**extra), timeout=600)


def run(tmp: Path, out: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return epbench("run", str(tmp / "cells.yaml"), "--backend", "torch-cpu", "--no-report", "--out", str(tmp / out),
                   *args, cwd=tmp, **extra)


def comparable(run_dir: Path) -> pd.DataFrame:
    """The table without its timings: the measured values and settings, bit for bit."""
    table = pd.read_parquet(run_dir / "results.parquet")
    table = table.drop(columns=VARYING)
    table.loc[table["metric"] == "epoch_time_s", "value"] = 0.0
    return table


def the_run_dir(tmp: Path, out: str) -> Path:
    (run_dir,) = [p for p in (tmp / out).iterdir() if p.is_dir()]
    return run_dir


def meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "meta.json").read_text())


def assert_same_table(run_dir: Path, reference: pd.DataFrame) -> None:
    table = comparable(run_dir)
    assert table["cell"].nunique() == N_CELLS
    assert not table.duplicated().any()
    pd.testing.assert_frame_equal(table, reference, check_exact=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cells")
    (tmp / "cells.yaml").write_text(SUITE)
    return tmp


@pytest.fixture(scope="module")
def reference(workdir) -> pd.DataFrame:
    """The uninterrupted in-process run."""
    done = run(workdir, "reference")
    assert done.returncode == 0, done.stderr
    run_dir = the_run_dir(workdir, "reference")
    assert meta(run_dir)["cells"] == {"total": N_CELLS, "done": N_CELLS, "failed": {}, "resumed": {}, "reused": 0}
    assert sorted(p.name for p in (run_dir / "cells").iterdir() if p.name.endswith(".ckpt")) == []
    return comparable(run_dir)


# ----- killed, then continued ------------------------------------------------------------------------
@pytest.mark.parametrize("point, resumed", [
    ("gdu:2", {}),                      # inside the second GDU cell
    ("cell:3", {}),                     # the first training cell written, before the next one
    ("epoch:2", {"t trial 1 ep": 1}),    # after epoch 2 of the first training cell, before its checkpoint
    ("checkpoint:2", {"t trial 1 ep": 1}),  # while epoch 2's checkpoint is written (epoch 1's stays)
    ("epoch:5", {"t trial 1 bptt": 1}),  # mid-cell in the second training cell
])
def test_killed_run_continues_to_the_same_table(workdir, reference, point, resumed):
    out = f"kill-{point.replace(':', '-')}"
    killed = run(workdir, out, EPBENCH_TEST_KILL_AT=point)
    assert killed.returncode == -9, killed.stderr
    run_dir = the_run_dir(workdir, out)
    assert meta(run_dir)["status"] == "running"  # SIGKILL: nothing recorded the end
    again = run(workdir, out)  # the same command continues the run
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(run_dir)
    assert the_run_dir(workdir, out) == run_dir
    info = meta(run_dir)
    assert info["status"] == "complete" and info["attempts"] == 2
    assert info["cells"]["resumed"] == resumed and info["cells"]["done"] == N_CELLS
    assert_same_table(run_dir, reference)
    assert not [p for p in (run_dir / "cells").iterdir() if ".ckpt" in p.name]
    if point == "epoch:2":  # the report says which cells were resumed
        assert epbench("report", str(run_dir), cwd=workdir).returncode == 0
        report = (run_dir / "report.md").read_text()
        assert "| **cells** | 6 of 6 done; 2 finished by an earlier attempt (attempts: 2); resumed from a " \
               "checkpoint: t trial 1 ep (after epoch 1); ran in process |" in report


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_keeps_the_finished_cells_and_says_how_to_continue(workdir, reference, jobs):
    """SIGINT after epoch 2 of the first training cell (in process: this process's Ctrl-C; -j 2:
    the worker interrupts its parent, which ends the pool): exit 130, status interrupted, the
    finished cells in the table, a last line naming --resume; --resume gives the same table."""
    out = f"ctrl-c-{jobs}"
    extra = {"EPBENCH_TEST_KILL_PARENT": "1"} if jobs == "2" else {}
    stopped = run(workdir, out, "-j", jobs, EPBENCH_TEST_KILL_AT="epoch:2", EPBENCH_TEST_KILL_SIGNAL="INT", **extra)
    run_dir = the_run_dir(workdir, out)
    assert stopped.returncode == 130, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted (SIGINT): run directory {run_dir}: status interrupted, the ")
    assert f"--resume {run_dir}" in last and "Traceback" not in stopped.stderr
    info = meta(run_dir)
    table = pd.read_parquet(run_dir / "results.parquet")
    assert info["status"] == "interrupted" and info["signal"] == "SIGINT" and info["rows"] == len(table)
    assert 0 < info["cells"]["done"] < N_CELLS and table["cell"].nunique() == info["cells"]["done"]
    again = run(workdir, "elsewhere-" + out, "-j", jobs, "--resume", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert_same_table(run_dir, reference)


@pytest.mark.parametrize("backend, batched", [("jax-cpu", False), ("jax-cpu", True), ("numpy", False)])
def test_resumed_mid_cell_is_bitwise_on_other_cpu_backends(workdir, backend, batched):
    """Killed after epoch 2 of the first training cell and continued: the uninterrupted table, bit
    for bit, on the other CPU backends too; with jax's trials batched (EPBENCH_BATCH_TRIALS=1)
    both trials of EP train in one task and both continue from their checkpoints."""
    from epbench.plugins import registry

    if backend not in registry().backends or not registry().backends[backend].availability().ok:
        pytest.skip(f"backend {backend} unavailable")
    extra = {"EPBENCH_BATCH_TRIALS": "1"} if batched else {}
    name = f"{backend}{'-batched' if batched else ''}"
    whole = run(workdir, f"whole-{name}", "--backend", backend, **extra)
    assert whole.returncode == 0, whole.stderr
    out = f"resumed-{name}"
    assert run(workdir, out, "--backend", backend, EPBENCH_TEST_KILL_AT="epoch:2", **extra).returncode == -9
    again = run(workdir, out, "--backend", backend, **extra)
    assert again.returncode == 0, again.stderr
    run_dir = the_run_dir(workdir, out)
    resumed = {"t trial 1 ep": 1, "t trial 2 ep": 1} if batched else {"t trial 1 ep": 1}
    assert meta(run_dir)["cells"]["resumed"] == resumed
    assert_same_table(run_dir, comparable(the_run_dir(workdir, f"whole-{name}")))


def test_checkpoint_is_arrays_and_json(workdir):
    """Killed after epoch 2 of the first training cell: its checkpoint holds epoch 1, the
    parameters as plain arrays (no pickle) and the rows so far."""
    import numpy as np

    killed = run(workdir, "ckpt", EPBENCH_TEST_KILL_AT="epoch:2")
    assert killed.returncode == -9
    (ckpt,) = (the_run_dir(workdir, "ckpt") / "cells").glob("*.ckpt")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 1 and state["seed"] == 3 and len(state["rows"]) == 4
    with np.load(ckpt / "params.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {"W01", "W1x"}  # P-1h: the two weight matrices


def test_resume_refuses_other_settings(workdir, reference):
    run_dir = the_run_dir(workdir, "reference")
    changed = run(workdir, "elsewhere", "--resume", str(run_dir), "--epochs", "2")
    lines = [line for line in changed.stderr.splitlines() if line.strip()]
    assert changed.returncode == 2 and len(lines) == 1, changed.stderr
    assert lines[0].startswith(f"error: {run_dir}: --resume: the settings differ")


# ----- a cell that raises -------------------------------------------------------------------------------
def test_failed_cell_is_recorded_and_resume_reruns_only_it(workdir, reference):
    failed = run(workdir, "fail", EPBENCH_TEST_FAIL_CELL="t:1:bptt")
    run_dir = the_run_dir(workdir, "fail")
    assert failed.returncode == 1, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 cell(s) failed: t trial 2 bptt (RuntimeError: injected backend error")
    assert f"--resume {run_dir}" in last
    info = meta(run_dir)
    assert info["status"] == "failed" and info["cells"]["done"] == N_CELLS - 1
    assert comparable(run_dir)["cell"].nunique() == N_CELLS - 1

    again = run(workdir, "other-out", "--resume", str(run_dir))
    assert again.returncode == 0, again.stderr
    info = meta(run_dir)
    assert info["status"] == "complete" and info["cells"]["reused"] == N_CELLS - 1
    assert_same_table(run_dir, reference)
    assert not (workdir / "other-out").exists() or not list((workdir / "other-out").iterdir())


# ----- executors -------------------------------------------------------------------------------------------
def test_local_worker_processes(workdir, reference):
    done = run(workdir, "j2", "-j", "2")
    assert done.returncode == 0, done.stderr
    run_dir = the_run_dir(workdir, "j2")
    assert meta(run_dir)["executor"] == "2 local worker processes"
    assert_same_table(run_dir, reference)


def test_local_worker_killed(workdir, reference):
    """A -j worker killed mid-cell breaks the pool: the run stops as failed with one line, the
    finished cells kept; --resume continues to the same table."""
    out = "j2-killed"
    killed = run(workdir, out, "-j", "2", EPBENCH_TEST_KILL_AT="epoch:2",
                 EPBENCH_TEST_KILL_ONCE=str(workdir / "j2-killed-once"))
    run_dir = the_run_dir(workdir, out)
    lines = [line for line in killed.stderr.splitlines() if line.strip()]
    assert killed.returncode == 2 and len(lines) == 1, killed.stderr
    assert lines[0].startswith("error: a -j worker process died") and f"--resume {run_dir}" in lines[0]
    assert meta(run_dir)["status"] == "failed"
    again = run(workdir, out, "-j", "2")
    assert again.returncode == 0, again.stderr
    assert_same_table(run_dir, reference)


def test_dask_local_cluster(workdir, reference):
    pytest.importorskip("distributed")
    done = run(workdir, "dask", "--executor", "dask", "-j", "2")
    assert done.returncode == 0, done.stderr
    run_dir = the_run_dir(workdir, "dask")
    assert meta(run_dir)["executor"] == "dask on a LocalCluster of 2 workers"
    assert_same_table(run_dir, reference)


def test_parallel_config_local(workdir, reference):
    pytest.importorskip("distributed")
    config = workdir / "parallel.yaml"
    config.write_text("cluster: local\ncluster_params:\n  n_workers: 2\n  processes: true\n")
    done = run(workdir, "pconfig", "--parallel-config", str(config))
    assert done.returncode == 0, done.stderr
    assert_same_table(the_run_dir(workdir, "pconfig"), reference)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path):
    """A ``dask scheduler`` and two ``dask worker`` processes on loopback; the first worker to
    reach its second epoch kills itself (once), mid-cell."""
    pytest.importorskip("distributed")
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen([*dask, "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    kill = env(EPBENCH_TEST_KILL_AT="epoch:2", EPBENCH_TEST_KILL_ONCE=str(tmp_path / "killed-once"))
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--no-dashboard"], env=kill,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address, tmp_path / "killed-once"
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_dask_scheduler_with_a_worker_killed_mid_cell(workdir, reference, dask_cluster):
    address, killed = dask_cluster
    done = run(workdir, "scheduler", "--scheduler", address)
    assert done.returncode == 0, done.stderr
    assert killed.exists()  # a worker died in the middle of a training cell
    run_dir = the_run_dir(workdir, "scheduler")
    info = meta(run_dir)
    assert info["executor"] == f"dask on {address}" and info["cells"]["done"] == N_CELLS
    assert len(info["cells"]["resumed"]) == 1  # the lost cell continued from its checkpoint
    assert_same_table(run_dir, reference)


def test_slurm_config_example(tmp_path):
    """The documented SLURM configuration builds a dask-jobqueue cluster whose job script asks for
    one GPU and gives the worker the GPU resource the cells ask for (nothing is submitted: scale 0)."""
    import importlib.util

    import yaml

    if importlib.util.find_spec("dask_jobqueue") is None:  # not importorskip: see executors._import_dask_jobqueue
        pytest.skip("dask-jobqueue is not installed")

    from epbench.executors import dask_cluster

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "parallel" / "slurm.yaml").read_text())
    config = tmp_path / "slurm.yaml"
    config.write_text(yaml.safe_dump({**doc, "scale": 0}))
    before = signal.getsignal(signal.SIGINT)
    cluster = dask_cluster(str(config))
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C stays a KeyboardInterrupt
    try:
        script = cluster.job_script()
        assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script
    finally:
        cluster.close()
