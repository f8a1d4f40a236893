"""The command line: import hygiene, one-line errors, plugin discovery through real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def epbench(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "epbench.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=300)


def test_help_imports_neither_torch_nor_jax():
    code = textwrap.dedent("""
        import sys
        from epbench.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
        heavy = sorted(m for m in ("torch", "jax", "jaxlib") if m in sys.modules)
        print("HEAVY:" + ",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout
    assert "HEAVY:\n" in out.stdout or out.stdout.rstrip().endswith("HEAVY:")


def test_backends_listing_imports_neither_torch_nor_jax():
    code = textwrap.dedent("""
        import sys
        from epbench.cli import main
        main(["backends"])
        print("HEAVY:" + ",".join(sorted(m for m in ("torch", "jax", "jaxlib") if m in sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch-cpu" in out.stdout
    assert out.stdout.rstrip().endswith("HEAVY:")


BAD_SUITES = {
    "unknown_key": ("name: s\nexperiments:\n  - name: a\n    task: gdu\n    colour: red\n"
                    "    model: {kind: p, hidden: [8]}\n    phase: {T: 5, K: 2, beta: 0.1}\n", "colour"),
    "wrong_type": ("name: s\nexperiments:\n  - name: a\n    task: gdu\n"
                   "    model: {kind: p, hidden: [8]}\n    phase: {T: many, K: 2, beta: 0.1}\n", "phase.T"),
    "t_not_positive": ("name: s\nexperiments:\n  - name: a\n    task: gdu\n"
                       "    model: {kind: p, hidden: [8]}\n    phase: {T: 0, K: 2, beta: 0.1}\n", "phase.T"),
    "k_above_t": ("name: s\nexperiments:\n  - name: a\n    task: gdu\n"
                  "    model: {kind: p, hidden: [8]}\n    phase: {T: 5, K: 9, beta: 0.1}\n", "K (9) must not exceed T (5)"),
    "bad_yaml": ("name: s\nexperiments: [\n  - {name: a\n", "bad YAML"),
    "unknown_model": ("name: s\nexperiments:\n  - name: a\n    task: gdu\n"
                      "    model: {kind: rnn}\n    phase: {T: 5, K: 2, beta: 0.1}\n",
                      "(a).model: unknown model kind 'rnn' (known: "),
    "unknown_algorithm": ("name: s\nexperiments:\n  - name: a\n    task: gdu\n    algorithms: [ep, bpt]\n"
                          "    model: {kind: p, hidden: [8]}\n    phase: {T: 5, K: 2, beta: 0.1}\n",
                          "unknown algorithm 'bpt'; did you mean 'bptt'? (known: "),
    "alternate_gdu": ("name: s\nexperiments:\n  - name: a\n    task: gdu\n    model: {kind: p, hidden: [8]}\n"
                      "    phase: {T: 6, K: 2, beta: 0.1, alternate: true}\n", "alternate is a training option"),
    "alternate_eb": ("name: s\nexperiments:\n  - name: a\n    task: train\n    model: {kind: eb, hidden: [8]}\n"
                     "    phase: {T: 6, K: 2, beta: 0.1, alternate: true}\n    train: {lrs: [0.1, 0.1]}\n",
                     "alternate applies to layered prototypical models (p), not eb"),
    "alternate_odd_k": ("name: s\nexperiments:\n  - name: a\n    task: train\n    model: {kind: p, hidden: [8]}\n"
                        "    phase: {T: 6, K: 3, beta: 0.1, alternate: true}\n    train: {lrs: [0.1, 0.1]}\n",
                        "must be even"),
}


@pytest.mark.parametrize("case", sorted(BAD_SUITES))
def test_bad_suite_exits_2_with_one_line(tmp_path, case):
    text, expected = BAD_SUITES[case]
    suite = tmp_path / f"{case}.yaml"
    suite.write_text(text)
    out = epbench("run", str(suite), "--out", str(tmp_path / "results"))
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert str(suite) in lines[0] and expected in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_missing_suite_file(tmp_path):
    out = epbench("run", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert "no such suite file" in out.stderr and "nope.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_backend_suggests_closest(tmp_path):
    out = epbench("run", str(ROOT / "suites" / "table3.yaml"), "--backend", "torch-cpus", "--out", str(tmp_path))
    assert out.returncode == 2
    assert "unknown backend 'torch-cpus'" in out.stderr and "did you mean 'torch-cpu'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def _fake_distribution(root: Path, dist: str, module: str, body: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-0.3.dist-info"  # wheel-style escaped name
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[epbench]\n{dist} = {module}\n")


FAKE_BACKEND = """
    from epbench import hookimpl
    from epbench.backend import Availability, Backend


    class FakeBackend(Backend):
        name = "fake-accel"
        framework = ""

        def availability(self, probe=False):
            return Availability(True, "", "fake device 0")

        def from_numpy(self, spec, params, dtype): return dict(params)
        def to_numpy(self, spec, params): return dict(params)
        def cast(self, params, dtype): return params
        def dtype_of(self, params): return "float32"
        def asarray(self, a, dtype=None): raise NotImplementedError
        def dynamics(self, *a, **k): raise NotImplementedError
        @property
        def ops(self): raise NotImplementedError


    @hookimpl
    def epbench_backends():
        return [FakeBackend()]
"""


def test_third_party_backend_through_a_real_entry_point(tmp_path):
    _fake_distribution(tmp_path, "epbench-fake", "epbench_fake_plugin", FAKE_BACKEND)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = epbench("backends", env=env)
    assert out.returncode == 0, out.stderr
    assert "fake-accel" in out.stdout and "fake device 0" in out.stdout
    plugins = epbench("plugins", env=env)
    assert "epbench-fake" in plugins.stdout and "epbench_backends" in plugins.stdout
    disabled = epbench("backends", env={**env, "EPBENCH_DISABLE_PLUGINS": "1"})
    assert disabled.returncode == 0 and "fake-accel" not in disabled.stdout and "torch-cpu" in disabled.stdout


def test_broken_entry_point_warns_and_cli_still_works(tmp_path):
    _fake_distribution(tmp_path, "epbench-broken", "epbench_broken_plugin", "raise ImportError('no such thing')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = epbench("backends", env=env)
    assert out.returncode == 0, out.stderr
    assert "warning:" in out.stderr and "epbench-broken" in out.stderr and "no such thing" in out.stderr
    assert "torch-cpu" in out.stdout
    strict = epbench("backends", env={**env, "EPBENCH_STRICT_PLUGINS": "1"})
    assert strict.returncode == 2 and "epbench-broken" in strict.stderr and "Traceback" not in strict.stderr


def test_trace_plugins(tmp_path):
    out = epbench("backends", env={"EPBENCH_TRACE_PLUGINS": "1"})
    assert out.returncode == 0
    assert "[epbench trace]" in out.stderr and "epbench_backends" in out.stderr


def test_suites_lists_bundled():
    out = epbench("suites")
    assert out.returncode == 0
    for name in ("table1", "table3", "table4"):
        assert name in out.stdout


def test_report_on_missing_dir(tmp_path):
    out = epbench("report", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "no such run directory" in out.stderr


def test_bench_writes_timings_and_flops(tmp_path):
    """`epbench bench` on the third-party numpy backend: one row of each metric, FLOPs from
    epbench.flops, a fraction of peak that is GFLOP/s over the measured peak."""
    from epbench import flops
    from epbench.bench import settings
    from epbench.results import read_table

    out = epbench("bench", "-b", "numpy", "-m", "p-1h", "-a", "ep", "--batches", "1", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    (run_dir,) = tmp_path.iterdir()
    df = read_table(run_dir)
    value = {m: df.loc[df.metric == m, "value"].item() for m in df.metric.unique()}
    spec, phase, _ = settings("p-1h")
    assert value["flops_per_batch"] == flops.ep_train_flops(spec, phase, 20)
    assert value["seconds_per_batch"] > 0 and value["seconds_per_sample"] == pytest.approx(value["seconds_per_batch"] / 20)
    assert value["peak_fraction"] == pytest.approx(value["gflops"] / value["peak_gflops"])
    assert "% of" in out.stdout


def test_bench_per_step_times_every_batch_size(tmp_path):
    from epbench.bench import STEP_BATCHES
    from epbench.results import read_table

    # one OpenBLAS thread: on a busy machine a multithreaded product's wake-up stalls can outlast the
    # 400 steps whose time the per-step figure is (a difference of two timings, clipped at 0)
    out = epbench("bench", "-b", "numpy", "-m", "p-1h", "--per-step", "--out", str(tmp_path),
                  env={"OPENBLAS_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    (run_dir,) = tmp_path.iterdir()
    df = read_table(run_dir)
    steps = df[df.metric == "seconds_per_step"]
    assert sorted(steps.batch_size) == sorted(STEP_BATCHES)
    assert (steps.value > 0).all()
    work = df[df.metric == "flops_per_step"].set_index("batch_size").value
    assert work[20] == 20 * work[1] == 20 * 2 * 2 * 512 * 10


def test_bench_per_step_refuses_other_options(tmp_path):
    out = epbench("bench", "--per-step", "--alternate", "--out", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--per-step" in out.stderr
    assert not any(tmp_path.iterdir())


# ----- first contact: data, suites, hints, packaging ---------------------------------------------
def test_data_listing_checks_what_it_reports(tmp_path):
    """`epbench data` on a folder of digits in MNIST format and on a corrupt copy: MNIST is found
    but unverified (not the published files), Fashion-MNIST is refused (digits), a truncated
    file is reported as bad."""
    from test_datasets import digits_set  # tests/ is on sys.path (rootdir-relative imports)

    env = {"EPBENCH_DATA": str(digits_set(tmp_path / "data")), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = epbench("data", env=env)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert lines["mnist"].split()[1] == "unverified" and "look like digits" in lines["mnist"]
    assert "other dataset" in lines["fashion-mnist"] and "not fashion-mnist" in lines["fashion-mnist"]
    assert lines["mnist-5k"].split()[1] == "ok"

    images = tmp_path / "data" / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:1000])
    lines = {line.split()[0]: line for line in epbench("data", env=env).stdout.splitlines()}
    assert lines["mnist"].split()[1] == "bad" and f"{images}: truncated or corrupt" in lines["mnist"]


def test_rich_markup_in_hints_is_shown_as_written(tmp_path):
    """A backend's reason such as pip install 'jax[cuda12]' keeps its brackets (rich markup)."""
    body = FAKE_BACKEND.replace('return Availability(True, "", "fake device 0")',
                                'return Availability(False, "pip install \'fake[cuda12]\' or [bold]x[/bold]")')
    _fake_distribution(tmp_path, "epbench-fake", "epbench_fake_plugin", body)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = epbench("backends", env=env)
    assert out.returncode == 0, out.stderr
    assert "pip install 'fake[cuda12]' or [bold]x[/bold]" in out.stdout


def test_suites_lists_first_sentences_and_shows_one_in_full():
    out = epbench("suites")
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 100
    assert "Table 1 of Ernoult et al. 2019: the Table 4 protocol over 5 trials" in " ".join(out.stdout.split())
    assert "Five trials." not in out.stdout  # the rest of table1's description
    full = epbench("suites", "table1")
    assert full.returncode == 0, full.stderr
    text = " ".join(full.stdout.split())
    assert "Five trials." in text and "p-3h train p 784-512-512-512-10" in text
    verbose = " ".join(epbench("suites", "-v").stdout.split())
    assert "Five trials." in verbose and "table3" in verbose
    unknown = epbench("suites", "table9")
    assert unknown.returncode == 2 and "unknown suite 'table9'" in unknown.stderr


def test_missing_suite_path_hints_at_the_bundled_name(tmp_path):
    """From outside a checkout, suites/table4.yaml does not exist: the error names `epbench run table4`."""
    out = epbench("run", "suites/table4.yaml", cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "no such suite file" in out.stderr and "epbench run table4" in out.stderr
    out = epbench("run", "tablex", cwd=tmp_path)
    assert out.returncode == 2 and "bundled suites: " in out.stderr and "table1, table3" in out.stderr


def test_wheel_ships_the_bundled_suites(tmp_path):
    """A non-editable install gets every suite of suites/ (one copy in the repository: the
    package's suites_data is a link to it)."""
    import shutil
    import zipfile

    assert (ROOT / "epbench" / "suites_data").resolve() == (ROOT / "suites").resolve()
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for part in ("epbench", "backends", "suites"):
        shutil.copytree(ROOT / part, src / part, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("epbench-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {Path(n).name: z.read(n) for n in z.namelist() if n.startswith("epbench/suites_data/")}
    expected = {p.name: p.read_bytes() for p in (ROOT / "suites").glob("*.yaml")}
    assert expected and shipped == expected


def test_compiling_backend_says_so_once_per_shape(tmp_path):
    """jax-cpu compiles per shape: one progress line before the first call of each new shape
    (b repeats a's shape, c has another T); torch-cpu compiles nothing and says nothing."""
    pytest.importorskip("jax")
    exp = "  - {{name: {}, task: gdu, dataset: synthetic, batch_size: 2, " \
          "model: {{kind: p, n_in: 6, hidden: [4], n_out: 3}}, phase: {{T: {}, K: 2, beta: {}}}}}\n"
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nexperiments:\n" + exp.format("a", 5, 0.1) + exp.format("b", 5, 0.2)
                     + exp.format("c", 6, 0.1))
    out = epbench("run", str(suite), "--backend", "jax-cpu", "--no-report", "--out", str(tmp_path / "jax"))
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stderr.splitlines() if line.startswith("compiling")]
    assert notes == ["compiling a for jax-cpu (first run of this shape)…",
                     "compiling c for jax-cpu (first run of this shape)…"]
    out = epbench("run", str(suite), "--no-report", "--out", str(tmp_path / "torch"))
    assert out.returncode == 0, out.stderr
    assert not [line for line in out.stderr.splitlines() if line.startswith("compiling")]


def test_plugins_lists_what_each_plugin_registers():
    """`epbench plugins` names, per plugin, the backends, datasets, algorithms and models it
    registers, then a table of algorithms and one of models."""
    pytest.importorskip("epbench_rbp")
    pytest.importorskip("epbench_lateral")
    out = epbench("plugins")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("epbench-rbp" in line and "algorithms: rbp" in line for line in lines)
    assert any("epbench-lateral" in line and "models: eb-lateral" in line for line in lines)
    assert "model kind" in out.stdout and "eb-lateral" in out.stdout and "fixed-point" in out.stdout
