"""The results store: one tidy table per run, with provenance on every row.

Each run gets a new directory ``results/<UTC time>-<suite>-<backend>[-n]/`` holding
``results.parquet`` and ``results.csv.gz`` (the same table; gzip since the process samples make
it long), ``suite.yaml`` (the experiments as run, options and overrides applied), ``meta.json`` (the provenance once more) and, after rendering,
``report.md`` and ``figures/``. Nothing is ever overwritten; every file is written to a
temporary name in the same directory and renamed into place.

One row = experiment x trial x algorithm x metric x layer (x epoch, x t and unit for
process samples). Columns (see :data:`COLUMNS`):

=================  ==============================================================
experiment         experiment name from the suite
task               ``gdu`` or ``train``
model, model_desc  spec.kind and spec.describe(); activation, dt (the time step ε / leak)
flavor, dataset    flavour; dataset name (``synthetic`` for the toy model's input)
dtype, T, K, beta  phase settings; ``symmetric`` (bool) for ±β nudging, ``alternate`` (bool)
                   for the even/odd alternation of P training
epochs, batch_size training settings / GDU batch size; lrs: learning rates, input side
                   first, joined by "-" (Table 4 order)
trial, seed        trial index and the seed of its initial parameters and data
algorithm          ``ep``, ``bptt`` or ``ep_vs_bptt``
metric             gdu: ``relmse``, ``sign_agreement``, ``sign_both_zero``, ``cosine``
                   (ep_vs_bptt); ``convergence`` (ep, layer ``all``); ``process``
                   (ep: ΔEP(t), bptt: −∇BPTT(t) for a few units, with ``t`` and ``unit``).
                   train: ``train_error``, ``test_error`` (%), ``diverged`` (0/1),
                   ``epoch_time_s``.
layer              ``s0``, ``s1``, ... (neurons) or ``W01``, ``b0``, ... (parameters)
quantity           ``neurons``, ``weights`` or ``""``
epoch, t, unit     integers, -1 where not applicable
value              float
compile_s, run_s   backend timings of the measurement (compile excluded from run; a GDU
                   measurement under 0.5 s is run up to 5 times and run_s is the fastest)
provenance         run_id, epbench_version, git_commit, git_dirty, suite, suite_hash,
                   backend, framework, framework_version, device, start_time,
                   wall_time_s (of the whole experiment x trial; the trials of a training
                   experiment run together, each gets an equal share, as does epoch_time_s)
=================  ==============================================================
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

COLUMNS = [
    "run_id", "experiment", "task", "model", "model_desc", "activation", "dt", "flavor", "dataset", "dtype",
    "T", "K", "beta", "symmetric", "alternate", "lrs", "epochs", "batch_size", "trial", "seed", "algorithm",
    "metric", "layer", "quantity", "epoch", "t", "unit", "value", "compile_s", "run_s", "wall_time_s",
    "epbench_version", "git_commit", "git_dirty", "suite", "suite_hash", "backend", "framework",
    "framework_version", "device", "start_time",
]
INT_COLUMNS = ["T", "K", "epochs", "batch_size", "trial", "seed", "epoch", "t", "unit"]

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
    """Write ``data`` to ``path`` through a temporary file and a rename."""
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def new_run_dir(root: str | os.PathLike, suite: str, backend: str) -> Path:
    """Create and return a new, empty run directory under ``root`` (never reuses one)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{stamp}-{_slug(suite)}-{_slug(backend)}"
    for n in range(1000):
        candidate = root / (base if n == 0 else f"{base}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {root}")


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
    return frame


def has_table(run_dir: str | os.PathLike) -> bool:
    return any((Path(run_dir) / name).exists() for name in (TABLE_PARQUET, TABLE_CSV, TABLE_CSV_PLAIN))


def write_meta(run_dir: Path, meta: dict) -> None:
    atomic_write_text(run_dir / "meta.json", json.dumps(meta, indent=2, sort_keys=True, default=str))


def read_meta(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}
