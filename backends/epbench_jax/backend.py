"""The JAX backend (``jax-cpu``, ``jax-cuda``).

Importing this module does not import JAX: every method imports it lazily. float64 runs inside
the scoped ``jax.enable_x64`` switch, so the rest of the process keeps JAX's float32 default.
Each program (a whole phase or algorithm) is compiled once per (program, spec, step counts,
argument shapes and dtypes) and cached; compilation is timed apart from the run. On the CPU, the
phases of the one-hidden-layer models in float32 run as one call of a fused kernel where that is
faster on this machine, measured once and remembered (:mod:`epbench_jax.native`;
``EPBENCH_JAX_NATIVE=1`` forces the kernel, ``=0`` the XLA loop); :meth:`JaxBackend.pop_implementation`
reports which ran. ``EPBENCH_JAX_UNROLL`` sets the steps per loop iteration of the phases
(:func:`epbench_jax.ops.unroll_setting`); it is read when a program is traced, and is part of
the key of the compiled-program cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from typing import Mapping

import numpy as np

from epbench.backend import Availability, Backend, Capabilities, batch_trials_from_env
from epbench.errors import BackendUnavailable, EpbenchError
from epbench.params import check_params
from epbench.spec import ModelSpec

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
    """The core's phases, algorithms and training chunks in JAX, each call one compiled XLA program."""

    framework = "jax"
    capabilities = Capabilities(compiles=True)

    def __init__(self, platform: str = "cpu"):
        if platform not in ("cpu", "cuda"):
            raise ValueError(f"unknown JAX platform {platform!r}")
        self.platform = platform
        self.name = f"jax-{platform}"
        self._cache: dict = {}
        self._dev = None
        #: run the trials of a training experiment as one vmapped program
        #: (``epbench.training.train_epochs``); on XLA's CPU backend the batched products are
        #: slower than the plain ones, hence off by default
        self.batch_trials = batch_trials_from_env()
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
        handles counts as ``xla-loop``). ``xla-loop`` when nothing ran. Where
        ``EPBENCH_JAX_UNROLL`` was set when a program was traced, its loop label says so:
        ``xla-loop:unroll=8``, ``xla-loop:unroll=full``."""
        from epbench_jax.ops import unroll_label

        used, self._implementations = self._implementations, set()
        return "+".join(sorted(used)) or "xla-loop" + unroll_label()

    # ----- parameters -------------------------------------------------------------------------
    def from_numpy(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str) -> dict:
        check_params(spec, dict(params))
        if dtype not in ("float32", "float64"):
            raise ValueError(f"unsupported dtype {dtype!r}")
        with self.precision(dtype):
            return {k: self.asarray(params[k], dtype) for k in spec.param_shapes}

    def to_numpy(self, spec: ModelSpec, params) -> dict[str, np.ndarray]:
        return {k: np.array(params[k]) for k in spec.param_shapes}

    def cast(self, params, dtype: str) -> dict:
        """Parameters as device arrays of ``dtype`` (the same arrays where they already are)."""
        dev = self._device()
        if not isinstance(params, Mapping) or not params:
            raise TypeError(f"{self.name}: parameters must come from from_numpy")
        if self.dtype_of(params) == dtype and all(
                getattr(v, "devices", None) and dev in v.devices() for v in params.values()):
            return dict(params)
        return {k: self.asarray(np.asarray(v), dtype) for k, v in params.items()}

    @staticmethod
    def dtype_of(params) -> str:
        return str(next(iter(params.values())).dtype)

    def asarray(self, a, dtype: str | None = None):
        jax = _jax()
        a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
        return jax.device_put(a, self._device())

    def to_host(self, tree):
        jax = _jax()
        return jax.tree.map(np.asarray, tree)

    def precision(self, dtype: str):
        """Scoped float64 switch: on for float64 calls, off otherwise; never global."""
        jax = _jax()
        return jax.enable_x64(dtype == "float64")

    # ----- primitives ---------------------------------------------------------------------------
    @property
    def ops(self):
        from epbench_jax.ops import OPS

        return OPS

    def dynamics(self, spec: ModelSpec, params, x, alternate: bool = False):
        """The registered model's :class:`~epbench.models.dynamics.ModelDynamics` with
        :class:`~epbench_jax.ops.JaxOps`, its phases run by the fused CPU kernel where
        ``native.chosen`` picks it (:class:`~epbench_jax.dynamics.JaxDynamics`)."""
        from epbench_jax.dynamics import JaxDynamics

        return JaxDynamics(self.ops, spec.model, spec, params, x, alternate)

    def run(self, key: tuple, build, *args):
        """Run the cached compiled program ``key`` (compiling ``build()`` on first use, for the
        platform, the kernel mode and the argument shapes and dtypes). Returns
        (outputs, {"compile_s", "run_s"})."""
        from epbench_jax import native
        from epbench_jax.dynamics import fused_phases

        from epbench_jax.ops import unroll_label

        jax = _jax()
        how = native.mode() if self.platform == "cpu" else "loop"
        unroll = unroll_label()  # EPBENCH_JAX_UNROLL, read (and checked) before tracing
        leaves, tree = jax.tree.flatten(args)
        sig = (key, self.platform, how, unroll, tree, tuple((tuple(np.shape(a)), str(a.dtype)) for a in leaves))
        compile_s = 0.0
        cached = self._cache.get(sig)
        if cached is None:
            t0 = time.perf_counter()
            with fused_phases(how != "loop"), native.recording() as used:
                exe = jax.jit(build()).lower(*args).compile()
            compile_s = time.perf_counter() - t0
            cached = self._cache[sig] = (exe, {i + unroll if i == native.LOOP else i for i in used or {native.LOOP}})
        exe, implementation = cached
        self._implementations |= implementation
        t0 = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        return out, {"compile_s": compile_s, "run_s": time.perf_counter() - t0}

    # ----- optional -------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Nothing to wait for: every call ends in ``jax.block_until_ready`` on its results
        (:meth:`run`), so no device work is left queued when it returns."""

    def matmul_gflops(self, n: int | None = None, dtype: str = "float32", repeats: int = 10) -> float:
        """Measured n×n matmul throughput (GFLOP/s) of this backend's device at
        Precision.HIGHEST (IEEE float32, as in the backend's own products), compiled first,
        2·n³ over the best of ``repeats`` calls each ended by ``jax.block_until_ready``.
        n = 2048 on a CPU, 8192 on a GPU (a 2048 product leaves a large GPU partly idle)."""
        jax = _jax()
        n = n or (8192 if self.platform == "cuda" else 2048)
        with self.precision(dtype):
            a = self.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.dtype(dtype)), dtype)
            from epbench_jax.ops import mm

            f = jax.jit(mm).lower(a, a).compile()
            jax.block_until_ready(f(a, a))
            best = float("inf")
            for _ in range(max(repeats, 1)):
                t0 = time.perf_counter()
                jax.block_until_ready(f(a, a))
                best = min(best, time.perf_counter() - t0)
        return 2.0 * n ** 3 / best / 1e9
