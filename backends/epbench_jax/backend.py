"""The JAX backend (``jax-cpu``, ``jax-cuda``).

Importing this module does not import JAX: every method imports it lazily. float64 runs inside
the scoped ``jax.enable_x64`` switch, so the rest of the process keeps JAX's float32 default.
Each program (a whole phase or algorithm) is compiled once per (program, spec, step counts,
argument shapes and dtypes) and cached; compilation is timed apart from the run. On the CPU, the
phases of the one-hidden-layer models in float32 run as one call of a fused kernel where that is
faster on this machine, measured once and remembered (:mod:`epbench_jax.native`;
``EPBENCH_JAX_NATIVE=1`` forces the kernel, ``=0`` the XLA loop); :meth:`JaxBackend.pop_implementation`
reports which ran.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from typing import Mapping

import numpy as np

from epbench.backend import Availability, Backend, Capabilities, EpochResult, GDUProcesses
from epbench.errors import BackendUnavailable, EpbenchError
from epbench.params import check_params
from epbench.spec import Algorithm, ModelSpec, PhaseSettings, TrainSettings, check_alternation

_CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")
_NVIDIA_DRIVER = "/proc/driver/nvidia/version"


def _jax():
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # JAX logs a warning for every platform it probes and cannot start (e.g. "Unable to
    # initialize backend 'tpu'"); availability() reports what matters, so keep those quiet
    # unless the user configured that logger.
    probe_log = logging.getLogger("jax._src.xla_bridge")
    if probe_log.level == logging.NOTSET:
        probe_log.setLevel(logging.ERROR)
    import jax

    return jax


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class JaxBackend(Backend):
    """EP and BPTT in JAX, each phase one compiled XLA program."""

    framework = "jax"
    capabilities = Capabilities(alternate=True, compiles=True)
    #: mini-batches per compiled training chunk
    CHUNK = 50

    def __init__(self, platform: str = "cpu"):
        if platform not in ("cpu", "cuda"):
            raise ValueError(f"unknown JAX platform {platform!r}")
        self.platform = platform
        self.name = f"jax-{platform}"
        self._cache: dict = {}
        self._dev = None
        #: run the trials of a training experiment as one vmapped program (train_epochs)
        self.batch_trials = os.environ.get("EPBENCH_BATCH_TRIALS", "") == "1"
        #: timings of the latest call ({"compile_s", "run_s"})
        self.last_timings: dict[str, float] = {}
        #: implementations of the phases run since the last pop_implementation()
        self._implementations: set[str] = set()

    def __repr__(self) -> str:
        return f"JaxBackend({self.platform!r})"

    # ----- discovery ------------------------------------------------------------------------
    def availability(self, probe: bool = False) -> Availability:
        if not _has_module("jax"):
            return Availability(False, "jax is not installed (pip install 'epbench[jax]')")
        if self.platform == "cpu":
            from epbench_jax import native

            try:
                native.mode()
            except EpbenchError as exc:
                return Availability(False, str(exc))
        if self.platform == "cuda" and not probe:
            if not any(_has_module(n) for n in _CUDA_PLUGINS):
                return Availability(False, "the JAX CUDA plugin is not installed (pip install 'jax[cuda12]')")
            if not os.path.exists(_NVIDIA_DRIVER):
                return Availability(False, "no NVIDIA driver found")
        if not probe:
            return Availability(True, device=self.platform)
        jax = _jax()
        try:
            devices = jax.devices(self.platform)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return Availability(False, f"JAX has no {self.platform} device: {first}")
        if not devices:
            return Availability(False, f"JAX has no {self.platform} device")
        d = devices[0]
        return Availability(True, device=f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip())

    def _device(self):
        if self._dev is None:
            avail = self.availability(probe=True)
            if not avail.ok:
                raise BackendUnavailable(f"backend {self.name} is unavailable: {avail.reason}")
            self._dev = _jax().devices(self.platform)[0]
        return self._dev

    def pop_implementation(self) -> str:
        """``xla-loop``, ``fused-cpp`` or ``fused-cpp+xla-loop``: how the phases of the calls
        since the previous call ran (``native.chosen``; a program without a phase the kernel
        handles counts as ``xla-loop``). ``xla-loop`` when nothing ran."""
        used, self._implementations = self._implementations, set()
        return "+".join(sorted(used)) or "xla-loop"

    # ----- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _x64(dtype: str):
        """Scoped float64 switch: on for float64 calls, off otherwise; never global."""
        jax = _jax()
        return jax.enable_x64(dtype == "float64")

    @staticmethod
    def _dtype_of(params) -> str:
        return str(next(iter(params.values())).dtype)

    def _put(self, a, dtype: str | None = None):
        jax = _jax()
        a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
        return jax.device_put(a, self._device())

    def _native(self, spec: ModelSpec, params, dtype: str) -> dict:
        """Parameters as device arrays of ``dtype`` (cast if the caller's dtype differs)."""
        dev = self._device()
        if not isinstance(params, Mapping) or not params:
            raise TypeError(f"{self.name}: parameters must come from from_numpy")
        if self._dtype_of(params) == dtype and all(
                getattr(v, "devices", None) and dev in v.devices() for v in params.values()):
            return dict(params)
        return {k: self._put(np.asarray(v), dtype) for k, v in params.items()}

    def _call(self, key: tuple, build, *args):
        """Run the cached compiled program ``key`` (compiling ``build()`` on first use).
        Returns (outputs, {"compile_s", "run_s"})."""
        from epbench_jax import native
        from epbench_jax.algorithms import fused_phases

        jax = _jax()
        how = native.mode() if self.platform == "cpu" else "loop"
        leaves, tree = jax.tree.flatten(args)
        sig = (key, self.platform, how, tree, tuple((tuple(np.shape(a)), str(a.dtype)) for a in leaves))
        compile_s = 0.0
        cached = self._cache.get(sig)
        if cached is None:
            t0 = time.perf_counter()
            with fused_phases(how != "loop"), native.recording() as used:
                exe = jax.jit(build()).lower(*args).compile()
            compile_s = time.perf_counter() - t0
            cached = self._cache[sig] = (exe, used or {native.LOOP})
        exe, implementation = cached
        self._implementations |= implementation
        t0 = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        timings = {"compile_s": compile_s, "run_s": time.perf_counter() - t0}
        self.last_timings = timings
        return out, timings

    def _batch(self, spec: ModelSpec, x, dtype: str):
        x = np.asarray(x)
        return self._put(x.reshape((x.shape[0],) + tuple(spec.input_shape)), dtype)

    def _scalar(self, v: float, dtype: str):
        return self._put(np.asarray(v), dtype)

    @staticmethod
    def _host(tree):
        jax = _jax()
        return jax.tree.map(np.asarray, tree)

    # ----- parameters -------------------------------------------------------------------------
    def from_numpy(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str) -> dict:
        check_params(spec, dict(params))
        if dtype not in ("float32", "float64"):
            raise ValueError(f"unsupported dtype {dtype!r}")
        with self._x64(dtype):
            return {k: self._put(params[k], dtype) for k in spec.param_shapes}

    def to_numpy(self, spec: ModelSpec, params) -> dict[str, np.ndarray]:
        return {k: np.array(params[k]) for k in spec.param_shapes}

    # ----- phases and algorithms ----------------------------------------------------------------
    def first_phase(self, spec: ModelSpec, params, x: np.ndarray, T: int) -> list[np.ndarray]:
        from epbench_jax import algorithms as A

        dtype = self._dtype_of(params)
        with self._x64(dtype):
            p = self._native(spec, params, dtype)
            s, _ = self._call(("first_phase", spec, T), lambda: A.first_phase_program(spec, T),
                              p, self._batch(spec, x, dtype))
            return [np.asarray(v) for v in s]

    def ep_update(self, spec: ModelSpec, params, x: np.ndarray, y: np.ndarray,
                  phase: PhaseSettings) -> dict[str, np.ndarray]:
        from epbench_jax import algorithms as A

        return self._direction(("ep_update", spec, phase.T, phase.K, phase.symmetric, phase.alternate),
                               lambda: A.ep_update_program(spec, phase.T, phase.K, phase.symmetric, phase.alternate),
                               spec, params, x, y, phase, with_beta=True)

    def bptt_grad(self, spec: ModelSpec, params, x: np.ndarray, y: np.ndarray,
                  phase: PhaseSettings) -> dict[str, np.ndarray]:
        from epbench_jax import algorithms as A

        return self._direction(("bptt_grad", spec, phase.T, phase.K, phase.alternate),
                               lambda: A.bptt_grad_program(spec, phase.T, phase.K, phase.alternate),
                               spec, params, x, y, phase, with_beta=False)

    def _direction(self, key: tuple, build, spec: ModelSpec, params, x, y, phase: PhaseSettings,
                   with_beta: bool) -> dict[str, np.ndarray]:
        """Run the update program ``key`` (EP update or BPTT gradient) on one batch, as NumPy."""
        check_alternation(spec, phase)
        dtype = phase.dtype
        with self._x64(dtype):
            args = [self._native(spec, params, dtype), self._batch(spec, x, dtype), self._put(y, dtype)]
            if with_beta:
                args.append(self._scalar(phase.beta, dtype))
            out, _ = self._call(key, build, *args)
            return self._host(out)

    def gdu(self, spec: ModelSpec, params, x: np.ndarray, y: np.ndarray, phase: PhaseSettings) -> GDUProcesses:
        from epbench_jax import algorithms as A

        check_alternation(spec, phase, gdu=True)

        dtype = phase.dtype
        with self._x64(dtype):
            p = self._native(spec, params, dtype)
            out, timings = self._call(("gdu", spec, phase.T, phase.K, phase.symmetric),
                                      lambda: A.gdu_program(spec, phase.T, phase.K, phase.symmetric),
                                      p, self._batch(spec, x, dtype), self._put(y, dtype),
                                      self._scalar(phase.beta, dtype))
            out = self._host(out)
        return GDUProcesses(ep_s=out["ep_s"], bptt_s=out["bptt_s"], ep_theta=out["ep_theta"],
                            bptt_theta=out["bptt_theta"], s_free=out["s_free"],
                            convergence=float(out["convergence"]), timings=timings)

    def train_epoch(self, spec: ModelSpec, params, x: np.ndarray, labels: np.ndarray,
                    phase: PhaseSettings, train: TrainSettings, algorithm: Algorithm) -> EpochResult:
        return self._train(spec, [params], [x], [labels], phase, train, algorithm, batched=False)[0]

    def train_epochs(self, spec: ModelSpec, params, xs, labels, phase: PhaseSettings, train: TrainSettings,
                     algorithm: Algorithm) -> list[EpochResult]:
        """With ``batch_trials`` (``EPBENCH_BATCH_TRIALS=1``), the trials run as one program
        vmapped over them; otherwise one after the other. On XLA's CPU backend the batched
        products are slower than the plain ones, hence off by default."""
        if not self.batch_trials or len(params) < 2:
            return super().train_epochs(spec, params, xs, labels, phase, train, algorithm)
        return self._train(spec, list(params), list(xs), list(labels), phase, train, algorithm, batched=True)

    def _chunks(self, spec: ModelSpec, x, labels, bs: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Full batches in chunks of CHUNK, the remainder in one chunk of its own size (one more
        compiled program, reused every epoch: cheaper than scanning over padding); a last short
        batch has its own."""
        x = np.asarray(x)
        x = x.reshape((x.shape[0],) + tuple(spec.input_shape))
        labels = np.asarray(labels).astype(np.int32)
        n = x.shape[0]
        n_full = n // bs
        chunks = []
        for start in range(0, n_full, self.CHUNK):
            m = min(self.CHUNK, n_full - start)
            chunks.append((x[start * bs:(start + m) * bs].reshape((m, bs) + x.shape[1:]),
                           labels[start * bs:(start + m) * bs].reshape(m, bs)))
        if n % bs:
            chunks.append((x[n_full * bs:][None], labels[n_full * bs:][None]))
        return chunks

    def _train(self, spec: ModelSpec, params: list, xs: list, labels: list, phase: PhaseSettings,
               train: TrainSettings, algorithm: Algorithm, batched: bool) -> list[EpochResult]:
        """One epoch of each trial; ``batched``: all trials in one program (``jax.vmap`` over the
        trial axis of parameters and data), else the single trial given."""
        from epbench_jax import algorithms as A

        jax = _jax()
        import jax.numpy as jnp

        check_alternation(spec, phase)
        if algorithm not in ("ep", "bptt"):
            raise ValueError(f"unknown algorithm {algorithm!r}")
        if len({len(x) for x in xs}) != 1:
            raise ValueError("trials trained together need the same number of samples")
        dtype = phase.dtype
        layer_lr = train.lr_of_layer(spec)
        per_trial = [self._chunks(spec, x, lab, train.batch_size) for x, lab in zip(xs, labels)]
        n_trials = len(params)
        key = ("train", spec, phase.T, phase.K, phase.symmetric, phase.alternate, algorithm, batched)

        def build():
            run = A.train_program(spec, phase.T, phase.K, algorithm, phase.symmetric, phase.alternate)
            return jax.vmap(run, in_axes=(0, 0, 0, 0, None, None)) if batched else run

        timings = {"compile_s": 0.0, "run_s": 0.0}
        wrong, seen = np.zeros(n_trials, np.int64), np.zeros(n_trials, np.int64)
        diverged = np.zeros(n_trials, bool)
        with self._x64(dtype):
            natives = [self._native(spec, p, dtype) for p in params]
            p = jax.tree.map(lambda *a: jnp.stack(a), *natives) if batched else natives[0]
            lrs = {k: self._scalar(layer_lr[spec.param_layer(k)], dtype) for k in natives[0]}
            beta = self._scalar(phase.beta, dtype)
            for c in range(len(per_trial[0])):
                xc = np.stack([t[c][0] for t in per_trial]) if batched else per_trial[0][c][0]
                lc = np.stack([t[c][1] for t in per_trial]) if batched else per_trial[0][c][1]
                (p, w, s, div), t = self._call(key, build, p, self._put(xc, dtype),
                                               self._put(np.eye(spec.n_out)[lc], dtype), self._put(lc), lrs, beta)
                for k in timings:
                    timings[k] += t[k]
                wrong += np.atleast_1d(np.asarray(w))
                seen += np.atleast_1d(np.asarray(s))
                diverged |= np.atleast_1d(np.asarray(div))
                if diverged.all():
                    break
        self.last_timings = timings
        share = {k: v / n_trials for k, v in timings.items()}
        out = [jax.tree.map(lambda a, i=i: a[i], p) for i in range(n_trials)] if batched else [p]
        return [EpochResult(params=out[i], train_error=100.0 * wrong[i] / max(seen[i], 1),
                            diverged=bool(diverged[i]), timings=dict(share)) for i in range(n_trials)]

    def evaluate(self, spec: ModelSpec, params, x: np.ndarray, labels: np.ndarray,
                 T: int, batch_size: int = 1000) -> float:
        from epbench_jax import algorithms as A

        dtype = self._dtype_of(params)
        x = np.asarray(x)
        labels = np.asarray(labels).astype(np.int32)
        n = x.shape[0]
        if n == 0:
            return float("nan")
        wrong = 0
        with self._x64(dtype):
            p = self._native(spec, params, dtype)
            for i in range(0, n, batch_size):
                w, _ = self._call(("evaluate", spec, T), lambda: A.evaluate_program(spec, T),
                                  p, self._batch(spec, x[i:i + batch_size], dtype),
                                  self._put(labels[i:i + batch_size]))
                wrong += int(w)
        return 100.0 * wrong / n

    # ----- optional -------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Nothing to wait for: every call ends in ``jax.block_until_ready`` on its results
        (``_call``), so no device work is left queued when it returns."""

    def matmul_gflops(self, n: int | None = None, dtype: str = "float32", repeats: int = 10) -> float:
        """Measured n×n matmul throughput (GFLOP/s) of this backend's device at
        Precision.HIGHEST (IEEE float32, as in the backend's own products), compiled first,
        2·n³ over the best of ``repeats`` calls each ended by ``jax.block_until_ready``.
        n = 2048 on a CPU, 8192 on a GPU (a 2048 product leaves a large GPU partly idle)."""
        jax = _jax()
        n = n or (8192 if self.platform == "cuda" else 2048)
        with self._x64(dtype):
            a = self._put(np.random.default_rng(0).standard_normal((n, n), dtype=np.dtype(dtype)), dtype)
            from epbench_jax.models import mm

            f = jax.jit(mm).lower(a, a).compile()
            jax.block_until_ready(f(a, a))
            best = float("inf")
            for _ in range(max(repeats, 1)):
                t0 = time.perf_counter()
                jax.block_until_ready(f(a, a))
                best = min(best, time.perf_counter() - t0)
        return 2.0 * n ** 3 / best / 1e9

    def _states(self, spec: ModelSpec, states, x, dtype: str) -> list:
        b = np.shape(x)[0]
        return [self._put(np.asarray(v).reshape((b,) + tuple(shape)), dtype)
                for v, shape in zip(states, spec.state_shapes)]

    def step_function(self, spec: ModelSpec, params, x: np.ndarray,
                      states: list[np.ndarray]) -> list[np.ndarray]:
        """F(x, s, θ) = s + h·dsdt(s) for one free step, without the clamp (so that F = ∂Φ/∂s
        for the energy-based models with σ'(s0))."""
        from epbench_jax import algorithms as A

        spec = spec.model_copy(update={"clamp": False})
        dtype = self._dtype_of(params)
        with self._x64(dtype):
            p = self._native(spec, params, dtype)
            s = self._states(spec, states, x, dtype)
            out, _ = self._call(("step", spec), lambda: A.step_program(spec), p, self._batch(spec, x, dtype), s)
            return [np.asarray(v) for v in out]

    def phi(self, spec: ModelSpec, params, x: np.ndarray, states: list[np.ndarray]) -> float:
        """Φ(x, s, θ) summed over the batch."""
        from epbench_jax import algorithms as A

        dtype = self._dtype_of(params)
        with self._x64(dtype):
            p = self._native(spec, params, dtype)
            s = self._states(spec, states, x, dtype)
            out, _ = self._call(("phi", spec), lambda: A.phi_program(spec), p, self._batch(spec, x, dtype), s)
            return float(out)
