"""The ``epbench`` command line.

Bad input (suite, option, backend or dataset name, missing data) and filesystem errors (a path
that cannot be written, a full disk) end with one line on stderr and exit status 2, never a
traceback; a run stopped by SIGINT or SIGTERM ends with one line naming its run directory and
exit status 130 or 143. Importing this module imports neither torch nor jax.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
import textwrap
import warnings

import click

from epbench import __version__
from epbench.errors import CellsFailed, EpbenchError, RunInterrupted

log = logging.getLogger("epbench")


def _show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
    click.echo(f"warning: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="epbench")
@click.option("-v", "--verbose", count=True, help="More output (-vv: tracebacks on errors).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the final result path.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """epbench: check that Equilibrium Propagation's updates match BPTT's gradients, train both
    from the same weights, and time implementations across frameworks and hardware."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = -1 if quiet else verbose
    logging.basicConfig(level=logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO),
                        format="%(message)s", stream=sys.stderr)
    warnings.showwarning = _show_warning


def _registry():
    from epbench.plugins import registry

    return registry()


# ----- run ---------------------------------------------------------------------------------
@cli.command()
@click.argument("suite")
@click.option("--backend", "-b", default="torch-cpu", show_default=True, help="Backend name (see `epbench backends`).")
@click.option("--dataset", help="Dataset for every experiment that reads one (see `epbench data`).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder holding the dataset files.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs of every training experiment.")
@click.option("--trials", type=click.IntRange(min=1), help="Trials of every experiment.")
@click.option("--quick", is_flag=True, help="Smoke run: 1 trial; GDU T<=200, K<=20, batch<=8; "
              "training 1 epoch on mnist-5k, <=1000 train / 500 test samples (explicit options win).")
@click.option("--only", multiple=True, help="Run only this experiment (repeatable).")
@click.option("--include-heavy", is_flag=True, help="Run experiments marked heavy on CPU backends too.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override a field of every experiment (e.g. phase.dtype=float64; NAME.key=value for one).")
@click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False),
              help="Folder under which the run directory is created.")
@click.option("--no-report", is_flag=True, help="Do not render report.md and figures.")
@click.option("--svg", is_flag=True, help="Save the figures as SVG too (PNG only by default).")
@click.option("--resume", type=click.Path(file_okay=False, exists=True), metavar="RUN_DIR",
              help="Continue RUN_DIR: skip its finished cells, continue the others from their checkpoints "
              "(refused if the settings differ).")
@click.option("--fresh", is_flag=True, help="Start a new run even if --out holds an unfinished run of the same cells.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cells at once: local worker processes (or LocalCluster workers with --executor dask).")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="local: this process, or -j worker processes; dask: Dask distributed.")
@click.option("--scheduler", metavar="tcp://HOST:PORT", help="Dask scheduler of an existing cluster (implies "
              "--executor dask).")
@click.option("--parallel-config", type=click.Path(dir_okay=False, exists=True), metavar="FILE.yaml",
              help="dask-jobqueue cluster (SLURM, PBS) settings (implies --executor dask); see docs/parallel.md.")
@click.pass_context
def run(ctx, suite, backend, dataset, data_dir, epochs, trials, quick, only, include_heavy, assignments, out, no_report,
        svg, resume, fresh, jobs, executor, scheduler, parallel_config):
    """Run SUITE (a YAML file, or the name of a bundled suite such as table3).

    Everything is checked before the run directory is created; its path is printed when it is.
    SIGINT (Ctrl-C) and SIGTERM stop the run with status "interrupted" in meta.json, keeping
    the cells that finished (exit 130 and 143); re-running the same command (or --resume
    RUN_DIR) continues it. A cell that fails is recorded with its error, the others go on, and
    the command exits with status 1 naming the failed cells."""
    import signal
    import threading

    from epbench.errors import Terminated

    def terminate(_signum, _frame):
        raise Terminated()

    main_thread = threading.current_thread() is threading.main_thread()  # signals go to the main thread only
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    from epbench.executors import ExecutorOptions

    if scheduler and parallel_config:
        raise click.UsageError("--scheduler and --parallel-config: one or the other")
    parallel = ExecutorOptions(executor="dask" if scheduler or parallel_config else executor, jobs=jobs,
                               scheduler=scheduler, parallel_config=parallel_config)
    try:
        _run(ctx, suite, backend, dataset, data_dir, epochs, trials, quick, only, include_heavy, assignments, out,
             no_report, svg, resume=resume, fresh=fresh, parallel=parallel)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(ctx, suite, backend, dataset, data_dir, epochs, trials, quick, only, include_heavy, assignments, out,
         no_report, svg=False, resume=None, fresh=False, parallel=None):
    from epbench.errors import CellsFailed, RunInterrupted, signal_number
    from epbench.results import settle_stale_runs
    from epbench.runner import RunOptions
    from epbench.suites import load_suite, parse_assignment, resolve_suite_path

    verbose = ctx.obj["verbose"]
    created: list = []

    def started(run_dir):
        created.append(run_dir)
        if verbose >= 0:
            click.echo(f"run directory: {run_dir}", err=True)

    try:
        path = resolve_suite_path(suite)
        parsed = [parse_assignment(a) for a in assignments]
        loaded, digest = load_suite(path, parsed)
        if dataset:
            _registry().dataset(dataset)
        _registry().backend(backend)
        for stale in settle_stale_runs(out):
            if verbose >= 0:
                click.echo(f"note: {stale}: its process ended without finishing; status now 'interrupted'", err=True)
        opts = RunOptions(backend=backend, out=out, dataset=dataset, epochs=epochs, trials=trials, quick=quick,
                          include_heavy=include_heavy, only=tuple(only), data_dir=data_dir,
                          overrides=tuple(assignments), command=shlex.join(["epbench", *sys.argv[1:]]),
                          resume=resume, fresh=fresh, **({"executor": parallel} if parallel else {}))
        run_dir = _run_with_progress(loaded, str(path), digest, opts, verbose, started)
        if not no_report:
            from epbench.report import render_report
            from epbench.results import fs_error

            try:
                report = render_report(run_dir, svg=svg)
            except OSError as exc:
                raise fs_error(run_dir, exc, "cannot write the report") from None
            if verbose >= 0:
                click.echo(f"report: {report}")
        click.echo(str(run_dir))
        _raise_failed_cells(run_dir)
    except KeyboardInterrupt as exc:
        signum = signal_number(exc)
        name = "SIGTERM" if signum == 15 else "SIGINT"
        if created:
            raise RunInterrupted(f"interrupted ({name}): run directory {created[0]}: {_status_of(created[0])}",
                                 signum) from None
        raise RunInterrupted(f"interrupted ({name}) before the run directory was created", signum) from None
    except CellsFailed:
        raise
    except EpbenchError as exc:
        if created:
            raise EpbenchError(f"{exc} (run directory {created[0]}: {_status_of(created[0])})") from None
        raise
    except Exception as exc:  # a bug: main() prints it, naming the run directory
        if created:
            exc.run_dir = created[0]
        raise


def _raise_failed_cells(run_dir) -> None:
    """Exit status 1 with one line naming the failed cells of a run that finished."""
    from epbench.errors import CellsFailed
    from epbench.results import read_meta

    failed = (read_meta(run_dir).get("cells") or {}).get("failed") or {}
    if failed:
        names = "; ".join(f"{label} ({error})" for label, error in failed.items())
        raise CellsFailed(f"{len(failed)} cell(s) failed: {names}; run directory {run_dir}: the other cells are "
                          f"kept; `epbench run ... --resume {run_dir}` re-runs only the failed ones")


def _status_of(run_dir) -> str:
    """The status of a run directory as meta.json records it, what it keeps, and how to go on."""
    from epbench.results import COMPLETE, RUNNING, read_meta

    try:
        meta = read_meta(run_dir)
    except EpbenchError:
        meta = {}
    status = meta.get("status", "unknown")
    if status == COMPLETE:
        return f"status {status}; `epbench report {run_dir}` renders the report again"
    if status == RUNNING:  # this process could not record its end: meta.json is not writable now
        return ("meta.json could not be updated and says 'running', which reads as interrupted once this "
                "process has ended; re-run the same command to start again")
    kept = f", the {meta['rows']} rows of the cells that finished kept" if "rows" in meta else ""
    return (f"status {status}{kept}; re-run the same command (or add --resume {run_dir}) to continue it: "
            "finished cells are not run again")


def _run_with_progress(suite, path, digest, opts, verbose, on_start=None):
    from epbench.runner import run_suite

    if verbose < 0 or not sys.stderr.isatty():
        def progress(message, _done, _total):
            if verbose >= 0:
                click.echo(message, err=True)

        return run_suite(suite, path, digest, opts, progress, on_start)

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(escape(f"{suite.name} on {opts.backend}"), total=None)

        def progress(message, done, total):
            if total:
                bar.update(task, completed=done, total=total, description=escape(message))
            elif verbose > 0 or message.startswith(("skipping", "warning", "continuing", "compiling")):
                console.print(escape(message))

        return run_suite(suite, path, digest, opts, progress, on_start)


# ----- discovery ---------------------------------------------------------------------------
@cli.command()
@click.option("--probe", is_flag=True, help="Import each framework and query its devices (slower).")
def backends(probe):
    """List the registered backends: name, version, availability, device."""
    from rich.console import Console
    from rich.table import Table

    reg = _registry()
    table = Table("backend", "plugin", "framework", "available", "device / reason")
    plugin_of = {name: info for info in reg.plugins for name in info.registers}
    for name in sorted(reg.backends):
        backend = reg.backends[name]
        info = plugin_of.get(name)
        try:
            avail = backend.availability(probe=probe)
        except Exception as exc:  # noqa: BLE001 - a third-party probe must not break the listing
            from epbench.backend import Availability

            avail = Availability(False, f"availability check failed: {exc}")
        version = backend.framework_version()
        table.add_row(*_plain(name, f"{info.distribution} {info.version}" if info else "?",
                              f"{backend.framework} {version}".strip(), "yes" if avail.ok else "no",
                              avail.device if avail.ok else avail.reason))
    Console(width=140).print(table)


def _plain(*texts: str) -> list[str]:
    """Texts shown through rich as they are: ``[...]`` is rich's markup, so an install hint such
    as ``pip install 'jax[cuda12]'`` would lose its brackets unless escaped."""
    from rich.markup import escape

    return [escape(str(t)) for t in texts]


@cli.command()
def plugins():
    """List the loaded plugins: distribution, version, hooks and what each registers (backends,
    datasets, algorithms, models), then every registered algorithm and model."""
    from rich.console import Console
    from rich.table import Table

    reg = _registry()
    table = Table("entry point", "module", "distribution", "hooks", "registers", "status")
    kinds = (("backend", reg.backends), ("dataset", reg.datasets), ("algorithm", reg.algorithms),
             ("model", reg.models))
    for info in reg.plugins:
        registers = "; ".join(f"{kind}s: {', '.join(names)}" for kind, names in
                              ((kind, [n for n in info.registers if n in found]) for kind, found in kinds) if names)
        table.add_row(*_plain(info.entry_point, info.module, f"{info.distribution} {info.version}".strip(),
                              ", ".join(info.hooks), registers, info.error or "ok"))
    console = Console(width=160)
    console.print(table)
    plugin_of = {name: info.entry_point for info in reg.plugins for name in info.registers}
    algos = Table("algorithm", "plugin", "agrees with BPTT", "GDU processes", "summary")
    from epbench.suites import has_processes

    for name, algorithm in reg.algorithms.items():
        algos.add_row(*_plain(name, plugin_of.get(name, "?"), getattr(algorithm, "agrees_with_bptt", "") or "—",
                              "yes" if has_processes(algorithm) else "no", getattr(algorithm, "summary", "")))
    console.print(algos)
    models = Table("model kind", "plugin", "energy-based", "summary")
    for kind, model in reg.models.items():
        models.add_row(*_plain(kind, plugin_of.get(kind, "?"), "yes" if model.energy_based else "no",
                               getattr(model, "summary", "")))
    console.print(models)


@cli.command()
@click.argument("name", required=False)
@click.option("-v", "--verbose", "full", is_flag=True, help="Full descriptions.")
def suites(name, full):
    """List the bundled suites (first sentence of each description); NAME: one suite in full,
    with its experiments."""
    from epbench.suites import (bundled_suite_names, bundled_suites_dir, load_suite, read_suite_file,
                                resolve_suite_path)

    folder = bundled_suites_dir()
    if folder is None:
        raise EpbenchError("no bundled suites folder found (set EPBENCH_SUITES)")
    names = bundled_suite_names()
    if name is not None and name not in names:
        from epbench.plugins import unknown_name_message

        raise EpbenchError(unknown_name_message("suite", name, names))
    width = min(100, shutil.get_terminal_size((100, 24)).columns)
    for stem in [name] if name else names:
        path = resolve_suite_path(stem)
        raw, _ = read_suite_file(path)
        experiments = [e for e in raw.get("experiments") or [] if isinstance(e, dict)]
        text = " ".join(str(raw.get("description") or "").split())
        if not (name or full):
            text = first_sentence(text)
        click.echo(f"{stem}  ({len(experiments)} experiments, {path})")
        if text:
            click.echo(textwrap.fill(text, width, initial_indent="    ", subsequent_indent="    "))
        if name:
            suite, _ = load_suite(path)
            for exp in suite.experiments:
                click.echo(f"    {exp.name:<16} {exp.task:<6} {exp.model.describe()}")


def first_sentence(text: str) -> str:
    """Up to the first '. ' followed by a capital letter ('et al. 2019' does not end one)."""
    import re

    match = re.search(r"\.\s+(?=[A-Z])", text)
    return text[: match.start() + 1] if match else text


@cli.group(invoke_without_command=True)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder holding the dataset files.")
@click.pass_context
def data(ctx, data_dir):
    """List the datasets: where each was found and whether it is sound and really that dataset
    (headers, sizes, published checksums of the labels); `data download NAME` fetches one."""
    if ctx.invoked_subcommand is not None:
        return
    reg = _registry()
    for name in sorted(reg.datasets):
        info = reg.datasets[name].info(data_dir)
        where = f"{info['location']}: " if info.get("found") else ""
        click.echo(f"{name:<14} {info.get('status', 'ok'):<13} {where}{info.get('reason', '')}")


@data.command("download")
@click.argument("name")
@click.option("--dest", type=click.Path(file_okay=False), help="Target folder (default: the per-user cache).")
def data_download(name, dest):
    """Download NAME (mnist, fashion-mnist) and verify its checksums."""
    from epbench.datasets.download import download

    _registry().dataset(name)
    click.echo(str(download(name, dest, log=lambda message: click.echo(message, err=True))))


@cli.command()
@click.argument("name", required=False)
@click.option("--reference", default="torch-cpu", show_default=True, help="Backend to agree with ('' for none).")
@click.option("--model", "model_kind", metavar="KIND",
              help="Check the registered model KIND on every CPU backend that runs it (instead of a backend).")
@click.option("--algorithm", "algorithm_name", metavar="NAME",
              help="Check the registered algorithm NAME on every CPU backend and model (instead of a backend).")
@click.option("--quick", is_flag=True, help="One dtype (float64), no β-sweep or training checks; models and "
                                            "algorithms: the paper flavour only.")
@click.option("-v", "--verbose", "show_all", is_flag=True, help="List passed and skipped checks too.")
def check(name, reference, model_kind, algorithm_name, quick, show_all):
    """Run the conformance kit on backend NAME, on a model (--model) or on an algorithm
    (--algorithm); one line per failure, exit 1 if a check fails."""
    if sum(x is not None for x in (name, model_kind, algorithm_name)) != 1:
        raise click.UsageError("give exactly one of NAME (a backend), --model KIND or --algorithm NAME")
    reports = []
    if model_kind is not None:
        from epbench.testing import check_model

        if model_kind not in _registry().models:
            from epbench.plugins import unknown_name_message

            raise EpbenchError(unknown_name_message("model kind", model_kind, _registry().models))
        reports.append(check_model(model_kind, quick=quick))
    elif algorithm_name is not None:
        from epbench.testing import check_algorithm

        _registry().algorithm(algorithm_name)
        reports.append(check_algorithm(algorithm_name, quick=quick))
    else:
        from epbench.testing import check_backend

        _registry().backend(name)
        reports.append(check_backend(name, reference=reference or None, quick=quick))
    for report in reports:
        click.echo(report.format(verbose=show_all))
    if any(report.failed for report in reports):
        raise SystemExit(1)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--svg", is_flag=True, help="Save the figures as SVG too (PNG only by default).")
def report(run_dir, svg):
    """Re-render RUN_DIR's report.md and figures from its results table."""
    from pathlib import Path

    from epbench.report import render_report

    from epbench.results import INTERRUPTED, has_table, settle_status

    path = Path(run_dir)
    if not path.is_dir():
        raise EpbenchError(f"{run_dir}: no such run directory")
    if not has_table(path) and not (path / "meta.json").is_file():
        raise EpbenchError(f"{run_dir}: not a run directory (no results.parquet or results.csv.gz)")
    meta = settle_status(path)
    if meta.get("status") == INTERRUPTED:
        click.echo(f"warning: {run_dir}: run interrupted"
                   + (f" ({meta['status_detail']})" if meta.get("status_detail") else "")
                   + "; the report shows the experiments that finished", err=True)
    try:
        click.echo(str(render_report(path, svg=svg)))
    except OSError as exc:
        from epbench.results import fs_error

        raise fs_error(path, exc, "cannot write the report") from None


@cli.command()
@click.argument("run_a", type=click.Path())
@click.argument("run_b", type=click.Path())
@click.option("--tolerance", type=click.FloatRange(min=0.0, min_open=True),
              help="Flag GDU metrics whose |B − A| exceeds this (absolute).")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(["relmse", "sign_agreement", "cosine"]),
              help="Check --tolerance on this GDU metric only (repeatable; default: all three).")
@click.option("--reference", type=click.Path(), help="A third run (e.g. the suite in float64) that A and B "
              "are measured against.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Also write the markdown to this file.")
def compare(run_a, run_b, tolerance, metrics, reference, out_file):
    """Two runs side by side (e.g. two backends on one suite): GDU metrics per layer, final
    errors, and run time without compilation. Exits 1 if --tolerance is exceeded."""
    from pathlib import Path

    from epbench.compare import GDU_METRICS, beyond_tolerance, compare_runs, render_markdown
    from epbench.results import has_table

    from epbench.results import COMPLETE, settle_status

    for run_dir in (run_a, run_b) + ((reference,) if reference else ()):
        if not Path(run_dir).is_dir() or not has_table(run_dir):
            raise EpbenchError(f"{run_dir}: not a run directory (no results.parquet or results.csv.gz)")
        status = settle_status(run_dir).get("status")
        if status not in (None, COMPLETE):
            click.echo(f"warning: {run_dir}: run {status}; only the experiments that finished are compared", err=True)
    comparison = compare_runs(run_a, run_b, reference)
    metrics = metrics or GDU_METRICS
    text = render_markdown(comparison, tolerance, metrics)
    click.echo(text, nl=False)
    if out_file:
        from epbench.results import atomic_write_text, fs_error

        try:
            atomic_write_text(Path(out_file), text)
        except OSError as exc:
            raise fs_error(out_file, exc, "--out: cannot write") from None
    if tolerance and len(comparison.gdu) and beyond_tolerance(comparison, tolerance, metrics).any():
        raise SystemExit(1)


@cli.command()
@click.option("--backend", "-b", "names", multiple=True, help="Backend (repeatable; default: every available one).")
@click.option("--model", "-m", "models", multiple=True, help="Table 4 row (repeatable; default: p-1h eb-1h eb-2h p-3h p-conv).")
@click.option("--algorithm", "-a", "algorithms", multiple=True,
              help="What to time: a registered algorithm's training step (`epbench plugins` lists them) or "
                   "`gdu` (repeatable; default: ep, bptt and gdu).")
@click.option("--batches", default=10, show_default=True, type=click.IntRange(min=1), help="Timed batches per measurement.")
@click.option("--alternate", is_flag=True, help="Training steps under the even/odd alternation of the P models "
              "(phase.alternate); other models are skipped, GDU is not timed.")
@click.option("--per-step", is_flag=True, help="Instead: time one first-phase step at batch sizes "
              "1, 5, 10, 20 and 40 (does the step cost grow with the batch, or is it fixed?).")
@click.option("--trials", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train N independent trials together (their own parameter copies), as an experiment's "
                   "trials are: one mapped program where the backend batches trials (jax or torch with "
                   "EPBENCH_BATCH_TRIALS=1), else one after the other. Times are seconds per batch per trial, "
                   "so 1 and N compare directly. GDU is not timed with N > 1: `-a gdu` is refused and the "
                   "default algorithms are then ep and bptt.")
@click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False))
def bench(names, models, algorithms, batches, alternate, per_step, trials, out):
    """Time EP and BPTT training steps and GDU per batch of 20 (Table 4 settings): useful FLOPs,
    GFLOP/s and the fraction of the device's float32 matmul peak measured on the spot."""
    import time

    from epbench import __version__, hardware
    from epbench.bench import BENCH_MODELS, bench_rows, describe_tf32, step_rows, tf32_settings
    from epbench.presets import TABLE4
    from epbench.results import git_provenance, new_run_dir, to_frame, write_meta, write_table

    if per_step and (alternate or algorithms or trials > 1):
        raise EpbenchError("--per-step times the first-phase step only: drop --alternate, --algorithm and --trials")
    if trials > 1 and "gdu" in algorithms:
        raise EpbenchError("--trials > 1 times training steps only: GDU is computed for one trial (drop -a gdu)")
    reg = _registry()
    for algorithm in algorithms:
        if algorithm != "gdu" and algorithm not in reg.algorithms:
            from epbench.plugins import unknown_name_message

            raise EpbenchError("--algorithm: " + unknown_name_message("algorithm", algorithm,
                                                                       [*reg.algorithms, "gdu"]))
    for model in models:
        if model not in TABLE4:
            from epbench.plugins import unknown_name_message

            raise EpbenchError(unknown_name_message("model", model, TABLE4))
    chosen = list(names) or sorted(n for n, b in reg.backends.items() if b.availability(probe=False).ok)
    backends_ = []
    for name in chosen:
        backend = reg.backend(name)
        avail = backend.availability(probe=True)
        if not avail.ok:
            if names:
                raise EpbenchError(f"backend '{name}' is not available: {avail.reason}")
            click.echo(f"skipping {name}: {avail.reason}", err=True)
            continue
        backends_.append((backend, avail))
    from epbench.results import check_output_dir

    check_output_dir(out)  # before the timing work
    commit, dirty = git_provenance()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = []
    for backend, avail in backends_:
        if per_step:
            made = step_rows(backend, models or BENCH_MODELS, progress=click.echo)
        else:
            made = bench_rows(backend, models or BENCH_MODELS,
                              algorithms or (("ep", "bptt", "gdu") if trials == 1 else ("ep", "bptt")), batches,
                              click.echo, alternate=alternate, trials=trials)
        for row in made:
            rows.append({**row, "device": avail.device, "epbench_version": __version__, "git_commit": commit,
                         "git_dirty": dirty, "suite": "bench", "start_time": started, "trial": 0, "seed": 0})
    run_dir = new_run_dir(out, "bench", "+".join(b.name for b, _ in backends_) or "none")
    for row in rows:
        row["run_id"] = run_dir.name
    write_table(run_dir, to_frame(rows))
    write_meta(run_dir, {"suite": "bench", "command": shlex.join(["epbench", *sys.argv[1:]]), "started": started,
                         "git_commit": commit, "git_dirty": dirty, "epbench_version": __version__,
                         "backends": [b.name for b, _ in backends_], "host": hardware.host(),
                         **({} if per_step else {"trials": trials}),
                         "tf32": {b.name: describe_tf32(b.framework, tf32_settings(b.framework)) for b, _ in backends_}})
    click.echo(str(run_dir))


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors with exit status 2 for bad input."""
    args = sys.argv[1:] if argv is None else argv
    verbose = sum(a.count("v") for a in args if a.startswith("-") and not a.startswith("--") and set(a[1:]) <= {"v"})
    try:
        cli.main(args=args, prog_name="epbench", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except RunInterrupted as exc:
        click.echo(str(exc), err=True)
        return exc.exit_code
    except CellsFailed as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except EpbenchError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - unexpected: a bug, not bad input
        if verbose > 1:
            raise
        where = getattr(exc, "run_dir", None)
        where = f"; run directory {where}: status failed" if where else ""
        click.echo(f"internal error: {type(exc).__name__}: {exc}{where} (run with -vv for the traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
