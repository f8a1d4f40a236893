"""Algorithms on top of the dynamics of :mod:`epbench_torch.models` (``docs/equations.md``):
first phase, nudged phase, the EP update, BPTT through the Prop. 4 recursion, and the per-step
GDU processes.

Equation numbers refer to the appendix of Ernoult et al. 2019. Time index t = 0..K counts
backwards from the end of the first phase for BPTT (``s_{T−t}``) and forwards from ``s*`` for EP
(``s^β_t``). All functions take tensors and return tensors; nothing here converts to NumPy.
"""

from __future__ import annotations

import collections

import torch

from epbench.spec import ModelSpec

Tensor = torch.Tensor


def zero_states(spec: ModelSpec, batch: int, like: Tensor) -> list[Tensor]:
    """``s_0 = 0`` for every layer."""
    return [like.new_zeros((batch, *shape)) for shape in spec.state_shapes]


@torch.no_grad()
def free_phase(model, params: dict, drives: list, s: list, T: int, keep: int = 1) -> list[list[Tensor]]:
    """T free steps ``s_{t+1} = F(x, s_t, θ)`` from ``s``; returns the last ``keep`` states
    (oldest first, the start state included when T < keep)."""
    hist = collections.deque([s], maxlen=max(keep, 1))
    for _ in range(T):
        s = model.step(params, drives, s)
        hist.append(s)
    return list(hist)


@torch.no_grad()
def nudged_phase(model, params: dict, drives: list, s_star: list, y: Tensor, beta: float, K: int,
                 keep_all: bool = False) -> list[list[Tensor]]:
    """K nudged steps from ``s^β_0 = s*`` (appendix eq. 35): ``s^β_{t+1} = F(x, s^β_t, θ)``, plus
    ``h·β(y − s0)`` on the output (the nudge is added to ``dsdt_0``).
    Returns ``[s^β_0, ..., s^β_K]`` if ``keep_all`` else the last two, ``[s^β_{K−1}, s^β_K]``."""
    traj = [s_star]
    for _ in range(K):
        traj.append(model.step(params, drives, traj[-1], beta, y))
        if not keep_all:
            del traj[:-2]
    return traj


def convergence(hist: list[list[Tensor]]) -> float:
    """``max_i ‖s^i_T − s^i_{T−1}‖_∞``."""
    if len(hist) < 2:
        return float("nan")
    return max(float((a - b).abs().max()) for a, b in zip(hist[-1], hist[-2]))


def dphi_difference(model, params: dict, ctx: dict, s: list[list[Tensor]], q: list[list[Tensor]]) -> dict:
    """∂Φ/∂θ(s[−1]) − ∂Φ/∂θ(q[−1]) (batch-averaged, ``model.dphi_increment``) for the last states
    of two trajectories ``s`` and ``q`` (oldest first, at least the last two states each). Under
    ``ModelSpec.late_pool_indices`` (official-code pconv) each end state is pooled with the argmax
    positions of its predecessor, ``s[−2]`` and ``q[−2]``, as the official step hands them over;
    otherwise with its own (Lemma 5)."""
    if model.spec.late_pool_indices:
        return model.dphi_increment(params, ctx, s[-1], q[-1], s_at=s[-2], q_at=q[-2])
    return model.dphi_increment(params, ctx, s[-1], q[-1])


@torch.no_grad()
def ep_update(model, params: dict, ctx: dict, star: list, plus: list, scale: float,
              minus: list | None = None) -> dict:
    """The EP update, the direction that is *added* (``θ ← θ + lr·Δθ``): the sum over t = 1..K of
    the weight updates ΔEP_θ(t) of the main text's eq. 10, which telescopes to

        Δθ = (∂Φ/∂θ(s^β_K) − ∂Φ/∂θ(s*)) / ep_scale(β),

    or, with symmetric nudging (Laborieux et al. 2021), ``minus`` (ending on s^{−β}_K) given:

        Δθ = (∂Φ/∂θ(s^{+β}_K) − ∂Φ/∂θ(s^{−β}_K)) / (2 ep_scale(β)).

    ``star``, ``plus``, ``minus``: the last two states of the first phase ``[s_{T−1}, s*]`` and of
    the nudged phases ``[s^β_{K−1}, s^β_K]`` (see :func:`dphi_difference`). ∂Φ/∂θ is
    batch-averaged; the difference is formed from the state increments.
    """
    lo, div = (star, scale) if minus is None else (minus, 2.0 * scale)
    return {k: v.div_(div) for k, v in dphi_difference(model, params, ctx, plus, lo).items()}


def bptt_sweep(model, params: dict, drives: list, ctx: dict, hist: list[list[Tensor]], y: Tensor,
               n_steps: int, per_step: bool):
    """BPTT by the recursion of Proposition 4 (appendix eqs 31-33), in one backward sweep.

    With ∇s(t) = ∂L/∂s_{T−t} and ∇θ(t) = ∂L/∂θ_{T−t} (eqs 29-30):

        ∇s(0) = ∂L/∂s_T = (s0_T − y)/B  (on s0; 0 elsewhere),         L = ‖s0_T − y‖²/(2B)   (eq. 31)
        (∇s(t), ∇θ(t)) = ( (∂F/∂s)(s_{T−t})ᵀ ∇s(t−1), (∂F/∂θ)(s_{T−t})ᵀ ∇s(t−1) ),  t = 1..n_steps (eqs 32-33)

    Each step is the vector-Jacobian product of *one* step function at the stored state
    ``s_{T−t} = hist[−1−t]`` (``torch.autograd.grad`` through a single ``model.step``);
    ∇θ(t) = ∂L/∂θ_{T−t} is the gradient w.r.t. the copy of θ used by step s_{T−t} → s_{T−t+1}.
    The drive's own parameters (``W_{L,x}``, ``b_L``; ``W2x``, ``b2``) get theirs from the drive
    gradients through ``model.drive_vjp``, batched over t.

    ``per_step``: return ``(grad_s, grad_theta)`` with ``grad_s[i]`` of shape ``(n_steps+1, B, ...)``
    and ``grad_theta[p]`` of shape ``(n_steps+1, *shape)`` (``∇θ(0) = 0``); otherwise
    ``(None, Σ_t ∇θ(t))``, the truncated BPTT gradient ∂L/∂θ.
    """
    s_T = hist[-1]
    B = s_T[0].shape[0]
    n_steps = min(n_steps, len(hist) - 1)
    g = [torch.zeros_like(si) for si in s_T]
    g[0] = (s_T[0] - y) / B
    step_names = list(model.step_params)
    p_leaf = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    d_idx = [i for i, d in enumerate(drives) if d is not None]
    d_leaf = list(drives)
    for i in d_idx:
        d_leaf[i] = drives[i].detach().requires_grad_(True)
    step_leaves = [p_leaf[k] for k in step_names]
    n = len(s_T)

    if per_step:
        grad_s = [si.new_zeros((n_steps + 1, *si.shape)) for si in s_T]
        for i in range(n):
            grad_s[i][0] = g[i]
        grad_theta = {k: v.new_empty((n_steps + 1, *v.shape)) for k, v in params.items()}
        for v in grad_theta.values():
            v[0].zero_()  # ∇θ(0) = 0; every other row is written below
        g_drive = {i: drives[i].new_zeros((n_steps, *drives[i].shape)) for i in d_idx}
    else:
        grad_s = None
        grad_theta = {k: torch.zeros_like(params[k]) for k in step_names}
        g_drive = {i: torch.zeros_like(drives[i]) for i in d_idx}

    for t in range(1, n_steps + 1):
        s_in = [si.detach().requires_grad_(True) for si in hist[-1 - t]]
        with torch.enable_grad():
            out = model.step(p_leaf, d_leaf, s_in)
            grads = torch.autograd.grad(out, s_in + step_leaves + [d_leaf[i] for i in d_idx], g,
                                        materialize_grads=True)
        g = list(grads[:n])
        gp = grads[n:n + len(step_names)]
        gd = grads[n + len(step_names):]
        if per_step:
            for i in range(n):
                grad_s[i][t] = g[i]
            for k, v in zip(step_names, gp):
                grad_theta[k][t] = v
            for i, v in zip(d_idx, gd):
                g_drive[i][t - 1] = v
        else:
            for k, v in zip(step_names, gp):
                grad_theta[k].add_(v)
            for i, v in zip(d_idx, gd):
                g_drive[i].add_(v)

    with torch.no_grad():
        if per_step:
            gd_list = [g_drive.get(i) for i in range(n)]
            for k, v in model.drive_vjp(params, ctx, gd_list).items():
                grad_theta[k][1:] = v
        else:
            gd_list = [g_drive[i].unsqueeze(0) if i in g_drive else None for i in range(n)]
            for k, v in model.drive_vjp(params, ctx, gd_list).items():
                grad_theta[k] = v[0]
    return grad_s, grad_theta


@torch.no_grad()
def ep_processes(model, spec: ModelSpec, params: dict, drives: list, ctx: dict, star: list, y: Tensor,
                 beta: float, K: int):
    """One-sided EP processes over K+1 nudged steps from s* (appendix eqs 35-36, main text eq. 10), t = 0..K:

        ΔEP_s(t) = Σ_batch (s^β_{t+1} − s^β_t) / (B · ep_scale)
        ΔEP_θ(t) = (∂Φ/∂θ(s^β_t) − ∂Φ/∂θ(s^β_{t−1})) / ep_scale   (t ≥ 1),   ΔEP_θ(0) = 0

    ``star``: the last two states of the first phase, ``[s_{T−1}, s*]`` (the predecessor of s*
    matters under ``ModelSpec.late_pool_indices``, see :func:`dphi_difference`).
    In the official-code flavour with clamping, ``s^β_{t+1} − s^β_t`` counts as 0 where
    ``s^β_{t+1}`` sits exactly at 0 or 1.
    """
    scale = spec.ep_scale(beta)
    s_star = star[-1]
    B = s_star[0].shape[0]
    zero_at_bounds = spec.clamp and spec.flavor == "official-code"
    ep_s = [si.new_zeros((K + 1, *si.shape[1:])) for si in s_star]
    ep_theta = {k: v.new_empty((K + 1, *v.shape)) for k, v in params.items()}
    for v in ep_theta.values():
        v[0].zero_()  # ΔEP_θ(0) = 0; every other row is written below
    tail = star[-2:]  # [s^β_{t−1}, s^β_t], with s^β_{−1} := s_{T−1}
    for t in range(K + 1):
        s = tail[-1]
        new = model.step(params, drives, s, beta, y)
        for i, (a, b) in enumerate(zip(new, s)):
            diff = a - b
            if zero_at_bounds:
                diff = diff.masked_fill_((a == 0) | (a == 1), 0.0)
            ep_s[i][t] = diff.sum(0).div_(B * scale)
        if t < K:
            for k, v in dphi_difference(model, params, ctx, [s, new], tail).items():
                torch.div(v, scale, out=ep_theta[k][t + 1])
        tail = [s, new]
    return ep_s, ep_theta
