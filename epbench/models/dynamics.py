"""``ModelDynamics``: a registered :class:`~epbench.models.Model` on one batch as the
:class:`~epbench.backend.Dynamics` primitives the algorithms use, on any backend.

The VJP of one step comes from the backend's autodiff (``ops.vjp``) through the model's step
with respect to the states and the step inputs of :meth:`Model.prepare`; ``theta_grad`` maps
cotangents of the step inputs to the parameters through the VJP of ``prepare`` itself (linear
in the cotangent, so a sum over steps is mapped once and a stack of them in one batched call).
On a backend without autodiff (``ops.vjp is None``) the model's analytic ``step_vjp`` gives
the parameter cotangents directly and ``theta_grad`` is the identity.
"""

from __future__ import annotations


class ModelDynamics:
    def __init__(self, ops, model, spec, params: dict, x, alternate: bool = False):
        self.ops = ops
        self.model = model
        self.spec = spec
        self.params = params
        self.x = x
        self.batch = x.shape[0]
        self.alternate = alternate
        self.split_sweep = ops.prefers_split_sweep and model.batches_over_time
        self.batched_maps = ops.vectorizes_maps and model.batches_over_time
        self.inputs, self.ctx = model.prepare(ops, spec, params, x)
        self._pullback = None

    # ----- the step ------------------------------------------------------------------------------
    def _step(self, inputs, s, nudge=None):
        m, ops, spec = self.model, self.ops, self.spec
        if not self.alternate:
            return m.step(ops, spec, inputs, self.ctx, s, nudge)
        even, odd = tuple(range(0, len(s), 2)), tuple(range(1, len(s), 2))
        if nudge is None:  # odd layers, then even ones (ends on s0)
            return m.step(ops, spec, inputs, self.ctx, m.step(ops, spec, inputs, self.ctx, s, layers=odd), layers=even)
        half = m.step(ops, spec, inputs, self.ctx, s, nudge, layers=even)  # even ones with the nudge, then odd
        return m.step(ops, spec, inputs, self.ctx, half, layers=odd)

    def zeros(self):
        return self.model.zeros(self.ops, self.spec, self.batch, self.x)

    def step(self, s, nudge=None):
        return self._step(self.inputs, s, nudge)

    def run(self, s, n: int, nudge=None):
        if n <= 0:
            return s
        return self.ops.fori(n, lambda z: self.step(z, nudge), s, unroll=self.ops.unroll(self.spec, nudge is None))

    # ----- VJPs ----------------------------------------------------------------------------------
    def _analytic_vjp(self, s, g):
        """The model's ``step_vjp`` (backends without autodiff); under alternation the double step's,
        by the chain rule through its two half steps (odd layers, then even ones)."""
        m, ops, spec = self.model, self.ops, self.spec
        if not self.alternate:
            return m.step_vjp(ops, spec, self.params, self.inputs, self.ctx, s, g)
        even, odd = tuple(range(0, len(s), 2)), tuple(range(1, len(s), 2))
        half = m.step(ops, spec, self.inputs, self.ctx, s, layers=odd)
        g_half, th_even = m.step_vjp(ops, spec, self.params, self.inputs, self.ctx, half, g, layers=even)
        g_s, th_odd = m.step_vjp(ops, spec, self.params, self.inputs, self.ctx, s, g_half, layers=odd)
        return g_s, {k: th_even[k] + th_odd[k] for k in th_even}

    def vjp(self, s, g):
        if self.ops.vjp is None:
            return self._analytic_vjp(s, g)
        _, pull = self.ops.vjp(lambda z, inp: self._step(inp, z), s, self.inputs)
        g_s, g_inputs = pull(g)
        return g_s, g_inputs

    def vjp_states(self, s, g):
        if self.ops.vjp is None:
            return self.vjp(s, g)[0]
        _, pull = self.ops.vjp(lambda z: self._step(self.inputs, z), s)
        return pull(g)[0]

    def vjp_theta_sum(self, states, cots):
        """Σ_t of the raw parameter cotangents: one VJP of the step mapped over t."""
        ops = self.ops
        if ops.vjp is None:
            n = ops.tree_leaves(states)[0].shape[0]
            total = None
            for t in range(n):
                _, raw = self.vjp(ops.tree_map(lambda a: a[t], states), ops.tree_map(lambda a: a[t], cots))
                total = raw if total is None else ops.tree_map(lambda a, b: a + b, total, raw)
            return total
        _, pull = ops.vjp(lambda inp: ops.map(lambda z: self._step(inp, z), states, batched=True), self.inputs)
        return pull(cots)[0]

    def _prepare_pullback(self):
        """The VJP of ``prepare`` (θ ↦ step inputs), built on first use (only BPTT-like
        algorithms need it)."""
        if self._pullback is None:
            _, self._pullback, _ = self.ops.vjp(
                lambda p: self.model.prepare(self.ops, self.spec, p, self.x), self.params, has_aux=True)
        return self._pullback

    def zero_raw(self):
        """Raw cotangents that are all zero (the structure ``vjp`` returns)."""
        source = self.params if self.ops.vjp is None else self.inputs
        return self.ops.tree_map(self.ops.xp.zeros_like, source)

    def theta_grad(self, raw, stacked: bool = False) -> dict:
        if self.ops.vjp is None:
            return raw
        pull = self._prepare_pullback()
        if stacked:
            return self.ops.pullback_stacked(pull, raw, batched=self.batched_maps)[0]
        return pull(raw)[0]

    # ----- Φ -------------------------------------------------------------------------------------
    def dphi_increment(self, s, q, s_at=None, q_at=None, scale=1.0) -> dict:
        return self.model.dphi_increment(self.ops, self.spec, self.params, self.ctx, s, q, s_at, q_at, scale)

    def phi(self, s):
        return self.model.phi(self.ops, self.spec, self.params, self.x, s)

    def external(self, s) -> list:
        return self.model.external(self.ops, self.spec, s)

    def internal(self, s) -> list:
        return self.model.internal(self.ops, self.spec, s)
