"""`epbench run` under bad input and faults, through the real command line: everything is checked
before the run directory exists; a run's status in meta.json is always true (SIGINT, SIGTERM,
SIGKILL, a full disk); filesystem errors are one line naming the path and the cause; duplicate
experiment names are refused; trials that diverge, explode or stay at chance level are flagged.

In-process runs go through :func:`epbench.cli.main` (the console script's entry point: the
one-line errors and exit codes); signals need a real child process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from epbench.cli import main
from epbench.datasets.idx import write_idx

ROOT = Path(__file__).resolve().parents[1]

GDU = """
  - name: {name}
    task: gdu
    dataset: {dataset}
    batch_size: 4
    model: {{kind: p, hidden: [8], activation: tanh, dt: 1.0}}
    phase: {{T: 12, K: 4, beta: 0.01, dtype: float64}}
"""
TRAIN = """
  - name: {name}
    task: train
    dataset: mnist-5k
    n_train: {n_train}
    n_test: 200
    model: {{kind: p, hidden: [32], activation: sigmoid, dt: 1.0}}
    phase: {{T: 20, K: 6, beta: 0.1}}
    train: {{epochs: {epochs}, lrs: [{lr1}, {lr2}]}}
"""


@pytest.fixture(autouse=True)
def no_user_data(tmp_path, monkeypatch):
    """Datasets are looked for only where a test puts them (not in the user's cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("EPBENCH_DATA", raising=False)


def suite_file(tmp_path: Path, *experiments: str, name: str = "hostile") -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(f"name: {name}\nexperiments:\n" + "".join(experiments))
    return path


def gdu(name: str = "gdu-a", dataset: str = "mnist-5k") -> str:
    return GDU.format(name=name, dataset=dataset)


def train(name: str = "p-1h", epochs: int = 1, lrs=(0.08, 0.04), n_train: int = 300) -> str:
    return TRAIN.format(name=name, epochs=epochs, lr1=lrs[0], lr2=lrs[1], n_train=n_train)


def run_main(capsys, *args: str) -> tuple[int, str, list[str]]:
    """(exit status, stdout, non-empty stderr lines) of ``epbench ARGS`` run in this process."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.exists() else []


def meta_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "meta.json").read_text())


def assert_one_error(rc: int, lines: list[str], *fragments: str) -> None:
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ----- 1. validate before creating anything ---------------------------------------------------------
def _idx_files(folder: Path, n_train: int = 12, n_test: int = 6, gz: bool = False) -> dict[str, Path]:
    """Four sound MNIST-style IDX files of random images."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    paths = {}
    for part, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        paths[f"{part}_images"] = Path(write_idx(str(folder / f"{prefix}-images-idx3-ubyte{suffix}"),
                                                 rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        paths[f"{part}_labels"] = Path(write_idx(str(folder / f"{prefix}-labels-idx1-ubyte{suffix}"),
                                                 (np.arange(n) % 10).astype(np.uint8)))
    return paths


def _bad_magic(folder):
    path = _idx_files(folder)["train_images"]
    data = bytearray(path.read_bytes())
    data[2:4] = b"\x42\x42"
    path.write_bytes(bytes(data))
    return path.name


def _truncated_payload(folder):
    path = _idx_files(folder)["train_images"]
    path.write_bytes(path.read_bytes()[:-100])
    return path.name


def _truncated_header(folder):
    path = _idx_files(folder)["train_images"]
    path.write_bytes(path.read_bytes()[:9])
    return path.name


def _zero_bytes(folder):
    path = _idx_files(folder)["train_labels"]
    path.write_bytes(b"")
    return path.name


def _wrong_image_size(folder):
    path = _idx_files(folder)["test_images"]
    write_idx(str(path), np.zeros((6, 27, 27), dtype=np.uint8))
    return path.name


def _label_200(folder):
    path = _idx_files(folder)["train_labels"]
    write_idx(str(path), np.full(12, 200, dtype=np.uint8))
    return path.name


def _count_mismatch(folder):
    path = _idx_files(folder)["train_labels"]
    write_idx(str(path), np.zeros(11, dtype=np.uint8))
    return path.name


def _truncated_gz(folder):
    path = _idx_files(folder, gz=True)["train_images"]
    path.write_bytes(path.read_bytes()[:-30])
    return path.name


def _not_gzip(folder):
    path = _idx_files(folder, gz=True)["test_labels"]
    path.write_bytes(b"this is not gzip data at all")
    return path.name


def _empty_folder(folder):
    folder.mkdir()
    return str(folder)


def _zero_samples(folder):
    _idx_files(folder, n_train=0)
    return "training images"


DATASET_FAULTS = {f.__name__.lstrip("_"): f for f in (
    _bad_magic, _truncated_payload, _truncated_header, _zero_bytes, _wrong_image_size, _label_200,
    _count_mismatch, _truncated_gz, _not_gzip, _empty_folder, _zero_samples)}


@pytest.mark.parametrize("fault", sorted(DATASET_FAULTS))
def test_dataset_fault_stops_before_the_run_directory(tmp_path, capsys, fault):
    data = tmp_path / "data"
    expected = DATASET_FAULTS[fault](data)
    suite = suite_file(tmp_path, gdu(dataset="mnist"))
    out = tmp_path / "results"
    rc, _, lines = run_main(capsys, "run", str(suite), "--data-dir", str(data), "--out", str(out))
    assert_one_error(rc, lines, expected)
    assert not out.exists()  # nothing created


def test_missing_data_dir_stops_before_the_run_directory(tmp_path, capsys):
    suite = suite_file(tmp_path, gdu(dataset="mnist"))
    out = tmp_path / "results"
    rc, _, lines = run_main(capsys, "run", str(suite), "--data-dir", str(tmp_path / "nowhere"), "--out", str(out))
    assert_one_error(rc, lines, str(tmp_path / "nowhere"))
    assert not out.exists()  # nothing created


@pytest.mark.parametrize("model, expected", [
    ("{kind: p, hidden: [8], n_in: 100}", "fits: model.n_in is 100 but the images of dataset mnist-5k"),
    ("{kind: p, hidden: [8], n_out: 5}", "has label 9 but the model has 5 outputs"),
])
def test_experiment_that_does_not_fit_its_data(tmp_path, capsys, model, expected):
    text = gdu("fits").replace("{kind: p, hidden: [8], activation: tanh, dt: 1.0}", model)
    suite = suite_file(tmp_path, gdu("first"), text)
    out = tmp_path / "results"
    rc, _, lines = run_main(capsys, "run", str(suite), "--out", str(out))
    assert_one_error(rc, lines, "error: fits: ", expected)
    assert not out.exists()  # nothing created


def test_unavailable_backend_stops_before_the_run_directory(tmp_path, capsys):
    from epbench.plugins import registry

    missing = [name for name, b in sorted(registry().backends.items()) if not b.availability(probe=True).ok]
    if not missing:
        pytest.skip("every registered backend is available here")
    out = tmp_path / "results"
    rc, _, lines = run_main(capsys, "run", str(suite_file(tmp_path, gdu())), "-b", missing[0], "--out", str(out))
    assert_one_error(rc, lines, f"backend '{missing[0]}' is not available: ")
    assert not out.exists()


# ----- 4. duplicate names ------------------------------------------------------------------------
def test_duplicate_experiment_names_are_refused(tmp_path, capsys):
    suite = suite_file(tmp_path, gdu("a"), gdu("p-1h"), gdu("b"), gdu("c"), gdu("p-1h"))
    out = tmp_path / "results"
    rc, _, lines = run_main(capsys, "run", str(suite), "--out", str(out))
    assert_one_error(rc, lines, str(suite), "experiments 2 and 5 are both named 'p-1h'")
    assert not out.exists()


# ----- 3. filesystem errors ----------------------------------------------------------------------
def _mount_tmpfs(target: Path, options: str) -> bool:
    target.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for target in made:
        subprocess.run(["umount", str(target)], capture_output=True)


def test_read_only_out(tmp_path, capsys, mounts):
    target = tmp_path / "ro"
    if _mount_tmpfs(target, "ro,size=1m"):
        mounts.append(target)
    elif os.geteuid() != 0:
        target.chmod(0o555)
    else:
        pytest.skip("running as root without the right to mount: a directory cannot be made read-only")
    suite = suite_file(tmp_path, gdu())
    out = target / "results"
    rc, _, lines = run_main(capsys, "run", str(suite), "--out", str(out))
    assert_one_error(rc, lines, str(out), "--out: cannot write there")
    assert "Read-only file system" in lines[0] or "Permission denied" in lines[0]
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="Linux /proc and /sys")
@pytest.mark.parametrize("where", ["/proc/epbench-results", "/sys/epbench-results"])
def test_out_under_proc_or_sys(tmp_path, capsys, where):
    rc, _, lines = run_main(capsys, "run", str(suite_file(tmp_path, gdu())), "--out", where)
    assert_one_error(rc, lines, where, "--out: cannot write there")
    assert not Path(where).exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="Linux /proc")
def test_bench_out_is_checked_before_timing(capsys):
    rc, _, lines = run_main(capsys, "bench", "-b", "numpy", "-m", "p-1h", "--out", "/proc/epbench-bench")
    assert_one_error(rc, lines, "/proc/epbench-bench: --out: cannot write there")
    assert not any("p-1h" in line for line in lines)  # no timing line came before


def test_not_enough_space_is_refused_before_the_run(tmp_path, capsys, mounts):
    target = tmp_path / "small"
    if not _mount_tmpfs(target, "size=256k"):
        pytest.skip("cannot mount a small tmpfs here")
    mounts.append(target)
    suite = suite_file(tmp_path, gdu(), train())
    out = target / "new" / "results"
    rc, _, lines = run_main(capsys, "run", str(suite), "--out", str(out))
    assert_one_error(rc, lines, str(out), "not enough free space", "MB free, the run needs about")
    assert list(target.iterdir()) == []  # the folders --out named are not left behind


def _disk_full_for(monkeypatch, is_full) -> None:
    """Simulated ENOSPC: every atomic write of a file for which ``is_full(path)`` fails."""
    import epbench.results as results

    real = results.atomic_write_bytes

    def write(path, data):
        if is_full(path):
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(results, "atomic_write_bytes", write)


@pytest.mark.parametrize("meta_writable", [True, False])
def test_disk_full_during_the_run(tmp_path, capsys, monkeypatch, meta_writable):
    """ENOSPC on the first results table (simulated: the disk cannot be filled at that moment
    from outside): one line naming the file and the cause, and a run directory that says so:
    "failed" if meta.json can still be written, else "running" until this process ends, which
    later commands then read as interrupted."""
    import epbench.results as results

    full = []

    def disk_full_for(path):
        if path.name == results.TABLE_PARQUET or (full and not meta_writable):
            full.append(path.name)
            return True
        return False

    _disk_full_for(monkeypatch, disk_full_for)
    out = tmp_path / "results"
    rc, _, lines = run_main(capsys, "-q", "run", str(suite_file(tmp_path, gdu())), "--out", str(out))
    (run_dir,) = run_dirs(out)
    assert_one_error(rc, lines, f"{run_dir / 'results.parquet'}: cannot write: No space left on device",
                     f"(run directory {run_dir}: ", "re-run the same command")
    meta = meta_of(run_dir)
    if meta_writable:
        assert "status failed, the 0 rows" in lines[0] and meta["rows"] == 0
        assert meta["status"] == "failed" and meta["error"] == "No space left on device"
    else:
        assert "meta.json could not be updated and says 'running', which reads as interrupted" in lines[0]
        assert meta["status"] == "running" and "meta.json" in full


def test_disk_full_while_writing_the_report(tmp_path, capsys, monkeypatch):
    """The results are complete and say so; the report could not be written (simulated ENOSPC)."""
    _disk_full_for(monkeypatch, lambda path: path.name == "report.md")
    out = tmp_path / "results"
    rc, _, lines = run_main(capsys, "-q", "run", str(suite_file(tmp_path, gdu())), "--out", str(out))
    (run_dir,) = run_dirs(out)
    assert_one_error(rc, lines, f"{run_dir / 'report.md'}: cannot write the report: No space left on device",
                     f"run directory {run_dir}: status complete; `epbench report {run_dir}` renders")
    assert meta_of(run_dir)["status"] == "complete"


def test_report_and_compare_into_places_they_cannot_write(tmp_path, capsys, mounts):
    target = tmp_path / "ro"
    if not _mount_tmpfs(target, "size=8m"):
        pytest.skip("cannot mount a tmpfs here")
    mounts.append(target)
    rc, stdout, lines = run_main(capsys, "-q", "run", str(suite_file(tmp_path, gdu())), "--out", str(target),
                                 "--no-report")
    assert rc == 0, lines
    run_dir = Path(stdout.strip())
    assert subprocess.run(["mount", "-o", "remount,ro", str(target)]).returncode == 0
    rc, _, lines = run_main(capsys, "report", str(run_dir))
    assert_one_error(rc, lines, str(run_dir), "cannot write the report: Read-only file system")
    rc, _, lines = run_main(capsys, "compare", str(run_dir), str(run_dir), "--out", str(target / "c.md"))
    assert_one_error(rc, lines, f"{target / 'c.md'}: --out: cannot write: Read-only file system")


def test_long_names_are_shortened_for_files_only(tmp_path, capsys):
    long_a, long_b = "g" * 240 + "-a", "g" * 240 + "-b"
    suite = suite_file(tmp_path, gdu(long_a), gdu(long_b), name="s" * 300)
    out = tmp_path / "results"
    rc, stdout, lines = run_main(capsys, "-q", "run", str(suite), "--out", str(out))
    assert rc == 0, lines
    (run_dir,) = run_dirs(out)
    assert len(run_dir.name) < 100 and stdout.strip() == str(run_dir)
    figures = sorted(p.name for p in (run_dir / "figures").iterdir())
    assert len({Path(f).stem for f in figures if f.startswith("process-")}) == 2  # one per experiment
    assert max(len(f) for f in figures) < 100
    table = pd.read_parquet(run_dir / "results.parquet")
    assert set(table["experiment"]) == {long_a, long_b} and (table["suite"] == "s" * 300).all()
    assert long_a in (run_dir / "report.md").read_text()


# ----- 2. the run's status is always true; 6. the run directory is printed ---------------------------
def _start_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A child `epbench run` of a quick GDU experiment and a long training, stopped once the
    GDU rows are written. Returns the process and the run directory (printed first)."""
    suite = suite_file(tmp_path, gdu(), train("long-train", epochs=1000, n_train=1000))
    proc = subprocess.Popen([sys.executable, "-m", "epbench.cli", "run", str(suite), "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = proc.stderr.readline()
    assert first.startswith("run directory: "), first
    run_dir = Path(first.removeprefix("run directory: ").strip())
    for line in proc.stderr:  # wait for the GDU experiment's rows (written before this line)
        if line.startswith("gdu-a trial 1 done"):
            break
    else:
        pytest.fail(f"run ended early: {proc.wait()}")
    return proc, run_dir


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_run_truthfully(tmp_path, signum, code):
    proc, run_dir = _start_run(tmp_path)
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == code
    last = [line for line in rest.splitlines() if line.strip()][-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"interrupted ({name}): run directory {run_dir}"), last
    assert "re-run the same command" in last and "Traceback" not in rest
    meta = meta_of(run_dir)
    assert meta["status"] == "interrupted" and meta["signal"] == name and meta["pid"] == proc.pid
    table = pd.read_parquet(run_dir / "results.parquet")
    assert set(table["experiment"]) == {"gdu-a"} and meta["rows"] == len(table)


def test_signal_while_the_end_is_recorded_comes_after_it():
    """A second Ctrl-C while a run records its end is held until the record is written."""
    from epbench.runner import signals_held

    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            signal.raise_signal(signal.SIGINT)  # in this thread, before it returns
            done.append("recorded")
    assert done == ["recorded"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_killed_run_reads_as_interrupted(tmp_path, capsys):
    proc, run_dir = _start_run(tmp_path)
    proc.kill()
    proc.communicate(timeout=300)
    assert meta_of(run_dir)["status"] == "running"  # nothing could record the end

    rc, stdout, lines = run_main(capsys, "report", str(run_dir))
    assert rc == 0 and stdout.strip() == str(run_dir / "report.md")
    assert lines == [f"warning: {run_dir}: run interrupted (process {proc.pid} on {meta_of(run_dir)['hostname']} "
                     "ended without recording how (killed, or the disk filled up)); the report shows the "
                     "experiments that finished"]
    assert meta_of(run_dir)["status"] == "interrupted"  # written back
    assert "| **status** | interrupted: process" in (run_dir / "report.md").read_text()

    rc, _, lines = run_main(capsys, "compare", str(run_dir), str(run_dir))
    assert rc == 0 and lines[0].startswith(f"warning: {run_dir}: run interrupted")


def test_new_run_settles_a_killed_run_in_the_same_out(tmp_path, capsys):
    proc, run_dir = _start_run(tmp_path)
    proc.kill()
    proc.communicate(timeout=300)
    rc, _, lines = run_main(capsys, "run", str(suite_file(tmp_path, gdu())), "--out", str(tmp_path / "out"),
                            "--no-report")
    assert rc == 0, lines
    assert f"note: {run_dir}: its process ended without finishing; status now 'interrupted'" in lines
    assert meta_of(run_dir)["status"] == "interrupted"


# ----- 5. divergence and stalls ----------------------------------------------------------------------
def test_exploding_and_chance_level_trials_are_flagged(tmp_path, capsys):
    """P-1h-like training at the Table 4 rates and at 1000x those rates: the first is ok, the
    second is flagged in the table and, in bold with its rule, in the report; the settings table
    names the learning rates that differ from Table 4."""
    suite = suite_file(tmp_path, train("p-1h"), train("p-1h-x1000", lrs=(80, 40)))
    out = tmp_path / "results"
    rc, stdout, lines = run_main(capsys, "run", str(suite), "--out", str(out), "--backend", "numpy")
    assert rc == 0, lines
    run_dir = Path(stdout.strip().splitlines()[-1])
    table = pd.read_parquet(run_dir / "results.parquet")
    status = table.groupby(["experiment", "algorithm"])["status"].agg(set)
    assert status["p-1h", "ep"] == {"ok"} and status["p-1h", "bptt"] == {"ok"}
    assert status["p-1h-x1000", "ep"] <= {"exploded", "chance"} and status["p-1h-x1000", "ep"]
    flagged = {s for (exp, _), st in status.items() if exp == "p-1h-x1000" for s in st}
    assert any(line.startswith("warning: p-1h-x1000 trial 1 ") for line in lines)
    report = (run_dir / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| p-1h-x1000 | 1 |"))
    assert "**EP: 1 " in row
    assert "**chance**: final test error ≥ 85 %" in report or "**exploded**: a parameter grew" in report
    for flag in flagged:
        assert f"**{flag}**:" in report
    settings = next(line for line in report.splitlines() if line.startswith("| p-1h-x1000 | paper |"))
    assert "learning rates 80-40 (paper 0.08-0.04)" in settings
    ok_settings = next(line for line in report.splitlines() if line.startswith("| p-1h | paper |"))
    assert "learning rates" not in ok_settings.split("|")[-2]
