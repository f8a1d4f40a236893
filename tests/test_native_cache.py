"""The fused kernel of jax-cpu (epbench_jax.native): chosen by measurement and the choice
remembered; forced by EPBENCH_JAX_NATIVE; its cache private and verified (a truncated or corrupt
library is rebuilt); a kernel that cannot be built falls back to the XLA loop with one warning;
the results say which ran.

The end-to-end tests run real processes (the kernel's state is per process) with the real
compiler, each in a temporary EPBENCH_CACHE."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from epbench.spec import ModelSpec

pytest.importorskip("jax")
native = pytest.importorskip("epbench_jax.native")
from epbench_jax.native import build, choice  # noqa: E402

needs_compiler = pytest.mark.skipif(build.compiler() is None or not sys.platform.startswith("linux"),
                                    reason="the kernel is built with a C++ compiler on Linux")


# ----- the decision, with a deterministic clock --------------------------------------------------
class FakeClock:
    """A clock that only moves when a fake implementation 'runs' for its next duration."""

    def __init__(self, kernel: list[float], loop: list[float]):
        self.now = 0.0
        self.durations = {choice.KERNEL: list(kernel), choice.LOOP: list(loop)}
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def runner(self, name: str):
        def run():
            self.calls.append(name)
            self.now += self.durations[name].pop(0)
        return run


def race(kernel, loop, **kw):
    clock = FakeClock(kernel, loop)
    return clock, choice.race(clock.runner(choice.KERNEL), clock.runner(choice.LOOP), clock=clock, **kw)


def test_race_keeps_the_faster_best_of():
    """Best of the timed runs, the untimed first runs ignored: the loop's one slow run and the
    kernel's fast first run do not decide."""
    _, result = race(kernel=[0.1, 3, 3, 3], loop=[9, 2, 8, 2], rounds=3, budget_s=100)
    assert result == {"choice": choice.LOOP, "kernel_s": 3, "loop_s": 2, "rounds": 3}
    _, result = race(kernel=[1, 1.5, 1, 2], loop=[1, 2, 2, 2], rounds=3, budget_s=100)
    assert result["choice"] == choice.KERNEL and result["kernel_s"] == 1


def test_race_alternates_and_stops_at_the_budget():
    clock, result = race(kernel=[1] * 10, loop=[1] * 10, rounds=8, budget_s=3.5)
    # untimed pair, then rounds alternating who goes first, until 3.5 s of timed runs (2 per round)
    assert clock.calls == ["fused-cpp", "xla-loop", "fused-cpp", "xla-loop", "xla-loop", "fused-cpp"]
    assert result["rounds"] == 2
    assert result["choice"] == choice.LOOP  # a tie keeps the XLA loop


def test_decide_measures_once_then_reads_the_file(tmp_path, monkeypatch):
    """The first decision is measured and stored beside the library, keyed by the phase; the
    next one (a new process: an empty memo) is read back, without measuring."""
    lib = tmp_path / "one_hidden-0.so"
    spec = ModelSpec(kind="p", n_in=20, hidden=(32,), n_out=5, activation="sigmoid")
    measured = []

    def fake_measure(spec, batch, steps, nudged):
        measured.append((batch, steps, nudged))
        return {"choice": choice.KERNEL if nudged else choice.LOOP, "kernel_s": 1.0, "loop_s": 1.0, "rounds": 1}

    monkeypatch.setattr(choice, "measure", fake_measure)
    assert choice.decide(lib, spec, 8, 20, False, {}) == choice.LOOP
    assert choice.decide(lib, spec, 8, 4, True, {}) == choice.KERNEL
    assert measured == [(8, 20, False), (8, 4, True)]
    stored = json.loads(choice.choices_path(lib).read_text())
    assert set(stored) == {choice.key(spec, 8, 20, False), choice.key(spec, 8, 4, True)}
    assert choice.decide(lib, spec, 8, 20, False, {}) == choice.LOOP
    assert choice.decide(lib, spec, 8, 4, True, {}) == choice.KERNEL
    assert len(measured) == 2
    assert "batch=8 steps=4 nudged" in choice.key(spec, 8, 4, True)
    assert choice.key(spec, 8, 4, True) != choice.key(spec.model_copy(update={"hidden": (48,)}), 8, 4, True)


def test_mode_rejects_other_values(monkeypatch):
    from epbench.errors import EpbenchError

    for value, mode in (("", "measure"), ("1", "kernel"), ("0", "loop")):
        monkeypatch.setenv("EPBENCH_JAX_NATIVE", value)
        assert native.mode() == mode
    monkeypatch.setenv("EPBENCH_JAX_NATIVE", "yes")
    with pytest.raises(EpbenchError, match="EPBENCH_JAX_NATIVE must be 1"):
        native.mode()
    from epbench_jax.backend import JaxBackend

    avail = JaxBackend("cpu").availability()  # so a run stops before it starts, with this reason
    assert not avail.ok and "EPBENCH_JAX_NATIVE must be 1" in avail.reason


# ----- the private cache folder --------------------------------------------------------------------
def test_cache_folders_are_created_private_and_repaired(tmp_path):
    new = tmp_path / "a" / "b" / "native"
    build.private_dir(new)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", new):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    os.chmod(new, 0o777)
    build.private_dir(new)
    assert stat.S_IMODE(new.stat().st_mode) == 0o700


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a folder away")
def test_cache_folder_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "native"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    with pytest.raises(build.CacheError, match="belongs to another user"):
        build.private_dir(folder)


# ----- end to end, real processes and the real compiler ---------------------------------------------
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import numpy as np
    from epbench import compute
    from epbench.plugins import registry
    from epbench.spec import ModelSpec, PhaseSettings

    jb = registry().backend("jax-cpu")
    spec = ModelSpec(kind="p", n_in=20, hidden=(32,), n_out=5, activation="sigmoid")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (6, 20)), np.eye(5)[rng.integers(0, 5, 6)]
    P = jb.from_numpy(spec, jb.init_params(spec, 0), "float32")
    compute.gradient(jb, spec, P, x, y, PhaseSettings(T=20, K=4, beta=0.1, dtype="float32"), "ep")
    print(jb.pop_implementation())
""")


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("EPBENCH_JAX_NATIVE", "CXX")}
    return {**env, "EPBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}


def _script(cache: Path, **extra) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=_env(cache, **extra),
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _library(cache: Path) -> Path:
    (lib,) = (cache / "native").glob("one_hidden-*.so")
    return lib


@needs_compiler
def test_choice_is_stored_reused_and_forcing_wins(tmp_path):
    """Unset: both phases of the EP update (20 free steps, 4 nudged) are measured and stored,
    and the implementation reported is the stored choices'. A second process follows the file
    (here edited to the opposite choices) without measuring; =1 and =0 force either way and
    leave the file alone."""
    cache = tmp_path / "cache"
    first = _script(cache)
    path = choice.choices_path(_library(cache))
    stored = json.loads(path.read_text())
    assert sorted(k.split(" batch=")[1].split(" float32")[0] for k in stored) == ["6 steps=20 free",
                                                                                  "6 steps=4 nudged"]
    assert first == "+".join(sorted({v["choice"] for v in stored.values()}))
    assert all(v["kernel_s"] > 0 and v["loop_s"] > 0 for v in stored.values())

    flipped = {k: {**v, "choice": choice.LOOP if v["choice"] == choice.KERNEL else choice.KERNEL}
               for k, v in stored.items()}
    path.write_text(json.dumps(flipped))
    assert _script(cache) == "+".join(sorted({v["choice"] for v in flipped.values()}))
    assert json.loads(path.read_text()) == flipped  # read, not measured again

    assert _script(cache, EPBENCH_JAX_NATIVE="1") == "fused-cpp"
    assert _script(cache, EPBENCH_JAX_NATIVE="0") == "xla-loop"
    assert json.loads(path.read_text()) == flipped


SUITE = """
name: kernel
defaults:
  dataset: synthetic
  seed: 0
  phase: {dtype: float32}
experiments:
  - name: p-gdu
    task: gdu
    batch_size: 4
    model: {kind: p, n_in: 20, hidden: [32], n_out: 5, activation: sigmoid, dt: 1.0}
    phase: {T: 20, K: 4, beta: 0.1}
"""


def _run(tmp_path: Path, cache: Path, **extra) -> tuple[subprocess.CompletedProcess, pd.DataFrame, dict]:
    suite = tmp_path / "kernel.yaml"
    suite.write_text(SUITE)
    out = tmp_path / f"results-{len(list(tmp_path.glob('results-*')))}"
    done = subprocess.run([sys.executable, "-m", "epbench.cli", "-q", "run", str(suite), "-b", "jax-cpu",
                           "--out", str(out), "--no-report"], capture_output=True, text=True, env=_env(cache, **extra),
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    (run_dir,) = out.iterdir()
    return done, pd.read_parquet(run_dir / "results.parquet"), json.loads((run_dir / "meta.json").read_text())


@needs_compiler
def test_truncated_and_corrupt_kernels_are_rebuilt(tmp_path):
    """A truncated library (the SIGBUS of old) and one with flipped bytes (same size) fail their
    checksum and are rebuilt; each run completes on the kernel and says so in the table and in
    meta.json, with the CPU it ran on."""
    cache = tmp_path / "cache"
    done, table, meta = _run(tmp_path, cache, EPBENCH_JAX_NATIVE="1")
    lib = _library(cache)
    good = lib.read_bytes()
    assert build.checksum_path(lib).read_text().split()[0] == build.sha256_of(lib)
    assert stat.S_IMODE((cache / "native").stat().st_mode) == 0o700
    assert set(table["implementation"]) == {"fused-cpp"} and meta["implementation"] == {"p-gdu": "fused-cpp"}
    assert table["cpu_model"].str.len().gt(0).all() and meta["host"]["cpu_model"] == table["cpu_model"].iloc[0]

    for damage in (good[: len(good) // 3], good[:4096] + bytes(b ^ 0xFF for b in good[4096:4160]) + good[4160:]):
        lib.write_bytes(damage)
        done, table, meta = _run(tmp_path, cache, EPBENCH_JAX_NATIVE="1")
        assert "does not match its recorded checksum" in done.stderr
        assert lib.stat().st_size == len(good) and build.verified(lib)
        assert set(table["implementation"]) == {"fused-cpp"}


@needs_compiler
def test_a_kernel_that_cannot_be_built_falls_back_with_one_warning(tmp_path):
    """A compiler that fails: one warning line, the run completes on the XLA loop and the
    table says ``xla-loop``."""
    cache = tmp_path / "cache"
    failing = tmp_path / "bad-cxx"
    failing.write_text("#!/bin/sh\necho 'internal compiler error' >&2\nexit 1\n")
    failing.chmod(0o755)
    done, table, meta = _run(tmp_path, cache, CXX=str(failing), EPBENCH_JAX_NATIVE="1")
    warnings = [line for line in done.stderr.splitlines() if "kernel" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "internal compiler error" in warnings[0]
    assert set(table["implementation"]) == {"xla-loop"} and meta["implementation"] == {"p-gdu": "xla-loop"}
    assert not list((cache / "native").glob("*.so"))


def test_bench_reports_the_implementation_and_the_hardware(tmp_path):
    """`epbench bench` on jax-cpu with the XLA loop forced: the rows and the progress lines say
    ``xla-loop``; rows and meta.json carry the CPU model and flags."""
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "epbench.cli", "bench", "-b", "jax-cpu", "-m", "p-1h", "-a", "ep",
                           "--batches", "1", "--out", str(out)], capture_output=True, text=True,
                          env=_env(tmp_path / "cache", EPBENCH_JAX_NATIVE="0"), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "[xla-loop]" in done.stdout
    (run_dir,) = out.iterdir()
    table = pd.read_parquet(run_dir / "results.parquet")
    meta = json.loads((run_dir / "meta.json").read_text())
    assert set(table["implementation"]) == {"xla-loop"}
    assert set(table["cpu_model"]) == {meta["host"]["cpu_model"]} and meta["host"]["cores"] >= 1
    assert set(table["cpu_flags"]) == {meta["host"]["cpu_flags"]}
