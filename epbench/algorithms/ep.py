"""Equilibrium Propagation (Scellier & Bengio 2017; discrete time, Ernoult et al. 2019)."""

from __future__ import annotations

from epbench.algorithms import Algorithm, FreePhase, Steps
from epbench.phases import dphi_difference, last, nudged_end


def _star(ops, free: FreePhase):
    """``(s_{T−1}, s*)``, the predecessor only when a history was kept."""
    return (None if free.history is None else last(ops, free.history)), free.s_T


class EP(Algorithm):
    """The EP update, main-text eq. 10 summed over the nudged phase (the sum telescopes):

        Δθ = (∂Φ/∂θ(s^β_K) − ∂Φ/∂θ(s*)) / ep_scale(β),

    s^β_K reached by K nudged steps from s* (appendix eq. 35); with symmetric nudging
    (``PhaseSettings.symmetric``, Laborieux et al. 2021)

        Δθ = (∂Φ/∂θ(s^{+β}_K) − ∂Φ/∂θ(s^{−β}_K)) / (2·ep_scale(β)).

    Training adds it (θ ← θ + lr·Δθ), so its gradient estimate is −Δθ. ∂Φ/∂θ is batch-averaged
    and the difference is formed from the state increments (``phases.dphi_difference``).
    """

    name = "ep"
    summary = "Equilibrium Propagation (one-sided, or symmetric nudging), eq. 10"
    agrees_with_bptt = "small-beta"
    process_sign = -1.0
    uses_beta = True

    def history(self, steps: Steps, spec) -> int:
        return 1 if spec.late_pool_indices else 0

    def update(self, ops, dyn, star, y, beta, K: int, symmetric: bool) -> dict:
        """Δθ from ``star = (s_{T−1}, s*)``: the direction *added* to θ."""
        scale = dyn.spec.ep_scale(beta)
        plus = nudged_end(ops, dyn, star[1], beta, y, K)
        if symmetric:
            lo, div = nudged_end(ops, dyn, star[1], -beta, y, K), 2.0 * scale
        else:
            lo, div = star, scale
        return dphi_difference(dyn, plus, lo, div)

    def gradient(self, ops, dyn, free: FreePhase, y, beta, steps: Steps, phase) -> dict:
        delta = self.update(ops, dyn, _star(ops, free), y, beta, steps.K, phase.symmetric)
        return {k: -v for k, v in delta.items()}

    def processes(self, ops, dyn, free: FreePhase, y, beta, K: int, phase):
        """ΔEP for t = 0..K; the mean of the +β and −β processes with symmetric nudging."""
        es, eth = one_sided_processes(ops, dyn, _star(ops, free), y, beta, K)
        if phase.symmetric:
            es2, eth2 = one_sided_processes(ops, dyn, _star(ops, free), y, -beta, K)
            es = [(a + b) / 2 for a, b in zip(es, es2)]
            eth = {k: (eth[k] + eth2[k]) / 2 for k in eth}
        return es, eth


def one_sided_processes(ops, dyn, star, y, beta, K: int):
    """One-sided EP processes for t = 0..K (K+1 nudged steps from s*):

        ΔEP_s[i](t) = Σ_batch (s^β_{t+1} − s^β_t) / (B·ep_scale)                  (appendix eq. 36)
        ΔEP_θ[p](t) = (∂Φ/∂θ(s^β_t) − ∂Φ/∂θ(s^β_{t−1})) / ep_scale,  ΔEP_θ(0) = 0   (eq. 10)

    ``star = (s_{T−1}, s*)`` (the predecessor is used under ``ModelSpec.late_pool_indices``).
    In the official-code flavour with clamping, s^β_{t+1} − s^β_t counts as 0 where s^β_{t+1}
    sits exactly at 0 or 1. The trajectory runs first; the parameter processes are then computed
    for all t at once (``ops.map`` of ``dphi_difference`` over t; row 0 is exactly 0)."""
    xp = ops.xp
    spec = dyn.spec
    scale = spec.ep_scale(beta)
    B = dyn.batch
    s_star = star[1]

    def body(s, _):
        s_new = dyn.step(s, (beta, y))
        return s_new, s_new

    _, after = ops.scan(body, s_star, None, length=K + 1)  # s^β_1 .. s^β_{K+1}
    traj = ops.concat_front(s_star, after)  # s^β_0 .. s^β_{K+1}
    zero_at_bounds = spec.clamp and spec.flavor == "official-code"
    es = []
    for v in traj:
        nxt, cur = v[1:, ...], v[:-1, ...]
        diff = nxt - cur
        if zero_at_bounds:
            diff = xp.where((nxt == 0) | (nxt == 1), xp.zeros_like(diff), diff)
        es.append(xp.sum(diff, axis=1) / (B * scale))
    cur = ops.tree_map(lambda v: v[:-1, ...], traj)  # s^β_t, t = 0..K
    prev = ops.concat_front(s_star, ops.tree_map(lambda v: v[:-2, ...], traj))  # s^β_{t−1}; s^β_{−1} := s*

    if not spec.late_pool_indices:
        eth = ops.map(lambda a, b: dphi_difference(dyn, (None, a), (None, b), scale), cur, prev,
                      batched=dyn.batched_maps)
    else:  # predecessors: of s^β_t, s^β_{t−1} (of s^β_0 = s*, s_{T−1}); of row 0's prev (s*), s_{T−1}
        cur_at = ops.concat_front(star[0], ops.tree_map(lambda v: v[:-2, ...], traj))
        prev_at = ops.concat_front(star[0], ops.tree_map(lambda v: v[:-1, ...], cur_at))
        eth = ops.map(lambda a, b, a_at, b_at: dphi_difference(dyn, (a_at, a), (b_at, b), scale),
                      cur, prev, cur_at, prev_at, batched=dyn.batched_maps)
    return es, eth
