"""Dynamics of the four model kinds of ``docs/equations.md``: explicit step functions, Φ and ∂Φ/∂θ.

Every model object exposes the same small interface, used by :mod:`epbench_torch.dynamics`:

* ``drive(params, x) -> (drives, ctx)``: the constant input drive, computed once per batch.
  ``drives[i]`` is the part of ``pre_i`` that depends on the input only (``W_{i,x} u + b_i``,
  or ``Pool(Conv(u, W2x) + b2)`` for pconv), ``None`` for layers without one; ``ctx`` keeps what
  the parameter derivatives need (``u``, and the pooling indices for pconv).
* ``step(params, drives, s, beta=0.0, y=None) -> new states``: one synchronous step
  ``s_i + h·dsdt_i(s)`` (the nudge ``β(y − s0)`` added to ``dsdt_0``), then the clamp to [0, 1]
  when ``spec.clamp``. Pure tensor code, no autograd inside; it is differentiable, so one
  ``torch.autograd.grad`` through it is the vector-Jacobian product of one step.
* ``phi(params, x, s)``: Φ summed over the batch (per-sample ∂Φ/∂s is then F, Theorem 1).
* ``dphi_dtheta(params, ctx, s)``: ∂Φ/∂θ for every parameter, *batch-averaged*;
  ``dphi_increment(params, ctx, s, q)``: ∂Φ/∂θ(s) − ∂Φ/∂θ(q) from the state increments (the EP
  update and processes use it: no cancellation of two nearly equal products). ConvModel's also
  takes the states whose max-pool argmax positions it uses (``s_at``, ``q_at``; by default each
  state's own): ``ModelSpec.late_pool_indices``.
* DenseModel's ``step`` also takes ``layers`` (update only those); :class:`Alternated` wraps a P
  model into the double step of ``PhaseSettings.alternate``.
* ``step_params`` / ``drive_params``: which parameters enter the step directly and which only
  through the drive; ``drive_vjp(params, ctx, g)`` maps gradients w.r.t. the drives (stacked over
  time, ``g[i]`` of shape ``(n_t, B, ...)``) to gradients w.r.t. the drive parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epbench.spec import ModelSpec

Tensor = torch.Tensor


# ----- activations --------------------------------------------------------------------------
class Activation:
    """ρ and ρ' of one activation; ``rho_rhop`` shares the work of computing both."""

    def __init__(self, name: str):
        if name not in ("sigmoid", "hard_sigmoid", "tanh"):
            raise ValueError(f"unknown activation {name!r}")
        self.name = name

    def rho(self, x: Tensor) -> Tensor:
        if self.name == "sigmoid":  # 1 / (1 + exp(-4 (x - 1/2)))
            return torch.sigmoid(4.0 * x - 2.0)
        if self.name == "hard_sigmoid":  # clamp(x, 0, 1)
            return x.clamp(0.0, 1.0)
        return torch.tanh(x)

    def rhop(self, x: Tensor) -> Tensor:
        return self.rho_rhop(x)[1]

    def rho_rhop(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(ρ(x), ρ'(x)): sigmoid' = 4ρ(1−ρ), hard_sigmoid' = 1 on [0, 1] else 0, tanh' = 1 − ρ²."""
        r = self.rho(x)
        if self.name == "sigmoid":
            return r, 4.0 * r * (1.0 - r)
        if self.name == "hard_sigmoid":
            return r, ((x >= 0) & (x <= 1)).to(x.dtype)
        return r, 1.0 - r * r


# ----- toy, eb, p: dense models -------------------------------------------------------------
class DenseModel:
    """Toy (all-to-all, 2 layers), layered energy-based (eqs 70-71) and prototypical (eqs 72-73).

    EB/toy: ``pre_i = W_{i,i+1} ρ(s_{i+1}) + W_{i-1,i}ᵀ ρ(s_{i-1}) + W_{i,x} u + b_i``,
    ``dsdt_i = −s_i + g_i ⊙ pre_i`` with ``g_i = ρ'(s_i)`` (``g_0 = 1`` without σ'(s0)).
    P: ``pre_i = W_{i,i+1} s_{i+1} + W_{i-1,i}ᵀ s_{i-1} + W_{i,x} u + b_i``, ``dsdt_i = −s_i + ρ(pre_i)``.
    The input terms ``W_{i,x} u + b_i`` exist for i = L (layered) or i ∈ {0, 1} (toy).
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.n = spec.n_layers
        self.L = self.n - 1
        self.h = float(spec.step)
        self.energy = spec.energy_based
        self.act = Activation(spec.activation)
        self.clamp = spec.clamp
        self.g0 = spec.output_sigma_prime
        self.biases = spec.biases
        self.sigma_on_input = spec.sigma_on_input
        #: W_{i,i+1}, i = 0..L-1
        self.lateral = [f"W{i}{i + 1}" for i in range(self.L)]
        #: layer -> name of its input weight W_{i,x}
        self.inputs = {0: "W0x", 1: "W1x"} if spec.kind == "toy" else {self.L: f"W{self.L}x"}
        self.drive_params = list(self.inputs.values())
        self.step_params = list(self.lateral)
        if self.biases:
            self.drive_params += [f"b{i}" for i in self.inputs]
            self.step_params += [f"b{i}" for i in range(self.n) if i not in self.inputs]

    def _u(self, x: Tensor) -> Tensor:
        return self.act.rho(x) if self.sigma_on_input else x

    def drive(self, params: dict, x: Tensor) -> tuple[list, dict]:
        """``drives[i] = W_{i,x} u + b_i`` for the layers that see the input."""
        u = self._u(x.reshape(x.shape[0], -1))
        drives: list = [None] * self.n
        for i, w in self.inputs.items():
            drives[i] = F.linear(u, params[w], params.get(f"b{i}") if self.biases else None)
        return drives, {"u": u}

    def step(self, params: dict, drives: list, s: list, beta: float = 0.0, y: Tensor | None = None,
             layers=None) -> list:
        """One step ``s_i ← s_i + h·dsdt_i(s)`` (+ ``h·β(y − s0)`` on the output), then the clamp;
        with ``layers``, only those layers move (P models; the others keep their state)."""
        h, L = self.h, self.L
        if self.energy:  # ρ(s_i) for the neighbours, g_i = ρ'(s_i) (g_0 = 1 without σ'(s0))
            r, g = [], []
            for i, si in enumerate(s):
                ri, gi = self.act.rho_rhop(si) if (i > 0 or self.g0) else (self.act.rho(si), None)
                r.append(ri)
                g.append(gi)
        else:
            r = s
        out = []
        for i in range(self.n):
            if layers is not None and i not in layers:
                out.append(s[i])
                continue
            pre = drives[i]
            if i < L:
                W = params[self.lateral[i]]
                if pre is None:
                    b = params[f"b{i}"] if self.biases else None
                    pre = F.linear(r[i + 1], W, b)
                else:
                    pre = torch.addmm(pre, r[i + 1], W.t())
            if i > 0:
                pre = torch.addmm(pre, r[i - 1], params[self.lateral[i - 1]])
            if self.energy:
                d = (g[i] * pre if g[i] is not None else pre) - s[i]
            else:
                d = self.act.rho(pre) - s[i]
            if i == 0 and beta != 0.0:
                d = d + beta * (y - s[0])
            new = torch.add(s[i], d, alpha=h)
            if self.clamp:
                new = new.clamp(0.0, 1.0)
            out.append(new)
        return out

    def phi(self, params: dict, x: Tensor, s: list) -> Tensor:
        """Φ summed over the batch.

        EB/toy: ``(1−h)/2 Σ‖s_i‖² + h[Σ ρ(s_i)·W_{i,i+1}ρ(s_{i+1}) + Σ ρ(s_i)·W_{i,x}u + Σ b_i·ρ(s_i)]``;
        P: ``Σ s_i·W_{i,i+1}s_{i+1} + Σ s_i·W_{i,x}u + Σ b_i·s_i``.
        """
        u = self._u(x.reshape(x.shape[0], -1))
        r = [self.act.rho(si) for si in s] if self.energy else s
        e = s[0].new_zeros(())
        for i, w in enumerate(self.lateral):
            e = e + (r[i] * F.linear(r[i + 1], params[w])).sum()
        for i, w in self.inputs.items():
            e = e + (r[i] * F.linear(u, params[w])).sum()
        if self.biases:
            for i in range(self.n):
                e = e + (r[i] * params[f"b{i}"]).sum()
        if self.energy:
            quad = sum((si * si).sum() for si in s)
            return 0.5 * (1.0 - self.h) * quad + self.h * e
        return e

    def dphi_dtheta(self, params: dict, ctx: dict, s: list) -> dict:
        """∂Φ/∂θ batch-averaged: ``c·ρ(s_i)ρ(s_{i+1})ᵀ``, ``c·ρ(s_i)uᵀ``, ``c·ρ(s_i)`` with c = h/B
        (EB/toy) or ``s_i s_{i+1}ᵀ/B``, ``s_i uᵀ/B``, ``s_i/B`` (P)."""
        B = s[0].shape[0]
        if self.energy:
            r = [self.act.rho(si) for si in s]
            c = self.h / B
        else:
            r = s
            c = 1.0 / B
        u = ctx["u"]
        g = {}
        for i, w in enumerate(self.lateral):
            g[w] = torch.mm(r[i].t(), r[i + 1]).mul_(c)
        for i, w in self.inputs.items():
            g[w] = torch.mm(r[i].t(), u).mul_(c)
        if self.biases:
            for i in range(self.n):
                g[f"b{i}"] = r[i].sum(0).mul_(c)
        return g

    def dphi_increment(self, params: dict, ctx: dict, s: list, q: list, scale=1.0) -> dict:
        """(∂Φ/∂θ(s) − ∂Φ/∂θ(q)) / scale (as :meth:`dphi_dtheta`), formed from the increments so that it is
        exactly 0 where nothing moved and free of the cancellation of two nearly equal products:
        ``ρ(s_i)ᵀρ(s_j) − ρ(q_i)ᵀρ(q_j) = [Δ_i; ρ(q_i)]ᵀ[ρ(s_j); Δ_j]`` (one product), ``Δ_iᵀu``."""
        B = s[0].shape[0]
        if self.energy:
            r, rq, c = [self.act.rho(v) for v in s], [self.act.rho(v) for v in q], self.h / B
        else:
            r, rq, c = s, q, 1.0 / B
        d = [a - b for a, b in zip(r, rq)]
        g = {}
        for i, w in enumerate(self.lateral):
            g[w] = torch.mm(torch.cat([d[i], rq[i]]).t(), torch.cat([r[i + 1], d[i + 1]])).mul_(c)
        for i, w in self.inputs.items():
            g[w] = torch.mm(d[i].t(), ctx["u"]).mul_(c)
        if self.biases:
            for i in range(self.n):
                g[f"b{i}"] = d[i].sum(0).mul_(c)
        return _divided(g, scale)

    def drive_vjp(self, params: dict, ctx: dict, g: list) -> dict:
        """From ``g[i] = ∂L/∂drive_i`` stacked over time ``(n_t, B, n_i)``: ``∂L/∂W_{i,x} = gᵀu`` and
        ``∂L/∂b_i = Σ_batch g`` for each time slice, shapes ``(n_t, *param_shape)``."""
        u = ctx["u"]
        out = {}
        for i, w in self.inputs.items():
            n_t, B, n = g[i].shape
            # one GEMM for all time slices: (n_t·n, B) @ (B, m)
            out[w] = torch.mm(g[i].transpose(1, 2).reshape(n_t * n, B), u).view(n_t, n, u.shape[1])
            if self.biases:
                out[f"b{i}"] = g[i].sum(1)
        return out


# ----- pconv ---------------------------------------------------------------------------------
class ConvModel:
    """Prototypical convolutional model (appendix C.7, D; Lemma 5).

    ``c1 = Conv(s2, W12) + b1``, ``(pool1, idx1) = Pool(c1)`` (recomputed every step);
    ``pool2 = Pool(Conv(u, W2x) + b2)`` (the constant drive);
    ``pre_0 = W01 flat(s1) + b0``, ``pre_1 = pool1 + unflat(W01ᵀ s0)``,
    ``pre_2 = pool2 + ConvT(Unpool(s1, idx1), W12)``, ``dsdt_i = −s_i + ρ(pre_i)``.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.n = 3
        self.h = float(spec.step)
        self.act = Activation(spec.activation)
        self.clamp = spec.clamp
        self.biases = spec.biases
        self.sigma_on_input = spec.sigma_on_input
        self.pool = spec.pool
        self.step_params = ["W01", "W12"] + (["b0", "b1"] if self.biases else [])
        self.drive_params = ["W2x"] + (["b2"] if self.biases else [])
        self.input_shape = spec.input_shape

    def _b(self, params: dict, i: int):
        return params[f"b{i}"] if self.biases else None

    def _u(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        return self.act.rho(x) if self.sigma_on_input else x

    def drive(self, params: dict, x: Tensor) -> tuple[list, dict]:
        """``(pool2, idx2) = Pool(Conv(u, W2x) + b2)``, computed once per batch."""
        u = self._u(x)
        c2 = F.conv2d(u, params["W2x"], self._b(params, 2))
        pool2, idx2 = F.max_pool2d(c2, self.pool, return_indices=True)
        return [None, None, pool2], {"u": u, "idx2": idx2, "c2_size": tuple(c2.shape[-2:])}

    def step(self, params: dict, drives: list, s: list, beta: float = 0.0, y: Tensor | None = None) -> list:
        """One step of the three layers from the old states; pooling indices from the current s2."""
        s0, s1, s2 = s
        W01, W12 = params["W01"], params["W12"]
        c1 = F.conv2d(s2, W12, self._b(params, 1))
        pool1, idx1 = F.max_pool2d(c1, self.pool, return_indices=True)
        pre0 = F.linear(s1.flatten(1), W01, self._b(params, 0))
        pre1 = pool1 + torch.mm(s0, W01).view_as(s1)
        up = F.max_unpool2d(s1, idx1, self.pool, output_size=c1.shape[-2:])
        pre2 = drives[2] + F.conv_transpose2d(up, W12)
        rho = self.act.rho
        out = []
        for i, (si, pre) in enumerate(zip(s, (pre0, pre1, pre2))):
            d = rho(pre) - si
            if i == 0 and beta != 0.0:
                d = d + beta * (y - s0)
            new = torch.add(si, d, alpha=self.h)
            if self.clamp:
                new = new.clamp(0.0, 1.0)
            out.append(new)
        return out

    def phi(self, params: dict, x: Tensor, s: list) -> Tensor:
        """Φ = s0·(W01 flat(s1) + b0) + s1·Pool(Conv(s2, W12) + b1) + s2·Pool(Conv(u, W2x) + b2), summed."""
        s0, s1, s2 = s
        drives, _ = self.drive(params, x)
        pool1 = F.max_pool2d(F.conv2d(s2, params["W12"], self._b(params, 1)), self.pool)
        return ((s0 * F.linear(s1.flatten(1), params["W01"], self._b(params, 0))).sum()
                + (s1 * pool1).sum() + (s2 * drives[2]).sum())

    def _unpooled_s1(self, params: dict, s1: Tensor, at2: Tensor) -> Tensor:
        """Unpool(s1, idx1) with idx1 the argmax positions of Conv(at2, W12) + b1."""
        c1 = F.conv2d(at2, params["W12"], self._b(params, 1))
        _, idx1 = F.max_pool2d(c1, self.pool, return_indices=True)
        return F.max_unpool2d(s1, idx1, self.pool, output_size=c1.shape[-2:])

    def dphi_dtheta(self, params: dict, ctx: dict, s: list) -> dict:
        """∂Φ/∂θ batch-averaged (Lemma 5), argmax positions taken at ``s``:
        ``W01: s0 flat(s1)ᵀ``, ``W12: Unpool(s1, idx1) ⋆ s2``, ``W2x: Unpool(s2, idx2) ⋆ u``, biases Σ_{m,n} s."""
        s0, s1, s2 = s
        B = s0.shape[0]
        W12 = params["W12"]
        up1 = self._unpooled_s1(params, s1, s2)
        up2 = F.max_unpool2d(s2, ctx["idx2"], self.pool, output_size=ctx["c2_size"])
        g = {
            "W01": torch.mm(s0.t(), s1.flatten(1)).div_(B),
            "W12": torch.nn.grad.conv2d_weight(s2, W12.shape, up1).div_(B),
            "W2x": torch.nn.grad.conv2d_weight(ctx["u"], params["W2x"].shape, up2).div_(B),
        }
        if self.biases:
            g["b0"] = s0.sum(0).div_(B)
            g["b1"] = s1.sum((0, 2, 3)).div_(B)
            g["b2"] = s2.sum((0, 2, 3)).div_(B)
        return g

    def dphi_increment(self, params: dict, ctx: dict, s: list, q: list,
                       s_at: list | None = None, q_at: list | None = None, scale=1.0) -> dict:
        """(∂Φ/∂θ(s) − ∂Φ/∂θ(q)) / scale (as :meth:`dphi_dtheta`, except that the argmax positions idx1 of s
        are those of the state ``s_at``, of q those of ``q_at``: by default each state's own,
        Lemma 5; the official-code flavour passes the previous states,
        ``ModelSpec.late_pool_indices``), from the increments:
        ``s2⋆g1(s) − q2⋆g1(q) = (s2 − q2)⋆g1(s) + q2⋆(g1(s) − g1(q))`` with g1 = Unpool(s1, idx1),
        and ``Unpool(s2 − q2, idx2)⋆u`` (idx2 is fixed by x)."""
        B = s[0].shape[0]
        W12 = params["W12"]
        g1 = self._unpooled_s1(params, s[1], (s if s_at is None else s_at)[2])
        g1q = self._unpooled_s1(params, q[1], (q if q_at is None else q_at)[2])
        d = [a - b for a, b in zip(s, q)]
        conv_w = torch.nn.grad.conv2d_weight
        g = {
            "W01": torch.mm(torch.cat([d[0], q[0]]).t(), torch.cat([s[1].flatten(1), d[1].flatten(1)])).div_(B),
            "W12": (conv_w(d[2], W12.shape, g1) + conv_w(q[2], W12.shape, g1 - g1q)).div_(B),
            "W2x": conv_w(ctx["u"], params["W2x"].shape,
                          F.max_unpool2d(d[2], ctx["idx2"], self.pool, output_size=ctx["c2_size"])).div_(B),
        }
        if self.biases:
            g["b0"] = d[0].sum(0).div_(B)
            g["b1"] = d[1].sum((0, 2, 3)).div_(B)
            g["b2"] = d[2].sum((0, 2, 3)).div_(B)
        return _divided(g, scale)

    def drive_vjp(self, params: dict, ctx: dict, g: list) -> dict:
        """From ``g[2] = ∂L/∂pool2`` stacked over time: ``∂L/∂W2x = Unpool(g, idx2) ⋆ u``, ``∂L/∂b2 = Σ g``."""
        g2 = g[2]
        shape = params["W2x"].shape
        out = {"W2x": torch.stack([
            torch.nn.grad.conv2d_weight(ctx["u"], shape,
                                        F.max_unpool2d(gt, ctx["idx2"], self.pool, output_size=ctx["c2_size"]))
            for gt in g2])}
        if self.biases:
            out["b2"] = g2.sum((1, 3, 4))
        return out


def _divided(g: dict, scale) -> dict:
    """``g / scale`` in place (nothing to do for 1.0)."""
    if not (isinstance(scale, float) and scale == 1.0):
        for v in g.values():
            v.div_(scale)
    return g


class Alternated:
    """A P fully connected model under ``PhaseSettings.alternate`` (appendix C.6): ``step`` is a
    double step that updates the odd-index layers, then the even-index ones (free phase: it
    ends on s0), or the even ones with the nudge, then the odd ones (nudged phase). Two time
    steps for the products of one; everything else is the wrapped model's."""

    def __init__(self, model: DenseModel):
        self.model = model
        self.even = tuple(range(0, model.n, 2))
        self.odd = tuple(range(1, model.n, 2))

    def __getattr__(self, name):
        return getattr(self.model, name)

    def step(self, params: dict, drives: list, s: list, beta: float = 0.0, y: Tensor | None = None) -> list:
        m = self.model
        if beta == 0.0:
            return m.step(params, drives, m.step(params, drives, s, layers=self.odd), layers=self.even)
        return m.step(params, drives, m.step(params, drives, s, beta, y, layers=self.even), layers=self.odd)


def build_model(spec: ModelSpec):
    """The dynamics object of ``spec.kind``."""
    return ConvModel(spec) if spec.kind == "pconv" else DenseModel(spec)
