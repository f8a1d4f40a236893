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


def test_cpu_mode_runs_the_comparisons_and_says_whether_they_paid(cpu_check):
    """The comparison steps run after asv, one bench run each under runs/variants/NAME/: the
    eager torch loop, the per-step timing, 4 trials one after the other and batched on torch-cpu
    and on jax-cpu (XLA loop), and EPBENCH_JAX_UNROLL default, 1 and full; summary.md's "Did it pay" section
    has one measured line per comparison."""
    from epbench.results import read_table

    _, folder, _ = cpu_check
    steps = {s["name"]: s for s in json.loads((folder / "steps.json").read_text())}
    names = list(steps)
    jax = importlib.util.find_spec("jax") is not None
    variants = ["bench-torch-cpu-eager", "bench-torch-cpu-per-step", "bench-torch-cpu-trials-sequential",
                "bench-torch-cpu-trials-batched"]
    jax_variants = ["bench-jax-cpu-trials-sequential", "bench-jax-cpu-trials-batched", "bench-jax-cpu-unroll-default",
                    "bench-jax-cpu-unroll-1", "bench-jax-cpu-unroll-full"]
    for name in variants + (jax_variants if jax else []):
        assert steps[name]["status"] == "ok", (name, steps[name])
        assert names.index(name) > names.index("asv")  # after every required step
        (run,) = (folder / "runs" / "variants" / name).glob("*-bench-*")
        assert read_table(run)["value"].notna().all()
    def command(name: str) -> str:
        return (folder / "logs" / f"{name}.log").read_text().splitlines()[0]

    assert command("bench-torch-cpu-eager").startswith("$ EPBENCH_TORCH_GRAPHS=0 ")
    assert " --per-step -m p-1h " in command("bench-torch-cpu-per-step")
    summary = (folder / "summary.md").read_text()
    section = summary[summary.index("## Did it pay"):]
    assert "- CUDA graphs (torch-cpu, p-1h): eager " in section
    assert "- speed-up over the official code's approach (p-1h): torch-cpu eager " in section
    assert "- one relaxation step at batch 20 (torch-cpu, p-1h, 784-512-10): " in section
    assert "about 55 µs per step" in section and "not measured in this check" in section
    assert command("bench-torch-cpu-trials-batched").startswith("$ EPBENCH_BATCH_TRIALS=1 ")
    assert "- batched vs sequential trials (torch-cpu, p-1h, 4 trials, per trial): sequential " in section
    assert "- torch.compile: not built" in section
    if jax:
        table = {n: read_table(next((folder / "runs" / "variants" / n).glob("*-bench-*"))) for n in jax_variants}
        assert set(table["bench-jax-cpu-unroll-1"]["implementation"]) == {"xla-loop:unroll=1"}
        assert set(table["bench-jax-cpu-unroll-full"]["implementation"]) == {"xla-loop:unroll=full"}
        assert set(table["bench-jax-cpu-unroll-default"]["implementation"]) == {"xla-loop"}
        for n in ("bench-jax-cpu-trials-sequential", "bench-jax-cpu-trials-batched"):
            assert table[n].loc[table[n].metric == "trials", "value"].tolist() == [4.0]
        assert command("bench-jax-cpu-unroll-full").startswith("$ EPBENCH_JAX_NATIVE=0 EPBENCH_JAX_UNROLL=full ")
        assert command("bench-jax-cpu-trials-batched").startswith("$ EPBENCH_JAX_NATIVE=0 EPBENCH_BATCH_TRIALS=1 ")
        assert " --trials 4 -m p-1h -a ep " in command("bench-jax-cpu-trials-sequential")
        assert "- unroll=1 vs default (jax-cpu, p-1h): " in section
        assert "- unroll=full vs default (jax-cpu, p-1h): " in section
        assert "- batched vs sequential trials (jax-cpu, p-1h, 4 trials, per trial): sequential " in section
        assert "not measured" not in section.replace("not measured in this check", "")


def test_did_it_pay_says_not_measured_for_missing_runs(tmp_path):
    """A check whose comparison steps failed, timed out or were skipped still writes summary.md,
    with "not measured" on each comparison line; skipped steps do not fail the check."""
    gpu_check = load_script()
    steps = [{"name": "bench-torch-cuda", "status": "failed", "seconds": 1.0, "detail": "exit status 1", "log": ""},
             {"name": "bench-torch-cuda-eager", "status": "timeout", "seconds": 150.0, "detail": "killed", "log": ""},
             {"name": "bench-torch-cuda-per-step", "status": "failed", "seconds": 1.0, "detail": "", "log": ""},
             {"name": "bench-jax-cuda-trials-sequential", "status": "skipped", "seconds": 0.0, "detail": "", "log": ""},
             {"name": "bench-jax-cuda-unroll-1", "status": "skipped", "seconds": 0.0, "detail": "", "log": ""}]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    (tmp_path / "runs" / "variants" / "bench-torch-cuda-eager").mkdir(parents=True)  # a run dir never written
    gpu_check.write_summary(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    section = summary[summary.index("## Did it pay"):]
    for line in ("- CUDA graphs (torch-cuda): not measured", "- unroll=1 vs default (jax-cuda, p-1h): not measured",
                 "- unroll=full vs default (jax-cuda, p-1h): not measured",
                 "- batched vs sequential trials (jax-cuda, p-1h): not measured",
                 "- speed-up over the official code's approach (p-1h): not measured",
                 "- one relaxation step at batch 20 (torch-cuda, p-1h, 784-512-10): not measured"):
        assert line in section, line
    assert "**FAILED: bench-torch-cuda, bench-torch-cuda-eager, bench-torch-cuda-per-step**" in summary
    # a fresh folder with nothing in it at all
    (tmp_path / "empty").mkdir()
    gpu_check.write_summary(tmp_path / "empty")
    assert "## Did it pay" in (tmp_path / "empty" / "summary.md").read_text()


def test_a_spent_budget_skips_optional_steps_without_failing(tmp_path, capsys):
    gpu_check = load_script()
    check = gpu_check.Check(tmp_path, budget_s=0)
    assert check.run("bench-x-unroll-1", ["true"], 60, optional=True).status == "skipped"
    assert check.failed() == []
    assert check.run("table3-x", ["true"], 60).status == "not run"
    assert [s.name for s in check.failed()] == ["table3-x"]


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
