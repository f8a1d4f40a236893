"""The tiny configurations the conformance kit runs on, and their data.

Sizes are kept tiny (EB 20-16-5, P 20-16-16-5, a 14×14 pconv on 2 samples) so that the whole
kit takes seconds; every case draws its parameters (:func:`epbench.params.init_params`) and its
batch from fixed seeds, so two backends always see the same numbers.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from epbench.params import init_params
from epbench.spec import ModelSpec, PhaseSettings

#: seed of the parameters of every case (and seed + 1 for the "different seed" check)
PARAM_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Case:
    """One model configuration with its phase settings and batch size.

    ``smooth``: the step is differentiable almost everywhere *and* finite differences are
    reliable (false for pconv with the hard sigmoid: saturated states make pooling ties).
    ``theorem``: F = ∂Φ/∂s holds, so the Theorem-1 β-sweep applies.
    ``variant``: an extra configuration (clamping, hard sigmoid) left out of quick runs.
    ``theorem_T``: first-phase length of the Theorem-1 sweep (0: :data:`THEOREM_PHASE` by kind).
    ``beta32``: β of the float32 runs, large enough that the EP differences (∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*))
    stay well above float32 rounding (larger for the official-code P models, whose leak h = 0.2
    weakens the nudge that reaches the layers near the input).
    """

    key: str
    model: dict
    flavor: str
    T: int
    K: int
    beta: float = 0.1
    beta32: float = 1.0
    batch: int = 4
    smooth: bool = True
    theorem: bool = False
    variant: bool = False
    theorem_T: int = 0

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(**self.model, flavor=self.flavor)

    @property
    def label(self) -> str:
        """Short model label for messages, e.g. ``eb 20-16-5 tanh``."""
        spec = self.spec
        if spec.kind == "pconv":
            side = spec.input_shape[-1]
            arch = f"{side}x{side} conv{spec.kernel} {'-'.join(map(str, spec.channels))}-{spec.n_out}"
        else:
            arch = "-".join(str(n) for n in (spec.n_in, *reversed(spec.hidden), spec.n_out))
        return f"{spec.kind} {arch} {spec.activation}" + (" clamp" if spec.clamp else "")

    def phase(self, dtype: str, **changes) -> PhaseSettings:
        beta = self.beta32 if dtype == "float32" else self.beta
        kw = dict(T=self.T, K=self.K, beta=beta, symmetric=False, dtype=dtype)
        kw.update(changes)
        return PhaseSettings(**kw)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.key.encode())

    def params(self, seed: int = PARAM_SEED) -> dict[str, np.ndarray]:
        return init_params(self.spec, seed)

    def batch_data(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y one-hot, labels) for ``n`` samples (default ``self.batch``), x ~ U[0, 1]."""
        spec = self.spec
        n = self.batch if n is None else n
        rng = np.random.default_rng(self.seed)
        x = rng.uniform(0.0, 1.0, size=(n, *spec.input_shape))
        labels = rng.integers(0, spec.n_out, size=n)
        y = np.eye(spec.n_out)[labels]
        return x, y, labels


_TOY = dict(kind="toy", n_in=10, hidden=(12,), n_out=5, activation="tanh", dt=0.08)
_EB = dict(kind="eb", n_in=20, hidden=(16,), n_out=5, dt=0.2)
_P = dict(kind="p", n_in=20, hidden=(16, 16), n_out=5)
_PCONV = dict(kind="pconv", n_in=196, n_out=10, channels=(2, 3), kernel=3, pool=2)

CASES: list[Case] = [
    Case("toy-paper", _TOY, "paper", T=40, K=6, theorem=True),
    Case("toy-official", _TOY, "official-code", T=40, K=6),
    Case("eb-paper", dict(_EB, activation="tanh"), "paper", T=30, K=6, theorem=True),
    Case("eb-official", dict(_EB, activation="sigmoid"), "official-code", T=30, K=6),
    Case("eb-clamp", dict(_EB, activation="sigmoid", clamp=True), "official-code", T=30, K=6, beta=0.5,
         variant=True),
    Case("p-paper", dict(_P, activation="tanh"), "paper", T=20, K=5),
    Case("p-official", dict(_P, activation="sigmoid"), "official-code", T=30, K=5, beta32=2.0),
    Case("p-hard", dict(_P, activation="hard_sigmoid"), "paper", T=20, K=5, variant=True),
    Case("pconv-paper", dict(_PCONV, activation="tanh"), "paper", T=10, K=3, batch=2),
    Case("pconv-official", dict(_PCONV, activation="hard_sigmoid"), "official-code", T=10, K=3, batch=2,
         beta32=2.0, smooth=False),
]

CASES_BY_KEY = {c.key: c for c in CASES}

#: Theorem-1 sweep: long enough first phases to converge to machine precision in float64
THEOREM_BETAS = (1e-2, 1e-3, 1e-4, 1e-5)
THEOREM_K = 12
THEOREM_PHASE = {"toy": dict(T=3000, K=THEOREM_K), "eb": dict(T=800, K=THEOREM_K)}

#: phase of the model and algorithm kits on a model's example spec (``Model.example_spec``)
EXAMPLE_T, EXAMPLE_K, EXAMPLE_BATCH = 20, 4, 3


def example_case(model, flavor: str = "paper") -> Case:
    """The kit's case for a registered model: its :meth:`~epbench.models.Model.example_spec`
    in ``flavor`` (unless the example names its own), T = 20, K = 4, β = 0.1, 3 samples.
    Finite differences are trusted unless max-pooling meets the hard sigmoid (saturated ties);
    the Theorem-1 sweep applies where F = ∂Φ/∂s, i.e. energy-based with σ'(s0)."""
    example = dict(model.example_spec())
    flavor = example.pop("flavor", None) or flavor
    spec = ModelSpec(**example, flavor=flavor)
    smooth = not (getattr(model, "uses_feature_maps", False) and spec.activation == "hard_sigmoid")
    theorem = bool(spec.energy_based and spec.output_sigma_prime and not spec.clamp)
    return Case(f"{spec.kind}-{flavor}", example, flavor, T=EXAMPLE_T, K=EXAMPLE_K, batch=EXAMPLE_BATCH,
                smooth=smooth, theorem=theorem)
