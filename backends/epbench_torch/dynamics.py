"""``TorchDynamics``: the :class:`epbench.backend.Dynamics` of one model on one batch, on
PyTorch, built on the model objects of :mod:`epbench_torch.models`.

The vector-Jacobian product of one step is one ``torch.autograd.grad`` through a single
``model.step`` with the states, the step parameters and the input drives as leaves; its
``raw`` cotangents are ``(∂/∂θ_step, ∂/∂drives)``, mapped to the drive's own parameters by
``model.drive_vjp`` (linear, so a sum over steps is mapped once).
"""

from __future__ import annotations

import torch

from epbench.spec import ModelSpec
from epbench_torch.models import Alternated, build_model


class TorchDynamics:
    split_sweep = False
    batched_maps = False

    def __init__(self, spec: ModelSpec, params: dict, x: torch.Tensor, alternate: bool = False):
        self.spec = spec
        self.params = params
        self.x = x
        self.batch = x.shape[0]
        model = build_model(spec)
        self.model = model
        self.stepper = Alternated(model) if alternate else model
        with torch.no_grad():
            self.drives, self.ctx = model.drive(params, x)
        self._leaves = None

    def zeros(self) -> list:
        return [self.x.new_zeros((self.batch, *shape)) for shape in self.spec.state_shapes]

    def step(self, s, nudge=None):
        if nudge is None:
            return self.stepper.step(self.params, self.drives, list(s))
        beta, y = nudge
        return self.stepper.step(self.params, self.drives, list(s), beta, y)

    def run(self, s, n: int, nudge=None):
        for _ in range(n):
            s = self.step(s, nudge)
        return s

    def _vjp_leaves(self):
        """Leaf copies of the step parameters and of the drives (made once per batch)."""
        if self._leaves is None:
            p_leaf = dict(self.params)
            for k in self.model.step_params:
                p_leaf[k] = self.params[k].detach().requires_grad_(True)
            d_leaf = [None if d is None else d.detach().requires_grad_(True) for d in self.drives]
            self._leaves = p_leaf, d_leaf
        return self._leaves

    def vjp(self, s, g):
        """``(∂F/∂s(s)ᵀg, (∂F/∂θ_step(s)ᵀg, ∂F/∂d(s)ᵀg))`` for one step at s (appendix eqs 32-33)."""
        p_leaf, d_leaf = self._vjp_leaves()
        names = self.model.step_params
        d_idx = [i for i, d in enumerate(d_leaf) if d is not None]
        s_in = [si.detach().requires_grad_(True) for si in s]
        with torch.enable_grad():
            out = self.stepper.step(p_leaf, d_leaf, s_in)
            grads = torch.autograd.grad(out, s_in + [p_leaf[k] for k in names] + [d_leaf[i] for i in d_idx],
                                        list(g), materialize_grads=True)
        n = len(s_in)
        g_drive = [None] * n
        for i, v in zip(d_idx, grads[n + len(names):]):
            g_drive[i] = v
        return list(grads[:n]), (dict(zip(names, grads[n:n + len(names)])), g_drive)

    def vjp_states(self, s, g):
        return self.vjp(s, g)[0]

    def vjp_theta_sum(self, states, cots):
        total = None
        for t in range(states[0].shape[0]):
            _, raw = self.vjp([v[t] for v in states], [v[t] for v in cots])
            total = raw if total is None else _add(total, raw)
        return total

    def theta_grad(self, raw, stacked: bool = False) -> dict:
        """Step-parameter cotangents as they are; drive cotangents through ``model.drive_vjp``
        (one product for every time slice)."""
        g_step, g_drive = raw
        if stacked:
            return {**g_step, **self.model.drive_vjp(self.params, self.ctx, g_drive)}
        one = [None if g is None else g.unsqueeze(0) for g in g_drive]
        return {**g_step, **{k: v[0] for k, v in self.model.drive_vjp(self.params, self.ctx, one).items()}}

    def dphi_increment(self, s, q, s_at=None, q_at=None, scale=1.0) -> dict:
        if s_at is None and q_at is None:
            return self.model.dphi_increment(self.params, self.ctx, list(s), list(q), scale=scale)
        return self.model.dphi_increment(self.params, self.ctx, list(s), list(q), s_at=list(s_at), q_at=list(q_at),
                                         scale=scale)

    def phi(self, s):
        return self.model.phi(self.params, self.x, list(s))

    def external(self, s) -> list:
        return list(s)

    def internal(self, s) -> list:
        return list(s)


def _add(a, b):
    g_step = {k: a[0][k] + b[0][k] for k in a[0]}
    g_drive = [None if u is None else u + v for u, v in zip(a[1], b[1])]
    return g_step, g_drive
