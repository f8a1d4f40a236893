"""What is specific to the PyTorch backend: its EP differences ∂Φ/∂θ(s) − ∂Φ/∂θ(q), formed from
the state increments (``dphi_increment``), equal the plain difference of ``dphi_dtheta``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epbench.spec import ModelSpec
from conftest import SMALL_MODELS


@pytest.mark.parametrize("kind", sorted(SMALL_MODELS))
def test_dphi_increment_is_the_difference_of_dphi(kind):
    from epbench_torch.models import build_model

    spec = ModelSpec(**SMALL_MODELS[kind])
    model = build_model(spec)
    gen = torch.Generator().manual_seed(6)

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo

    params = {k: uniform(shape, -0.5, 0.5) for k, shape in spec.param_shapes.items()}
    x = uniform((3, *spec.input_shape), 0.0, 1.0)
    _, ctx = model.drive(params, x)
    s = [uniform((3, *shape), -0.3, 1.1) for shape in spec.state_shapes]
    q = [v + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for v in s]
    inc = model.dphi_increment(params, ctx, s, q)
    ds, dq = model.dphi_dtheta(params, ctx, s), model.dphi_dtheta(params, ctx, q)
    zero = model.dphi_increment(params, ctx, s, s)
    assert set(inc) == set(params)
    for k in params:
        np.testing.assert_allclose(inc[k].numpy(), (ds[k] - dq[k]).numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
        assert not torch.any(zero[k]), k
