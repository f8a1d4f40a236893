"""``TorchBackend``: the PyTorch implementation of :class:`epbench.backend.Backend`.

Importing this module does not import torch: every method that computes imports it lazily.
Native parameters are a ``dict`` of tensors with the canonical names and shapes, on the
backend's device, in the dtype asked for by ``from_numpy`` (a phase's ``dtype`` that differs
casts them for that call).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from typing import Mapping

import numpy as np

from epbench.backend import Availability, Backend, Capabilities, batch_trials_from_env
from epbench.errors import BackendUnavailable
from epbench.spec import ModelSpec

_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl")


@contextlib.contextmanager
def _ieee_float32(device_kind: str):
    """On CUDA, float32 means float32: TF32 off for matmuls and cuDNN convolutions for the call
    (cuDNN allows TF32 by default, which would blur the GDU comparisons); restored afterwards."""
    if device_kind != "cuda":
        yield
        return
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                        benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def _cpu_threads(device_kind: str):
    """CPU thread count for one call: ``$EPBENCH_NUM_THREADS``, one by default. The per-step
    work (batch x 512 products, small convolutions) is too fine to split, and torch's OpenMP
    threads collapse as soon as another process shares the cores (measured on 2 cores, the other
    one busy: EB-3h 0.74 ms/step on one thread vs 7.2 on two; P-conv 3.4 vs 83)."""
    if device_kind != "cpu":
        yield
        return
    import torch

    n = max(1, int(os.environ.get("EPBENCH_NUM_THREADS") or 1))
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class TorchBackend(Backend):
    """EP and BPTT on PyTorch, on the CPU (``torch-cpu``) or one CUDA device (``torch-cuda``)."""

    framework = "torch"

    def __init__(self, device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        self.device_kind = device
        self.name = f"torch-{device}"
        #: torch-cuda captures a CUDA graph for each new program shape on first use
        self.capabilities = Capabilities(compiles=device == "cuda")
        self._ops = None
        #: the trials of a training experiment as one ``torch.func.vmap``ped program
        #: (``EPBENCH_BATCH_TRIALS=1``; the ops are then functional, :class:`TorchOps`)
        self.batch_trials = batch_trials_from_env()
        #: how programs run (:class:`epbench_torch.graphs.GraphRunner`: eager, or CUDA graphs on
        #: torch-cuda as ``EPBENCH_TORCH_GRAPHS`` says), made on first use
        self.runner = None

    def __repr__(self) -> str:
        return f"TorchBackend({self.device_kind!r})"

    def pop_implementation(self) -> str:
        """``eager`` (one kernel launch per operation of each step), ``cuda-graph`` (the program
        replayed as one CUDA graph, :mod:`epbench_torch.graphs`) or both joined by "+"."""
        return self._runner().pop_used()

    # ----- discovery ----------------------------------------------------------------------
    def availability(self, probe: bool = False) -> Availability:
        if importlib.util.find_spec("torch") is None:
            return Availability(False, "torch is not installed (pip install 'epbench[torch]')")
        if self.device_kind == "cpu" and not probe:
            return Availability(True, "", "cpu")
        if not probe:
            if not any(os.path.exists(p) for p in _DRIVER_FILES):
                return Availability(False, "no NVIDIA driver found")
            return Availability(True, "", "cuda")
        try:
            import torch
        except Exception as exc:  # noqa: BLE001 - a broken install is "unavailable", not a crash
            return Availability(False, f"torch fails to import: {type(exc).__name__}: {exc}")
        if self.device_kind == "cpu":
            return Availability(True, "", "cpu")
        if not torch.cuda.is_available():
            return Availability(False, "torch.cuda.is_available() is False")
        return Availability(True, "", f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})")

    # ----- helpers ------------------------------------------------------------------------
    def _device(self):
        import torch

        if self.device_kind == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailable(f"{self.name}: no CUDA device is available to PyTorch "
                                         "(torch.cuda.is_available() is False)")
            return torch.device("cuda")
        return torch.device("cpu")

    @staticmethod
    def _dtype(name: str):
        import torch

        return {"float32": torch.float32, "float64": torch.float64}[name]

    def _tensor(self, a, dtype):
        import torch

        a = np.asarray(a)
        if not a.flags.writeable:  # torch warns about (and cannot share) read-only buffers
            a = a.copy()
        return torch.as_tensor(a, dtype=dtype, device=self._device())

    def cast(self, params: dict, dtype: str) -> dict:
        """The parameters in ``dtype`` (the same dict when they already are)."""
        dt, dev = self._dtype(dtype), self._device()
        if all(v.dtype == dt and v.device.type == dev.type for v in params.values()):
            return params
        return {k: v.to(device=dev, dtype=dt) for k, v in params.items()}

    def dtype_of(self, params: dict) -> str:
        return str(next(iter(params.values())).dtype).removeprefix("torch.")

    def asarray(self, a, dtype: str | None = None):
        import torch

        a = np.asarray(a)
        if dtype is None:
            if not a.flags.writeable:
                a = a.copy()
            return torch.as_tensor(a, device=self._device())
        return self._tensor(a, self._dtype(dtype))

    def to_host(self, tree):
        from epbench.ops import tree_map

        return tree_map(self._np, tree)

    @contextlib.contextmanager
    def precision(self, dtype: str):
        """IEEE float32 on CUDA (:func:`_ieee_float32`) and the CPU thread count
        (:func:`_cpu_threads`) for the call."""
        with _ieee_float32(self.device_kind), _cpu_threads(self.device_kind):
            yield

    @property
    def ops(self):
        if self._ops is None:
            from epbench_torch.ops import TorchOps

            self._ops = TorchOps(device_side=self.device_kind == "cuda", functional=self.batch_trials)
        return self._ops

    def run(self, key: tuple, build, *args):
        """The program without autograd (one step's VJP enables it locally): eagerly on the CPU;
        on CUDA as a replayed CUDA graph where that is faster (:mod:`epbench_torch.graphs`)."""
        import torch

        with torch.no_grad():
            return self._runner().run(key, build, args)

    def _runner(self):
        """The :class:`~epbench_torch.graphs.GraphRunner`, made on first use (the runner asks for
        the implementation before an experiment, so a bad ``EPBENCH_TORCH_GRAPHS`` stops a run
        before its first cell)."""
        if self.runner is None:
            from epbench_torch.graphs import GraphRunner, mode_from_env

            self.runner = GraphRunner(mode_from_env(self.device_kind), synchronize=self.synchronize)
        return self.runner

    @staticmethod
    def _np(t) -> np.ndarray:
        return t.detach().cpu().numpy()

    # ----- parameters ---------------------------------------------------------------------
    def from_numpy(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str) -> dict:
        from epbench.params import check_params

        check_params(spec, dict(params))
        dt = self._dtype(dtype)
        return {k: self._tensor(params[k], dt).clone() for k in spec.param_shapes}

    def to_numpy(self, spec: ModelSpec, params: dict) -> dict[str, np.ndarray]:
        return {k: self._np(params[k]).copy() for k in spec.param_shapes}

    def matmul_gflops(self, n: int | None = None, dtype: str = "float32", repeats: int = 10) -> float:
        """Measured n×n matmul throughput (GFLOP/s) of this backend's device, on all its cores,
        in IEEE float32 (TF32 off, as in the backend's own calls): 2·n³·repeats over the time of
        ``repeats`` back-to-back products between two synchronisations. n = 2048 on a CPU, 8192
        on a GPU (a 2048 product leaves a large GPU partly idle and its peak understated)."""
        import torch

        n = n or (8192 if self.device_kind == "cuda" else 2048)

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        old = torch.get_num_threads()
        torch.set_num_threads(cores)
        try:
            with _ieee_float32(self.device_kind):
                return self._matmul_gflops(n, dtype, repeats)
        finally:
            torch.set_num_threads(old)

    def _matmul_gflops(self, n: int, dtype: str, repeats: int) -> float:
        import torch

        dt, dev = self._dtype(dtype), self._device()
        gen = torch.Generator(device=dev).manual_seed(0)
        a = torch.rand((n, n), dtype=dt, device=dev, generator=gen)
        b = torch.rand((n, n), dtype=dt, device=dev, generator=gen)
        c = torch.empty_like(a)
        for _ in range(2):
            torch.mm(a, b, out=c)
        self.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=c)
        self.synchronize()
        return 2.0 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9

    def synchronize(self) -> None:
        """Wait for the work queued on the CUDA device (CUDA kernels run asynchronously)."""
        if self.device_kind == "cuda":
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
