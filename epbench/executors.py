"""Where cells run: in this process (the default), in ``-j N`` local worker processes, or on Dask.

Every executor runs :func:`epbench.cells.execute_cells` on plain-data tasks and yields each cell's
record as it finishes; the cell's rows are already in the shared run directory by then (workers
write them there, so a lost client or worker loses no finished cell). One rule for all of them:
a cell's failure is its record, an executor's failure (a worker pool that broke, a cluster that
went away) is an exception that stops the run, and the cells not finished are run again by
``--resume``.

* ``-j N``: :class:`concurrent.futures.ProcessPoolExecutor` with ``spawn`` workers (no fork of a
  process that may hold framework threads); the standard library, starts in a fraction of a
  second, nothing to configure. Each worker gets ``cores // N`` threads for its framework.
* ``--executor dask``: a ``distributed.Client`` on a ``LocalCluster`` (``-j`` workers, one thread
  each), on ``--scheduler tcp://HOST:PORT``, or on a ``dask-jobqueue`` cluster described by
  ``--parallel-config FILE.yaml`` (see :func:`dask_cluster`). Dask re-runs a cell whose worker died
  (the cell continues from its checkpoint); each cell is submitted under its key, once.
  On a GPU backend each cell asks for the worker resource ``GPU=1``: start workers with
  ``--resources GPU=1`` and one visible device each (``CUDA_VISIBLE_DEVICES``), or use dask-cuda.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

from epbench.errors import EpbenchError

EXECUTORS = ("local", "dask")


@dataclasses.dataclass
class ExecutorOptions:
    executor: str = "local"  # "local" (in process, or -j N processes) or "dask"
    jobs: int = 1
    scheduler: str | None = None  # dask: tcp://HOST:PORT of an existing cluster
    parallel_config: str | None = None  # dask: a dask-jobqueue YAML file
    gpu: bool = False  # one GPU per cell (dask resources)

    @property
    def in_process(self) -> bool:
        return self.executor == "local" and self.jobs <= 1

    def describe(self) -> str:
        if self.in_process:
            return "in process"
        if self.executor == "local":
            return f"{self.jobs} local worker processes"
        where = self.scheduler or (f"dask-jobqueue ({self.parallel_config})" if self.parallel_config
                                   else f"a LocalCluster of {self.jobs} workers")
        return f"dask on {where}"


def run_tasks(tasks: list[dict], opts: ExecutorOptions, say=None, before=None) -> Iterator[dict]:
    """Each task's record, in the order the cells finish. In process, ``before(task)`` is called
    before each cell and ``say(message)`` with its progress lines."""
    if opts.in_process:
        from epbench.cells import execute_cells

        for task in tasks:
            if before is not None:
                before(task)
            yield from execute_cells(task, say)
    elif opts.executor == "local":
        yield from _pool(tasks, opts.jobs)
    else:
        yield from _dask(tasks, opts)


# ----- -j N ----------------------------------------------------------------------------------------
def _worker_init(threads: int) -> None:
    """A -j worker: Ctrl-C goes to the parent, which ends the pool; ``threads`` for the framework."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))


def _pool(tasks: list[dict], jobs: int) -> Iterator[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from epbench.cells import execute_cells

    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(threads,))
    try:
        futures = [pool.submit(execute_cells, task) for task in tasks]
        for future in as_completed(futures):
            try:
                yield from future.result()
            except BrokenProcessPool:
                raise EpbenchError("a -j worker process died (killed, or out of memory); the finished cells "
                                   "are kept") from None
    finally:
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:  # an interrupted run must not leave cells running behind it
            if proc.is_alive():
                proc.terminate()
        for proc in processes:
            proc.join(timeout=30)


# ----- Dask ------------------------------------------------------------------------------------------
def dask_cluster(config_path: str):
    """A cluster from a ``--parallel-config`` YAML file (in the spirit of benchopt's)::

        cluster: slurm          # slurm, pbs (dask-jobqueue) or local (distributed.LocalCluster)
        scale: 4                # jobs (workers) to start
        cluster_params:         # keyword arguments of SLURMCluster / PBSCluster / LocalCluster
          cores: 4
          memory: 16GB
          walltime: "04:00:00"

    Returns the cluster (started, scaled)."""
    import yaml

    try:
        with open(config_path) as fh:
            doc = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise EpbenchError(f"{config_path}: --parallel-config: cannot read it ({exc})") from None
    kind = str(doc.get("cluster", "slurm")).lower()
    params = dict(doc.get("cluster_params") or {})
    unknown = set(doc) - {"cluster", "scale", "cluster_params"}
    if unknown:
        raise EpbenchError(f"{config_path}: --parallel-config: unknown key(s) {', '.join(sorted(unknown))} "
                           "(expected cluster, scale, cluster_params)")
    if kind == "local":
        from distributed import LocalCluster

        cluster = LocalCluster(**{"threads_per_worker": 1, "dashboard_address": None, **params})
    elif kind in ("slurm", "pbs"):
        dask_jobqueue = _import_dask_jobqueue()
        cls = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
        cluster = cls(**params)
    else:
        raise EpbenchError(f"{config_path}: --parallel-config: cluster must be slurm, pbs or local, not {kind!r}")
    if doc.get("scale") and kind != "local":
        cluster.scale(jobs=int(doc["scale"]))
    return cluster


def _import_dask_jobqueue():
    """dask_jobqueue, imported without its SIGINT handler (its runner module makes Ctrl-C a
    ``sys.exit()`` on import): Ctrl-C must stay a KeyboardInterrupt, which ends a run cleanly."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError:
        raise EpbenchError("--parallel-config: dask-jobqueue is not installed (pip install 'epbench[dask]')") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return dask_jobqueue


def _client(opts: ExecutorOptions):
    import logging

    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise EpbenchError("--executor dask: dask.distributed is not installed (pip install 'epbench[dask]')") from None
    # the progress display says what happens; Dask's own INFO lines (workers starting, keys
    # cancelled) only from its warnings up, here and in the local workers
    logging.getLogger("distributed").setLevel(logging.WARNING)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    if opts.scheduler:
        try:
            return Client(opts.scheduler, timeout="30s"), None
        except OSError as exc:
            raise EpbenchError(f"--scheduler {opts.scheduler}: cannot connect ({exc})") from None
    if opts.parallel_config:
        cluster = dask_cluster(opts.parallel_config)
    else:
        kwargs = {"resources": {"GPU": 1}} if opts.gpu else {}
        cluster = LocalCluster(n_workers=max(1, opts.jobs), threads_per_worker=1, processes=True,
                               dashboard_address=None, **kwargs)
    return Client(cluster), cluster


def _dask(tasks: list[dict], opts: ExecutorOptions) -> Iterator[dict]:
    import hashlib

    from distributed import as_completed

    from epbench.cells import execute_cells

    client, cluster = _client(opts)
    resources = {"GPU": 1} if opts.gpu else None
    # a task's key names the run directory too: two runs of the same cells on one scheduler stay apart
    where = hashlib.sha256(os.path.abspath(tasks[0]["run_dir"]).encode()).hexdigest()[:12] if tasks else ""
    keys = {f"epbench-cell-{where}-{t['cells'][0]['key']}": t["cells"] for t in tasks}
    try:
        futures = [client.submit(execute_cells, task, key=key, pure=False, resources=resources)
                   for key, task in zip(keys, tasks)]
        for future in as_completed(futures):
            try:
                yield from future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: the cells lost their worker too often
                for cell in keys[future.key]:
                    yield {"key": cell["key"], "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                           "resumed_from": None, "warnings": [], "rows": 0, "lost": True}
    finally:
        try:
            for future in futures if "futures" in locals() else []:
                if not future.done():
                    future.cancel()
            client.close()
            if cluster is not None:
                cluster.close()
        except Exception:  # noqa: BLE001 - closing a cluster that is going away
            pass
