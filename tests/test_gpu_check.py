"""scripts/gpu-check: its CPU mode runs every step of the GPU check (torch-cpu for the device
backend, the numpy example as the CPU reference, tiny settings, no installs) and writes the
folder, the summary and the archive; its agreement gate fails loudly on a run that disagrees."""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check"


@functools.cache
def load_script():
    """The script as a module (its dataclasses need it in sys.modules while it loads)."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One run of ``scripts/gpu-check --cpu``: (completed process, its folder, $OUT)."""
    pytest.importorskip("epbench_numpy")
    base = tmp_path_factory.mktemp("gpu-check")
    out = base / "OUT"
    out.mkdir()
    env = {**os.environ, "HOME": str(base / "home"), "OUT": str(out)}  # asv keeps its machine file in $HOME
    for name in ("EPBENCH_GPU_CHECK_BACKENDS", "EPBENCH_TEST_BACKENDS"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(base / "results")],
                          capture_output=True, text=True, env=env, timeout=900)
    folders = list((base / "results").glob("gpu-check-*"))
    assert len(folders) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, folders[0], out


def test_cpu_mode_runs_every_step_and_writes_the_folder(cpu_check):
    proc, folder, out = cpu_check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu-check: OK")
    steps = {s["name"]: s for s in json.loads((folder / "steps.json").read_text())}
    for name in ("info", "available", "gate-run-float64-torch-cpu", "gate-run-float64-numpy",
                 "agree-float64-torch-cpu-vs-numpy", "agree-float32-torch-cpu-vs-numpy", "bench-torch-cpu",
                 "check-torch-cpu", "pytest-golden-cross", "table3-torch-cpu", "table4-reduced-torch-cpu", "asv"):
        assert steps[name]["status"] == "ok", (name, steps.get(name))
        assert name == "fastest" or (folder / steps[name]["log"]).is_file()
    assert steps["fastest"]["detail"] == "torch-cpu"
    summary = (folder / "summary.md").read_text()
    assert "| p-1h | ep |" in summary  # the bench table, with ms/batch, % of peak and first call
    assert "| agree-float64-torch-cpu-vs-numpy | 1e-08 | relmse" in summary
    assert "TF32, torch-cpu:" in summary
    assert summary.rstrip().endswith("All steps passed.")
    assert len(list((folder / "runs").glob("*-table3-torch-cpu"))) == 1
    assert len(list((folder / "runs").glob("*-table4-torch-cpu"))) == 1
    with tarfile.open(out / f"{folder.name}.tar.gz") as tar:
        names = tar.getnames()
    assert f"{folder.name}/summary.md" in names and f"{folder.name}/steps.json" in names
    assert (out / "summary.md").read_text() == summary


def _perturbed_copy(run: Path, dest: Path, by: float) -> Path:
    """A copy of ``run`` with the RelMSE of one layer moved by ``by``."""
    from epbench.results import read_table, write_table

    shutil.copytree(run, dest)
    table = read_table(dest)
    rows = table[(table["task"] == "gdu") & (table["algorithm"] == "ep_vs_bptt") & (table["metric"] == "relmse")]
    table.loc[rows.index[0], "value"] += by
    write_table(dest, table)
    return dest


def test_agreement_gate_fails_loudly_on_a_perturbed_run(cpu_check, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    gpu_check = load_script()
    _, folder, _ = cpu_check
    run = next((folder / "runs" / "gate-float64").glob("*-table3-torch-cpu"))
    ref = next((folder / "runs" / "gate-float64").glob("*-table3-numpy"))

    agrees = gpu_check.Check(tmp_path / "agrees", budget_s=300)
    agrees.folder.mkdir()
    assert gpu_check.agreement(agrees, "float64", "torch-cpu", str(run), "numpy", str(ref)).status == "ok"

    # 1e-6 on one RelMSE: far inside float32 noise, 100 times the float64 tolerance
    bad = _perturbed_copy(run, tmp_path / "perturbed", 1e-6)
    check = gpu_check.Check(tmp_path / "check", budget_s=300)
    check.folder.mkdir()
    step = gpu_check.agreement(check, "float64", "torch-cpu", str(bad), "numpy", str(ref))
    assert (step.status, step.detail) == ("failed", "exit status 1")
    assert "**no**" in (check.folder / "agree-float64-torch-cpu-vs-numpy.md").read_text()
    capsys.readouterr()
    assert gpu_check.finish(check) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("gpu-check: FAILED: agree-float64-torch-cpu-vs-numpy")
    assert "**FAILED: agree-float64-torch-cpu-vs-numpy**" in (check.folder / "summary.md").read_text()


def test_agreement_gate_fails_when_the_runs_share_no_gdu_rows(cpu_check, tmp_path):
    gpu_check = load_script()
    _, folder, _ = cpu_check
    run = next((folder / "runs" / "gate-float64").glob("*-table3-torch-cpu"))
    table4 = next((folder / "runs").glob("*-table4-torch-cpu"))
    check = gpu_check.Check(tmp_path / "check", budget_s=300)
    check.folder.mkdir()
    step = gpu_check.agreement(check, "float64", "torch-cpu", str(run), "numpy", str(table4))
    assert (step.status, step.detail) == ("failed", "no GDU rows in common")


def test_a_missing_run_fails_the_gate(tmp_path):
    gpu_check = load_script()
    check = gpu_check.Check(tmp_path, budget_s=300)
    step = gpu_check.agreement(check, "float32", "torch-cuda", "", "torch-cpu", "/nowhere")
    assert step.status == "failed" and step.name == "agree-float32-torch-cuda-vs-torch-cpu"


@pytest.mark.parametrize("text, reason", [
    ("p-1h    torch-cpu    219μs \n  p-1h jax-cpu  n/a \n", ""),
    ("p-1h    torch-cuda    1.05ms \n", ""),
    ("[100.00%] ··· benchmarks.Step.track_ep_seconds_per_sample        failed\n", "a benchmark failed"),
    ("p-1h    torch-cuda    n/a \n", "no timing reported"),
])
def test_asv_output_is_read_for_failures_and_timings(text, reason):
    assert load_script().asv_timed(text) == reason


def test_fastest_backend_from_the_bench_logs(tmp_path):
    gpu_check = load_script()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "bench-torch-cuda.log").write_text(
        "torch-cuda p-1h    ep         4.00 ms/batch   48.9 MFLOP\ntorch-cuda eb-1h   ep   9.00 ms/batch\n")
    (tmp_path / "logs" / "bench-jax-cuda.log").write_text("jax-cuda   p-1h    ep         1.00 ms/batch\n")
    check = gpu_check.Check(tmp_path, budget_s=1)
    assert gpu_check.fastest(check, ["torch-cuda", "jax-cuda"]) == "jax-cuda"  # on the pairs both timed
    assert gpu_check.fastest(check, ["nothing-timed"]) == "nothing-timed"
