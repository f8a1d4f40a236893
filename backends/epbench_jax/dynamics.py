"""The JAX :class:`~epbench.ops.Ops` and :class:`~epbench.backend.Dynamics` the core's phases and
algorithms are traced against, built on the pure functions of ``models.py``.

Everything here is traced inside one ``jax.jit`` program per call: loops are ``lax.fori_loop`` /
``lax.scan``, never Python loops. ``spec`` and the step counts are static Python values; β, the
data and the parameters are traced.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax

from epbench.ops import Ops
from epbench.spec import ModelSpec

from epbench_jax import models as M
from epbench_jax import native

#: set while a jax-cpu program is traced: phases of the models ``native.handles`` run as one
#: fused kernel call (``native.phase``) instead of an XLA loop of ``models.step``
_FUSED = contextvars.ContextVar("epbench_fused_phases", default=False)


@contextlib.contextmanager
def fused_phases(enabled: bool):
    """Trace programs with (or without) the fused CPU phases of :mod:`epbench_jax.native`."""
    token = _FUSED.set(enabled)
    try:
        yield
    finally:
        _FUSED.reset(token)


class JaxOps(Ops):
    """Loop combinators that trace into one XLA program: ``lax.fori_loop``, ``lax.scan``,
    ``lax.cond``, ``jax.vmap`` / ``lax.map``; trees are JAX pytrees (``None`` an empty subtree)."""

    xp = jnp

    def tree_map(self, f, tree, *rest):
        return jax.tree.map(f, tree, *rest)

    def tree_leaves(self, tree) -> list:
        return jax.tree.leaves(tree)

    def fori(self, n: int, body, carry, unroll: int = 1):
        return lax.fori_loop(0, n, lambda _, c: body(c), carry, unroll=unroll)

    def scan(self, body, carry, xs=None, length: int | None = None, reverse: bool = False, first_y=None):
        carry, ys = lax.scan(body, carry, xs, length=length, reverse=reverse)
        return carry, (ys if first_y is None else self.concat_front(first_y, ys))

    def cond(self, pred, true_fn, false_fn, operand):
        return lax.cond(pred, true_fn, false_fn, operand)

    def map(self, f, *xs, batched: bool = True):
        """``jax.vmap`` (one large product per parameter) when ``batched``, else ``lax.map``
        (a loop: pconv, whose per-step products are already large and batch poorly)."""
        if batched:
            return jax.vmap(f)(*xs)
        return lax.map(lambda a: f(*a), xs)

    def stack(self, trees: list):
        if not trees or trees[0] is None:
            return None
        return jax.tree.map(lambda *a: jnp.stack(a), *trees)

    def concat_front(self, first, rest):
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b], 0), first, rest)


OPS = JaxOps()


def _unroll(spec: ModelSpec) -> int:
    """Steps per loop iteration in the long free phase (fewer loop-control round trips)."""
    return 2 if spec.kind == "pconv" else 4


class JaxDynamics:
    """One model on one batch. Per-batch quantities are computed once, outside the time loops:
    u, the step parameters in their step layout ``psl`` (and the transpose ``layout_vjp`` back
    to θ_step), the drive d, the constant pooling indices ``aux`` and the transpose ``drive_vjp``
    of θ_drive ↦ d.

    ``F(psl, d, s, nudge=None)`` is the step every phase and the BPTT sweep use: ``models.step``,
    or with ``alternate`` the double step ``models.double_step`` (two time steps; the core then
    counts T, K and the BPTT span in double steps, ``epbench.compute.steps``). The ``raw``
    cotangents of a step are ``(∂/∂psl, ∂/∂d)``; both maps to θ are linear."""

    def __init__(self, spec: ModelSpec, params: dict, x, alternate: bool = False):
        self.spec = spec
        self.F = functools.partial(M.double_step if alternate else M.step, spec)
        self.params = params
        self.u = M.input_of(spec, x)
        ps, pd = M.split_params(spec, params)
        self.psl, self.layout_vjp = jax.vjp(lambda q: M.step_layout(spec, q), ps)
        self.d, self.drive_vjp, self.aux = jax.vjp(lambda q: M.drive(spec, q, self.u), pd, has_aux=True)
        self.batch = x.shape[0]
        self.dtype = x.dtype
        #: eq. 33 mapped over t as one batched product (dense models); pconv sweeps eqs 32-33 together
        self.split_sweep = spec.kind != "pconv"
        self.batched_maps = spec.kind != "pconv"

    def zeros(self):
        return M.zero_states(self.spec, self.batch, self.dtype)

    def step(self, s, nudge=None):
        return self.F(self.psl, self.d, tuple(s), nudge)

    def run(self, s, n: int, nudge=None):
        """n steps of :meth:`step` from s: one fused kernel call where that is on and
        ``native.chosen`` picks it for this phase (synchronous steps only), else an XLA loop."""
        s = tuple(s)
        if n <= 0:
            return s
        if _FUSED.get() and self.F.func is M.step and native.chosen(self.spec, self.dtype, self.batch, n,
                                                                    nudge is not None):
            return native.phase(self.spec, self.psl, self.d, s, n, nudge)
        unroll = min(_unroll(self.spec), n) if nudge is None else 1
        return lax.fori_loop(0, n, lambda _, z: self.step(z, nudge), s, unroll=unroll)

    def vjp(self, s, g):
        """``(∂F/∂s(s)ᵀg, (∂F/∂psl(s)ᵀg, ∂F/∂d(s)ᵀg))``: eqs 32-33 for one step at s."""
        _, pull = jax.vjp(lambda z, p, d: self.F(p, d, z), tuple(s), self.psl, self.d)
        gs, gp, gd = pull(tuple(g))
        return gs, (gp, gd)

    def vjp_states(self, s, g):
        """∂F/∂s(s)ᵀg (eq. 32)."""
        _, pull = jax.vjp(lambda z: self.F(self.psl, self.d, z), tuple(s))
        (gs,) = pull(tuple(g))
        return gs

    def vjp_theta_sum(self, states, cots):
        """Σ_t (∂F/∂psl(s_t)ᵀg_t, ∂F/∂d(s_t)ᵀg_t): one VJP of the step mapped over t, θ shared."""
        states, cots = tuple(states), tuple(cots)
        _, pull = jax.vjp(lambda p, d: jax.vmap(lambda s: self.F(p, d, s))(states), self.psl, self.d)
        return pull(cots)

    def _theta_grad(self, raw) -> dict:
        g_layout, g_drive = raw
        (gs,) = self.layout_vjp(g_layout)
        (gd,) = self.drive_vjp(g_drive)
        return {**gs, **gd}

    def theta_grad(self, raw, stacked: bool = False) -> dict:
        """Cotangents of the step layout and of the drive → ∂/∂θ for every parameter (along a
        leading time axis when ``stacked``: batched for the dense models, a loop for pconv)."""
        if not stacked:
            return self._theta_grad(raw)
        return OPS.map(self._theta_grad, raw, batched=self.batched_maps)

    def dphi_increment(self, s, q, s_at=None, q_at=None, scale=1.0) -> dict:
        """(∂Φ/∂θ(s) − ∂Φ/∂θ(q)) / scale (``models.dphi_increment``)."""
        inc = M.dphi_increment(self.spec, self.params, self.u, self.aux, tuple(s), tuple(q),
                               None if s_at is None else tuple(s_at), None if q_at is None else tuple(q_at))
        return {k: v / scale for k, v in inc.items()}

    def phi(self, s):
        return M.phi(self.spec, self.params, self.u, tuple(s))

    def external(self, s) -> list:
        return M.to_external(self.spec, s)

    def internal(self, s):
        return M.to_internal(self.spec, s)
