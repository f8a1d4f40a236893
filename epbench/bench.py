"""``epbench bench``: seconds per batch, useful FLOPs, achieved GFLOP/s and the fraction of the
device's float32 matmul peak, measured on the spot, for each model and backend.

Timing rule (:func:`best_time`): device work is asynchronous on a GPU, so every timed region
starts and ends with ``backend.synchronize()``; the first call, which compiles (JAX), allocates
and autotunes (cuDNN), is timed apart (``first_call_seconds``) and never mixed into the run
time; then untimed warm-up calls for ``WARM_UP_S``; the run time is the fastest of the timed
calls. The TF32 state of the framework (:func:`tf32_settings`, :func:`describe_tf32`) is printed
for each backend and kept in meta.json (``tf32``): on Ampere and later GPUs, TF32 rounds float32 matmul inputs to 10
mantissa bits, which is faster and not float32."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from epbench import compute, training
from epbench import flops as flopcount
from epbench import hardware
from epbench.presets import table4
from epbench.spec import alternation_problem

#: the models benchmarked by default (Table 4 settings, batch 20)
BENCH_MODELS = ("p-1h", "eb-1h", "eb-2h", "p-3h", "p-conv")

#: batch sizes of ``epbench bench --per-step``
STEP_BATCHES = (1, 5, 10, 20, 40)


def numpy_matmul_gflops(n: int = 2048, dtype: str = "float32", repeats: int = 10) -> float:
    """n×n matmul throughput of NumPy's BLAS on this machine, best of ``repeats``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


def device_peak(backend) -> float:
    peak = backend.matmul_gflops()
    return peak if peak else numpy_matmul_gflops()


#: what epbench's own backends do inside their calls, whatever the process defaults say
BACKEND_FLOAT32 = {
    "torch": "epbench's torch backend turns TF32 off for matmuls and cuDNN inside its calls (IEEE float32)",
    "jax": "epbench's jax backend asks for Precision.HIGHEST in every product (IEEE float32)",
}

#: settings values that select TF32 (or lower) for float32 matmuls
_TF32_VALUES = {"high", "medium", "tf32", "tensorfloat32", "bfloat16", "bfloat16_3x", "default", "fastest"}


def tf32_settings(framework: str) -> dict[str, object]:
    """The process-wide float32 matmul settings of ``framework`` (``torch``: the
    ``allow_tf32`` switches, ``get_float32_matmul_precision()`` and, where the version has them,
    the ``fp32_precision`` switches; ``jax``: ``jax_default_matmul_precision``), read without
    changing them; empty for another framework or one that is not installed."""
    if framework == "torch":
        try:
            import torch
        except ImportError:
            return {}
        out: dict[str, object] = {
            "torch.backends.cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
            "torch.backends.cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32)}
        for name, obj in (("torch.backends.cuda.matmul", torch.backends.cuda.matmul),
                          ("torch.backends.cudnn.conv", getattr(torch.backends.cudnn, "conv", None))):
            value = getattr(obj, "fp32_precision", None) if obj is not None else None
            if isinstance(value, str):
                out[f"{name}.fp32_precision"] = value
        return out
    if framework == "jax":
        try:
            import jax
        except ImportError:
            return {}
        value = jax.config.jax_default_matmul_precision
        return {"jax_default_matmul_precision": None if value is None else str(value)}
    return {}


def describe_tf32(framework: str, values: dict[str, object]) -> str:
    """One line on TF32 from :func:`tf32_settings`' ``values``. torch: matmuls use TF32 when
    ``allow_tf32`` is on, the float32 matmul precision is ``high``/``medium`` or the matmul
    ``fp32_precision`` is ``tf32``; cuDNN convolutions when the cuDNN ``allow_tf32`` is on (its
    default) or the conv ``fp32_precision`` is ``tf32``. JAX: float32 dots on GPUs use TF32
    unless ``jax_default_matmul_precision`` is ``highest``/``float32`` (unset = ``default`` =
    TF32). Followed by what epbench's backend of that framework does inside its calls."""
    def on(flag: bool) -> str:
        return "on" if flag else "off"

    if framework == "torch" and values:
        matmul = (bool(values.get("torch.backends.cuda.matmul.allow_tf32"))
                  or str(values.get("torch.get_float32_matmul_precision()")).lower() in ("high", "medium")
                  or str(values.get("torch.backends.cuda.matmul.fp32_precision", "")).lower() == "tf32")
        conv = (bool(values.get("torch.backends.cudnn.allow_tf32"))
                or str(values.get("torch.backends.cudnn.conv.fp32_precision", "")).lower() == "tf32")
        state = f"process defaults: TF32 {on(matmul)} for CUDA matmuls, {on(conv)} for cuDNN convolutions"
    elif framework == "jax" and values:
        value = values.get("jax_default_matmul_precision")
        tf32 = value is None or str(value).lower() in _TF32_VALUES
        state = (f"process default: TF32 {on(tf32)} for float32 dots on GPUs "
                 f"(jax_default_matmul_precision={value if value is not None else 'unset'})")
    else:
        return "TF32: not applicable (no torch or jax settings)"
    return f"{state}; {BACKEND_FLOAT32[framework]}"


def _random_data(spec, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n, *spec.input_shape)).astype(np.float32)
    labels = rng.integers(0, spec.n_out, size=n)
    return x, labels


def settings(model: str, dtype: str = "float32", alternate: bool = False):
    """(spec, phase, train) of a Table 4 row, optionally with ``phase.alternate``."""
    spec, phase, train = table4(model, dtype=dtype)
    return spec, phase.model_copy(update={"alternate": alternate}), train


#: seconds of untimed calls before timing (after the first, compiling, call): a fresh process
#: runs its first second or so measurably slower (page faults, thread pools waking up)
WARM_UP_S = 0.5


@dataclass(frozen=True)
class Timing:
    """``first_s``: seconds of the first call (compilation, allocation, autotuning and the work
    itself); ``best_s``: seconds of the fastest timed call."""

    first_s: float
    best_s: float

    def per(self, n: int) -> "Timing":
        """The best time divided by ``n`` (e.g. per batch); the first call stays whole."""
        return Timing(self.first_s, self.best_s / n)


def best_time(work: Callable[[], object], backend, repeats: int = 3,
              clock: Callable[[], float] = time.perf_counter) -> Timing:
    """The first call of ``work``, timed apart, then the fastest of ``repeats`` timed calls
    (timeit's rule: the fastest run is the one least disturbed by the rest of the machine),
    after untimed calls until ``WARM_UP_S`` has passed. Every timed region is
    ``synchronize(); start = clock(); work(); synchronize(); clock() - start``, so queued device
    work is neither left out nor carried into the next region."""
    def region() -> float:
        backend.synchronize()
        start = clock()
        work()
        backend.synchronize()
        return clock() - start

    first = region()
    warm_until = clock() + WARM_UP_S
    while clock() < warm_until:
        work()
        backend.synchronize()
    return Timing(first, min(region() for _ in range(max(repeats, 1))))


def time_per_batch(backend, model: str, algorithm: str, batches: int = 10, dtype: str = "float32",
                   batch_size: int = 20, repeats: int = 3, alternate: bool = False, trials: int = 1) -> Timing:
    """Seconds per mini-batch of one training step (a registered algorithm: ``ep``, ``bptt``, ...)
    or one GDU computation of EP's and BPTT's processes (``gdu``), timed by :func:`best_time` over ``batches`` mini-batches on the same data (the
    first call, of all ``batches``, whole).

    ``trials`` > 1 (training steps only): that many independent trials (their own parameter
    copies, from seeds 0, 1, ...) trained together by one ``training.train_epochs`` call, as an
    experiment's trials are: one mapped program where ``backend.batch_trials`` is true, else one
    after the other. The run time is then per batch *and per trial* (so 1 and N trials compare
    directly); the first call stays whole (all trials)."""
    if trials < 1:
        raise ValueError(f"trials must be at least 1, not {trials}")
    if algorithm == "gdu" and trials > 1:
        raise ValueError("GDU is timed for one trial only (trials=1)")
    spec, phase, train = settings(model, dtype, alternate)
    train = train.model_copy(update={"batch_size": batch_size, "lrs": tuple(0.0 for _ in train.lrs)})
    params = backend.from_numpy(spec, backend.init_params(spec, 0), dtype)
    if algorithm != "gdu" and trials > 1:
        copies = [params] + [backend.from_numpy(spec, backend.init_params(spec, seed), dtype)
                             for seed in range(1, trials)]
        x, labels = _random_data(spec, batch_size * batches)

        def work():
            training.train_epochs(backend, spec, copies, [x] * trials, [labels] * trials, phase, train, algorithm)
        return best_time(work, backend, repeats).per(batches * trials)
    if algorithm == "gdu":
        x, labels = _random_data(spec, batch_size)
        y = np.eye(spec.n_out)[labels]

        def work():
            for _ in range(batches):
                compute.gdu(backend, spec, params, x, y, phase, algorithms=("ep",))
    else:
        x, labels = _random_data(spec, batch_size * batches)

        def work():
            training.train_epochs(backend, spec, [params], [x], [labels], phase, train, algorithm)
    return best_time(work, backend, repeats).per(batches)


def time_per_step(backend, model: str, batch_size: int, steps: int = 400, repeats: int = 5,
                  dtype: str = "float32") -> float:
    """Seconds per step of the first phase at ``batch_size``: (time of 1 + ``steps`` steps − time
    of 1 step) / ``steps``, which removes the input drive and the cost of the call; each timed
    by :func:`best_time`."""
    spec, _, _ = settings(model, dtype)
    params = backend.from_numpy(spec, backend.init_params(spec, 0), dtype)
    x, _ = _random_data(spec, batch_size)

    def phase_of(T: int) -> float:
        return best_time(lambda: compute.first_phase(backend, spec, params, x, T), backend, repeats).best_s

    return max(phase_of(1 + steps) - phase_of(1), 0.0) / steps


#: the analytic FLOP counts of :mod:`epbench.flops`, by what is timed
FLOP_COUNTERS: dict[str, Callable] = {"ep": flopcount.ep_train_flops, "bptt": flopcount.bptt_train_flops,
                                      "gdu": flopcount.gdu_flops}


def useful_flops(model: str, algorithm: str, batch_size: int = 20, alternate: bool = False) -> float:
    """Useful FLOPs of one batch (:mod:`epbench.flops`); NaN for an algorithm it does not count."""
    spec, phase, _ = settings(model, alternate=alternate)
    counter = FLOP_COUNTERS.get(algorithm)
    return counter(spec, phase, batch_size) if counter else float("nan")


def _rows(backend, model: str, spec, phase, algorithm: str, batch: int, peak: float, gflops: float,
          measured: dict[str, float]) -> list[dict]:
    """Results rows of one measurement, made right after it: ``measured`` metrics, then GFLOP/s,
    peak and fraction; the implementation that ran it (``backend.pop_implementation()``) and
    the hardware (:func:`epbench.hardware.columns`)."""
    base = {"experiment": model, "task": "bench", "model": spec.kind, "model_desc": spec.describe(),
            "flavor": spec.flavor, "dtype": "float32", "T": phase.T, "K": phase.K, "beta": phase.beta,
            "alternate": phase.alternate, "batch_size": batch, "algorithm": algorithm, "backend": backend.name,
            "framework": backend.framework, "framework_version": backend.framework_version(),
            "implementation": backend.pop_implementation(),
            **hardware.columns(backend.framework, backend.availability(probe=False).device)}
    values = {**measured, "gflops": gflops, "peak_gflops": peak, "peak_fraction": gflops / peak}
    return [{**base, "metric": metric, "value": value} for metric, value in values.items()]


def bench_rows(backend, models=BENCH_MODELS, algorithms=("ep", "bptt", "gdu"), batches: int = 10,
               progress: Callable[[str], None] = lambda _m: None, alternate: bool = False,
               trials: int = 1) -> list[dict]:
    """One row per (model, algorithm, metric) for ``backend``; with ``alternate``, the training
    steps under the even/odd alternation (P models only; GDU is not timed); with ``trials`` > 1,
    that many trials trained together, seconds per batch per trial (:func:`time_per_batch`; GDU
    is not timed). Each measurement has a ``trials`` row (metric ``trials``, the number of
    trials trained together; 1 by default) beside its timings. The matmul peak is
    measured again before each model, so that each row's fraction compares two measurements
    made within seconds of each other (timings on a shared machine drift over minutes)."""
    progress(f"{backend.name}: {describe_tf32(backend.framework, tf32_settings(backend.framework))}")
    rows = []
    for model in models:
        spec, phase, _ = settings(model, alternate=alternate)
        reason = backend.supports(spec, "float32") or alternation_problem(spec, phase)
        if reason:
            progress(f"{backend.name} {model}: skipped ({reason})")
            continue
        peak = device_peak(backend)
        for algorithm in algorithms:
            if (alternate or trials > 1) and algorithm == "gdu":
                continue
            timing = time_per_batch(backend, model, algorithm, batches=batches, alternate=alternate, trials=trials)
            seconds = timing.best_s
            work = useful_flops(model, algorithm, alternate=alternate)
            gflops = work / seconds / 1e9
            made = _rows(backend, model, spec, phase, algorithm, 20, peak, gflops,
                         {"seconds_per_batch": seconds, "seconds_per_sample": seconds / 20, "flops_per_batch": work,
                          "first_call_seconds": timing.first_s, "trials": float(trials)})
            rows += made
            per = f" trials={trials}" + (" (per batch per trial)" if trials > 1 else "")
            progress(f"{backend.name:<10} {model:<7} {algorithm:<5} {seconds * 1e3:9.2f} ms/batch "
                     f"{work / 1e6:9.1f} MFLOP {gflops:8.1f} GFLOP/s {100 * gflops / peak:6.1f}% of {peak:.0f} "
                     f"(first call {timing.first_s:.2f} s) [{made[0]['implementation']}]{per}")
    return rows


def step_rows(backend, models=BENCH_MODELS, batch_sizes=STEP_BATCHES,
              progress: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """``epbench bench --per-step``: seconds and GFLOP/s of one first-phase step per model and
    batch size. A cost that grows in proportion to the batch is compute in the kernels; one that
    stays flat is the fixed cost of launching them."""
    progress(f"{backend.name}: {describe_tf32(backend.framework, tf32_settings(backend.framework))}")
    rows = []
    for model in models:
        spec, phase, _ = settings(model)
        reason = backend.supports(spec, "float32")
        if reason:
            progress(f"{backend.name} {model}: skipped ({reason})")
            continue
        peak = device_peak(backend)
        for batch in batch_sizes:
            seconds = time_per_step(backend, model, batch)
            work = flopcount.step_flops(spec, batch)
            gflops = work / seconds / 1e9 if seconds > 0 else float("nan")
            made = _rows(backend, model, spec, phase, "first-phase-step", batch, peak, gflops,
                         {"seconds_per_step": seconds, "flops_per_step": work})
            rows += made
            progress(f"{backend.name:<10} {model:<7} step batch {batch:<3d} {seconds * 1e6:9.2f} µs/step "
                     f"{work / 1e6:7.3f} MFLOP {gflops:8.1f} GFLOP/s {100 * gflops / peak:6.1f}% of {peak:.0f} "
                     f"[{made[0]['implementation']}]")
    return rows
