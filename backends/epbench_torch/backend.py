"""``TorchBackend``: the PyTorch implementation of :class:`epbench.backend.Backend`.

Importing this module does not import torch: every method that computes imports it lazily.
Native parameters are a ``dict`` of tensors with the canonical names and shapes, on the
backend's device, in the dtype asked for by ``from_numpy`` (a phase's ``dtype`` that differs
casts them for that call).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import time
from typing import Mapping

import numpy as np

from epbench.backend import Availability, Backend, Capabilities, EpochResult, GDUProcesses
from epbench.errors import BackendUnavailable
from epbench.spec import Algorithm, ModelSpec, PhaseSettings, TrainSettings, check_alternation

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


def _numerics(method):
    """Run a computing method under :func:`_ieee_float32` and :func:`_cpu_threads`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _ieee_float32(self.device_kind), _cpu_threads(self.device_kind):
            return method(self, *args, **kwargs)

    return wrapper


class TorchBackend(Backend):
    """EP and BPTT on PyTorch, on the CPU (``torch-cpu``) or one CUDA device (``torch-cuda``)."""

    framework = "torch"
    capabilities = Capabilities(alternate=True)

    def __init__(self, device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        self.device_kind = device
        self.name = f"torch-{device}"

    def __repr__(self) -> str:
        return f"TorchBackend({self.device_kind!r})"

    def pop_implementation(self) -> str:
        """Every call runs one way: eager PyTorch, one kernel launch per operation of each step."""
        return "eager"

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

    def _cast(self, params: dict, dtype) -> dict:
        """The parameters in ``dtype`` (the same dict when they already are)."""
        dev = self._device()
        if all(v.dtype == dtype and v.device.type == dev.type for v in params.values()):
            return params
        return {k: v.to(device=dev, dtype=dtype) for k, v in params.items()}

    @staticmethod
    def _np(t) -> np.ndarray:
        return t.detach().cpu().numpy()

    def _prepare(self, spec: ModelSpec, params: dict, x, dtype):
        from epbench_torch.models import build_model

        params = self._cast(params, dtype)
        xt = self._tensor(x, dtype)
        xt = xt.reshape(xt.shape[0], *spec.input_shape)
        model = build_model(spec)
        return model, params, xt

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

    # ----- phases -------------------------------------------------------------------------
    @_numerics
    def first_phase(self, spec: ModelSpec, params: dict, x: np.ndarray, T: int) -> list[np.ndarray]:
        from epbench_torch import algorithms as A

        dtype = next(iter(params.values())).dtype
        model, params, xt = self._prepare(spec, params, x, dtype)
        drives, _ = model.drive(params, xt)
        s = A.free_phase(model, params, drives, A.zero_states(spec, xt.shape[0], xt), T)[-1]
        return [self._np(si) for si in s]

    @staticmethod
    def _dynamics(spec: ModelSpec, model, phase: PhaseSettings):
        """(step model, first-phase steps, nudged steps, BPTT span) in units of its step: time
        steps, or with ``phase.alternate`` double steps of :class:`~epbench_torch.models.Alternated`."""
        from epbench_torch.models import Alternated

        check_alternation(spec, phase)
        span = spec.bptt_span(phase.K)
        if phase.alternate:
            return Alternated(model), phase.T // 2, phase.K // 2, span // 2
        return model, phase.T, phase.K, span

    def _free(self, spec, params, x, y, phase: PhaseSettings, keep: int | None):
        """Shared prologue: step model, params, x, y as tensors, drives, ctx, the last states
        (``keep`` of them; ``None``: the BPTT span + 1) and the step counts of ``_dynamics``."""
        import torch

        from epbench_torch import algorithms as A

        dtype = self._dtype(phase.dtype)
        model, params, xt = self._prepare(spec, params, x, dtype)
        model, T, K, span = self._dynamics(spec, model, phase)
        yt = self._tensor(y, dtype).reshape(xt.shape[0], -1)
        with torch.no_grad():
            drives, ctx = model.drive(params, xt)
        hist = A.free_phase(model, params, drives, A.zero_states(spec, xt.shape[0], xt), T,
                            span + 1 if keep is None else keep)
        return model, params, yt, drives, ctx, hist, (K, span)

    @_numerics
    def ep_update(self, spec: ModelSpec, params: dict, x: np.ndarray, y: np.ndarray,
                  phase: PhaseSettings) -> dict[str, np.ndarray]:
        model, params, yt, drives, ctx, hist, (K, _) = self._free(spec, params, x, y, phase, 2)
        delta = self._ep_delta(spec, model, params, drives, ctx, hist, yt, phase, K)
        return {k: self._np(v) for k, v in delta.items()}

    @staticmethod
    def _ep_delta(spec, model, params, drives, ctx, star, yt, phase: PhaseSettings, K: int) -> dict:
        """The EP update after ``K`` nudged steps of ``model`` (see ``_dynamics``) from the last
        two first-phase states ``star = [s_{T−1}, s*]``."""
        from epbench_torch import algorithms as A

        b = phase.beta
        plus = A.nudged_phase(model, params, drives, star[-1], yt, b, K)
        minus = A.nudged_phase(model, params, drives, star[-1], yt, -b, K) if phase.symmetric else None
        return A.ep_update(model, params, ctx, star, plus, spec.ep_scale(b), minus)

    @_numerics
    def bptt_grad(self, spec: ModelSpec, params: dict, x: np.ndarray, y: np.ndarray,
                  phase: PhaseSettings) -> dict[str, np.ndarray]:
        from epbench_torch import algorithms as A

        model, params, yt, drives, ctx, hist, (_, span) = self._free(spec, params, x, y, phase, None)
        _, grad = A.bptt_sweep(model, params, drives, ctx, hist, yt, span, per_step=False)
        return {k: self._np(grad[k]) for k in spec.param_shapes}

    @_numerics
    def gdu(self, spec: ModelSpec, params: dict, x: np.ndarray, y: np.ndarray,
            phase: PhaseSettings) -> GDUProcesses:
        from epbench_torch import algorithms as A

        check_alternation(spec, phase, gdu=True)
        K = phase.K
        t0 = time.perf_counter()
        model, params, yt, drives, ctx, hist, _ = self._free(spec, params, x, y, phase, K + 1)
        self.synchronize()
        t1 = time.perf_counter()
        bptt_s, bptt_theta = A.bptt_sweep(model, params, drives, ctx, hist, yt, K, per_step=True)
        bptt_s = [g.sum(1) for g in bptt_s]
        self.synchronize()
        t2 = time.perf_counter()
        s_star = hist[-1]
        ep_s, ep_theta = A.ep_processes(model, spec, params, drives, ctx, hist, yt, phase.beta, K)
        if phase.symmetric:
            ep_s_m, ep_theta_m = A.ep_processes(model, spec, params, drives, ctx, hist, yt, -phase.beta, K)
            ep_s = [(a + b).mul_(0.5) for a, b in zip(ep_s, ep_s_m)]
            for k in ep_theta:
                ep_theta[k].add_(ep_theta_m[k]).mul_(0.5)
        self.synchronize()
        t3 = time.perf_counter()
        out = GDUProcesses(
            ep_s=[self._np(v) for v in ep_s],
            bptt_s=[self._np(v) for v in bptt_s],
            ep_theta={k: self._np(ep_theta[k]) for k in spec.param_shapes},
            bptt_theta={k: self._np(bptt_theta[k]) for k in spec.param_shapes},
            s_free=[self._np(v) for v in s_star],
            convergence=A.convergence(hist),
        )
        t4 = time.perf_counter()
        out.timings = {"first_phase_s": t1 - t0, "bptt_s": t2 - t1, "ep_s": t3 - t2,
                       "to_numpy_s": t4 - t3, "run_s": t4 - t0}
        return out

    # ----- training -----------------------------------------------------------------------
    @_numerics
    def train_epoch(self, spec: ModelSpec, params: dict, x: np.ndarray, labels: np.ndarray,
                    phase: PhaseSettings, train: TrainSettings, algorithm: Algorithm) -> EpochResult:
        """One epoch of SGD; works on a copy of ``params`` (the input stays untouched)."""
        import torch
        import torch.nn.functional as F

        from epbench_torch import algorithms as A
        from epbench_torch.models import build_model

        if algorithm not in ("ep", "bptt"):
            raise ValueError(f"unknown algorithm {algorithm!r}")
        t0 = time.perf_counter()
        dtype = self._dtype(phase.dtype)
        dev = self._device()
        params = {k: v.to(device=dev, dtype=dtype).clone() for k, v in params.items()}
        model, T, K, span = self._dynamics(spec, build_model(spec), phase)
        lr_layer = train.lr_of_layer(spec)
        lrs = {k: lr_layer[spec.param_layer(k)] for k in params}
        X = self._tensor(x, dtype)
        X = X.reshape(X.shape[0], *spec.input_shape)
        lab = torch.as_tensor(np.asarray(labels).reshape(-1), device=dev, dtype=torch.long)
        N = X.shape[0]
        keep = span + 1 if algorithm == "bptt" else 2
        errors = torch.zeros((), dtype=torch.long, device=dev)
        seen = 0
        diverged = False
        for start in range(0, N, train.batch_size):
            xb, lb = X[start:start + train.batch_size], lab[start:start + train.batch_size]
            yb = F.one_hot(lb, spec.n_out).to(dtype)
            with torch.no_grad():
                drives, ctx = model.drive(params, xb)
            hist = A.free_phase(model, params, drives, A.zero_states(spec, xb.shape[0], xb), T, keep)
            s_star = hist[-1]
            errors += (s_star[0].argmax(1) != lb).sum()
            seen += xb.shape[0]
            if algorithm == "ep":
                delta = self._ep_delta(spec, model, params, drives, ctx, hist[-2:], yb, phase, K)
                sign = 1.0
            else:
                _, delta = A.bptt_sweep(model, params, drives, ctx, hist, yb, span, per_step=False)
                sign = -1.0
            with torch.no_grad():
                for k, v in params.items():
                    v.add_(delta[k], alpha=sign * lrs[k])
                finite = torch.stack([torch.isfinite(si).all() for si in s_star]
                                     + [torch.isfinite(v).all() for v in params.values()]).all()
            if not bool(finite):
                diverged = True
                break
        self.synchronize()
        err = 100.0 * float(errors) / max(seen, 1)
        return EpochResult(params=params, train_error=err, diverged=diverged,
                           timings={"run_s": time.perf_counter() - t0, "samples": float(seen)})

    @_numerics
    def evaluate(self, spec: ModelSpec, params: dict, x: np.ndarray, labels: np.ndarray,
                 T: int, batch_size: int = 1000) -> float:
        import torch

        from epbench_torch import algorithms as A
        from epbench_torch.models import build_model

        dtype = next(iter(params.values())).dtype
        params = self._cast(params, dtype)
        model = build_model(spec)
        X = self._tensor(x, dtype)
        X = X.reshape(X.shape[0], *spec.input_shape)
        lab = torch.as_tensor(np.asarray(labels).reshape(-1), device=X.device, dtype=torch.long)
        wrong = torch.zeros((), dtype=torch.long, device=X.device)
        with torch.no_grad():
            for start in range(0, X.shape[0], batch_size):
                xb = X[start:start + batch_size]
                drives, _ = model.drive(params, xb)
                s = A.free_phase(model, params, drives, A.zero_states(spec, xb.shape[0], xb), T)[-1]
                wrong += (s[0].argmax(1) != lab[start:start + batch_size]).sum()
        return 100.0 * float(wrong) / max(X.shape[0], 1)

    # ----- optional -----------------------------------------------------------------------
    def _states(self, spec: ModelSpec, states, dtype, batch: int):
        return [self._tensor(si, dtype).reshape(batch, *shape) for si, shape in zip(states, spec.state_shapes)]

    @_numerics
    def step_function(self, spec: ModelSpec, params: dict, x: np.ndarray,
                      states: list[np.ndarray]) -> list[np.ndarray]:
        """F(x, s, θ) = s + h·dsdt(s) for one free step, *without* the clamp (F = ∂Φ/∂s for EB with σ'(s0))."""
        import torch

        dtype = next(iter(params.values())).dtype
        model, params, xt = self._prepare(spec, params, x, dtype)
        model.clamp = False
        with torch.no_grad():
            drives, _ = model.drive(params, xt)
            out = model.step(params, drives, self._states(spec, states, dtype, xt.shape[0]))
        return [self._np(v) for v in out]

    @_numerics
    def phi(self, spec: ModelSpec, params: dict, x: np.ndarray, states: list[np.ndarray]) -> float:
        """Φ(x, s, θ) summed over the batch (its per-sample gradient in s is F)."""
        import torch

        dtype = next(iter(params.values())).dtype
        model, params, xt = self._prepare(spec, params, x, dtype)
        with torch.no_grad():
            return float(model.phi(params, xt, self._states(spec, states, dtype, xt.shape[0])))

