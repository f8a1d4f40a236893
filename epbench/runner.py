"""Runs a suite on one backend and fills the results store.

The two tasks:

* ``gdu``: at initialisation, on one mini-batch, compare each algorithm's per-step processes
  (EP's ΔEP(t), ...) with BPTT's (t = 0..K) layer by layer: RelMSE (eq. 67), sign agreement and
  cosine of the cumulative updates, and the first-phase convergence.
* ``train``: every algorithm of the experiment from the same initial weights (per trial),
  per-epoch online train error and test error, and a verdict per trial and algorithm
  (:func:`epbench.training.train_status`).

Everything a run needs (backend, data, every experiment's settings, a writable ``--out`` with
room for the output) is checked by :func:`plan_run` before the run directory exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from epbench import __version__, cells as cellstore, compute, hardware, metrics
from epbench.backend import Availability, Backend
from epbench.errors import BackendUnavailable, EpbenchError, signal_number
from epbench.results import (BYTES_PER_FIGURE, BYTES_PER_ROW, COMPLETE, FAILED, INTERRUPTED, REFERENCE, RUNNING,
                             check_output_dir, comparison_name, fs_error, git_provenance, new_run_dir, this_process, to_frame,
                             write_meta, write_table)
from epbench.suites import QUICK, Experiment, Suite, check_algorithms, expand_sweeps
from epbench.executors import ExecutorOptions, run_tasks

SYNTHETIC = "synthetic"


@dataclasses.dataclass
class RunOptions:
    backend: str
    out: str = "results"
    dataset: str | None = None
    epochs: int | None = None
    trials: int | None = None
    quick: bool = False
    include_heavy: bool = False
    only: tuple[str, ...] = ()
    data_dir: str | None = None
    overrides: tuple[str, ...] = ()
    command: str = ""
    resume: str | None = None  # a run directory to continue
    fresh: bool = False  # never continue an unfinished run of the same settings under --out
    executor: ExecutorOptions = dataclasses.field(default_factory=ExecutorOptions)


Progress = Callable[[str, int, int], None]


def _quiet(_msg: str, _done: int, _total: int) -> None:
    pass


# ----- applying the options ----------------------------------------------------------------
def apply_options(experiments: list[Experiment], opts: RunOptions, cpu: bool) -> tuple[list[Experiment], list[dict], list[str]]:
    """Returns (experiments to run, skipped [{experiment, reason}], reductions [sentences])."""
    out, skipped, reductions = [], [], []
    if opts.only:
        unknown = sorted(set(opts.only) - {e.name for e in experiments})
        if unknown:
            raise EpbenchError(f"--only: no experiment named {', '.join(unknown)}")
    for exp in experiments:
        if opts.only and exp.name not in opts.only:
            continue
        if exp.heavy and cpu and not opts.include_heavy:
            skipped.append({"experiment": exp.name, "reason": "heavy experiment skipped on a CPU backend; "
                                                              "pass --include-heavy to run it"})
            continue
        update: dict = {}
        if opts.dataset and exp.dataset != SYNTHETIC:
            update["dataset"] = opts.dataset
        if opts.trials:
            update["trials"] = opts.trials
        if opts.epochs and exp.train is not None:
            update["train"] = exp.train.model_copy(update={"epochs": opts.epochs})
        if opts.quick:  # explicit --trials/--epochs/--dataset win over the quick defaults
            if not opts.trials:
                update["trials"] = min(exp.trials, QUICK["trials"])
            if exp.task == "gdu":
                K = min(exp.phase.K, QUICK["gdu_K"])
                T = max(K, min(exp.phase.T, QUICK["gdu_T"]))
                update["phase"] = exp.phase.model_copy(update={"T": T, "K": K})
                update["batch_size"] = min(exp.batch_size, QUICK["gdu_batch"])
            else:
                if not opts.epochs:
                    update["train"] = exp.train.model_copy(update={"epochs": min(exp.train.epochs, QUICK["epochs"])})
                if not opts.dataset:
                    update["dataset"] = QUICK["train_dataset"]
                update["n_train"] = min(exp.n_train or QUICK["max_train"], QUICK["max_train"])
                update["n_test"] = min(exp.n_test or QUICK["max_test"], QUICK["max_test"])
        new = exp.model_copy(update=update) if update else exp
        out.append(new)
        notes = reduction_notes(exp, new)
        if notes:
            reductions.append(f"{new.name}: " + "; ".join(notes))
    return out, skipped, reductions


def reduction_notes(orig: Experiment, new: Experiment) -> list[str]:
    """Plain sentences saying how ``new`` departs from the paper's protocol in ``orig``."""
    notes = []
    if new.dataset != orig.dataset:
        notes.append(f"dataset {new.dataset} instead of {orig.dataset}")
    elif new.task == "train" and new.dataset != "mnist":
        notes.append(f"dataset {new.dataset}, not the full MNIST of the paper")
    if new.train is not None and orig.train is not None and new.train.epochs != orig.train.epochs:
        notes.append(f"{new.train.epochs} epoch(s) instead of {orig.train.epochs}")
    if new.trials < orig.trials:
        notes.append(f"{new.trials} trial(s) instead of {orig.trials}")
    if (new.phase.T, new.phase.K) != (orig.phase.T, orig.phase.K):
        notes.append(f"T={new.phase.T}, K={new.phase.K} instead of T={orig.phase.T}, K={orig.phase.K}")
    if new.task == "gdu" and new.batch_size != orig.batch_size:
        notes.append(f"GDU batch {new.batch_size} instead of {orig.batch_size}")
    if new.n_train:
        notes.append(f"at most {new.n_train} training and {new.n_test or 'all'} test samples")
    return notes


# ----- one experiment ------------------------------------------------------------------------
def _layer_quantity(name: str) -> str:
    return "neurons" if name.startswith("s") else "weights"


def _sample_units(bptt: np.ndarray, n: int) -> np.ndarray:
    """Indices (flattened) of the n elements with the largest −∇BPTT RMS, for process plots."""
    if n <= 0:
        return np.zeros(0, dtype=int)
    flat = bptt.reshape(bptt.shape[0], -1)
    rms = np.sqrt(np.mean(flat * flat, axis=0))
    n = min(n, rms.size)
    return np.sort(np.argsort(-rms, kind="stable")[:n])


def gdu_algorithms(exp: Experiment) -> tuple[str, ...]:
    """The algorithms whose processes a GDU experiment compares with BPTT's (BPTT aside)."""
    return tuple(a for a in exp.algorithms if a != REFERENCE)


def _process_pairs(procs, spec, algorithm: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(layer, the algorithm's process, BPTT's process times the algorithm's sign) per neuron
    layer and parameter: the two curves that agree when the algorithm estimates BPTT."""
    mine, ref = procs.processes[algorithm], procs.processes[REFERENCE]
    sign = mine.sign
    pairs = [(name, mine.s[i], sign * ref.s[i]) for i, name in enumerate(spec.state_names)]
    pairs += [(name, mine.theta[name], sign * ref.theta[name]) for name in spec.param_shapes]
    return pairs


def gdu_rows(procs, spec, units: int, algorithms: tuple[str, ...] | None = None) -> list[dict]:
    """Metric rows comparing each algorithm's processes with BPTT's (``sign``·∇BPTT: −∇BPTT for
    EP's ΔEP) for every layer and parameter (``algorithm`` = ``<name>_vs_bptt``), and the
    process samples of each algorithm and of BPTT: the units of largest BPTT RMS, BPTT's
    drawn with the first compared algorithm's sign (−∇BPTT beside ΔEP)."""
    if algorithms is None:
        algorithms = tuple(a for a in procs.processes if a != REFERENCE)
    rows: list[dict] = []
    for n, algorithm in enumerate(algorithms):
        for layer, mine, bp in _process_pairs(procs, spec, algorithm):
            quantity = _layer_quantity(layer)
            base = {"algorithm": comparison_name(algorithm), "layer": layer, "quantity": quantity}
            same, both_zero = metrics.sign_agreement(mine.sum(axis=0), bp.sum(axis=0))
            rows += [
                {**base, "metric": "relmse", "value": metrics.relmse(mine, bp)},
                {**base, "metric": "sign_agreement", "value": same},
                {**base, "metric": "sign_both_zero", "value": both_zero},
                {**base, "metric": "cosine", "value": metrics.cosine(mine.sum(axis=0), bp.sum(axis=0))},
            ]
            idx = _sample_units(bp, units)
            mine_flat, bp_flat = mine.reshape(mine.shape[0], -1), bp.reshape(bp.shape[0], -1)
            drawn = [(algorithm, mine_flat)] + ([(REFERENCE, bp_flat)] if n == 0 else [])
            for unit in idx:
                for t in range(mine.shape[0]):
                    for name, flat in drawn:
                        rows.append({"algorithm": name, "metric": "process", "layer": layer, "quantity": quantity,
                                     "t": t, "unit": int(unit), "value": float(flat[t, unit])})
    rows.append({"algorithm": REFERENCE if not algorithms else algorithms[0], "metric": "convergence",
                 "layer": "all", "value": procs.convergence})
    return rows


class DataCache:
    def __init__(self, data_dir: str | None):
        self.data_dir = data_dir
        self._splits: dict = {}
        self._digests: dict = {}

    def digest(self, name: str) -> str:
        """SHA-256 (hex) of a dataset's arrays: its identity in the cell keys, wherever its files are."""
        if name not in self._digests:
            import hashlib

            split, h = self.get(name), hashlib.sha256()
            for part in ("x_train", "y_train", "x_test", "y_test"):
                array = np.ascontiguousarray(getattr(split, part))
                h.update(f"{part}{array.dtype}{array.shape}".encode())
                h.update(array.data)
            self._digests[name] = h.hexdigest()
        return self._digests[name]

    def get(self, name: str):
        if name not in self._splits:
            from epbench.datasets import load_dataset

            self._splits[name] = load_dataset(name, data_dir=self.data_dir)
        return self._splits[name]


def gdu_batch(exp: Experiment, seed: int, data: DataCache) -> tuple[np.ndarray, np.ndarray]:
    """The mini-batch of a GDU measurement: the toy's random input and one-hot target
    (x ~ U[0,1], appendix C.2), or ``batch_size`` training images drawn with ``seed``."""
    spec = exp.model
    rng = np.random.default_rng(seed + 7919)
    B = exp.batch_size
    if exp.dataset == SYNTHETIC:
        x = rng.uniform(0.0, 1.0, size=(B, spec.n_in))
        labels = rng.integers(0, spec.n_out, size=B)
    else:
        split = data.get(exp.dataset)
        idx = rng.choice(split.x_train.shape[0], size=B, replace=False)
        x, labels = split.x_train[idx].astype(np.float64), split.y_train[idx]
    y = np.eye(spec.n_out)[labels]
    return x.reshape((B, *spec.input_shape)), y


#: GDU measurements shorter than this (seconds) are repeated for their timing, timeit-style
SHORT_RUN_S = 0.5
#: at most this many runs of a short GDU measurement; ``run_s`` is the fastest
MAX_TIMING_RUNS = 5


def _timed_gdu(backend: Backend, exp: Experiment, params, x, y):
    """(processes, run seconds): the backend's own ``run_s`` (compilation excluded) if it
    reports one, else the wall time of the call."""
    start = time.perf_counter()
    procs = compute.gdu(backend, exp.model, params, x, y, exp.phase, algorithms=gdu_algorithms(exp))
    elapsed = time.perf_counter() - start
    return procs, float(procs.timings.get("run_s", elapsed))


def _gdu_run_s(backend: Backend, exp: Experiment, params, x, y, first_run_s: float) -> float:
    """Best-of run time of a short GDU measurement: a single run of a few milliseconds mostly
    measures one-off costs (first touch of fresh output buffers, cold caches), so it is repeated
    while the runs stay short, up to MAX_TIMING_RUNS in all. The results come from the first run."""
    best = first_run_s
    if not np.isfinite(best):
        return best
    spent, runs = best, 1
    while best < SHORT_RUN_S and runs < MAX_TIMING_RUNS and spent < 2 * SHORT_RUN_S:
        again = _timed_gdu(backend, exp, params, x, y)[1]
        best, spent, runs = min(best, again), spent + again, runs + 1
    return best


def run_gdu(backend: Backend, exp: Experiment, trial: int, data: DataCache) -> list[dict]:
    seed = exp.seed + trial
    params = backend.from_numpy(exp.model, backend.init_params(exp.model, seed), exp.dtype)
    x, y = gdu_batch(exp, seed, data)
    procs, first_run_s = _timed_gdu(backend, exp, params, x, y)
    run_s = _gdu_run_s(backend, exp, params, x, y, first_run_s)
    rows = gdu_rows(procs, exp.model, exp.process_units, gdu_algorithms(exp))
    status = "ok" if all(math.isfinite(row["value"]) for row in rows) else "diverged"
    for row in rows:
        row.setdefault("compile_s", procs.timings.get("compile_s", 0.0))
        row.setdefault("run_s", run_s)
        row.setdefault("status", status)
    return rows


def experiment_columns(exp: Experiment, trial: int) -> dict:
    spec = exp.model
    return {
        "experiment": exp.name, "task": exp.task, "model": spec.kind, "model_desc": spec.describe(),
        "hidden": "-".join(str(n) for n in (spec.channels if spec.kind == "pconv" else spec.hidden)),
        "n_out": spec.n_out, "activation": spec.activation, "dt": spec.step,
        "lrs": "-".join(f"{lr:g}" for lr in exp.train.lrs) if exp.train else "",
        "flavor": spec.flavor, "dataset": exp.dataset, "dtype": exp.dtype, "T": exp.phase.T,
        "K": exp.phase.K, "beta": exp.phase.beta, "symmetric": exp.phase.symmetric,
        "alternate": exp.phase.alternate,
        "epochs": exp.train.epochs if exp.train else -1,
        "batch_size": exp.train.batch_size if exp.train else exp.batch_size,
        "trial": trial, "seed": exp.seed + trial,
    }


def resolve_backend(name: str) -> Backend:
    from epbench.plugins import registry

    backend = registry().backend(name)
    avail = backend.availability(probe=True)
    if not avail.ok:
        raise BackendUnavailable(f"backend '{name}' is not available: {avail.reason}")
    return backend


@dataclasses.dataclass
class RunPlan:
    """A run checked and ready (:func:`plan_run`): nothing has been written yet."""

    backend: Backend
    availability: Availability
    experiments: list[Experiment]
    skipped: list[dict]
    reductions: list[str]
    data: "DataCache"
    output_bytes: int


def check_experiment(exp: Experiment, data: DataCache) -> None:
    """What an experiment needs from its data, checked before anything runs: the dataset loads
    (every file check of its loader), its images have ``model.n_in`` pixels and its labels fit
    ``model.n_out`` outputs; a GDU batch fits in the training set; training has at least one
    training and one test image."""
    spec = exp.model
    if exp.dataset == SYNTHETIC:
        if exp.task == "train":
            raise EpbenchError(f"{exp.name}: dataset '{SYNTHETIC}' is the toy model's random input, for gdu "
                               "experiments only")
        return
    split = data.get(exp.dataset)
    where = f"dataset {exp.dataset} ({split.source})" if split.source else f"dataset {exp.dataset}"
    pixels = int(np.prod(split.x_train.shape[1:])) if split.x_train.ndim > 1 else 0
    if split.n_train and pixels != spec.n_in:
        raise EpbenchError(f"{exp.name}: model.n_in is {spec.n_in} but the images of {where} have {pixels} pixels")
    for part in ("train", "test"):
        labels = getattr(split, f"y_{part}")
        if len(labels) and int(labels.max()) >= spec.n_out:
            raise EpbenchError(f"{exp.name}: {where} has label {int(labels.max())} but the model has "
                               f"{spec.n_out} outputs (model.n_out)")
    if exp.task == "gdu" and split.n_train < exp.batch_size:
        raise EpbenchError(f"{exp.name}: batch_size {exp.batch_size} but {where} has {split.n_train} training "
                           "images")
    if exp.task == "train":
        for part, n in (("training", split.n_train), ("test", split.n_test)):
            if n == 0:
                raise EpbenchError(f"{exp.name}: {where} has no {part} images")


def estimate_output_bytes(experiments: list[Experiment]) -> int:
    """An upper estimate of a run's output: its table rows (gdu: 4 metrics per layer,
    parameter and compared algorithm, the sampled processes of each and of BPTT, the convergence; train: 4 metrics per trial, algorithm
    and epoch) at BYTES_PER_ROW; figures at BYTES_PER_FIGURE: the RelMSE bars and the training
    curves, and per GDU experiment and flavour its processes and (for a β sweep) its Theorem 1
    plot; and 1 MiB for the report, meta.json and suite.yaml."""
    rows, figures = 0, 2
    for exp in experiments:
        spec = exp.model
        if exp.task == "gdu":
            layers = len(spec.state_names) + len(spec.param_shapes)
            n = len(gdu_algorithms(exp))
            rows += exp.trials * (layers * (4 * n + (n + 1) * exp.process_units * (exp.phase.K + 1)) + 1)
        else:
            rows += exp.trials * len(exp.algorithms) * exp.train.epochs * 4
    gdu = [e for e in experiments if e.task == "gdu"]
    figures += len({(e.name, e.model.flavor) for e in gdu})
    figures += sum(len({e.phase.beta for e in gdu if e.name == name}) > 1 for name in {e.name for e in gdu})
    return rows * BYTES_PER_ROW + figures * BYTES_PER_FIGURE + (1 << 20)


def plan_run(suite: Suite, opts: RunOptions) -> RunPlan:
    """Check everything a run needs before its directory exists: the algorithms are registered
    (:func:`epbench.suites.check_algorithms`), the backend is available, the
    options apply (``--only`` names exist), every runnable experiment's data loads and fits it
    (:func:`check_experiment`), and ``--out`` is writable with room for the estimated output
    (:func:`estimate_output_bytes`). Raises :class:`EpbenchError`; writes nothing."""
    check_algorithms(suite)
    backend = resolve_backend(opts.backend)
    avail = backend.availability(probe=True)
    cpu = "cpu" in (avail.device or "cpu").lower()
    experiments, skipped, reductions = apply_options(expand_sweeps(suite.experiments), opts, cpu)
    runnable = []
    for exp in experiments:
        reason = backend.supports(exp.model, exp.dtype)
        if not reason and exp.phase.alternate and not getattr(backend.capabilities, "alternate", True):
            reason = f"{backend.name} does not implement phase.alternate"
        if reason:
            skipped.append({"experiment": exp.name, "reason": reason})
        else:
            runnable.append(exp)
    data = DataCache(opts.data_dir)
    for exp in runnable:
        check_experiment(exp, data)
    need = estimate_output_bytes(runnable)
    check_output_dir(opts.out, need)
    return RunPlan(backend, avail, runnable, skipped, reductions, data, need)


def run_suite(suite: Suite, suite_path: str, suite_hash: str, opts: RunOptions,
              progress: Progress = _quiet, on_start: Callable[[Path], None] | None = None) -> Path:
    """Run every cell of ``suite`` on ``opts.backend`` (:mod:`epbench.cells`); returns the run directory.

    :func:`plan_run` checks everything first; then the run directory is created, or an earlier
    one continued (:func:`open_run_dir`), ``on_start`` is called with it, and meta.json records
    ``status`` "running" with this process's pid and host, and finally "complete", "interrupted"
    (SIGINT/SIGTERM: the KeyboardInterrupt goes on, with ``run_dir`` set) or "failed" (an error,
    or cells that failed: ``cells.failed`` names them; a filesystem error becomes an
    :class:`EpbenchError` naming the path and the cause). Cells run through
    ``opts.executor`` (:mod:`epbench.executors`); each finished cell's rows are on disk at once
    and the table (results.parquet) is assembled from the cells after each one."""
    plan = plan_run(suite, opts)
    backend, avail, runnable = plan.backend, plan.availability, plan.experiments
    for item in plan.skipped:
        progress(f"skipping {item['experiment']}: {item['reason']}", 0, 0)
    planned = cellstore.plan_cells(runnable, backend.name, plan.data)
    cells = [cell for cell, _ in planned]
    run_dir, previous = open_run_dir(opts, suite, [c.key for c in cells], progress)

    commit, dirty = git_provenance()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    provenance = {
        "run_id": run_dir.name, "epbench_version": __version__, "git_commit": commit, "git_dirty": dirty,
        "suite": suite.name, "suite_hash": suite_hash, "backend": backend.name, "framework": backend.framework,
        "framework_version": backend.framework_version(), "device": avail.device,
        "start_time": (previous or {}).get("start_time", started),
        **hardware.columns(backend.framework, avail.device),
    }
    meta = {
        **provenance, "suite_path": str(suite_path), "command": opts.command,
        "started": (previous or {}).get("started", started),
        "quick": opts.quick, "overrides": list(opts.overrides), "reductions": plan.reductions,
        "skipped": plan.skipped,
        "host": hardware.host(backend.framework, avail.device),
        **this_process(), "status": RUNNING, "executor": opts.executor.describe(),
        "attempts": (previous or {}).get("attempts", 1) + (1 if previous else 0),
    }
    if previous:
        meta["resumed"] = [*previous.get("resumed", []), started]
    records = {c.key: cellstore.read_record(run_dir, c.key) for c in cells if cellstore.is_done(run_dir, c.key)}
    frames = {key: cellstore.read_rows(run_dir, key) for key in records}
    reused = len(records)
    meta["rows"] = 0  # rows in results.parquet
    written = [-1]  # cells in the table on disk

    def save() -> None:
        keys = [c.key for c in cells if c.key in frames]
        table = pd.concat([frames[k] for k in keys], ignore_index=True) if keys else to_frame([])
        write_table(run_dir, table)
        meta["rows"], written[0] = len(table), len(keys)

    def record_cells() -> None:
        meta["cells"] = {**cellstore.summary(records, cells), "reused": reused}
        meta["implementation"] = {str(f["experiment"].iloc[0]): str(f["implementation"].iloc[0])
                                  for f in frames.values() if len(f)}

    try:
        if on_start is not None:
            on_start(run_dir)
        write_meta(run_dir, meta)
        write_suite_as_run(run_dir, suite, runnable)
        cellstore.write_plan(run_dir, cells, suite_hash)
        if reused:
            progress(f"{reused} of {len(cells)} cells finished in an earlier attempt; running the other "
                     f"{len(cells) - reused}", 0, 0)
        _run_cells(run_dir, [(c, e) for c, e in planned if c.key not in records], len(cells), records, frames,
                   provenance, opts, backend, plan.data, save, progress, "gpu" in str(avail.device).lower()
                   or "cuda" in str(avail.device).lower())
        if written[0] != len(frames):
            save()
        record_cells()
        failed = meta["cells"]["failed"]
        if failed:
            meta["status"] = FAILED
            meta["error"] = f"{len(failed)} of {len(cells)} cells failed: " + "; ".join(
                f"{label} ({error})" for label, error in failed.items())
        else:
            meta["status"] = COMPLETE
            meta.pop("error", None)
    except KeyboardInterrupt as exc:
        meta["status"], meta["signal"] = INTERRUPTED, _signal_name(signal_number(exc))
        exc.run_dir = run_dir
        raise
    except OSError as exc:
        meta["status"], meta["error"] = FAILED, f"{exc.strerror or exc}"
        raise fs_error(run_dir, exc) from None
    except BaseException as exc:
        meta["status"], meta["error"] = FAILED, f"{type(exc).__name__}: {exc}"
        raise
    finally:
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with signals_held():  # a second Ctrl-C must not leave "running" behind
            for key, record in records.items():  # a cell recorded just before an interruption
                if record.get("status") == cellstore.DONE and key not in frames:
                    try:
                        frames[key] = cellstore.read_rows(run_dir, key)
                    except OSError:
                        record["status"] = "unread"
            record_cells()
            try:
                if written[0] != len(frames):
                    save()
            except OSError:
                pass  # the table of the cells before stays on disk (meta["rows"] counts its rows)
            try:
                write_meta(run_dir, meta)
            except OSError:
                pass  # a full disk: the "running" status left behind reads as interrupted once this process ends
    return run_dir


def _run_cells(run_dir: Path, todo: list, total: int, records: dict, frames: dict, provenance: dict,
               opts: RunOptions, backend: Backend, data: DataCache, save: Callable[[], None], progress: Progress,
               gpu: bool) -> None:
    """Run the cells not yet done through the executor; after each, its rows join the table."""
    executor = dataclasses.replace(opts.executor, gpu=gpu)
    tasks = [cellstore.CellTask(cells=[dataclasses.asdict(c) for c in group], experiment=exp.model_dump(mode="json"),
                                backend=backend.name, data_dir=opts.data_dir, run_dir=str(run_dir),
                                columns=provenance).to_dict() for group, exp in cell_groups(todo, backend)]
    labels = {cell.key: cell.label for cell, _ in todo}
    parallel = 1 if executor.in_process else (executor.jobs if not (executor.scheduler or executor.parallel_config)
                                              else None)
    shapes: set[tuple] = set()
    experiments = {cell.key: exp for cell, exp in todo}

    def before(task: dict) -> None:
        """In process, on a backend that compiles per shape: a line before the first cell of each
        new shape (:func:`compile_key`), which takes longer."""
        exp = experiments[task["cells"][0]["key"]]
        if backend.capabilities.compiles and compile_key(exp) not in shapes:
            progress(f"compiling {exp.name} for {backend.name} (first run of this shape)…", 0, 0)
        shapes.add(compile_key(exp))

    if executor.in_process:
        cellstore.preload(backend, data)
    began, finished, failed = time.perf_counter(), 0, 0
    done_before = total - len(todo)

    def status() -> None:
        remaining = len(todo) - finished
        running = min(parallel, remaining) if parallel else remaining
        eta = ""
        if finished and remaining:
            left = (time.perf_counter() - began) / finished * remaining / max(1, min(parallel or 1, remaining))
            eta = f", ETA {int(left // 60)}:{int(left % 60):02d}"
        progress(f"cells {done_before + finished - failed}/{total} done, {running} "
                 f"{'running' if parallel else 'queued or running'}, {failed} failed{eta}",
                 done_before + finished, total)

    if todo:
        progress(f"running {len(todo)} cells {executor.describe()}", 0, 0)
        status()
    for record in run_tasks(tasks, executor, lambda message: progress(message, 0, 0), before):
        key = record["key"]
        if record.get("lost"):  # its worker died too often: nothing recorded it
            cellstore.write_cell(run_dir, key, None, record)
        records[key] = record
        finished += 1
        if record["status"] == cellstore.DONE:
            frames[key] = cellstore.read_rows(run_dir, key)
            save()
            resumed = f" (continued after epoch {record['resumed_from']})" if record.get("resumed_from") else ""
            progress(f"{labels[key]} done in {record['wall_s']:.1f} s{resumed}", 0, 0)
        else:
            failed += 1
            progress(f"warning: {labels[key]} failed: {record['error']}", 0, 0)
        for warning in record.get("warnings", []):
            progress(warning, 0, 0)
        status()


def cell_groups(todo: list, backend: Backend) -> list[tuple[list, Experiment]]:
    """The tasks of a run: one cell each, except on a backend that batches trials
    (``backend.batch_trials``: jax or torch with ``EPBENCH_BATCH_TRIALS=1``), where the trials of
    one training experiment × algorithm stay together, one program over them, in one task."""
    groups: list[tuple[list, Experiment]] = []
    index: dict[tuple, int] = {}
    for cell, exp in todo:
        if exp.task == "train" and backend.batch_trials:
            key = (cell.experiment, cell.algorithm)
            if key in index:
                groups[index[key]][0].append(cell)
                continue
            index[key] = len(groups)
        groups.append(([cell], exp))
    return groups


def open_run_dir(opts: RunOptions, suite: Suite, keys: list[str], progress: Progress) -> tuple[Path, dict | None]:
    """(run directory, its earlier meta.json or None for a new one). Continued: ``--resume
    RUN_DIR``; ``--out RUN_DIR`` naming a run directory; or, unless ``--fresh``, the latest
    unfinished (interrupted or failed) run under ``--out`` whose cells are this run's. A run
    directory whose cells differ from this run's (other settings, data, backend) is refused."""
    from epbench.results import read_meta

    target = opts.resume or (opts.out if cellstore.read_plan(opts.out) is not None else None)
    if target is None and not opts.fresh:
        root = Path(opts.out)
        for candidate in sorted(root.glob("*/" + cellstore.CELLS + "/" + cellstore.PLAN), reverse=True):
            run_dir = candidate.parent.parent
            try:
                same = [c["key"] for c in (cellstore.read_plan(run_dir) or {}).get("cells", [])] == keys
                status = read_meta(run_dir).get("status")
            except (OSError, ValueError, EpbenchError):
                continue
            if same and status in (INTERRUPTED, FAILED):
                progress(f"continuing {run_dir} (the same cells, status {status}); --fresh starts a new run", 0, 0)
                target = str(run_dir)
                break
    if target is None:
        return new_run_dir(opts.out, suite.name, opts.backend), None
    run_dir = Path(target)
    plan = cellstore.read_plan(run_dir)
    if plan is None:
        raise EpbenchError(f"{run_dir}: --resume: not a run directory with cells ({cellstore.CELLS}/{cellstore.PLAN} "
                           "missing)")
    meta = read_meta(run_dir)
    if meta.get("status") == RUNNING:
        raise EpbenchError(f"{run_dir}: --resume: the run is still going (process {meta.get('pid')} on "
                           f"{meta.get('hostname')})")
    theirs = [c["key"] for c in plan.get("cells", [])]
    if theirs != keys:
        gone, new = len(set(theirs) - set(keys)), len(set(keys) - set(theirs))
        raise EpbenchError(f"{run_dir}: --resume: the settings differ from that run's ({gone} of its {len(theirs)} "
                           f"cells not in this run, {new} new ones): its cells would not be comparable; start a "
                           "new run (--fresh, or another --out)")
    return run_dir, meta


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM while the end of a run is recorded, then deliver the first one
    that came (to the handlers restored). Main thread only, where Python runs signal handlers."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda n, _f: came.append(n)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if came:
            handler = previous[came[0]]
            if callable(handler):  # Python's (KeyboardInterrupt) or the CLI's (Terminated)
                handler(came[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), came[0])


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def compile_key(exp: Experiment) -> tuple:
    """What a backend that compiles per shape compiles anew for: the task, the model, the phase
    settings (β aside, a run-time value) and the batch size."""
    batch = exp.train.batch_size if exp.task == "train" else exp.batch_size
    return exp.task, exp.model.model_dump_json(), exp.phase.model_dump_json(exclude={"beta"}), batch


def write_suite_as_run(run_dir: Path, suite: Suite, experiments: list[Experiment]) -> None:
    """``suite.yaml``: the experiments exactly as run (sweeps expanded, options applied)."""
    import yaml

    from epbench.results import atomic_write_text

    doc = {"name": suite.name, "description": suite.description,
           "experiments": [e.model_dump(mode="json", exclude_none=True) for e in experiments]}
    atomic_write_text(run_dir / "suite.yaml", yaml.safe_dump(doc, sort_keys=False))
