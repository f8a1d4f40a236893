"""Backend-neutral description of a model, its phases and its training.

Conventions (appendix C.3): layers are indexed *backwards*: ``s0`` is the output
layer, ``s1`` the hidden layer next to it, ..., ``sL`` the hidden layer next to the input ``x``.

Canonical parameter names (shared by every backend; parameters move between backends as
NumPy arrays with exactly these names and shapes):

* layered models (``eb``, ``p``, ``pconv``): ``W{i}{i+1}`` connects layer ``i+1`` to layer
  ``i`` (shape ``(n_i, n_{i+1})``, or a convolution kernel ``(C_i, C_{i+1}, F, F)``),
  ``W{L}x`` connects the input to the last hidden layer, ``b{i}`` is the bias of layer ``i``
  (present in the ``official-code`` flavour only; docs/equations.md lists its departures);
  indices of two digits or more are separated by ``_`` (:func:`weight_name`).
* ``toy``: ``W01`` (5, 50), ``W0x`` (5, 10), ``W1x`` (50, 10), biases ``b0``, ``b1``.

A model (``kind``) is a registered :class:`epbench.models.Model`, which declares its shapes.

Every model is a discrete-time system ``s_{t+1} = s_t + dt * dsdt(s_t)``, where ``dt`` is the
paper's ε for energy-based models (eq. 71) and the leak of the prototypical ones (dt = 1:
no leak, appendix C.4).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

Activation = Literal["sigmoid", "hard_sigmoid", "tanh"]
Flavor = Literal["paper", "official-code"]
DType = Literal["float32", "float64"]
#: a registered algorithm's name (``epbench plugins`` lists them; suites check it on loading)
Algorithm = str

#: Table 3 / Table 4 MNIST geometry
MNIST_SIDE = 28
MNIST_PIXELS = MNIST_SIDE * MNIST_SIDE
N_CLASSES = 10


def weight_name(i: int, j: int | str) -> str:
    """Canonical name of the weight connecting layer j (or the input, ``"x"``) to layer i:
    ``W{i}{j}`` while both indices are single characters (``W01``, ``W1x``), ``W{i}_{j}`` beyond
    (``W10_11``), so that depth is not capped."""
    a, b = str(i), str(j)
    return f"W{a}{b}" if len(a) == 1 and len(b) == 1 else f"W{a}_{b}"


def layer_of_name(name: str) -> int:
    """The first layer index of a canonical parameter name (``W{i}{j}``, ``W{i}_{j}``, ``b{i}``)."""
    body = name[1:]
    if name.startswith("b"):
        return int(body)
    return int(body.split("_")[0]) if "_" in body else int(body[0])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelSpec(_Strict):
    """One model: its kind (a registered :class:`epbench.models.Model`, built-in ``toy``,
    ``eb``, ``p``, ``pconv``, or a plugin's), its sizes, activation, time step and flavour; every
    departure of the official code is a switch.

    ``flavor='paper'`` follows the appendix; ``flavor='official-code'`` follows the official
    code (docs/equations.md, "Departures of the official-code flavour"): no σ'(s0) on the EB
    output layer, biases on every layer, PyTorch's default initialisation, a BPTT span of K+1
    steps for fully connected models, a default P leak dt = 0.2 and, in pconv's ∂Φ/∂θ, max-pool
    indices taken one step late (:attr:`late_pool_indices`). Structure (states, parameters,
    spans) comes from the model (:attr:`model`).
    """

    kind: str
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
        if self.dt is not None and not (0.0 < self.dt <= 1.0):
            raise ValueError("dt (eps) must lie in (0, 1]")
        self.model.validate(self)
        return self

    # ----- the model ----------------------------------------------------------------------------
    @property
    def model(self):
        """The registered :class:`epbench.models.Model` of :attr:`kind`."""
        from epbench.plugins import get_model

        return get_model(self.kind)

    @property
    def energy_based(self) -> bool:
        return self.model.energy_based

    @property
    def step(self) -> float:
        """The time step dt (ε for EB and toy; leak of P models), the model's default if unset."""
        return self.dt if self.dt is not None else self.model.default_dt(self)

    @property
    def biases(self) -> bool:
        """Biases on every layer: official code only."""
        return self.flavor == "official-code"

    @property
    def output_sigma_prime(self) -> bool:
        """σ'(s0) on the output layer of an energy-based model: the paper's; the official code's
        EB has none (the toy model has it in both flavours)."""
        return getattr(self.model, "output_sigma_prime", lambda spec: True)(self)

    @property
    def sigma_on_input(self) -> bool:
        """Energy-based models see σ(x) (eq. 70), prototypical ones raw x."""
        if self.input_activation is not None:
            return self.input_activation
        return self.energy_based

    @property
    def late_pool_indices(self) -> bool:
        """∂Φ/∂θ pools with the argmax positions of the *previous* state (official-code pconv;
        docs/equations.md): a state s_{t+1} reached by one step from s_t is unpooled at the
        positions computed from s_t (the official step returns them together with s_{t+1}), so
        s* = s_T with those of s_{T−1} and s^β_{t+1} with those of s^β_t. The paper (Lemma 5)
        takes them at the state itself."""
        return getattr(self.model, "late_pool_indices", lambda spec: False)(self)

    def bptt_span(self, K: int) -> int:
        """Number of steps BPTT back-propagates through in training."""
        return getattr(self.model, "bptt_span", lambda spec, K: K)(self, K)

    def ep_scale(self, beta: float) -> float:
        """Divisor of the EP differences: the nudge the output actually receives per step and
        unit of ∂ℓ/∂s, dt·β (eq. 71; for P models the leak dt, 1 in the paper's, appendix C.4).
        A P model's ∂Φ/∂θ differences are those of dt·Φ_P (the energy whose step of size dt
        the leaky dynamics take), so its weight update stays (∂Φ_P/∂θ(s^β) − ∂Φ_P/∂θ(s*))/β,
        as the official code's, while its neuron processes divide by dt·β, as its dS does."""
        return self.step * beta

    @property
    def ep_phi_factor(self) -> float:
        """The multiple of Φ whose ∂Φ/∂θ differences EP divides by :meth:`ep_scale`: 1 for an
        energy-based model (its Φ carries dt), dt for a prototypical one (the energy dt·Φ_P
        whose step of size dt the leaky dynamics take)."""
        return 1.0 if self.energy_based else self.step

    def pconv_sides(self) -> tuple[int, int, int, int]:
        """pconv: (conv1 output side, pool1 side, conv2 output side, pool2 side)."""
        return self.model.sides(self)

    @property
    def n_layers(self) -> int:
        """Number of state layers s0..sL."""
        return len(self.state_shapes)

    @property
    def state_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of each state layer s0..sL."""
        return self.model.state_shapes(self)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.model.input_shape(self))

    def weight_names(self) -> list[str]:
        """Weight names, output side first."""
        return [k for k in self.param_shapes if k.startswith("W")]

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names and shapes, weights (output side first) then biases."""
        return self.model.param_shapes(self)

    def param_layer(self, name: str) -> int:
        """Index of the layer that a parameter drives (its learning rate's layer)."""
        return self.model.param_layer(self, name)

    @property
    def state_names(self) -> list[str]:
        return [f"s{i}" for i in range(self.n_layers)]

    def describe(self) -> str:
        return self.model.describe(self)


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
    if not spec.model.supports_alternate(spec):
        return f"alternate applies to layered prototypical models (p), not {spec.kind}"
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
    """Raise ``ValueError`` if ``phase.alternate`` is set where it does not apply (the core's
    gradients and training check it; the GDU processes follow the synchronous dynamics)."""
    if not phase.alternate:
        return
    if gdu:
        raise ValueError("phase.alternate is a training option: the GDU processes follow the synchronous dynamics")
    problem = alternation_problem(spec, phase)
    if problem:
        raise ValueError(problem)
