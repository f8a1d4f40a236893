"""EB with lateral connections: the layered energy-based network of the paper (eqs 70-71) plus
symmetric connections between the units of each hidden layer, which the paper does not have.

Each hidden layer i gets a weight ``W{i}{i}`` (n_i × n_i); its symmetric, zero-diagonal part
S_i = (W_ii + W_iiᵀ)/2 ⊙ (1 − I) couples the layer to itself:

    Φ = Φ_EB + dt/2 Σ_i ρ(s_i)ᵀ S_i ρ(s_i),      so     pre_i = pre_i^EB + S_i ρ(s_i),

and the step keeps the EB form s_i + dt(−s_i + ρ'(s_i) ⊙ pre_i): F = ∂Φ/∂s still holds (with
σ'(s0)), so Theorem 1 applies and EP's updates approach BPTT's gradients as β → 0.
∂Φ/∂W_ii = dt/2 ρ(s_i)ρ(s_i)ᵀ off the diagonal (batch-averaged), 0 on it.

Everything else (drive, EB terms, the flavours, initialisation) is the built-in EB model's,
which this class extends through the model interface: the lateral term is added to the
pre-activation, to Φ, to ∂Φ/∂θ and to the analytic one-step VJP (for backends without autodiff).
"""

from __future__ import annotations

from epbench.models.dense import EB
from epbench.spec import weight_name


def _sym_offdiag(ops, w):
    """(W + Wᵀ)/2 with a zero diagonal."""
    xp = ops.xp
    return (w + w.T) * (0.5 * (1.0 - xp.eye(w.shape[0], dtype=w.dtype, device=_device(w))))


def _device(a):
    from array_api_compat import device

    return device(a)


class LateralEB(EB):
    kind = "eb-lateral"
    summary = "EB with symmetric lateral connections inside each hidden layer (examples/epbench-lateral)"

    def hidden_layers(self, spec) -> range:
        return range(1, self.n_layers(spec))

    def param_shapes(self, spec):
        shapes = super().param_shapes(spec)
        weights = {k: v for k, v in shapes.items() if k.startswith("W")}
        weights.update({weight_name(i, i): (n, n) for i, n in zip(self.hidden_layers(spec), spec.hidden)})
        return {**weights, **{k: v for k, v in shapes.items() if not k.startswith("W")}}

    def flops(self, spec):
        drive, step, dphi, dphi_input = super().flops(spec)
        lateral = sum(2 * n * n for n in spec.hidden)
        return drive, step + 2 * lateral, dphi + lateral, dphi_input

    def describe(self, spec) -> str:
        return super().describe(spec) + " lateral"

    # ----- dynamics --------------------------------------------------------------------------------
    def prepare(self, ops, spec, params, x):
        inputs, ctx = super().prepare(ops, spec, params, x)
        for i in self.hidden_layers(spec):
            inputs[f"S{i}"] = _sym_offdiag(ops, params[weight_name(i, i)])
        return inputs, ctx

    def _pre(self, ops, pl, inputs, r, i: int):
        p = super()._pre(ops, pl, inputs, r, i)
        lateral = inputs.get(f"S{i}")
        return p if lateral is None else ops.matmul_add(p, r[i], lateral)

    def phi(self, ops, spec, params, x, s):
        xp = ops.xp
        h = spec.step
        extra = sum(xp.sum(ops.rho(spec.activation, s[i]) * ops.matmul(
            ops.rho(spec.activation, s[i]), _sym_offdiag(ops, params[weight_name(i, i)])))
            for i in self.hidden_layers(spec))
        return super().phi(ops, spec, params, x, s) + 0.5 * h * extra

    def dphi_increment(self, ops, spec, params, ctx, s, q, s_at=None, q_at=None, scale=1.0):
        """The EB increments, plus for W_ii: dt/(2·B·scale) · offdiag([Δ_i; ρ(q_i)]ᵀ[ρ(s_i); Δ_i])
        with Δ_i = ρ(s_i) − ρ(q_i) (ρ(s_i)ᵀρ(s_i) − ρ(q_i)ᵀρ(q_i) in one product)."""
        xp = ops.xp
        out = super().dphi_increment(ops, spec, params, ctx, s, q, s_at, q_at, scale)
        c = spec.step / (2.0 * s[0].shape[0] * scale)
        for i in self.hidden_layers(spec):
            r, rq = ops.rho(spec.activation, s[i]), ops.rho(spec.activation, q[i])
            d = r - rq
            cross = ops.matmul(xp.concat([d, rq], axis=0).T, xp.concat([r, d], axis=0))
            n = cross.shape[0]
            out[weight_name(i, i)] = cross * (c * (1.0 - xp.eye(n, dtype=cross.dtype, device=_device(cross))))
        return out

    def step_vjp(self, ops, spec, params, inputs, ctx, s, a, layers=None):
        """The EB VJP plus the lateral terms: ∂L/∂s_i += ρ'(s_i) ⊙ (c_i S_i) and
        ∂L/∂W_ii = offdiag((G + Gᵀ)/2) with G = ρ(s_i)ᵀ c_i, c_i = ∂L/∂pre_i."""
        grads, dtheta = super().step_vjp(ops, spec, params, inputs, ctx, s, a, layers)
        r, _, _, _, c = self.pre_cotangents(ops, spec, inputs, ctx, s, a, layers)
        for i in self.hidden_layers(spec):
            grads[i] = grads[i] + ops.rho_prime(spec.activation, s[i]) * ops.matmul(c[i], inputs[f"S{i}"])
            dtheta[weight_name(i, i)] = _sym_offdiag(ops, ops.matmul(r[i].T, c[i]))
        return grads, dtheta
