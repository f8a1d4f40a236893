"""The ``numpy`` backend: epbench's primitives on NumPy, and nothing more.

Everything else is the core's: the models (:mod:`epbench.models`), the phases, EP, BPTT
(Prop. 4), the GDU processes and training, with the core's Python loops
(:class:`epbench.ops.EagerOps`) over the Array API namespace of NumPy. NumPy has no automatic
differentiation (``capabilities.autodiff = False``), so the VJP of one step is each model's
analytic ``step_vjp`` (the built-in fully connected models have one; pconv, which also needs
convolutions, does not run here).

Native parameters are a ``dict`` of NumPy arrays in the dtype given to ``from_numpy``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from epbench.backend import Availability, Backend, Capabilities, NDict
from epbench.ops import EagerOps
from epbench.spec import ModelSpec


class NumpyOps(EagerOps):
    """Python loops over ``array_api_compat.numpy``; no autodiff, no feature maps."""

    def __init__(self):
        import array_api_compat.numpy as xp

        super().__init__(xp)

    def matmul(self, a, b):
        return np.matmul(a, b)


class NumpyBackend(Backend):
    name = "numpy"
    framework = "numpy"
    capabilities = Capabilities(autodiff=False, feature_maps=False)

    def __init__(self):
        self._ops = NumpyOps()

    def availability(self, probe: bool = False) -> Availability:
        return Availability(True, device="cpu")

    @property
    def ops(self) -> NumpyOps:
        return self._ops

    def from_numpy(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str) -> NDict:
        from epbench.params import check_params

        check_params(spec, dict(params))
        return {k: np.array(params[k], dtype=np.dtype(dtype), copy=True) for k in spec.param_shapes}

    def to_numpy(self, spec: ModelSpec, params: NDict) -> NDict:
        return {k: np.array(params[k], copy=True) for k in spec.param_shapes}

    def cast(self, params: NDict, dtype: str) -> NDict:
        """The parameters in ``dtype`` (the same dict when they already are)."""
        dt = np.dtype(dtype)
        if all(v.dtype == dt for v in params.values()):
            return params
        return {k: v.astype(dt) for k, v in params.items()}

    def dtype_of(self, params: NDict) -> str:
        return str(next(iter(params.values())).dtype)

    def asarray(self, a, dtype: str | None = None) -> np.ndarray:
        return np.asarray(a) if dtype is None else np.asarray(a, dtype=np.dtype(dtype))
