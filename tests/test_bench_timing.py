"""The device-independent parts of honest GPU timings (epbench.bench): every timed region is
bracketed by the backend's synchronisation, the first (compiling) call is timed apart, and the
TF32 state is read from the framework's settings and described correctly."""

import pytest

from epbench import bench


class FakeDevice:
    """A backend whose ``synchronize`` and a ``work`` that only move a fake clock and log."""

    def __init__(self, first_call: float, later_calls: float):
        self.now = 0.0
        self.log: list[str] = []
        self.calls = 0
        self.durations = (first_call, later_calls)

    def clock(self) -> float:
        self.log.append("clock")
        return self.now

    def synchronize(self) -> None:
        self.log.append("sync")

    def work(self) -> None:
        self.now += self.durations[0] if self.calls == 0 else self.durations[1]
        self.calls += 1
        self.log.append("work")


def test_best_time_synchronises_around_every_timed_region_and_times_the_first_call_apart(monkeypatch):
    monkeypatch.setattr(bench, "WARM_UP_S", 0.0)
    dev = FakeDevice(first_call=7.0, later_calls=1.0)
    timing = bench.best_time(dev.work, dev, repeats=3, clock=dev.clock)
    assert timing == bench.Timing(first_s=7.0, best_s=1.0)
    region = ["sync", "clock", "work", "sync", "clock"]
    warm_up = ["clock", "clock"]  # the deadline, then the loop's first (failing) test
    assert dev.log == region + warm_up + region * 3


def test_best_time_warms_up_until_the_deadline_and_synchronises_each_warm_up_call(monkeypatch):
    monkeypatch.setattr(bench, "WARM_UP_S", 2.5)
    dev = FakeDevice(first_call=7.0, later_calls=1.0)
    bench.best_time(dev.work, dev, repeats=2, clock=dev.clock)
    assert dev.calls == 1 + 3 + 2  # 3 warm-up calls of 1 fake second pass the 2.5 s deadline
    assert all(dev.log[i + 1] == "sync" for i, e in enumerate(dev.log) if e == "work")


def test_per_divides_the_run_time_only():
    assert bench.Timing(first_s=6.0, best_s=2.0).per(4) == bench.Timing(first_s=6.0, best_s=0.5)


TORCH_DEFAULTS = {"torch.backends.cuda.matmul.allow_tf32": False, "torch.get_float32_matmul_precision()": "highest",
                  "torch.backends.cudnn.allow_tf32": True}


@pytest.mark.parametrize("changes, matmul, conv", [
    ({}, "off", "on"),
    ({"torch.backends.cuda.matmul.allow_tf32": True}, "on", "on"),
    ({"torch.get_float32_matmul_precision()": "high"}, "on", "on"),
    ({"torch.get_float32_matmul_precision()": "medium"}, "on", "on"),
    ({"torch.backends.cuda.matmul.fp32_precision": "tf32"}, "on", "on"),
    ({"torch.backends.cudnn.allow_tf32": False}, "off", "off"),
    ({"torch.backends.cudnn.allow_tf32": False, "torch.backends.cudnn.conv.fp32_precision": "tf32"}, "off", "on"),
])
def test_describe_tf32_torch(changes, matmul, conv):
    line = bench.describe_tf32("torch", {**TORCH_DEFAULTS, **changes})
    assert f"TF32 {matmul} for CUDA matmuls, {conv} for cuDNN convolutions" in line
    assert line.endswith(bench.BACKEND_FLOAT32["torch"])


@pytest.mark.parametrize("value, state", [(None, "on"), ("default", "on"), ("tensorfloat32", "on"),
                                          ("bfloat16", "on"), ("highest", "off"), ("float32", "off")])
def test_describe_tf32_jax(value, state):
    line = bench.describe_tf32("jax", {"jax_default_matmul_precision": value})
    assert f"TF32 {state} for float32 dots on GPUs" in line
    assert line.endswith(bench.BACKEND_FLOAT32["jax"])


def test_describe_tf32_other_framework():
    assert "not applicable" in bench.describe_tf32("numpy", bench.tf32_settings("numpy"))


def test_tf32_settings_reads_torch_as_it_is_set():
    torch = pytest.importorskip("torch")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert bench.tf32_settings("torch")["torch.get_float32_matmul_precision()"] == "high"
        assert "TF32 on for CUDA matmuls" in bench.describe_tf32("torch", bench.tf32_settings("torch"))
        torch.set_float32_matmul_precision("highest")
        assert bench.tf32_settings("torch")["torch.get_float32_matmul_precision()"] == "highest"
    finally:
        torch.set_float32_matmul_precision(old)


def test_tf32_settings_reads_jax_as_it_is_set():
    jax = pytest.importorskip("jax")
    old = jax.config.jax_default_matmul_precision
    try:
        jax.config.update("jax_default_matmul_precision", "highest")
        assert "TF32 off for float32 dots" in bench.describe_tf32("jax", bench.tf32_settings("jax"))
        jax.config.update("jax_default_matmul_precision", None)
        assert "TF32 on for float32 dots" in bench.describe_tf32("jax", bench.tf32_settings("jax"))
    finally:
        jax.config.update("jax_default_matmul_precision", old)


def test_bench_records_the_first_call_apart_and_the_tf32_state(tmp_path):
    """`epbench bench` on torch-cpu: a first_call_seconds row beside seconds_per_batch, the TF32
    line printed and kept in meta.json."""
    import subprocess
    import sys

    from epbench.results import read_meta, read_table

    out = subprocess.run([sys.executable, "-m", "epbench.cli", "bench", "-b", "torch-cpu", "-m", "p-1h", "-a", "ep",
                          "--batches", "1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (run_dir,) = tmp_path.iterdir()
    df = read_table(run_dir)
    value = {m: df.loc[df.metric == m, "value"].item() for m in df.metric.unique()}
    assert value["first_call_seconds"] > 0 and value["seconds_per_batch"] > 0
    line = bench.describe_tf32("torch", bench.tf32_settings("torch"))
    assert read_meta(run_dir)["tf32"] == {"torch-cpu": line}
    assert f"torch-cpu: {line}" in out.stdout


def test_bench_trials_times_trials_trained_together(tmp_path):
    """`epbench bench --trials 2` on torch-cpu: the measurement's rows say trials=2 (a ``trials``
    row beside the timings, and meta.json), its times are finite and positive (per batch per
    trial), the progress line names the trials, and GDU is not timed."""
    import subprocess
    import sys

    import numpy as np

    from epbench.results import read_meta, read_table

    out = subprocess.run([sys.executable, "-m", "epbench.cli", "bench", "-b", "torch-cpu", "-m", "p-1h", "-a", "ep",
                          "--batches", "1", "--trials", "2", "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (run_dir,) = tmp_path.iterdir()
    df = read_table(run_dir)
    assert set(df.algorithm) == {"ep"}
    value = {m: df.loc[df.metric == m, "value"].item() for m in df.metric.unique()}
    assert value["trials"] == 2
    for metric in ("seconds_per_batch", "seconds_per_sample", "first_call_seconds", "gflops"):
        assert np.isfinite(value[metric]) and value[metric] > 0, metric
    assert read_meta(run_dir)["trials"] == 2
    assert "trials=2 (per batch per trial)" in out.stdout


def test_bench_rows_default_to_one_trial_and_gdu_needs_one_trial():
    """Without ``trials`` every measurement has a trials=1 row; time_per_batch refuses GDU for
    more than one trial and a trial count below 1."""
    from epbench.plugins import registry

    backend = registry().backends["numpy"] if "numpy" in registry().backends else None
    if backend is None:
        pytest.skip("the numpy example backend is not installed")
    rows = bench.bench_rows(backend, models=("p-1h",), algorithms=("ep",), batches=1)
    assert {r["value"] for r in rows if r["metric"] == "trials"} == {1.0}
    with pytest.raises(ValueError, match="GDU"):
        bench.time_per_batch(backend, "p-1h", "gdu", batches=1, trials=2)
    with pytest.raises(ValueError, match="at least 1"):
        bench.time_per_batch(backend, "p-1h", "ep", batches=1, trials=0)


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "Invalid value for '--trials'"),
    (["--trials", "two"], "Invalid value for '--trials'"),
    (["--trials", "2", "-a", "gdu"], "--trials > 1 times training steps only"),
    (["--trials", "2", "--per-step"], "--per-step times the first-phase step only"),
])
def test_bench_rejects_bad_trials(args, message, tmp_path, capsys):
    from epbench.cli import main

    assert main(["bench", "-b", "torch-cpu", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # rejected before any timing or output
