"""The contract between the core and a backend.

A backend is an object registered through the ``epbench_backends`` hook (see
:mod:`epbench.hookspecs`). The core only ever hands it NumPy arrays and a spec, and only ever
receives NumPy arrays back, except for the *parameters*, which stay in the backend's own
native form between calls (``from_numpy`` / ``to_numpy``) so that training never copies them.

Shapes: ``x`` is ``(B, *spec.input_shape)`` and ``y`` is ``(B, n_out)`` one-hot; states are
lists ``[s0, ..., sL]`` of ``(B, *spec.state_shapes[i])`` arrays.

Processes (:class:`GDUProcesses`) follow appendix eqs 29-33 with index t = 0..K:

* ``bptt_s[i][t] = Σ_batch ∂L/∂s^i_{T-t}`` with ``L = ‖s0_T − y‖² / (2B)``;
  ``bptt_theta[p][t] = ∂L/∂θ_{T-t}`` where θ_{T-t} is the copy of θ used by the step
  s_{T-t} → s_{T-t+1}; ``bptt_theta[p][0] = 0``.
* ``ep_s[i][t] = Σ_batch (s^β_{t+1} − s^β_t) / (B·ep_scale)`` and
  ``ep_theta[p][t] = (∂Φ/∂θ(s^β_t) − ∂Φ/∂θ(s^β_{t−1})) / ep_scale`` (batch-averaged ∂Φ/∂θ),
  ``ep_theta[p][0] = 0``; ``ep_scale = spec.ep_scale(β)``.

Theorem 1: ``ep_* → −bptt_*`` as β → 0 when F = ∂Φ/∂s.

Reporting: after the calls of an experiment the runner asks :meth:`Backend.pop_implementation`
which implementation ran them (e.g. ``xla-loop`` or ``fused-cpp`` on jax-cpu, ``eager``), and
records it on every row.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import numpy as np

from epbench.spec import Algorithm, ModelSpec, PhaseSettings, TrainSettings

Params = Any  # backend-native parameter container
NDict = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""
    device: str = ""


@dataclasses.dataclass
class GDUProcesses:
    """Per-step processes of EP and BPTT, t = 0..K, batch-averaged (see module docstring)."""

    ep_s: list[np.ndarray]  # per layer: (K+1, *state_shape)
    bptt_s: list[np.ndarray]  # per layer: (K+1, *state_shape)
    ep_theta: NDict  # per parameter: (K+1, *param_shape)
    bptt_theta: NDict  # per parameter: (K+1, *param_shape)
    s_free: list[np.ndarray]  # first-phase states s_T, (B, *state_shape)
    convergence: float  # max_i ‖s^i_T − s^i_{T−1}‖_∞ over the batch
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EpochResult:
    params: Params
    train_error: float  # % of argmax(s0 after first phase) != label, online, before each update
    diverged: bool = False
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend declares it supports; the conformance kit skips the rest."""

    kinds: tuple[str, ...] = ("toy", "eb", "p", "pconv")
    flavors: tuple[str, ...] = ("paper", "official-code")
    dtypes: tuple[str, ...] = ("float32", "float64")
    activations: tuple[str, ...] = ("sigmoid", "hard_sigmoid", "tanh")
    #: implements ``PhaseSettings.alternate`` (even/odd alternation of the P models) in training
    alternate: bool = False
    #: compiles a program for each new shape on first use, so the first call of an experiment
    #: takes longer (the runner says so before it)
    compiles: bool = False


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
        if spec.kind not in caps.kinds:
            return f"{self.name} does not implement the {spec.kind} model"
        if spec.flavor not in caps.flavors:
            return f"{self.name} does not implement the {spec.flavor} flavour"
        if dtype not in caps.dtypes:
            return f"{self.name} does not support {dtype}"
        if spec.activation not in caps.activations:
            return f"{self.name} does not support the {spec.activation} activation"
        return None

    # ----- parameters ---------------------------------------------------------------------
    def init_params(self, spec: ModelSpec, seed: int) -> NDict:
        """Initial parameters from a seed, as NumPy (float64). The default is the core's
        backend-independent initialisation, so every backend starts from the same weights."""
        from epbench.params import init_params

        return init_params(spec, seed)

    @abstractmethod
    def from_numpy(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str) -> Params:
        """Native parameters from canonical NumPy arrays."""

    @abstractmethod
    def to_numpy(self, spec: ModelSpec, params: Params) -> NDict:
        """Canonical NumPy arrays from native parameters."""

    # ----- phases and algorithms ----------------------------------------------------------
    @abstractmethod
    def first_phase(self, spec: ModelSpec, params: Params, x: np.ndarray, T: int) -> list[np.ndarray]:
        """States after T free steps from s = 0."""

    @abstractmethod
    def ep_update(self, spec: ModelSpec, params: Params, x: np.ndarray, y: np.ndarray,
                  phase: PhaseSettings) -> NDict:
        """Σ_{t=1..K} ΔEP_θ(t) = (∂Φ/∂θ(s^β_K) − ∂Φ/∂θ(s*)) / ep_scale, batch-averaged:
        the direction *added* with the learning rate. Symmetric nudging when ``phase.symmetric``."""

    @abstractmethod
    def bptt_grad(self, spec: ModelSpec, params: Params, x: np.ndarray, y: np.ndarray,
                  phase: PhaseSettings) -> NDict:
        """∂L/∂θ with BPTT truncated to ``spec.bptt_span(K)`` steps: the direction *subtracted*."""

    @abstractmethod
    def gdu(self, spec: ModelSpec, params: Params, x: np.ndarray, y: np.ndarray,
            phase: PhaseSettings) -> GDUProcesses:
        """All four processes for t = 0..K (Prop. 4 recursion for BPTT, in one backward sweep)."""

    @abstractmethod
    def train_epoch(self, spec: ModelSpec, params: Params, x: np.ndarray, labels: np.ndarray,
                    phase: PhaseSettings, train: TrainSettings, algorithm: Algorithm) -> EpochResult:
        """One epoch of SGD over (x, labels) in consecutive mini-batches of ``train.batch_size``
        (the core shuffles before the call; a last short batch is used as it is).
        EP: θ += lr·ep_update; BPTT: θ −= lr·bptt_grad, per layer (``train.lr_of_layer``).
        A NaN/inf in the states or parameters stops the epoch with ``diverged=True``."""

    def train_epochs(self, spec: ModelSpec, params: Sequence[Params], xs: Sequence[np.ndarray],
                     labels: Sequence[np.ndarray], phase: PhaseSettings, train: TrainSettings,
                     algorithm: Algorithm) -> list[EpochResult]:
        """One epoch of several independent trials (their own parameters and data order, the
        same data size): ``[train_epoch(params[i], xs[i], labels[i]) for i]``. A backend may
        override it to run the trials as one batched program; the results must be the same."""
        return [self.train_epoch(spec, p, x, lab, phase, train, algorithm) for p, x, lab in zip(params, xs, labels)]

    @abstractmethod
    def evaluate(self, spec: ModelSpec, params: Params, x: np.ndarray, labels: np.ndarray,
                 T: int, batch_size: int = 1000) -> float:
        """Test error in % (argmax of s0 after the first phase)."""

    # ----- optional -----------------------------------------------------------------------
    def pop_implementation(self) -> str:
        """Which implementation ran the calls made since the previous ``pop_implementation()``
        (the record then starts afresh), for the results' ``implementation`` column: the runner
        pops it before and after each experiment, ``epbench bench`` after each measurement. A
        backend that can run a call in more than one way says which one it used (jax-cpu:
        ``fused-cpp``, ``xla-loop``, or both joined by "+"); the default is the framework's name
        (``"default"`` without one), for a backend with one way of running each call."""
        return self.framework or "default"

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""

    def matmul_gflops(self, n: int = 2048, dtype: str = "float32", repeats: int = 10) -> float | None:
        """Measured n×n matmul throughput of this backend's device in GFLOP/s (its practical
        peak), or None if the backend does not measure it (the core then uses NumPy)."""
        return None

    def step_function(self, spec: ModelSpec, params: Params, x: np.ndarray,
                      states: list[np.ndarray]) -> list[np.ndarray] | None:
        """F(x, s, θ) = s + h·dsdt(s): one free step *before* the clamp (optional: used by the
        conformance kit)."""
        return None

    def phi(self, spec: ModelSpec, params: Params, x: np.ndarray, states: list[np.ndarray]) -> float | None:
        """Φ(x, s, θ) summed over the batch (optional: used by the conformance kit)."""
        return None
