"""Recurrent backpropagation (Almeida 1987; Pineda 1987), written against epbench's primitives.

At the end of the first phase s* (taken as a fixed point of F), the adjoint is iterated with the
transposed Jacobian of one step *at s** instead of at the stored trajectory:

    ∇s(0) = ∂L/∂s*,   ∇s(t) = ∂F/∂s(x, s*, θ)ᵀ · ∇s(t−1),
    ∇θ(t) = ∂F/∂θ(x, s*, θ)ᵀ · ∇s(t−1),                      t = 1..K,

and ∂L/∂θ ≈ Σ_t ∇θ(t). When the first phase has converged (s_{T−t} = s* for t ≤ K) this is
exactly the Prop. 4 recursion of BPTT (appendix eqs 31-33), step for step; RBP needs no stored
trajectory, only s*.
"""

from __future__ import annotations

from epbench.algorithms import Algorithm, FreePhase, Steps
from epbench.phases import loss_grad


class RBP(Algorithm):
    name = "rbp"
    summary = "Almeida-Pineda recurrent backpropagation: the adjoint iterated K times at s*"
    process_sign = 1.0
    #: at a converged first phase its processes equal BPTT's (the conformance kit checks it)
    agrees_with_bptt = "fixed-point"

    def gradient(self, ops, dyn, free: FreePhase, y, beta, steps: Steps, phase) -> dict:
        """Σ_{t=1..span} ∇θ(t): the raw cotangents summed, mapped to θ once (linear)."""
        def body(carry, _):
            g, total = carry
            gs, raw = dyn.vjp(free.s_T, g)
            return (gs, ops.tree_map(lambda a, b: a + b, total, raw)), None

        g0 = loss_grad(ops, free.s_T, y)
        gs, raw = dyn.vjp(free.s_T, g0)
        (_, total), _ = ops.scan(body, (gs, raw), None, length=steps.span - 1)
        return dyn.theta_grad(total)

    def processes(self, ops, dyn, free: FreePhase, y, beta, K: int, phase):
        """(∇s(t) summed over the batch, ∇θ(t)) for t = 0..K, ∇θ(0) = 0."""
        xp = ops.xp
        g0 = loss_grad(ops, free.s_T, y)
        batch_sum = lambda g: [xp.sum(v, axis=0) for v in g]  # noqa: E731

        def body(g, _):
            gs, raw = dyn.vjp(free.s_T, g)
            return gs, (batch_sum(gs), raw)

        _, (proc_s, raws) = ops.scan(body, g0, None, length=K, first_y=(batch_sum(g0), dyn.zero_raw()))
        return proc_s, dyn.theta_grad(raws, stacked=True)
