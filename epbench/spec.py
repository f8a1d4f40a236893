"""Backend-neutral description of a model, its phases and its training.

Conventions (appendix C.3): layers are indexed *backwards*: ``s0`` is the output
layer, ``s1`` the hidden layer next to it, ..., ``sL`` the hidden layer next to the input ``x``.

Canonical parameter names (shared by every backend; parameters move between backends as
NumPy arrays with exactly these names and shapes):

* layered models (``eb``, ``p``, ``pconv``): ``W{i}{i+1}`` connects layer ``i+1`` to layer
  ``i`` (shape ``(n_i, n_{i+1})``, or a convolution kernel ``(C_i, C_{i+1}, F, F)``),
  ``W{L}x`` connects the input to the last hidden layer, ``b{i}`` is the bias of layer ``i``
  (present in the ``official-code`` flavour only; docs/equations.md lists its departures).
* ``toy``: ``W01`` (5, 50), ``W0x`` (5, 10), ``W1x`` (50, 10), biases ``b0``, ``b1``.

Every model is a discrete-time system ``s_{t+1} = s_t + dt * dsdt(s_t)``, where ``dt`` is the
paper's ε for energy-based models (eq. 71) and the leak of the prototypical ones (dt = 1:
no leak, appendix C.4).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

ModelKind = Literal["toy", "eb", "p", "pconv"]
Activation = Literal["sigmoid", "hard_sigmoid", "tanh"]
Flavor = Literal["paper", "official-code"]
DType = Literal["float32", "float64"]
Algorithm = Literal["ep", "bptt"]

#: Table 3 / Table 4 MNIST geometry
MNIST_SIDE = 28
MNIST_PIXELS = MNIST_SIDE * MNIST_SIDE
N_CLASSES = 10


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelSpec(_Strict):
    """One model of the paper, with every departure of the official code as a switch.

    ``flavor='paper'`` follows the appendix; ``flavor='official-code'`` follows the official
    code (docs/equations.md, "Departures of the official-code flavour"): no σ'(s0) on the EB
    output layer, biases on every layer, PyTorch's default initialisation, a BPTT span of K+1
    steps for fully connected models, a default P leak dt = 0.2 and, in pconv's ∂Φ/∂θ, max-pool indices
    taken one step late (:attr:`late_pool_indices`).
    """

    kind: ModelKind
    hidden: tuple[int, ...] = Field(default=(512,), description="hidden layer sizes, output side first")
    n_in: int = MNIST_PIXELS
    n_out: int = N_CLASSES
    channels: tuple[int, ...] = Field(default=(32, 64), description="pconv: channels, input side first")
    kernel: int = 5
    pool: int = 2
    activation: Activation = "sigmoid"
    dt: float | None = Field(default=None, validation_alias=AliasChoices("dt", "eps"))
    clamp: bool = False
    flavor: Flavor = "paper"
    input_activation: bool | None = None

    @field_validator("hidden", "channels")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(n <= 0 for n in v):
            raise ValueError("sizes must be positive")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.kind in ("eb", "p") and not 1 <= len(self.hidden) <= 9:
            raise ValueError("fully connected models need 1 to 9 hidden layers")
        if self.kind == "toy" and len(self.hidden) != 1:
            raise ValueError("the toy model has exactly one hidden layer")
        if self.kind == "pconv" and len(self.channels) != 2:
            raise ValueError("pconv has exactly two convolutional layers")
        if self.dt is not None and not (0.0 < self.dt <= 1.0):
            raise ValueError("dt (eps) must lie in (0, 1]")
        if self.kind == "pconv" and self.pconv_sides()[-1] <= 0:
            raise ValueError("input too small for the convolutions")
        return self

    # ----- derived quantities -------------------------------------------------------------
    @property
    def energy_based(self) -> bool:
        return self.kind in ("toy", "eb")

    @property
    def step(self) -> float:
        """The time step dt (ε for EB and toy; leak of P models)."""
        if self.dt is not None:
            return self.dt
        if self.energy_based:
            return 0.08 if self.kind == "toy" else 0.2
        if self.kind == "p" and self.flavor == "official-code":
            return 0.2
        return 1.0

    @property
    def biases(self) -> bool:
        """Biases on every layer: official code only."""
        return self.flavor == "official-code"

    @property
    def output_sigma_prime(self) -> bool:
        """σ'(s0) on the EB output layer: paper only; the toy model has it in both."""
        return self.flavor == "paper" or self.kind == "toy"

    @property
    def sigma_on_input(self) -> bool:
        """Energy-based models see σ(x) (eq. 70), prototypical ones raw x."""
        if self.input_activation is not None:
            return self.input_activation
        return self.energy_based

    @property
    def late_pool_indices(self) -> bool:
        """pconv's ∂Φ/∂θ pools with the argmax positions of the *previous* state (official code
        only; docs/equations.md): a state s_{t+1} reached by one step from s_t is unpooled at the
        positions computed from s_t (the official step returns them together with s_{t+1}), so
        s* = s_T with those of s_{T−1} and s^β_{t+1} with those of s^β_t. The paper (Lemma 5)
        takes them at the state itself. Only ∂Φ/∂W12 depends on it (idx2 is fixed by x)."""
        return self.kind == "pconv" and self.flavor == "official-code"

    def bptt_span(self, K: int) -> int:
        """Number of steps BPTT back-propagates through in training."""
        if self.flavor == "official-code" and self.kind in ("eb", "p"):
            return K + 1
        return K

    def ep_scale(self, beta: float) -> float:
        """Divisor of the EP differences: the nudge the output actually receives per unit of
        ∂ℓ/∂s. EB/toy nudge by ε·β (eq. 71), P by β (appendix C.4)."""
        return self.step * beta if self.energy_based else beta

    def pconv_sides(self) -> tuple[int, int, int, int]:
        """pconv: (conv1 output side, pool1 side, conv2 output side, pool2 side)."""
        side = int(math.isqrt(self.n_in))
        c1 = side - self.kernel + 1
        p1 = c1 // self.pool
        c2 = p1 - self.kernel + 1
        p2 = c2 // self.pool
        return c1, p1, c2, p2

    @property
    def n_layers(self) -> int:
        """Number of state layers s0..sL."""
        if self.kind == "toy":
            return 2
        if self.kind == "pconv":
            return 3
        return 1 + len(self.hidden)

    @property
    def state_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of each state layer s0..sL."""
        if self.kind == "pconv":
            _, p1, _, p2 = self.pconv_sides()
            c_in_side, c_out_side = self.channels
            return [(self.n_out,), (c_out_side, p2, p2), (c_in_side, p1, p1)]
        return [(self.n_out,)] + [(h,) for h in self.hidden]

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "pconv":
            side = int(math.isqrt(self.n_in))
            return (1, side, side)
        return (self.n_in,)

    def weight_names(self) -> list[str]:
        """Weight names, output side first."""
        if self.kind == "toy":
            return ["W01", "W0x", "W1x"]
        L = self.n_layers - 1
        return [f"W{i}{i + 1}" for i in range(L)] + [f"W{L}x"]

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names and shapes, weights (output side first) then biases."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.kind == "toy":
            n0, n1, nx = self.n_out, self.hidden[0], self.n_in
            shapes = {"W01": (n0, n1), "W0x": (n0, nx), "W1x": (n1, nx)}
        elif self.kind == "pconv":
            c1, c2 = self.channels
            k = self.kernel
            _, _, _, p2 = self.pconv_sides()
            shapes = {"W01": (self.n_out, c2 * p2 * p2), "W12": (c2, c1, k, k), "W2x": (c1, 1, k, k)}
        else:
            sizes = [self.n_out, *self.hidden, self.n_in]
            for i, name in enumerate(self.weight_names()):
                shapes[name] = (sizes[i], sizes[i + 1])
        if self.biases:
            for i, shape in enumerate(self.state_shapes):
                shapes[f"b{i}"] = (shape[0],)
        return shapes

    def param_layer(self, name: str) -> int:
        """Index of the layer that a parameter drives (its learning rate's layer)."""
        if name.startswith("b"):
            return int(name[1:])
        return int(name[1])

    @property
    def state_names(self) -> list[str]:
        return [f"s{i}" for i in range(self.n_layers)]

    def describe(self) -> str:
        if self.kind == "pconv":
            arch = "conv " + "-".join(str(c) for c in self.channels)
        else:
            arch = "-".join(str(n) for n in (self.n_in, *reversed(self.hidden), self.n_out))
        return f"{self.kind} {arch} {self.activation} dt={self.step:g} {self.flavor}"


class PhaseSettings(_Strict):
    """First phase (T steps from s = 0), nudged phase (K steps, strength β) and BPTT over K.

    ``alternate`` (training only; P models with dt = 1): the even/odd alternation of appendix
    C.6 (Fig. 14). In a layered P model s_{t+1}^i depends on s_t^{i±1} only, so the loss reaches
    back through one zig-zag half of the unrolled graph; updating the even-index and the
    odd-index layers on alternate steps computes just that half, at half the products per step.
    Both phases then run as T/2 and K/2 double steps (odd layers then even layers in the first
    phase, ending on s0; even layers, with the nudge, then odd layers in the nudged phase), so
    T, K and the BPTT span must be even. Exact for the first phase's s0_T, the loss, the online
    error and the truncated BPTT gradient (odd layers hold s_{T−1}); EP's update is that of the
    alternated dynamics, equal to the synchronous one at a fixed point (docs/equations.md).
    """

    T: int
    K: int
    beta: float
    symmetric: bool = False
    alternate: bool = False
    dtype: DType = "float32"

    @field_validator("T")
    @classmethod
    def _t_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("T must be > 0")
        return v

    @field_validator("K")
    @classmethod
    def _k_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("K must be > 0")
        return v

    @field_validator("beta")
    @classmethod
    def _beta_nonzero(cls, v: float) -> float:
        if v == 0 or not math.isfinite(v):
            raise ValueError("beta must be finite and non-zero")
        return v

    @model_validator(mode="after")
    def _k_le_t(self) -> "PhaseSettings":
        if self.K > self.T:
            raise ValueError(f"K ({self.K}) must not exceed T ({self.T})")
        if self.alternate and (odd := _odd_steps(self)):
            raise ValueError(odd)
        return self


def _odd_steps(phase: "PhaseSettings") -> str | None:
    if phase.T % 2 or phase.K % 2:
        return f"alternate runs double steps: T ({phase.T}) and K ({phase.K}) must be even"
    return None


def alternation_problem(spec: ModelSpec, phase: PhaseSettings) -> str | None:
    """Why ``phase.alternate`` cannot apply to ``spec`` (``None`` if it can): it needs a layered
    model whose new state depends on the neighbouring layers only, i.e. a fully connected P
    model with dt = 1, and an even BPTT span."""
    if not phase.alternate:
        return None
    if odd := _odd_steps(phase):
        return odd
    if spec.kind != "p":
        return f"alternate applies to fully connected P models only, not {spec.kind}"
    if spec.step != 1.0:
        return f"alternate needs dt = 1 (no leak), got dt = {spec.step:g}"
    span = spec.bptt_span(phase.K)
    if span % 2:
        return f"alternate needs an even BPTT span; the {spec.flavor} flavour's is {span}"
    return None


class TrainSettings(_Strict):
    """SGD with one learning rate per layer, listed input side first (Table 4 order)."""

    lrs: tuple[float, ...]
    epochs: int = 1
    batch_size: int = 20

    @field_validator("epochs", "batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    def lr_of_layer(self, spec: ModelSpec) -> list[float]:
        """Learning rate of each layer s0..sL (reversing Table 4's input-first order)."""
        if len(self.lrs) != spec.n_layers:
            raise ValueError(f"{spec.kind} needs {spec.n_layers} learning rates, got {len(self.lrs)}")
        return list(reversed(self.lrs))


def check_alternation(spec: ModelSpec, phase: PhaseSettings, gdu: bool = False) -> None:
    """Raise ``ValueError`` if ``phase.alternate`` is set where it does not apply (for backends:
    call it first in ep_update, bptt_grad, train_epoch and gdu)."""
    if not phase.alternate:
        return
    if gdu:
        raise ValueError("phase.alternate is a training option: the GDU processes follow the synchronous dynamics")
    problem = alternation_problem(spec, phase)
    if problem:
        raise ValueError(problem)
