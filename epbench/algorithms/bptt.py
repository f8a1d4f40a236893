"""Backpropagation through time by the recursion of Proposition 4 (appendix eqs 31-33)."""

from __future__ import annotations

from epbench.algorithms import Algorithm, FreePhase, Steps
from epbench.phases import loss_grad


class BPTT(Algorithm):
    """∂L/∂θ for ``L = ‖s0_T − y‖²/(2B)``, back-propagated through the last ``span`` steps of
    the first phase (``ModelSpec.bptt_span``) by :func:`prop4`. The reference of the GDU table."""

    name = "bptt"
    summary = "backpropagation through time, Prop. 4 recursion (eqs 31-33)"
    agrees_with_bptt = "exact"
    process_sign = 1.0

    def history(self, steps: Steps, spec) -> int:
        return steps.span

    def gradient(self, ops, dyn, free: FreePhase, y, beta, steps: Steps, phase) -> dict:
        return prop4(ops, dyn, free.history, free.s_T, y, per_step=False)

    def processes(self, ops, dyn, free: FreePhase, y, beta, K: int, phase):
        return prop4(ops, dyn, free.history, free.s_T, y, per_step=True)


def prop4(ops, dyn, states, s_T, y, per_step: bool):
    """BPTT by the recursion of Proposition 4, one backward sweep with the vector-Jacobian
    product of *one* step F(x, s, θ) (``dyn.vjp``):

        ∇s(0) = ∂ℓ/∂s(s_T, y)                                             (31)
        ∇s(t) = ∂F/∂s(x, s_{T−t}, θ)ᵀ · ∇s(t−1),   t = 1..n                (32)
        ∇θ(t) = ∂F/∂θ(x, s_{T−t}, θ)ᵀ · ∇s(t−1),   t = 1..n                (33)

    ``states`` holds s_{T−n}..s_{T−1} stacked in time order; the sweep runs from s_{T−1} back
    to s_{T−n}. ∇θ(t) is the gradient w.r.t. the copy of θ used by the step s_{T−t} → s_{T−t+1}.
    The one-step VJP returns cotangents in the dynamics' own form (``raw``), linear in ∇s(t−1);
    ``dyn.theta_grad`` maps them to the canonical parameters, once for a sum over t and once for
    all t stacked.

    Two ways to run it, the same numbers: by default each step of the sweep does eqs 32 and 33
    together; with ``dyn.split_sweep`` the sweep runs eq. 32 only and eq. 33, which needs no
    recursion, is applied to all t at once (``dyn.vjp_theta`` mapped over t: one large product
    per parameter; pays on a compiling backend for the dense models).

    per_step=True: ``(bptt_s, bptt_θ)`` for t = 0..n, ∇s summed over the batch and ∇θ(0) = 0;
    per_step=False: Σ_{t=1..n} ∇θ(t) = ∂L/∂θ truncated to n steps.
    """
    xp = ops.xp
    g0 = loss_grad(ops, s_T, y)
    n = ops.tree_leaves(states)[0].shape[0]
    batch_sum = lambda g: [xp.sum(v, axis=0) for v in g]  # noqa: E731

    if dyn.split_sweep:
        def eq32(g, s):
            g_new = dyn.vjp_states(s, g)
            return g_new, (g, g_new)

        # outputs in the time order of ``states``: index j is the step at s_{T−n+j} (t = n − j),
        # with its cotangent ∇s(t−1) and its result ∇s(t)
        _, (cot, grads) = ops.scan(eq32, g0, states, reverse=True)
        if not per_step:
            return dyn.theta_grad(dyn.vjp_theta_sum(states, cot))  # linear: sum first, map once
        flip = lambda v: xp.flip(v, axis=0)  # noqa: E731
        bptt_s = [xp.concat([xp.sum(a, axis=0)[None, ...], flip(xp.sum(b, axis=1))], axis=0)
                  for a, b in zip(g0, grads)]
        # t = 0..n: at t = 0 the cotangent is 0, so ∇θ(0) = 0 exactly (any state will do)
        s_t = ops.concat_front(s_T, ops.tree_map(flip, states))
        g_t = ops.concat_front(ops.tree_map(xp.zeros_like, g0), ops.tree_map(flip, cot))
        return bptt_s, dyn.theta_grad(ops.map(lambda s, g: dyn.vjp(s, g)[1], s_t, g_t, batched=True), stacked=True)

    if not per_step:
        def acc(carry, s):
            g, total = carry
            gs, raw = dyn.vjp(s, g)
            return (gs, raw if total is None else ops.tree_map(lambda a, b: a + b, total, raw)), None

        # the first step outside the loop gives the accumulator its structure
        gs, raw = dyn.vjp(ops.tree_map(lambda a: a[n - 1], states), g0)
        if n > 1:
            (_, raw), _ = ops.scan(acc, (gs, raw), ops.tree_map(lambda a: a[:n - 1], states), reverse=True)
        return dyn.theta_grad(raw)

    def body(g, s):  # the step at s_{T−t}, t = 1..n
        gs, raw = dyn.vjp(s, g)
        return gs, (batch_sum(gs), raw)

    # the states flipped to s_{T−1}, ..., s_{T−n}, so the outputs come in the order t = 1..n; row t = 0: ∇θ(0) = 0
    backwards = ops.tree_map(lambda v: xp.flip(v, axis=0), states)
    _, (bptt_s, raws) = ops.scan(body, g0, backwards, first_y=(batch_sum(g0), dyn.zero_raw()))
    return bptt_s, dyn.theta_grad(raws, stacked=True)  # linear: one map over every t
