"""The prototypical convolutional model, P-conv (appendix C.7, D; Lemma 5).

States s0 (output, n_out), s1 (C2 maps, p2×p2), s2 (C1 maps, p1×p1); input x one 28×28 map.

    c1 = Conv(s2, W12) + b1,   (pool1, idx1) = Pool(c1)        (every step)
    pool2 = Pool(Conv(u, W2x) + b2)                             (the constant drive, idx2)
    pre_0 = W01 flat(s1) + b0,  pre_1 = pool1 + unflat(W01ᵀ s0),  pre_2 = pool2 + ConvT(Unpool(s1, idx1), W12)
    dsdt_i = −s_i + ρ(pre_i)
    Φ = s0·(W01 flat(s1) + b0) + s1·Pool(Conv(s2, W12) + b1) + s2·pool2

Conv is the valid stride-1 cross-correlation (appendix eq. 74), ConvT its adjoint (eq. 75),
Pool max-pooling with window = stride = ``spec.pool`` and Unpool its transpose. The backend
supplies them (``ops.conv2d`` ...) on feature maps in its own layout (``ops.maps_from_canonical``).
"""

from __future__ import annotations

import math

from epbench.models import Model


class PConv(Model):
    kind = "pconv"
    summary = "prototypical convolutional network, two conv + max-pool layers (appendix C.7)"
    energy_based = False
    batches_over_time = False
    uses_feature_maps = True

    def sides(self, spec) -> tuple[int, int, int, int]:
        """(Conv(u) side, pool of it = s2's side, Conv(s2) side, pool of it = s1's side)."""
        side = int(math.isqrt(spec.n_in))
        c1 = side - spec.kernel + 1
        p1 = c1 // spec.pool
        c2 = p1 - spec.kernel + 1
        return c1, p1, c2, c2 // spec.pool

    def validate(self, spec) -> None:
        if len(spec.channels) != 2:
            raise ValueError("pconv has exactly two convolutional layers")
        if self.sides(spec)[-1] <= 0:
            raise ValueError("input too small for the convolutions")

    def input_shape(self, spec):
        side = int(math.isqrt(spec.n_in))
        return (1, side, side)

    def state_shapes(self, spec):
        _, p1, _, p2 = self.sides(spec)
        c_in_side, c_out_side = spec.channels
        return [(spec.n_out,), (c_out_side, p2, p2), (c_in_side, p1, p1)]

    def param_shapes(self, spec):
        c1, c2 = spec.channels
        k = spec.kernel
        p2 = self.sides(spec)[3]
        shapes = {"W01": (spec.n_out, c2 * p2 * p2), "W12": (c2, c1, k, k), "W2x": (c1, 1, k, k)}
        if spec.biases:
            shapes.update({"b0": (spec.n_out,), "b1": (c2,), "b2": (c1,)})
        return shapes

    def bptt_span(self, spec, K: int) -> int:
        return K

    def late_pool_indices(self, spec) -> bool:
        return spec.flavor == "official-code"

    def flops(self, spec):
        c1, c2 = spec.channels
        k = spec.kernel
        conv1_side, _, conv2_side, pool2 = self.sides(spec)
        conv1 = 2 * c1 * 1 * k * k * conv1_side ** 2
        conv2 = 2 * c2 * c1 * k * k * conv2_side ** 2
        fc = 2 * spec.n_out * c2 * pool2 ** 2
        return conv1, 2 * conv2 + 2 * fc, conv2 + fc + conv1, conv1

    def describe(self, spec) -> str:
        return f"pconv conv {'-'.join(str(c) for c in spec.channels)} {spec.activation} dt={spec.step:g} {spec.flavor}"

    # ----- layout ------------------------------------------------------------------------------
    def internal(self, ops, spec, s):
        return [s[0], ops.maps_from_canonical(s[1]), ops.maps_from_canonical(s[2])]

    def external(self, ops, spec, s):
        return [s[0], ops.maps_to_canonical(s[1]), ops.maps_to_canonical(s[2])]

    def internal_shapes(self, ops, spec):
        return [tuple(sh) if i == 0 else ops.map_shape(sh) for i, sh in enumerate(self.state_shapes(spec))]

    # ----- dynamics ------------------------------------------------------------------------------
    def _u(self, ops, spec, x):
        xp = ops.xp
        u = ops.maps_from_canonical(xp.reshape(x, (x.shape[0], *self.input_shape(spec))))
        return ops.rho(spec.activation, u) if spec.sigma_on_input else u

    def _conv(self, ops, z, kernel, b):
        return ops.conv2d(z, kernel, b)

    def prepare(self, ops, spec, params, x):
        """Step inputs: W01, W12 in the backend's kernel form, b0, b1 and the drive
        pool2 = Pool(Conv(u, W2x) + b2); ctx: u and idx2."""
        u = self._u(ops, spec, x)
        b = params.get if spec.biases else (lambda _: None)
        pool2, idx2 = ops.max_pool(self._conv(ops, u, ops.conv_kernel(params["W2x"]), b("b2")), spec.pool)
        inputs = {"W01": params["W01"], "K12": ops.conv_kernel(params["W12"]), "d2": pool2}
        if spec.biases:
            inputs.update(b0=params["b0"], b1=params["b1"])
        return inputs, {"u": u, "idx2": idx2}

    def step(self, ops, spec, inputs, ctx, s, nudge=None, layers=None):
        xp = ops.xp
        s0, s1, s2 = s
        c1 = self._conv(ops, s2, inputs["K12"], inputs.get("b1"))
        pool1, idx1 = ops.max_pool(c1, spec.pool)
        pre0 = ops.linear(ops.flatten_maps(s1), inputs["W01"], inputs.get("b0"))
        pre1 = pool1 + ops.unflatten_maps(ops.matmul(s0, inputs["W01"]), self.state_shapes(spec)[1])
        pre2 = inputs["d2"] + ops.conv_transpose2d(ops.max_unpool(s1, idx1, spec.pool, self.sides(spec)[2]),
                                                   inputs["K12"])
        out = []
        for i, (si, pre) in enumerate(zip(s, (pre0, pre1, pre2))):
            d = ops.rho(spec.activation, pre) - si
            if i == 0 and nudge is not None:
                beta, y = nudge
                d = d + beta * (y - si)
            new = ops.add_scaled(si, d, spec.step)
            out.append(ops.clip01(new) if spec.clamp else new)
        return out

    def phi(self, ops, spec, params, x, s):
        xp = ops.xp
        s0, s1, s2 = s
        inputs, _ = self.prepare(ops, spec, params, x)
        pool1, _ = ops.max_pool(self._conv(ops, s2, inputs["K12"], inputs.get("b1")), spec.pool)
        t0 = ops.linear(ops.flatten_maps(s1), params["W01"], inputs.get("b0"))
        return xp.sum(s0 * t0) + xp.sum(s1 * pool1) + xp.sum(s2 * inputs["d2"])

    def _unpooled_s1(self, ops, spec, params, s1, at2):
        """Unpool(s1, idx1) with idx1 the argmax positions of Conv(at2, W12) + b1."""
        b1 = params["b1"] if spec.biases else None
        _, idx1 = ops.max_pool(self._conv(ops, at2, ops.conv_kernel(params["W12"]), b1), spec.pool)
        return ops.max_unpool(s1, idx1, spec.pool, self.sides(spec)[2])

    def dphi_increment(self, ops, spec, params, ctx, s, q, s_at=None, q_at=None, scale=1.0):
        """(∂Φ/∂θ(s) − ∂Φ/∂θ(q))/scale, batch-averaged (Lemma 5), from the increments:
        W01: [s0 − q0; q0]ᵀ[flat(s1); flat(s1 − q1)]; W12: s2⋆g1(s) − q2⋆g1(q) =
        [(s2 − q2); q2] ⋆ [g1(s); g1(s) − g1(q)] with g1 = Unpool(s1, idx1) (idx1 at ``s_at``/``q_at``,
        by default each state's own); W2x: Unpool(s2 − q2, idx2) ⋆ u (idx2 is fixed by x); biases Σ."""
        xp = ops.xp
        B = s[0].shape[0]
        c = spec.ep_phi_factor / (B * scale)
        g1 = self._unpooled_s1(ops, spec, params, s[1], (s if s_at is None else s_at)[2])
        g1q = self._unpooled_s1(ops, spec, params, q[1], (q if q_at is None else q_at)[2])
        d = [a - b for a, b in zip(s, q)]
        out = {
            "W01": ops.matmul(xp.concat([d[0], q[0]], axis=0).T,
                              xp.concat([ops.flatten_maps(s[1]), ops.flatten_maps(d[1])], axis=0)) * c,
            "W12": ops.conv2d_weight(xp.concat([d[2], q[2]], axis=0), xp.concat([g1, g1 - g1q], axis=0),
                                     tuple(params["W12"].shape)) * c,
            "W2x": ops.conv2d_weight(ctx["u"], ops.max_unpool(d[2], ctx["idx2"], spec.pool, self.sides(spec)[0]),
                                     tuple(params["W2x"].shape)) * c,
        }
        if spec.biases:
            out["b0"] = xp.sum(d[0], axis=0) * c
            out["b1"] = ops.channel_sum(d[1]) * c
            out["b2"] = ops.channel_sum(d[2]) * c
        return out
