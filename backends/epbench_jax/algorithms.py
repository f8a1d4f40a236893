"""Phases and algorithms of ``docs/equations.md`` built on the dynamics of ``models.py``.

Every public function here is pure and meant to be traced whole into one ``jax.jit`` program:
loops over time steps are ``lax.fori_loop`` / ``lax.scan``, never Python loops. ``spec`` and the
step counts (T, K) are static Python values; β, the data and the parameters are traced.

The two algorithms of the paper live in one function each: :func:`ep_update` (the EP update,
main-text eq. 10 summed over the nudged phase) and :func:`bptt_prop4` (the BPTT recursion of
Proposition 4, appendix eqs 31-33).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax

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


# ----- set-up ---------------------------------------------------------------------------------
class Prepared:
    """Per-batch quantities, computed once outside the time loops: u, the step parameters in
    their step layout ``psl`` (and the transpose ``layout_vjp`` back to θ_step), the drive d,
    the constant pooling indices ``aux`` and the transpose ``drive_vjp`` of θ_drive ↦ d.

    ``F(ps, d, s, nudge=None)`` is the step every phase and the BPTT sweep use: ``models.step``,
    or with ``alternate`` the double step ``models.double_step`` (two time steps; the callers
    then count T, K and the BPTT span in double steps, see :func:`steps`)."""

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

    def step(self, s, nudge=None):
        return self.F(self.psl, self.d, s, nudge)

    def run(self, s, n: int, nudge=None):
        """n steps of :meth:`step` from s: one fused kernel call where that is on and
        ``native.chosen`` picks it for this phase (synchronous steps only), else an XLA loop."""
        if n <= 0:
            return s
        if _FUSED.get() and self.F.func is M.step and native.chosen(self.spec, self.dtype, self.batch, n,
                                                                    nudge is not None):
            return native.phase(self.spec, self.psl, self.d, s, n, nudge)
        unroll = min(_unroll(self.spec), n) if nudge is None else 1
        return lax.fori_loop(0, n, lambda _, z: self.step(z, nudge), s, unroll=unroll)

    def theta_grad(self, g_layout, g_drive) -> dict:
        """Cotangents of the step layout and of the drive → ∂/∂θ for every parameter."""
        (gs,) = self.layout_vjp(g_layout)
        (gd,) = self.drive_vjp(g_drive)
        return {**gs, **gd}


def _unroll(spec: ModelSpec) -> int:
    """Steps per loop iteration in the long free phase (fewer loop-control round trips)."""
    return 2 if spec.kind == "pconv" else 4


def _free_run(prep: Prepared, s, n: int):
    """n free steps (no storage)."""
    return prep.run(s, n)


def _free_run_history(prep: Prepared, s, n: int):
    """n free steps; also returns the stacked input states of each step (time order)."""
    def body(z, _):
        return prep.step(z), z
    return lax.scan(body, s, None, length=n)


def first_phase(prep: Prepared, T: int, n_hist: int = 0):
    """T free steps from s = 0: (s_T, history) with history = s_{T−n_hist}..s_{T−1} stacked
    (``None`` when n_hist = 0); internal layout (``models.to_external`` converts)."""
    s = M.zero_states(prep.spec, prep.batch, prep.dtype)
    s = _free_run(prep, s, T - n_hist)
    if n_hist == 0:
        return s, None
    return _free_run_history(prep, s, n_hist)


def convergence(s_T, s_prev):
    """max_i ‖s^i_T − s^i_{T−1}‖_∞."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in zip(s_T, s_prev)]))


def nudged_run(prep: Prepared, s, beta, y, n: int):
    """n nudged steps (β(y − s0) added to dsdt_0) from s."""
    return prep.run(s, n, (beta, y))


def loss_grad(s_T, y):
    """∂L/∂s_T for L = ‖s0_T − y‖² / (2B) (appendix eq. 31)."""
    B = y.shape[0]
    return ((s_T[0] - y) / B,) + tuple(jnp.zeros_like(v) for v in s_T[1:])


# ----- EP ----------------------------------------------------------------------------------------
def first_phase_end(prep: Prepared, T: int):
    """T free steps from s = 0, ending as ``(s_{T−1}, s*)``: the predecessor of s* is kept only
    where ∂Φ/∂θ needs it (``ModelSpec.late_pool_indices``), else ``None`` (no extra cost)."""
    if not prep.spec.late_pool_indices:
        return None, first_phase(prep, T)[0]
    s_T, hist = first_phase(prep, T, 1)
    return jax.tree.map(lambda a: a[-1], hist), s_T


def nudged_end(prep: Prepared, s, beta, y, n: int):
    """n nudged steps from s, ending as ``(s^β_{n−1}, s^β_n)`` (predecessor as in :func:`first_phase_end`)."""
    if not prep.spec.late_pool_indices:
        return None, nudged_run(prep, s, beta, y, n)
    before = nudged_run(prep, s, beta, y, n - 1)
    return before, prep.step(before, (beta, y))


def dphi_difference(prep: Prepared, s, q) -> dict:
    """∂Φ/∂θ(s[1]) − ∂Φ/∂θ(q[1]) (``models.dphi_increment``) for two ``(predecessor, state)``
    pairs. Under ``ModelSpec.late_pool_indices`` (official-code pconv) each state is pooled with
    the argmax positions of its predecessor, as the official step hands them over; otherwise
    with its own (Lemma 5)."""
    spec = prep.spec
    at = (s[0], q[0]) if spec.late_pool_indices else (None, None)
    return M.dphi_increment(spec, prep.params, prep.u, prep.aux, s[1], q[1], *at)


def ep_update(prep: Prepared, star, y, beta, K: int, symmetric: bool):
    """EP update, the direction *added* to θ (main-text eq. 10 summed over t = 1..K; the sum
    telescopes):

        Δθ = (∂Φ/∂θ(s^β_K) − ∂Φ/∂θ(s*)) / ep_scale(β),

    where s^β_K is reached by K nudged steps from s* (appendix eq. 35). Symmetric nudging
    (Laborieux et al. 2021): Δθ = (∂Φ/∂θ(s^{+β}_K) − ∂Φ/∂θ(s^{−β}_K)) / (2·ep_scale(β)).
    ``star = (s_{T−1}, s*)`` from :func:`first_phase_end`. ∂Φ/∂θ is batch-averaged; the
    difference is formed from state increments (:func:`dphi_difference`)."""
    spec = prep.spec
    scale = spec.ep_scale(beta)
    plus = nudged_end(prep, star[1], beta, y, K)
    if symmetric:
        lo, div = nudged_end(prep, star[1], -beta, y, K), 2.0 * scale
    else:
        lo, div = star, scale
    delta = dphi_difference(prep, plus, lo)
    return {k: v / div for k, v in delta.items()}


def _stack(first, rest):
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b], 0), first, rest)


def _map_t(spec: ModelSpec, f, *xs):
    """f mapped over the leading (time) axis: batched (``vmap``: one large product per
    parameter) for the dense models, a loop (``lax.map``) for pconv, whose per-step
    products are already large and whose patch copies batch poorly."""
    if spec.kind == "pconv":
        return lax.map(lambda a: f(*a), xs)
    return jax.vmap(f)(*xs)


def ep_processes(prep: Prepared, star, y, beta, K: int):
    """One-sided EP processes for t = 0..K (K+1 nudged steps from s*):

        ep_s[i][t]  = Σ_batch (s^β_{t+1} − s^β_t) / (B·ep_scale)          (appendix eq. 36)
        ep_θ[p][t]  = (∂Φ/∂θ(s^β_t) − ∂Φ/∂θ(s^β_{t−1})) / ep_scale,  ep_θ[p][0] = 0   (eq. 10)

    ``star = (s_{T−1}, s*)`` (the predecessor is used under ``ModelSpec.late_pool_indices``).
    In the official-code flavour with clamping, s^β_{t+1} − s^β_t counts as 0 where s^β_{t+1}
    sits exactly at 0 or 1. The trajectory is run first; the parameter processes are then
    computed for all t at once (:func:`dphi_difference` mapped over t; row 0 is exactly 0)."""
    spec = prep.spec
    scale = spec.ep_scale(beta)
    B = prep.batch
    s_star = star[1]

    def body(s, _):
        s_new = prep.step(s, (beta, y))
        return s_new, s_new

    _, after = lax.scan(body, s_star, None, length=K + 1)  # s^β_1 .. s^β_{K+1}
    traj = _stack(s_star, after)  # s^β_0 .. s^β_{K+1}
    es = []
    for v in traj:
        nxt, cur = v[1:], v[:-1]
        diff = nxt - cur
        if spec.clamp and spec.flavor == "official-code":
            diff = jnp.where((nxt == 0) | (nxt == 1), jnp.zeros_like(diff), diff)
        es.append(jnp.sum(diff, 1) / (B * scale))
    cur = jax.tree.map(lambda v: v[:-1], traj)  # s^β_t, t = 0..K
    prev = _stack(s_star, jax.tree.map(lambda v: v[:-2], traj))  # s^β_{t−1}, with s^β_{−1} := s*
    if not spec.late_pool_indices:
        cur_at = prev_at = None
    else:  # predecessors: of s^β_t, s^β_{t−1} (of s^β_0 = s*, s_{T−1}); of row 0's prev (s*), s_{T−1}
        cur_at = _stack(star[0], jax.tree.map(lambda v: v[:-2], traj))
        prev_at = _stack(star[0], jax.tree.map(lambda v: v[:-1], cur_at))
    inc = _map_t(spec, lambda a, b, a_at, b_at: dphi_difference(prep, (a_at, a), (b_at, b)),
                 cur, prev, cur_at, prev_at)
    return es, {k: v / scale for k, v in inc.items()}


# ----- BPTT --------------------------------------------------------------------------------------
def bptt_prop4(prep: Prepared, states, s_T, y, per_step: bool):
    """BPTT by the recursion of Proposition 4 (appendix eqs 31-33), one backward sweep with the
    vector-Jacobian product of *one* step F(x, s, θ) = ``models.step``:

        ∇s(0) = ∂ℓ/∂s(s_T, y)                                             (31)
        ∇s(t) = ∂F/∂s(x, s_{T−t}, θ)ᵀ · ∇s(t−1),   t = 1..n                (32)
        ∇θ(t) = ∂F/∂θ(x, s_{T−t}, θ)ᵀ · ∇s(t−1),   t = 1..n                (33)

    ``states`` holds s_{T−n}..s_{T−1} stacked in time order; the sweep is a loop from
    s_{T−1} back to s_{T−n}. For the dense models it runs eq. 32 only and keeps each ∇s(t−1);
    eq. 33 needs no recursion and is then applied to all t at once (the same one-step VJP,
    batched over t). For pconv, whose per-step products are large, each step of the sweep
    does eqs 32 and 33 together. The shares of ∇θ(t) that reach θ through the drive d or the
    step layout go through the transposes of those linear maps.

    per_step=True: returns (bptt_s, bptt_θ) for t = 0..n, batch-summed ∇s and ∇θ(0) = 0;
    per_step=False: returns Σ_{t=1..n} ∇θ(t) = ∂L/∂θ truncated to n steps."""
    spec = prep.spec
    g0 = loss_grad(s_T, y)
    n = jax.tree.leaves(states)[0].shape[0]

    def eq32(g, s):
        _, pull = jax.vjp(lambda z: prep.F(prep.psl, prep.d, z), s)
        (g_new,) = pull(g)
        return g_new, (g, g_new)

    def eq33(s, g):
        _, pull = jax.vjp(lambda p, d: prep.F(p, d, s), prep.psl, prep.d)
        return pull(g)

    def eq32_33(s, g):
        _, pull = jax.vjp(lambda z, p, d: prep.F(p, d, z), s, prep.psl, prep.d)
        return pull(g)

    if spec.kind == "pconv":
        if not per_step:
            def acc(carry, s):
                g, total = carry
                gs, gp, gd = eq32_33(s, g)
                return (gs, jax.tree.map(jnp.add, total, (gp, gd))), None

            zero = jax.tree.map(jnp.zeros_like, (prep.psl, prep.d))
            (_, (gp, gd)), _ = lax.scan(acc, (g0, zero), states, reverse=True)
            return prep.theta_grad(gp, gd)  # both maps are linear: sum first, map once

        # t = 1..n written in place into (n+1)-long buffers; row 0: ∇s(0) and ∇θ(0) = 0
        bs0 = tuple(jnp.zeros((n + 1,) + v.shape[1:], v.dtype).at[0].set(jnp.sum(v, 0)) for v in g0)
        bth0 = {k: jnp.zeros((n + 1,) + v.shape, v.dtype) for k, v in prep.params.items()}

        def body(t, carry):
            g, bs, bth = carry
            gs, gp, gd = eq32_33(jax.tree.map(lambda a: a[n - t], states), g)  # at s_{T−t}
            gth = prep.theta_grad(gp, gd)
            bs = tuple(b.at[t].set(jnp.sum(v, 0)) for b, v in zip(bs, gs))
            return gs, bs, {k: bth[k].at[t].set(gth[k]) for k in bth}

        _, bs, bth = lax.fori_loop(1, n + 1, body, (g0, bs0, bth0))
        return list(bs), bth

    # reverse scan: outputs come back in the time order of ``states``: index j is the step at
    # s_{T−n+j} (t = n − j), with its cotangent ∇s(t−1) and its result ∇s(t)
    _, (cot, grads) = lax.scan(eq32, g0, states, reverse=True)
    if not per_step:  # Σ_t eq. 33: one VJP of the step mapped over t, θ shared
        _, pull = jax.vjp(lambda p, d: jax.vmap(lambda s: prep.F(p, d, s))(states), prep.psl, prep.d)
        return prep.theta_grad(*pull(cot))  # both maps are linear: sum first, map once
    bptt_s = [jnp.concatenate([jnp.sum(a, 0)[None], jnp.flip(jnp.sum(b, 1), 0)], 0) for a, b in zip(g0, grads)]
    # t = 0..n: at t = 0 the cotangent is 0, so ∇θ(0) = 0 exactly (any state will do)
    s_t = _stack(s_T, jax.tree.map(lambda v: jnp.flip(v, 0), states))
    g_t = _stack(jax.tree.map(jnp.zeros_like, g0), jax.tree.map(lambda v: jnp.flip(v, 0), cot))
    return bptt_s, jax.vmap(lambda s, g: prep.theta_grad(*eq33(s, g)))(s_t, g_t)


# ----- whole programs (traced into one jit each) -------------------------------------------------
def first_phase_program(spec: ModelSpec, T: int):
    def run(params, x):
        prep = Prepared(spec, params, x)
        s, _ = first_phase(prep, T)
        return M.to_external(spec, s)
    return run


def ep_update_program(spec: ModelSpec, T: int, K: int, symmetric: bool, alternate: bool = False):
    T, K, _ = steps(spec, T, K, alternate)

    def run(params, x, y, beta):
        prep = Prepared(spec, params, x, alternate)
        return ep_update(prep, first_phase_end(prep, T), y, beta, K, symmetric)
    return run


def bptt_span(spec: ModelSpec, T: int, K: int) -> int:
    return min(spec.bptt_span(K), T)


def steps(spec: ModelSpec, T: int, K: int, alternate: bool) -> tuple[int, int, int]:
    """(first-phase steps, nudged steps, BPTT span) of the step function ``Prepared.F``: time
    steps, or double steps with ``alternate`` (the counts are even, see
    ``epbench.spec.alternation_problem``)."""
    n = bptt_span(spec, T, K)
    return (T // 2, K // 2, n // 2) if alternate else (T, K, n)


def bptt_grad_program(spec: ModelSpec, T: int, K: int, alternate: bool = False):
    T, _, n = steps(spec, T, K, alternate)

    def run(params, x, y):
        prep = Prepared(spec, params, x, alternate)
        s_T, hist = first_phase(prep, T, n)
        return bptt_prop4(prep, hist, s_T, y, per_step=False)
    return run


def gdu_program(spec: ModelSpec, T: int, K: int, symmetric: bool):
    """First phase (keeping the last K states), the BPTT processes (Prop. 4) and the EP
    processes (mean of the ±β ones when symmetric), t = 0..K."""

    def run(params, x, y, beta):
        prep = Prepared(spec, params, x)
        s_T, hist = first_phase(prep, T, K)
        conv = convergence(s_T, jax.tree.map(lambda a: a[-1], hist))
        bs, bth = bptt_prop4(prep, hist, s_T, y, per_step=True)
        star = (jax.tree.map(lambda a: a[-1], hist), s_T)
        es, eth = ep_processes(prep, star, y, beta, K)
        if symmetric:
            es2, eth2 = ep_processes(prep, star, y, -beta, K)
            es = [(a + b) / 2 for a, b in zip(es, es2)]
            eth = {k: (eth[k] + eth2[k]) / 2 for k in eth}
        return dict(ep_s=M.to_external(spec, es), bptt_s=M.to_external(spec, bs), ep_theta=eth, bptt_theta=bth,
                    s_free=M.to_external(spec, s_T), convergence=conv)
    return run


def train_step(spec: ModelSpec, T: int, K: int, algorithm: str, symmetric: bool,
               params, x, y, labels, lrs, beta, alternate: bool = False):
    """One SGD step: first phase, online error count, then θ += lr·ep_update (EP) or
    θ −= lr·bptt_grad (BPTT). Returns (θ', n_wrong, finite) where ``finite`` says whether the
    first-phase states are all finite (θ' is checked once per chunk, by :func:`train_program`:
    a pass over every weight per batch cost as much as a sixth of a one-hidden-layer step)."""
    prep = Prepared(spec, params, x, alternate)
    T, K, n = steps(spec, T, K, alternate)
    if algorithm == "ep":
        star = first_phase_end(prep, T)
        s_star = star[1]
        direction = ep_update(prep, star, y, beta, K, symmetric)
        sign = 1.0
    else:
        s_star, hist = first_phase(prep, T, n)
        direction = bptt_prop4(prep, hist, s_star, y, per_step=False)
        sign = -1.0
    wrong = jnp.sum(jnp.argmax(s_star[0], 1) != labels).astype(jnp.int32)
    new = {k: params[k] + sign * lrs[k] * direction[k] for k in params}
    return new, wrong, _all_finite(s_star)


def _all_finite(arrays) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in arrays]))


def train_program(spec: ModelSpec, T: int, K: int, algorithm: str, symmetric: bool, alternate: bool = False):
    """A scan of :func:`train_step` over stacked mini-batches; every step after one diverges is
    skipped. Divergence: non-finite first-phase states (so non-finite weights are caught by the
    next batch's first phase), or non-finite weights at the end of the chunk. Returns
    (θ, n_wrong, n_seen, diverged)."""

    def run(params, xs, ys, labels, lrs, beta):
        bs = xs.shape[1]

        def body(carry, batch):
            p, diverged, wrong, seen = carry
            x, y, lab = batch

            def live(p):
                new, w, finite = train_step(spec, T, K, algorithm, symmetric, p, x, y, lab, lrs, beta, alternate)
                return new, ~finite, w, jnp.int32(bs)

            def skip(p):
                return p, diverged, jnp.int32(0), jnp.int32(0)

            p, div, w, n = lax.cond(~diverged, live, skip, p)
            return (p, div, wrong + w, seen + n), None

        init = (params, jnp.bool_(False), jnp.int32(0), jnp.int32(0))
        (p, div, wrong, seen), _ = lax.scan(body, init, (xs, ys, labels))
        return p, wrong, seen, div | ~_all_finite(p.values())
    return run


def evaluate_program(spec: ModelSpec, T: int):
    """Number of wrong argmax(s0) after the first phase."""
    def run(params, x, labels):
        prep = Prepared(spec, params, x)
        s, _ = first_phase(prep, T)
        return jnp.sum(jnp.argmax(s[0], 1) != labels).astype(jnp.int32)
    return run


def step_program(spec: ModelSpec):
    def run(params, x, s):
        prep = Prepared(spec, params, x)
        return M.to_external(spec, prep.step(M.to_internal(spec, s)))
    return run


def phi_program(spec: ModelSpec):
    def run(params, x, s):
        return M.phi(spec, params, M.input_of(spec, x), M.to_internal(spec, s))
    return run
