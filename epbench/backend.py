"""The contract between the core and a backend: everything a backend implements is on this page.

A backend is an object registered through the ``epbench_backends`` hook (see
:mod:`epbench.hookspecs`). It supplies only what a framework can do: arrays on a device, one
model's dynamics as a few primitives (:class:`Dynamics`), loop combinators (:class:`~epbench.ops.Ops`),
running a program (compiled, on a compiling backend), synchronisation and the matmul peak.
Everything else is written once in the core and runs on every backend:

* the phases (:mod:`epbench.phases`), the algorithms (:mod:`epbench.algorithms`: the EP update in
  ``ep.py``, the Prop. 4 recursion in ``bptt.py``), the GDU processes (:mod:`epbench.compute`);
* the training loop, online error, divergence policy and evaluation (:mod:`epbench.training`).

The core hands a backend NumPy arrays and gets NumPy arrays back, except for the *parameters*,
which stay in the backend's own form between calls (``from_numpy`` / ``to_numpy``) so that
training never copies them. Shapes: ``x`` is ``(B, *spec.input_shape)`` and ``y`` is
``(B, n_out)`` one-hot; canonical states are lists ``[s0, ..., sL]`` of ``(B, *spec.state_shapes[i])``.

Reporting: after the calls of an experiment the runner asks :meth:`Backend.pop_implementation`
which implementation ran them (e.g. ``xla-loop`` or ``fused-cpp`` on jax-cpu, ``eager``), and
records it on every row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from epbench.ops import Ops
from epbench.spec import ModelSpec

Params = Any  # backend-native parameter container
NDict = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""
    device: str = ""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend declares it supports; the conformance kit skips the rest."""

    #: model kinds it runs (``None``: every registered model its primitives allow)
    kinds: tuple[str, ...] | None = None
    flavors: tuple[str, ...] = ("paper", "official-code")
    dtypes: tuple[str, ...] = ("float32", "float64")
    activations: tuple[str, ...] = ("sigmoid", "hard_sigmoid", "tanh")
    #: compiles a program for each new shape on first use, so the first call of an experiment
    #: takes longer (the runner says so before it)
    compiles: bool = False
    #: ``ops.vjp`` exists (else only models with an analytic ``step_vjp`` run)
    autodiff: bool = True
    #: ``ops`` has the feature-map operations (convolutions, pooling)
    feature_maps: bool = True


class Dynamics(Protocol):
    """One model's dynamics on one batch ``x``, in the backend's arrays (built by
    :meth:`Backend.dynamics` inside a program). States are sequences ``(s0, ..., sL)`` in the
    backend's own layout (``external`` converts them to the canonical one). ``nudge`` is
    ``None`` or ``(β, y)``: the nudge ``β(y − s0)`` added to ``dsdt_0`` (appendix eq. 35)."""

    spec: ModelSpec
    batch: int
    #: ``prop4`` runs eq. 32 as the sweep and eq. 33 mapped over t (see ``algorithms.bptt``)
    split_sweep: bool
    #: ``ops.map`` over time may vectorise ∂Φ/∂θ increments (large products batch well)
    batched_maps: bool

    def zeros(self): """s = 0 for every layer."""
    def step(self, s, nudge=None): """F(x, s, θ): one step ``s + dt·dsdt(s)`` (then the clamp)."""
    def run(self, s, n: int, nudge=None): """n steps of ``step`` (a fused kernel may override)."""
    def vjp(self, s, g) -> tuple: """(∂F/∂s(s)ᵀg, raw ∂F/∂θ(s)ᵀg): eqs 32-33 for one step."""
    def vjp_states(self, s, g): """∂F/∂s(s)ᵀg alone (eq. 32)."""
    def vjp_theta_sum(self, states, cots): """Σ_t raw ∂F/∂θ(s_t)ᵀg_t over stacked s_t, g_t."""
    def zero_raw(self): """Raw cotangents that are all zero (the structure ``vjp`` returns)."""
    def theta_grad(self, raw, stacked: bool = False) -> dict:
        """raw cotangents (linear) → ∂/∂θ by canonical name; ``stacked``: along a leading time axis."""
    def dphi_increment(self, s, q, s_at=None, q_at=None, scale=1.0) -> dict:
        """(∂Φ/∂θ(s) − ∂Φ/∂θ(q)) / scale, batch-averaged, from the increments (argmax positions
        of pconv's pooling at ``s_at``/``q_at`` when given, ``ModelSpec.late_pool_indices``)."""
    def phi(self, s): """Φ(x, s, θ) summed over the batch (0-d)."""
    def external(self, s) -> list: """States in the canonical layout."""
    def internal(self, s): """States from the canonical layout."""


def batch_trials_from_env() -> bool:
    """``EPBENCH_BATCH_TRIALS=1``: the backends that can batch trials (jax: ``jax.vmap``; torch:
    ``torch.func.vmap``) run the trials of a training experiment as one program. Off by default:
    whether it pays depends on the device (measured by ``epbench bench --trials``)."""
    import os

    return os.environ.get("EPBENCH_BATCH_TRIALS", "") == "1"


class Backend(ABC):
    """Base class of every backend (built-in or third party)."""

    #: registry name, e.g. "torch-cpu"
    name: str = ""
    #: distribution/framework that does the work, e.g. "torch"
    framework: str = ""
    capabilities: Capabilities = Capabilities()

    # ----- discovery (must not import the framework) --------------------------------------
    @abstractmethod
    def availability(self, probe: bool = False) -> Availability:
        """Whether this backend can run here, and on which device. Without ``probe`` this must
        not import the framework (``epbench backends`` stays cheap)."""

    def framework_version(self) -> str:
        from importlib import metadata

        try:
            return metadata.version(self.framework) if self.framework else ""
        except metadata.PackageNotFoundError:
            return ""

    def supports(self, spec: ModelSpec, dtype: str) -> str | None:
        """``None`` if supported, else the reason it is not."""
        caps = self.capabilities
        model = spec.model
        if caps.kinds is not None and spec.kind not in caps.kinds:
            return f"{self.name} does not implement the {spec.kind} model"
        if not caps.autodiff and model.step_vjp is None:
            return f"{self.name} has no autodiff and the {spec.kind} model no analytic step_vjp"
        if not caps.feature_maps and getattr(model, "uses_feature_maps", False):
            return f"{self.name} has no convolutions or pooling, which the {spec.kind} model needs"
        if spec.flavor not in caps.flavors:
            return f"{self.name} does not implement the {spec.flavor} flavour"
        if dtype not in caps.dtypes:
            return f"{self.name} does not support {dtype}"
        if spec.activation not in caps.activations:
            return f"{self.name} does not support the {spec.activation} activation"
        return None

    # ----- parameters and arrays ------------------------------------------------------------
    def init_params(self, spec: ModelSpec, seed: int) -> NDict:
        """Initial parameters from a seed, as NumPy (float64): the model's (``Model.init_params``),
        so every backend starts from the same weights."""
        return spec.model.init_params(spec, seed)

    @abstractmethod
    def from_numpy(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str) -> Params:
        """Native parameters from canonical NumPy arrays."""

    @abstractmethod
    def to_numpy(self, spec: ModelSpec, params: Params) -> NDict:
        """Canonical NumPy arrays from native parameters."""

    @abstractmethod
    def cast(self, params: Params, dtype: str) -> Params:
        """Native parameters in ``dtype`` on the backend's device (the same object if they are)."""

    @abstractmethod
    def dtype_of(self, params: Params) -> str:
        """The float dtype name (``"float32"``, ``"float64"``) of native parameters."""

    @abstractmethod
    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """A native array from a NumPy one (``dtype``: a float dtype name; ``None`` keeps it)."""

    def to_host(self, tree) -> Any:
        """NumPy arrays from a tree of native ones."""
        from epbench.ops import tree_map

        return tree_map(np.asarray, tree)

    def precision(self, dtype: str) -> contextlib.AbstractContextManager:
        """Context for every call in ``dtype`` (e.g. JAX's float64 switch, IEEE float32 on CUDA)."""
        return contextlib.nullcontext()

    # ----- primitives ---------------------------------------------------------------------
    @property
    @abstractmethod
    def ops(self) -> Ops:
        """Loop combinators and the array namespace (:class:`epbench.ops.EagerOps` for Python loops)."""

    def dynamics(self, spec: ModelSpec, params: Params, x, alternate: bool = False) -> Dynamics:
        """The :class:`Dynamics` of ``spec`` on the native batch ``x`` (called inside a program):
        the registered model's, run with :attr:`ops` (:class:`epbench.models.dynamics.ModelDynamics`).
        ``alternate``: ``step`` is the double step of ``PhaseSettings.alternate``. A backend
        overrides it only to substitute a faster fused implementation of some model's phases."""
        from epbench.models.dynamics import ModelDynamics

        return ModelDynamics(self.ops, spec.model, spec, params, x, alternate)

    def run(self, key: tuple, build: Callable[[], Callable], *args) -> tuple[Any, dict[str, float]]:
        """Run the program ``build()`` on native ``args``; returns ``(outputs, {"compile_s", "run_s"})``.
        ``key`` (hashable: the program's name and static settings) lets a compiling backend cache
        the compiled program per key and argument shapes. The default calls it eagerly."""
        t0 = time.perf_counter()
        out = build()(*args)
        self.synchronize()
        return out, {"compile_s": 0.0, "run_s": time.perf_counter() - t0}

    # ----- optional -----------------------------------------------------------------------
    def pop_implementation(self) -> str:
        """Which implementation ran the calls made since the previous ``pop_implementation()``
        (the record then starts afresh), for the results' ``implementation`` column: the runner
        pops it before and after each experiment, ``epbench bench`` after each measurement. A
        backend that can run a call in more than one way says which one it used (jax-cpu:
        ``fused-cpp``, ``xla-loop``, or both joined by "+"); the default is the framework's name
        (``"default"`` without one), for a backend with one way of running each call."""
        return self.framework or "default"

    #: train several trials as one program (``ops.map`` over stacked trials); off by default
    #: (a backend that can sets it from :func:`batch_trials_from_env`)
    batch_trials: bool = False

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""

    def matmul_gflops(self, n: int = 2048, dtype: str = "float32", repeats: int = 10) -> float | None:
        """Measured n×n matmul throughput of this backend's device in GFLOP/s (its practical
        peak), or None if the backend does not measure it (the core then uses NumPy)."""
        return None
