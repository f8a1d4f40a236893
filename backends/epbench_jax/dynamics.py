"""The JAX :class:`~epbench.backend.Dynamics`: the core's :class:`~epbench.models.dynamics.ModelDynamics`
over the registered model with :class:`~epbench_jax.ops.JaxOps`, whose phases may run as one
fused kernel call on the CPU (:mod:`epbench_jax.native`).

Everything here is traced inside one ``jax.jit`` program per call. ``spec`` and the step counts
are static Python values; β, the data and the parameters are traced.
"""

from __future__ import annotations

import contextlib
import contextvars

from epbench.models.dynamics import ModelDynamics

from epbench_jax import native

#: set while a jax-cpu program is traced: phases of the models ``native.handles`` run as one
#: fused kernel call (``native.phase``) instead of an XLA loop of the model's step
_FUSED = contextvars.ContextVar("epbench_fused_phases", default=False)


@contextlib.contextmanager
def fused_phases(enabled: bool):
    """Trace programs with (or without) the fused CPU phases of :mod:`epbench_jax.native`."""
    token = _FUSED.set(enabled)
    try:
        yield
    finally:
        _FUSED.reset(token)


class JaxDynamics(ModelDynamics):
    """:class:`ModelDynamics` whose :meth:`run` is one fused kernel call where that is on and
    :func:`native.chosen` picks it for the phase (synchronous steps only)."""

    def run(self, s, n: int, nudge=None):
        """n steps ``s ← F(x, s, θ)`` (with the nudge β(y − s0) on dsdt_0 when given)."""
        if n > 0 and _FUSED.get() and not self.alternate and native.chosen(
                self.spec, self.x.dtype, self.batch, n, nudge is not None):
            return native.phase(self.spec, self.inputs, s, n, nudge)
        return super().run(s, n, nudge)
