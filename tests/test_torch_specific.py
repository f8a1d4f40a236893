"""The models' EP differences on PyTorch: ∂Φ/∂θ(s) − ∂Φ/∂θ(q), formed from the state increments
(``Model.dphi_increment``, batch-averaged), equal the plain difference of ∂Φ/∂θ taken by torch
autograd of the model's Φ (summed over the batch, so divided by B), and are exactly 0 for q = s."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epbench.spec import ModelSpec
from conftest import SMALL_MODELS, load_backend


@pytest.mark.parametrize("kind", sorted(SMALL_MODELS))
def test_dphi_increment_is_the_difference_of_dphi(kind):
    ops = load_backend("torch-cpu").ops
    spec = ModelSpec(**SMALL_MODELS[kind])
    model = spec.model
    gen = torch.Generator().manual_seed(6)

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo

    B = 3
    params = {k: uniform(shape, -0.5, 0.5) for k, shape in spec.param_shapes.items()}
    x = uniform((B, *spec.input_shape), 0.0, 1.0)
    _, ctx = model.prepare(ops, spec, params, x)
    s = [uniform((B, *shape), -0.3, 1.1) for shape in spec.state_shapes]
    q = [v + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for v in s]
    s_in, q_in = model.internal(ops, spec, s), model.internal(ops, spec, q)

    def dphi(states):  # ∂Φ/∂θ batch-averaged, by autograd
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(model.phi(ops, spec, leaves, x, states), list(leaves.values()),
                                    allow_unused=True, materialize_grads=True)
        return {k: g / B for k, g in zip(leaves, grads)}

    inc = model.dphi_increment(ops, spec, params, ctx, s_in, q_in)
    half = model.dphi_increment(ops, spec, params, ctx, s_in, q_in, scale=2.0)
    ds, dq = dphi(s_in), dphi(q_in)
    zero = model.dphi_increment(ops, spec, params, ctx, s_in, s_in)
    assert set(inc) == set(params)
    for k in params:
        want = spec.ep_phi_factor * (ds[k] - dq[k]).numpy()  # the increments of dt·Φ for P (dt = 0.2 here)
        np.testing.assert_allclose(inc[k].numpy(), want, rtol=1e-9, atol=1e-12, err_msg=k)
        np.testing.assert_allclose(half[k].numpy(), inc[k].numpy() / 2, rtol=1e-14, atol=0, err_msg=k)
        assert np.abs(inc[k].numpy()).max() > 0, k
        assert not torch.any(zero[k]), k
