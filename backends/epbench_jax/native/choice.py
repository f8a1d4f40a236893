"""Which implementation runs a phase that the fused kernel handles: chosen by measurement.

The kernel is not faster everywhere: on a 2-core AVX2 EPYC without AVX-512, one P-1h EP batch
took 4.4 ms with it against 2.2 ms with XLA's loop (EB-1h: 11.9 against 4.5 ms). So the first
time a phase is met (model, batch, steps, free or nudged; float32), both implementations run it
back to back on its real shapes (:func:`race`: best of a few alternating runs within a small
time budget) and the faster one is kept (a tie keeps the XLA loop). The decision is stored in
``<library>.choices.json`` beside the cached library, whose name already hashes the kernel's
source, the flags, the compiler, jaxlib and the CPU; the key adds the phase and the number of
cores this process may use, so later runs on this machine do not measure again (delete the file
to measure again).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from epbench import hardware
from epbench.spec import ModelSpec

log = logging.getLogger(__name__)

KERNEL = "fused-cpp"
LOOP = "xla-loop"
#: at most this many timed rounds (one run of each implementation per round)
ROUNDS = 25
#: the timed runs stop after a round once they have taken this many seconds in all
BUDGET_S = 0.25


def race(run_kernel: Callable[[], object], run_loop: Callable[[], object],
         clock: Callable[[], float] = time.perf_counter, rounds: int = ROUNDS, budget_s: float = BUDGET_S) -> dict:
    """Time both implementations back to back and return ``{"choice", "kernel_s", "loop_s",
    "rounds"}``: the best (smallest) time of each, and the faster one (the XLA loop on a tie).

    Each is run once untimed first (first touch of its buffers), then they alternate, one timed
    run each per round, the order swapped every round, for at most ``rounds`` rounds and stopping
    after the round in which the timed runs reach ``budget_s`` seconds in all."""
    run_kernel()
    run_loop()
    runs = {KERNEL: run_kernel, LOOP: run_loop}
    best = {KERNEL: float("inf"), LOOP: float("inf")}
    spent, done = 0.0, 0
    while done < max(rounds, 1):
        order = (KERNEL, LOOP) if done % 2 == 0 else (LOOP, KERNEL)
        for name in order:
            start = clock()
            runs[name]()
            seconds = clock() - start
            best[name] = min(best[name], seconds)
            spent += seconds
        done += 1
        if spent >= budget_s:
            break
    choice = KERNEL if best[KERNEL] < best[LOOP] else LOOP
    return {"choice": choice, "kernel_s": best[KERNEL], "loop_s": best[LOOP], "rounds": done}


def key(spec: ModelSpec, batch: int, steps: int, nudged: bool) -> str:
    """The decision's key: the model (its description and a hash of every field), the batch,
    the number of steps, free or nudged, and the usable cores."""
    digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]
    return (f"{spec.describe()} [{digest}] batch={batch} steps={steps} {'nudged' if nudged else 'free'} "
            f"float32 cores={hardware.cores()}")


def choices_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".choices.json")


def read_choices(path: Path) -> dict:
    """The stored decisions (none if the file is missing or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store(path: Path, entry_key: str, entry: dict) -> None:
    """Add one decision to the file (read, merged and written under the cache's lock)."""
    from epbench.results import atomic_write_bytes
    from epbench_jax.native.build import locked

    with locked(path.parent):
        data = read_choices(path)
        data[entry_key] = entry
        atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def measure(spec: ModelSpec, batch: int, steps: int, nudged: bool) -> dict:
    """:func:`race` on this phase: both implementations compiled as programs of their own that
    run the phase alone, from s = 0, with the step inputs of ``dynamics.JaxDynamics`` computed
    beforehand (initial parameters of seed 0, inputs uniform in [0, 1]). May run while another
    program is being traced."""
    import jax

    from epbench.params import init_params
    from epbench_jax import dynamics as D
    from epbench_jax import native
    from epbench_jax.ops import OPS

    rng = np.random.default_rng(0)
    with jax.ensure_compile_time_eval():
        params, x, y, beta = jax.device_put((
            {k: np.asarray(v, np.float32) for k, v in init_params(spec, 0).items()},
            rng.uniform(0.0, 1.0, (batch, *spec.input_shape)).astype(np.float32),
            np.eye(spec.n_out, dtype=np.float32)[rng.integers(0, spec.n_out, batch)],
            np.float32(0.5)))

    def dynamics(params, x):
        return D.JaxDynamics(OPS, spec.model, spec, params, x)

    inputs = jax.jit(lambda params, x: dynamics(params, x).inputs).lower(params, x).compile()(params, x)
    args = (params, x, inputs, y, beta)

    def program(kernel: bool):
        def run(params, x, inputs, y, beta):
            dyn = dynamics(params, x)
            dyn.inputs = inputs  # computed beforehand: XLA drops the drive here
            s = dyn.zeros()
            nudge = (beta, y) if nudged else None
            if kernel:
                return native.phase(spec, dyn.inputs, s, steps, nudge)
            with D.fused_phases(False):
                return dyn.run(s, steps, nudge)

        exe = jax.jit(run).lower(*args).compile()
        return lambda: jax.block_until_ready(exe(*args))

    return race(program(True), program(False))


def decide(lib: Path, spec: ModelSpec, batch: int, steps: int, nudged: bool, memo: dict) -> str:
    """``fused-cpp`` or ``xla-loop`` for this phase: from ``memo`` (this process), else from the
    file beside ``lib``, else measured now and stored in both."""
    entry_key = key(spec, batch, steps, nudged)
    if entry_key in memo:
        return memo[entry_key]
    path = choices_path(lib)
    stored = read_choices(path).get(entry_key)
    if isinstance(stored, dict) and stored.get("choice") in (KERNEL, LOOP):
        memo[entry_key] = stored["choice"]
        return stored["choice"]
    result = measure(spec, batch, steps, nudged)
    result["measured"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    log.info("jax-cpu: %s: fused kernel %.3g ms, XLA loop %.3g ms: using the %s", entry_key,
             1e3 * result["kernel_s"], 1e3 * result["loop_s"], result["choice"])
    try:
        store(path, entry_key, result)
    except OSError as exc:
        log.warning("jax-cpu: could not store the kernel choice in %s (%s)", path, exc)
    memo[entry_key] = result["choice"]
    return result["choice"]
