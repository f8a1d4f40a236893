"""Cells: the unit of work of a run, each cached on disk the moment it finishes.

A run is a list of cells: a GDU experiment × trial, a training experiment × trial × algorithm.
Each has a stable key (:func:`cell_key`: the SHA-256 of everything its rows depend on: the
experiment's settings, the trial and seed, the algorithm, the data's identity and the backend),
and lives in ``RUN_DIR/cells/``:

=====================  ===========================================================================
``plan.json``          the run's cells in order (key, experiment, trial, algorithm) and its suite hash
``<key>.parquet``      the cell's rows (the results table's columns, ``cell`` = the key), written
                       atomically when the cell finishes
``<key>.json``         its record: ``status`` (``done`` or ``failed``), ``error``, ``wall_s``,
                       ``resumed_from`` (the epoch of the checkpoint it continued from, or null);
                       written after the rows, so a record saying ``done`` has its rows on disk
``<key>.ckpt/``        a training cell's checkpoint after its last finished epoch (removed when the
                       cell is done): ``params.npz`` (NumPy arrays, read with ``allow_pickle=False``)
                       and ``state.json`` (epoch, seed of the next epoch's data order, the
                       divergence flags, the rows so far). Written to a temporary directory and
                       renamed into place; the previous one is kept as ``<key>.ckpt.old`` until then.
=====================  ===========================================================================

Nothing here is pickled; the results table and the report are assembled from the cell files.
:func:`execute_cells` runs one cell (or a group of trials trained together) from plain data (a
:class:`CellTask` as a dict), so that any executor (this process, local worker processes, Dask
workers) can run it and write its files into the shared run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from epbench.results import atomic_write_bytes, atomic_write_text, to_frame

CELLS = "cells"
PLAN = "plan.json"
DONE, FAILED = "done", "failed"


# ----- identity ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cell:
    key: str
    experiment: str
    trial: int
    algorithm: str | None = None  # None for a GDU cell (it compares every algorithm with BPTT)

    @property
    def label(self) -> str:
        return f"{self.experiment} trial {self.trial + 1}" + (f" {self.algorithm}" if self.algorithm else "")


def data_identity(exp, data) -> str:
    """The dataset's name and a SHA-256 of the arrays the experiment reads (``synthetic`` for the
    toy's random input): a cell's key changes when its data does, wherever the files live."""
    if exp.dataset == "synthetic":
        return "synthetic"
    return f"{exp.dataset}:{data.digest(exp.dataset)}"


def cell_key(exp, trial: int, algorithm: str | None, backend: str, data_id: str) -> str:
    """SHA-256 (hex) of a cell's full settings. The experiment's trial count is left out: a cell
    of trial 0 is the same cell whether the run has 1 or 5 trials."""
    doc = {"experiment": exp.model_dump(mode="json", exclude={"trials"}), "trial": trial,
           "seed": exp.seed + trial, "algorithm": algorithm, "data": data_id, "backend": backend}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


def plan_cells(experiments: list, backend: str, data) -> list[tuple[Cell, object]]:
    """(cell, experiment) for every cell of a run in table order: per experiment, trial by trial
    and, for training, algorithm by algorithm within a trial."""
    cells = []
    for exp in experiments:
        data_id = data_identity(exp, data)
        for trial in range(exp.trials):
            algorithms = exp.algorithms if exp.task == "train" else [None]
            for algorithm in algorithms:
                key = cell_key(exp, trial, algorithm, backend, data_id)
                cells.append((Cell(key, exp.name, trial, algorithm), exp))
    return cells


# ----- files -----------------------------------------------------------------------------------------
def cells_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CELLS


def write_plan(run_dir: Path, cells: list[Cell], suite_hash: str) -> None:
    doc = {"suite_hash": suite_hash, "cells": [dataclasses.asdict(c) for c in cells]}
    atomic_write_text(cells_dir(run_dir) / PLAN, json.dumps(doc, indent=1))


def read_plan(run_dir: str | os.PathLike) -> dict | None:
    path = cells_dir(run_dir) / PLAN
    if not path.exists():
        return None
    return json.loads(path.read_text())


def read_record(run_dir: str | os.PathLike, key: str) -> dict | None:
    path = cells_dir(run_dir) / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_done(run_dir: str | os.PathLike, key: str) -> bool:
    record = read_record(run_dir, key)
    return bool(record) and record.get("status") == DONE and (cells_dir(run_dir) / f"{key}.parquet").exists()


def read_rows(run_dir: str | os.PathLike, key: str) -> pd.DataFrame:
    return pd.read_parquet(cells_dir(run_dir) / f"{key}.parquet")


def write_cell(run_dir: Path, key: str, rows: list[dict] | None, record: dict) -> None:
    """A finished cell: its rows (if any) then its record, each atomically."""
    if rows is not None:
        buffer = io.BytesIO()
        to_frame(rows).to_parquet(buffer, index=False)
        atomic_write_bytes(cells_dir(run_dir) / f"{key}.parquet", buffer.getvalue())
    atomic_write_text(cells_dir(run_dir) / f"{key}.json", json.dumps(record, indent=1, default=str))


def assemble(run_dir: str | os.PathLike, keys: list[str]) -> pd.DataFrame:
    """The results table of the done cells among ``keys``, in that order."""
    frames = [read_rows(run_dir, k) for k in keys if is_done(run_dir, k)]
    if not frames:
        return to_frame([])
    return pd.concat(frames, ignore_index=True)


# ----- checkpoints ----------------------------------------------------------------------------------
class Checkpoint:
    """A training cell's checkpoint directory: ``save`` after each epoch, ``load`` to continue."""

    def __init__(self, run_dir: Path, key: str):
        self.path = cells_dir(run_dir) / f"{key}.ckpt"
        self.old = self.path.with_name(self.path.name + ".old")

    def save(self, params: dict[str, np.ndarray], state: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with open(tmp / "params.npz", "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in params.items()})
            fh.flush()
            os.fsync(fh.fileno())
        with open(tmp / "state.json", "w") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        test_hook("checkpoint")
        if self.path.exists():
            shutil.rmtree(self.old, ignore_errors=True)
            os.rename(self.path, self.old)
        os.rename(tmp, self.path)
        shutil.rmtree(self.old, ignore_errors=True)

    def load(self) -> tuple[dict[str, np.ndarray], dict] | None:
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # an attempt killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        for path in (self.path, self.old):
            try:
                state = json.loads((path / "state.json").read_text())
                with np.load(path / "params.npz", allow_pickle=False) as npz:
                    params = {k: npz[k] for k in npz.files}
                return params, state
            except (OSError, ValueError, KeyError):
                continue
        return None

    def drop(self) -> None:
        for path in (self.path, self.old):
            shutil.rmtree(path, ignore_errors=True)


# ----- test hooks (a process that kills itself at a named point; an injected error) ----------------------
_HITS: dict[str, int] = {}


def test_hook(point: str) -> None:
    """``EPBENCH_TEST_KILL_AT=POINT:N``: SIGKILL this process the N-th time it reaches ``POINT``
    (``gdu``: inside a GDU cell; ``epoch``: after an epoch, before its checkpoint; ``checkpoint``:
    a checkpoint written but not yet renamed into place; ``cell``: a cell's files written, before
    the next cell). With ``EPBENCH_TEST_KILL_ONCE=FILE`` only the process that creates FILE dies
    (one worker of several). ``EPBENCH_TEST_KILL_SIGNAL=INT`` sends SIGINT instead (a Ctrl-C at a
    known point), to the parent process with ``EPBENCH_TEST_KILL_PARENT=1`` (a -j worker
    interrupting its run). For the tests; unset, this does nothing."""
    spec = os.environ.get("EPBENCH_TEST_KILL_AT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _HITS[point] = _HITS.get(point, 0) + 1
    if _HITS[point] != int(n or 1):
        return
    once = os.environ.get("EPBENCH_TEST_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    signum = getattr(signal, "SIG" + os.environ.get("EPBENCH_TEST_KILL_SIGNAL", "KILL"))
    os.kill(os.getppid() if os.environ.get("EPBENCH_TEST_KILL_PARENT") else os.getpid(), signum)


def _injected_failure(cell: Cell) -> None:
    """``EPBENCH_TEST_FAIL_CELL=EXPERIMENT:TRIAL[:ALGORITHM]``: that cell raises (tests)."""
    spec = os.environ.get("EPBENCH_TEST_FAIL_CELL")
    if spec and spec == ":".join(str(p) for p in (cell.experiment, cell.trial, cell.algorithm) if p is not None):
        raise RuntimeError("injected backend error (EPBENCH_TEST_FAIL_CELL)")


# ----- running cells ----------------------------------------------------------------------------------
@dataclasses.dataclass
class CellTask:
    """Everything a worker needs to run one cell, or a group of cells trained together (the trials
    of one training experiment × algorithm on a backend that batches trials), as plain data."""

    cells: list[dict]
    experiment: dict
    backend: str
    data_dir: str | None
    run_dir: str
    columns: dict  # provenance columns of every row

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: per process: backends and data caches already resolved (a worker runs many cells)
_BACKENDS: dict = {}
_DATA: dict = {}


def preload(backend, data) -> None:
    """Let :func:`execute_cells` in this process use an already-resolved backend and data cache."""
    _BACKENDS[backend.name] = backend
    _DATA[data.data_dir] = data


def _resolve(task: CellTask):
    from epbench.runner import DataCache, resolve_backend

    if task.backend not in _BACKENDS:
        _BACKENDS[task.backend] = resolve_backend(task.backend)
    if task.data_dir not in _DATA:
        _DATA[task.data_dir] = DataCache(task.data_dir)
    return _BACKENDS[task.backend], _DATA[task.data_dir]


def execute_cells(task: dict | CellTask, say: Callable[[str], None] | None = None) -> list[dict]:
    """Run a task's cells and write their files; returns their records (``key``, ``label``,
    ``status``, ``error``, ``wall_s``, ``resumed_from``, ``rows``, ``warnings``). Cells whose
    computation raises are recorded as failed (the exception's type and message); a filesystem
    error writing the files, SIGINT or SIGTERM propagate."""
    from epbench.runner import experiment_columns
    from epbench.suites import Experiment

    if isinstance(task, dict):
        task = CellTask(**task)
    cells = [Cell(**c) for c in task.cells]
    exp = Experiment.model_validate(task.experiment)
    run_dir = Path(task.run_dir)
    say = say or (lambda _m: None)
    backend, data = _resolve(task)
    records = {c.key: {"key": c.key, "label": c.label, "resumed_from": None, "warnings": [],
                       "host": os.uname().nodename, "pid": os.getpid()} for c in cells}
    start = time.perf_counter()
    try:
        for cell in cells:
            _injected_failure(cell)
        if exp.task == "gdu":
            from epbench.runner import run_gdu

            (cell,) = cells
            rows = {cell.key: run_gdu(backend, exp, cell.trial, data)}
            test_hook("gdu")
        else:
            rows = train_cells(backend, exp, cells, data, run_dir, records, say)
    except Exception as exc:  # noqa: BLE001 - recorded with the cells; the other cells go on
        backend.pop_implementation()
        for cell in cells:
            records[cell.key].update(status=FAILED, error=f"{type(exc).__name__}: {exc}",
                                     wall_s=time.perf_counter() - start, rows=0)
            write_cell(run_dir, cell.key, None, records[cell.key])
        return list(records.values())
    share = (time.perf_counter() - start) / len(cells)
    ran = {"implementation": backend.pop_implementation()}
    for cell in cells:
        record = records[cell.key]
        wall = share + record.pop("wall_before", 0.0)
        columns = experiment_columns(exp, cell.trial)
        mine = [{**task.columns, **ran, **columns, **row, "wall_time_s": wall, "cell": cell.key}
                for row in rows[cell.key]]
        record.update(status=DONE, error="", wall_s=wall, rows=len(mine))
        write_cell(run_dir, cell.key, mine, record)
        if exp.task == "train":
            Checkpoint(run_dir, cell.key).drop()
        test_hook("cell")
    return list(records.values())


@dataclasses.dataclass
class _Trial:
    cell: Cell
    seed: int
    limit: float
    ckpt: Checkpoint
    state: dict
    params: object

    @property
    def stopped(self) -> bool:
        return self.state["diverged"] or self.state["exploded"]


def train_cells(backend, exp, cells: list[Cell], data, run_dir: Path, records: dict,
                say: Callable[[str], None]) -> dict[str, list[dict]]:
    """Trials × one algorithm of a training experiment (usually one trial: one cell), epoch by
    epoch, each from its initial parameters or the checkpoint of a previous attempt, each
    checkpointed after every epoch; the trials due for an epoch are trained together through
    :func:`epbench.training.train_epochs` (one program on a backend that batches trials). The
    data order of an epoch is :func:`epbench.datasets.epoch_order` of the trial's seed and the
    epoch; parameters cross the checkpoint through ``backend.to_numpy``/``from_numpy`` (exact),
    so a resumed cell gives the rows of an uninterrupted one. A trial stops when it diverges or
    explodes (:data:`epbench.training.EXPLODE_FACTOR`); every row gets the verdict of
    :func:`epbench.training.train_status`. Returns each cell's rows."""
    from epbench import training
    from epbench.datasets import epoch_order
    from epbench.training import EXPLODE_FACTOR, _max_abs, status_text, train_status

    spec, train, algorithm = exp.model, exp.train, cells[0].algorithm
    split = data.get(exp.dataset)
    shape = (-1, *spec.input_shape)
    x_train, y_train = split.x_train[: exp.n_train].reshape(shape), split.y_train[: exp.n_train]
    x_test, y_test = split.x_test[: exp.n_test].reshape(shape), split.y_test[: exp.n_test]
    trials = []
    for cell in cells:
        seed = exp.seed + cell.trial
        initial = backend.init_params(spec, seed)
        ckpt = Checkpoint(run_dir, cell.key)
        saved = ckpt.load()
        if saved is not None:
            current, state = saved
            records[cell.key]["resumed_from"] = state["epoch"]
            records[cell.key]["wall_before"] = state.get("wall_s", 0.0)
            say(f"{cell.label}: continuing after epoch {state['epoch']} (checkpoint)")
        else:
            current = initial
            state = {"epoch": 0, "rows": [], "diverged": False, "exploded": False, "wall_s": 0.0}
        trials.append(_Trial(cell, seed, EXPLODE_FACTOR * _max_abs(initial), ckpt, state,
                             backend.from_numpy(spec, current, exp.dtype)))
    for epoch in range(1, train.epochs + 1):
        live = [t for t in trials if t.state["epoch"] < epoch and not t.stopped]
        if not live:
            continue
        began = time.perf_counter()
        orders = [epoch_order(x_train.shape[0], t.seed * 1_000_003 + epoch) for t in live]
        results = training.train_epochs(backend, spec, [t.params for t in live], [x_train[o] for o in orders],
                                        [y_train[o] for o in orders], exp.phase, train, algorithm)
        tests = [float("nan") if r.diverged else training.evaluate(backend, spec, r.params, x_test, y_test,
                                                                    exp.phase.T)
                 for r in results]
        backend.synchronize()
        elapsed = (time.perf_counter() - began) / len(live)  # each trial's share
        for t, result, test_error in zip(live, results, tests):
            t.params = result.params
            base = {"algorithm": algorithm, "epoch": epoch, "compile_s": result.timings.get("compile_s", 0.0),
                    "run_s": result.timings.get("run_s", elapsed)}
            t.state["rows"] += [
                {**base, "metric": "train_error", "value": result.train_error},
                {**base, "metric": "test_error", "value": test_error},
                {**base, "metric": "diverged", "value": float(result.diverged)},
                {**base, "metric": "epoch_time_s", "value": elapsed},
            ]
            say(f"{exp.name} trial {t.cell.trial + 1} {algorithm} epoch {epoch}: train {result.train_error:.2f}% "
                f"test {test_error:.2f}%")
        test_hook("epoch")
        for t, result in zip(live, results):
            numpy_params = backend.to_numpy(spec, t.params)
            diverged = bool(result.diverged)
            exploded = not diverged and _max_abs(numpy_params) > t.limit
            t.state = {"epoch": epoch, "order_seed": t.seed * 1_000_003 + epoch, "seed": t.seed,
                       "rows": t.state["rows"], "diverged": diverged, "exploded": exploded,
                       "wall_s": t.state.get("wall_s", 0.0) + elapsed}
            if epoch < train.epochs and not t.stopped:
                t.ckpt.save(numpy_params, t.state)
    out = {}
    for t in trials:
        rows = t.state["rows"]
        tests = [r["value"] for r in rows if r["metric"] == "test_error"]
        status = train_status(t.state["diverged"], t.state["exploded"], tests[-1] if tests else float("nan"),
                              spec.n_out)
        for row in rows:
            row["status"] = status
        if status != "ok":
            records[t.cell.key]["warnings"].append(
                f"warning: {exp.name} trial {t.cell.trial + 1} {algorithm}: {status}: {status_text(status, spec.n_out)}")
        out[t.cell.key] = rows
    return out


def summary(records: dict[str, dict], cells: list[Cell]) -> dict:
    """meta.json's ``cells``: counts and the labels of failed and resumed cells."""
    done = [c for c in cells if records.get(c.key, {}).get("status") == DONE]
    failed = [c for c in cells if records.get(c.key, {}).get("status") == FAILED]
    resumed = [c for c in cells if records.get(c.key, {}).get("resumed_from") is not None]
    return {"total": len(cells), "done": len(done),
            "failed": {c.label: records[c.key].get("error", "") for c in failed},
            "resumed": {c.label: records[c.key]["resumed_from"] for c in resumed}}

