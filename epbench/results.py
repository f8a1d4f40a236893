"""The results store: one tidy table per run, with provenance on every row.

Each run gets a new directory ``results/<UTC time>-<suite>-<backend>[-n]/`` (names made safe and
short by :func:`safe_name`) holding
``results.parquet`` and ``results.csv.gz`` (the same table; gzip since the process samples make
it long), ``suite.yaml`` (the experiments as run, options and overrides applied), ``meta.json`` (the provenance once more) and, after rendering,
``report.md`` and ``figures/``, and ``cells/`` (each finished cell's rows and record, a
training cell's checkpoint: :mod:`epbench.cells`; the table is assembled from them). Nothing is
ever overwritten; every file is written to a temporary name in the same directory and renamed
into place.

One row = experiment x trial x algorithm x metric x layer (x epoch, x t and unit for
process samples). Columns (see :data:`COLUMNS`):

=================  ==============================================================
experiment         experiment name from the suite
task               ``gdu`` or ``train``
model, model_desc  spec.kind and spec.describe(); activation, dt (the time step ε / leak);
                   hidden (hidden layer sizes, output side first, joined by "-"; pconv:
                   its channels, input side first), n_out (output units: the number of classes)
flavor, dataset    flavour; dataset name (``synthetic`` for the toy model's input)
dtype, T, K, beta  phase settings; ``symmetric`` (bool) for ±β nudging, ``alternate`` (bool)
                   for the even/odd alternation of P training
epochs, batch_size training settings / GDU batch size; lrs: learning rates, input side
                   first, joined by "-" (Table 4 order)
trial, seed        trial index and the seed of its initial parameters and data
algorithm          a registered algorithm's name (``ep``, ``bptt``, a plugin's), or
                   ``<name>_vs_bptt`` for the GDU rows comparing its processes with BPTT's
metric             gdu: ``relmse``, ``sign_agreement``, ``sign_both_zero``, ``cosine``
                   (``<name>_vs_bptt``: the algorithm's processes against BPTT's times the
                   algorithm's sign, −∇BPTT for EP); ``convergence`` (the first compared
                   algorithm, layer ``all``: the first phase shared by all); ``process``
                   (each algorithm's process, e.g. ep: ΔEP(t), and bptt: ∇BPTT(t) times the
                   first compared algorithm's sign, −∇BPTT(t) beside EP, for a few units,
                   with ``t`` and ``unit``).
                   train: ``train_error``, ``test_error`` (%), ``diverged`` (0/1),
                   ``epoch_time_s``.
layer              ``s0``, ``s1``, ... (neurons) or ``W01``, ``b0``, ... (parameters)
quantity           ``neurons``, ``weights`` or ``""``
epoch, t, unit     integers, -1 where not applicable
value              float
status             the verdict on the measurement: ``ok``; training (per trial x algorithm,
                   after its last epoch, see :mod:`epbench.runner`): ``diverged`` (NaN/inf),
                   ``exploded`` (a parameter beyond the runner's limit), ``chance`` (test
                   error at chance level); GDU: ``diverged`` if a metric is NaN/inf
compile_s, run_s   backend timings of the measurement (compile excluded from run; a GDU
                   measurement under 0.5 s is run up to 5 times and run_s is the fastest)
provenance         run_id, epbench_version, git_commit, git_dirty, suite, suite_hash,
                   backend, framework, framework_version, device, start_time;
                   implementation (how the backend ran the experiment, its
                   ``pop_implementation()``: e.g. ``xla-loop`` or ``fused-cpp`` on jax-cpu);
                   cpu_model, cpu_flags (vector extensions), gpu_name, gpu_driver,
                   cuda_version (empty off a GPU): :mod:`epbench.hardware`;
                   wall_time_s (of the row's cell: experiment x trial, x algorithm for
                   training; a resumed cell's includes its earlier attempts' epochs)
cell               the key of the row's cell (:mod:`epbench.cells`): SHA-256 of its settings
=================  ==============================================================
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

from epbench.errors import EpbenchError

COLUMNS = [
    "run_id", "experiment", "task", "model", "model_desc", "hidden", "n_out", "activation", "dt", "flavor", "dataset", "dtype",
    "T", "K", "beta", "symmetric", "alternate", "lrs", "epochs", "batch_size", "trial", "seed", "algorithm",
    "metric", "layer", "quantity", "epoch", "t", "unit", "value", "status", "compile_s", "run_s", "wall_time_s",
    "epbench_version", "git_commit", "git_dirty", "suite", "suite_hash", "backend", "framework",
    "framework_version", "device", "implementation", "cpu_model", "cpu_flags", "gpu_name", "gpu_driver",
    "cuda_version", "start_time", "cell",
]
#: the algorithm every other one's GDU processes are compared with
REFERENCE = "bptt"
#: how the ``algorithm`` column names the rows comparing an algorithm's processes with BPTT's
COMPARISON_SUFFIX = f"_vs_{REFERENCE}"


def comparison_name(algorithm: str) -> str:
    """``algorithm`` of the GDU rows comparing ``algorithm``'s processes with BPTT's (``ep_vs_bptt``)."""
    return algorithm + COMPARISON_SUFFIX


def compared_algorithm(name: str) -> str | None:
    """The algorithm of a comparison row's ``algorithm`` value (``ep_vs_bptt`` → ``ep``), else None."""
    name = str(name)
    return name[:-len(COMPARISON_SUFFIX)] if name.endswith(COMPARISON_SUFFIX) else None


def algorithms_in(df: pd.DataFrame, comparisons: bool = False) -> list[str]:
    """The algorithms of a table in order of first appearance: those with rows of their own
    (``comparisons=False``), or those compared with BPTT in GDU rows (``comparisons=True``)."""
    if "algorithm" not in df or df.empty:
        return []
    names = dict.fromkeys(str(a) for a in df["algorithm"])
    if comparisons:
        return [a for a in (compared_algorithm(n) for n in names) if a]
    return [n for n in names if n and compared_algorithm(n) is None]


def algorithm_label(name: str) -> str:
    """How reports write an algorithm: its name in capitals (``ep`` → EP, ``bptt`` → BPTT)."""
    return str(name).upper()


INT_COLUMNS = ["n_out", "T", "K", "epochs", "batch_size", "trial", "seed", "epoch", "t", "unit"]

TABLE_PARQUET = "results.parquet"
TABLE_CSV = "results.csv.gz"
TABLE_CSV_PLAIN = "results.csv"


def git_provenance(path: str | os.PathLike | None = None) -> tuple[str, bool]:
    """(commit, dirty) of the checkout containing ``path`` (the package by default)."""
    where = Path(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename. An OSError names
    ``path`` (not the temporary file)."""
    try:
        _atomic_write_bytes(path, data)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


#: longest name :func:`safe_name` returns: with a prefix (``theorem1-``, the run directory's time
#: stamp), the extension and the temporary suffix of an atomic write, a file name stays far below
#: the 255 bytes that common filesystems allow
SAFE_NAME_MAX = 64


def safe_name(text: str, max_len: int = SAFE_NAME_MAX, default: str = "x") -> str:
    """A file-name-safe form of ``text``: runs of characters other than ``A-Za-z0-9_.-``
    become ``-``; a result longer than ``max_len`` keeps its first ``max_len - 9`` characters
    and ends with ``-`` and 8 hex digits of the SHA-1 of ``text``, so distinct long names stay
    distinct. The table keeps the real names; only file names use this."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-.") or default
    if len(slug) <= max_len:
        return slug
    digest = hashlib.sha1(str(text).encode("utf-8")).hexdigest()[:8]
    return f"{slug[: max_len - 9].rstrip('-.')}-{digest}"


def fs_error(path: str | os.PathLike, exc: OSError, doing: str = "cannot write") -> EpbenchError:
    """One line for a filesystem error: the path and the cause (``No space left on device``,
    ``Read-only file system``, ``Permission denied``, ``File name too long``...)."""
    cause = exc.strerror or str(exc)
    where = exc.filename if isinstance(exc.filename, str) and exc.filename else os.fspath(path)
    return EpbenchError(f"{where}: {doing}: {cause}")


#: bytes per table row allowed for when estimating a run's output (measured: 23 bytes per row for
#: parquet and csv.gz together on the bundled table3 suite; a fresh copy is written beside the old
#: one at each update, and each row is in its cell's parquet file too: room for two and a half)
BYTES_PER_ROW = 64
#: bytes allowed per figure (PNG, and SVG with --svg: the largest measured pair, P-3h's GDU
#: processes, is 0.9 MB)
BYTES_PER_FIGURE = 1 << 20


def check_output_dir(root: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Make sure run directories can be created under ``root`` before any work starts: ``root``
    exists or can be created, a file can be created in it (a probe, since permissions alone
    miss read-only mounts, and root ignores them), and it has ``need_bytes`` free. Raises
    :class:`EpbenchError` naming the path and the cause."""
    root = Path(root)
    made = [p for p in (root, *root.absolute().parents) if not p.exists()]  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".epbench-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise fs_error(root, exc, "--out: cannot write there") from None
    free = shutil.disk_usage(root).free
    if need_bytes and free < need_bytes:
        for folder in made:  # leave nothing behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise EpbenchError(f"{root}: --out: not enough free space: {free / 1e6:.1f} MB free, the run needs "
                           f"about {need_bytes / 1e6:.1f} MB")
    return root


def new_run_dir(root: str | os.PathLike, suite: str, backend: str) -> Path:
    """Create and return a new, empty run directory under ``root`` (never reuses one)."""
    root = Path(root)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{stamp}-{safe_name(suite, default='run')}-{safe_name(backend, default='run')}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            candidate = root / (base if n == 0 else f"{base}-{n}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as exc:
        raise fs_error(root, exc, "cannot create the run directory") from None
    raise EpbenchError(f"{root}: 1000 run directories named {base}[-n] exist already")


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows → the canonical table (all columns, fixed order, integer columns as int64)."""
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = -1 if column in INT_COLUMNS else ("" if column not in ("value",) else float("nan"))
    frame = frame[COLUMNS]
    for column in INT_COLUMNS:
        frame[column] = frame[column].fillna(-1).astype("int64")
    for column in ("value", "compile_s", "run_s", "wall_time_s", "beta", "dt"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in ("symmetric", "alternate"):
        frame[column] = frame[column].replace("", False).astype(bool)
    frame["git_dirty"] = frame["git_dirty"].replace("", False).astype(bool)
    for column in COLUMNS:
        if frame[column].dtype == object:
            frame[column] = frame[column].astype(str)
    return frame


def write_table(run_dir: Path, frame: pd.DataFrame) -> None:
    """Write the table as parquet and gzipped CSV, atomically."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(run_dir / TABLE_PARQUET, buffer.getvalue())
    csv = io.BytesIO()
    frame.to_csv(csv, index=False, compression={"method": "gzip", "mtime": 0})
    atomic_write_bytes(run_dir / TABLE_CSV, csv.getvalue())


def read_table(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The results table of a run directory (parquet, or CSV if parquet is missing)."""
    run_dir = Path(run_dir)
    frame = None
    if (run_dir / TABLE_PARQUET).exists():
        frame = pd.read_parquet(run_dir / TABLE_PARQUET)
    else:
        for name in (TABLE_CSV, TABLE_CSV_PLAIN):
            if (run_dir / name).exists():
                frame = pd.read_csv(run_dir / name)
                break
    if frame is None:
        raise FileNotFoundError(f"{run_dir} holds no {TABLE_PARQUET} or {TABLE_CSV}")
    if "alternate" not in frame:  # tables written before the column existed
        frame.insert(frame.columns.get_loc("symmetric") + 1 if "symmetric" in frame else len(frame.columns),
                     "alternate", False)
    if "n_out" not in frame or "hidden" not in frame:  # tables written before the columns existed
        at = frame.columns.get_loc("model_desc") + 1 if "model_desc" in frame else len(frame.columns)
        arch = [legacy_architecture(d) for d in (frame["model_desc"] if "model_desc" in frame else [""] * len(frame))]
        if "n_out" not in frame:
            frame.insert(at, "n_out", [n for _, n in arch])
        if "hidden" not in frame:
            frame.insert(at, "hidden", [h for h, _ in arch])
    if "status" not in frame:  # tables written before the column existed: no verdict recorded
        frame.insert(frame.columns.get_loc("value") + 1 if "value" in frame else len(frame.columns), "status", "")
    frame["status"] = ["" if pd.isna(v) else str(v) for v in frame["status"]]
    return frame


def legacy_architecture(model_desc) -> tuple[str, int]:
    """(hidden, n_out) of a table written before those columns, from its ``model_desc``
    ('p 784-512-10 ...': hidden '512', n_out 10; pconv: the channels, n_out 10)."""
    parts = str(model_desc).split()
    if len(parts) > 2 and parts[0] == "pconv" and parts[1] == "conv":
        return parts[2], 10
    sizes = parts[1].split("-") if len(parts) > 1 else []
    if len(sizes) < 2 or not all(v.isdigit() for v in sizes):
        return "", 10
    return "-".join(reversed(sizes[1:-1])), int(sizes[-1])


def has_table(run_dir: str | os.PathLike) -> bool:
    return any((Path(run_dir) / name).exists() for name in (TABLE_PARQUET, TABLE_CSV, TABLE_CSV_PLAIN))


def write_meta(run_dir: Path, meta: dict) -> None:
    atomic_write_text(run_dir / "meta.json", json.dumps(meta, indent=2, sort_keys=True, default=str))


# ----- run status ----------------------------------------------------------------------------
#: ``status`` in meta.json: "running" while the process works, then "complete", "interrupted"
#: (SIGINT/SIGTERM, or found later with its process gone) or "failed" (an error stopped it)
RUNNING, COMPLETE, INTERRUPTED, FAILED = "running", "complete", "interrupted", "failed"


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (Linux /proc; "" elsewhere):
    with the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("utf-8", "replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_process() -> dict:
    """What meta.json records to tell later whether the run's process still exists:
    ``pid``, ``hostname`` and ``pid_start`` (see :func:`_process_start`)."""
    return {"pid": os.getpid(), "hostname": socket.gethostname(), "pid_start": _process_start(os.getpid())}


def process_gone(meta: dict) -> bool:
    """True when the process that wrote a "running" meta.json no longer exists: same host, and
    its pid is free or now belongs to a process started at another time. A run on another host
    (or with no pid recorded) cannot be checked: False."""
    pid, host = meta.get("pid"), meta.get("hostname")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        pass
    recorded, now = meta.get("pid_start", ""), _process_start(pid)
    return bool(recorded and now and recorded != now)


def read_meta(run_dir: str | os.PathLike) -> dict:
    """meta.json of a run directory ({} if absent). A "running" status whose process is gone
    (:func:`process_gone`) reads as "interrupted", with ``status_detail`` saying why."""
    path = Path(run_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as exc:
        raise EpbenchError(f"{path}: unreadable meta.json ({exc})") from None
    if meta.get("status") == RUNNING and process_gone(meta):
        meta["status"] = INTERRUPTED
        meta["status_detail"] = (f"process {meta['pid']} on {meta['hostname']} ended without recording how "
                                 "(killed, or the disk filled up)")
    return meta


def settle_status(run_dir: str | os.PathLike) -> dict:
    """:func:`read_meta`, and if it found a "running" run whose process is gone, write the
    corrected status back to meta.json (when the directory is writable; otherwise only the
    reader sees it). Returns the meta."""
    meta = read_meta(run_dir)
    if meta.get("status_detail") and meta.get("status") == INTERRUPTED and "finished" not in meta:
        try:
            write_meta(Path(run_dir), {**meta, "finished": "unknown"})
        except OSError:
            pass
    return meta


def settle_stale_runs(root: str | os.PathLike) -> list[Path]:
    """Settle the status (:func:`settle_status`) of every run directory directly under ``root``
    whose meta.json says "running"; returns those found interrupted."""
    found = []
    root = Path(root)
    if not root.is_dir():
        return found
    for meta_path in sorted(root.glob("*/meta.json")):
        try:
            if '"running"' not in meta_path.read_text():
                continue
            if settle_status(meta_path.parent).get("status") == INTERRUPTED:
                found.append(meta_path.parent)
        except (OSError, EpbenchError):
            continue
    return found
