"""The two phases of EP and what every algorithm takes from them (docs/equations.md).

Pure functions of a backend's :class:`~epbench.backend.Dynamics` ``dyn`` (one model on one
batch) and its :class:`~epbench.ops.Ops`: they trace into one program on a compiling backend.
States are sequences ``(s0, ..., sL)`` in the dynamics' own layout.
"""

from __future__ import annotations


def first_phase(ops, dyn, T: int, n_hist: int = 0):
    """T free steps ``s_{t+1} = F(x, s_t, θ)`` from s_0 = 0: ``(s_T, history)`` with the history
    ``s_{T−n_hist}, ..., s_{T−1}`` stacked in time order (``None`` when n_hist = 0)."""
    s = dyn.run(dyn.zeros(), T - n_hist)
    if n_hist == 0:
        return s, None
    return ops.scan(lambda z, _: (dyn.step(z), z), s, None, length=n_hist)


def last(ops, stacked):
    """The last slice of a stacked history."""
    return ops.tree_map(lambda a: a[-1], stacked)


def first_phase_end(ops, dyn, T: int):
    """T free steps from 0, as ``(s_{T−1}, s*)``: the predecessor of s* is kept only where
    ∂Φ/∂θ needs it (``ModelSpec.late_pool_indices``), else ``None`` (no extra cost)."""
    if not dyn.spec.late_pool_indices:
        return None, first_phase(ops, dyn, T)[0]
    s_T, hist = first_phase(ops, dyn, T, 1)
    return last(ops, hist), s_T


def nudged_end(ops, dyn, s, beta, y, n: int):
    """n nudged steps from s (appendix eq. 35: ``β(y − s0)`` added to ``dsdt_0``), ending as
    ``(s^β_{n−1}, s^β_n)`` (the predecessor as in :func:`first_phase_end`)."""
    if not dyn.spec.late_pool_indices:
        return None, dyn.run(s, n, (beta, y))
    before = dyn.run(s, n - 1, (beta, y))
    return before, dyn.step(before, (beta, y))


def dphi_difference(dyn, s, q, scale=1.0) -> dict:
    """(∂Φ/∂θ(s[1]) − ∂Φ/∂θ(q[1])) / scale, batch-averaged, for two ``(predecessor, state)`` pairs,
    formed from the state increments (``dyn.dphi_increment``). Under ``ModelSpec.late_pool_indices``
    (official-code pconv) each state is unpooled with the argmax positions of its predecessor,
    as the official step hands them over; otherwise with its own (Lemma 5)."""
    at = (s[0], q[0]) if dyn.spec.late_pool_indices else (None, None)
    return dyn.dphi_increment(s[1], q[1], *at, scale=scale)


def loss_grad(ops, s_T, y):
    """∂L/∂s_T for ``L = ‖s0_T − y‖² / (2B)`` (appendix eq. 31): ``(s0_T − y)/B`` on the output,
    0 elsewhere."""
    xp = ops.xp
    B = y.shape[0]
    return type(s_T)([(s_T[0] - y) / B] + [xp.zeros_like(v) for v in s_T[1:]])


def convergence(ops, s_T, s_prev):
    """``max_i ‖s^i_T − s^i_{T−1}‖_∞`` over the batch (0-d array)."""
    xp = ops.xp
    return xp.max(xp.stack([xp.max(xp.abs(a - b)) for a, b in zip(s_T, s_prev)]))


def wrong(ops, s, labels):
    """Number of samples whose argmax(s0) is not the label (0-d int32 array)."""
    xp = ops.xp
    return xp.sum(xp.astype(xp.argmax(s[0], axis=1) != labels, xp.int32), dtype=xp.int32)


def all_finite(ops, arrays):
    """Whether every entry of every array is finite (0-d boolean array)."""
    xp = ops.xp
    return xp.all(xp.stack([xp.all(xp.isfinite(v)) for v in arrays]))
