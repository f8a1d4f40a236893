"""The fully connected models of docs/equations.md: the toy model, the layered energy-based
model (EB, eqs 70-71) and the layered prototypical model (P, eqs 72-73, appendix C.4).

Layer i's pre-activation (layers indexed backwards, s0 the output, sL next to the input):

    pre_i = W_{i,i+1} r_{i+1} + W_{i−1,i}ᵀ r_{i−1} + d_i + b_i,

with r = ρ(s) (EB, toy) or r = s (P), the input drive ``d_i = W_{i,x} u + b_i`` on the layers
that see the input (sL; both layers of the toy model) and ``u = ρ(x)`` for energy-based models
(eq. 70), x for prototypical ones. Then

    EB/toy: dsdt_i = −s_i + g_i ⊙ pre_i,  g_i = ρ'(s_i)  (g_0 = 1 without σ'(s0): official code),
    P:      dsdt_i = −s_i + ρ(pre_i),

and Φ = (1−dt)/2 Σ‖s_i‖² + dt [Σ ρ(s_i)·W_{i,i+1}ρ(s_{i+1}) + Σ ρ(s_i)·d_i + Σ b_i·ρ(s_i)] (EB, toy;
F = ∂Φ/∂s with σ'(s0)), Φ = Σ s_i·W_{i,i+1}s_{i+1} + Σ s_i·d_i + Σ b_i·s_i (P).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from epbench.models import Model
from epbench.spec import weight_name


@functools.lru_cache(maxsize=None)
def _lateral_names(n_layers: int) -> list[str]:
    return [weight_name(i, i + 1) for i in range(n_layers - 1)]


@functools.lru_cache(maxsize=None)
def _input_names(layers: tuple[int, ...]) -> dict[int, str]:
    return {i: weight_name(i, "x") for i in layers}


class _Plan(NamedTuple):
    h: float
    clamp: bool
    act: str
    g0: bool
    #: per layer: (drive input key, upper weight, bias key when there is no drive, lower weight)
    terms: tuple[tuple[str, str, str, str], ...]


@functools.lru_cache(maxsize=256)
def _plan(model: "Dense", spec) -> _Plan:
    n = model.n_layers(spec)
    names = model.lateral_names(spec)
    drives = model.input_names(spec)
    terms = tuple((f"d{i}" if i in drives else "", names[i] if i < n - 1 else "",
                   f"b{i}" if spec.biases and i not in drives else "", names[i - 1] if i > 0 else "")
                  for i in range(n))
    return _Plan(spec.step, spec.clamp, spec.activation, model.output_sigma_prime(spec), terms)


class Dense(Model):
    """Layered EB/P and toy models: ``L+1`` state layers, a weight between neighbours, the input
    into the layers of :meth:`input_layers`."""

    def n_layers(self, spec) -> int:
        return 1 + len(spec.hidden)

    def input_layers(self, spec) -> tuple[int, ...]:
        return (self.n_layers(spec) - 1,)

    def validate(self, spec) -> None:
        if len(spec.hidden) < 1:
            raise ValueError(f"{spec.kind} needs at least one hidden layer")

    def state_shapes(self, spec) -> list[tuple[int, ...]]:
        return [(spec.n_out,)] + [(h,) for h in spec.hidden]

    def sizes(self, spec) -> list[int]:
        return [spec.n_out, *spec.hidden]

    def lateral_names(self, spec) -> list[str]:
        """W_{i,i+1}, i = 0..L−1."""
        return _lateral_names(self.n_layers(spec))

    def input_names(self, spec) -> dict[int, str]:
        """layer → the name of its input weight W_{i,x}."""
        return _input_names(self.input_layers(spec))

    def param_shapes(self, spec) -> dict[str, tuple[int, ...]]:
        n = self.sizes(spec)
        shapes = {w: (n[i], n[i + 1]) for i, w in enumerate(self.lateral_names(spec))}
        shapes.update({w: (n[i], spec.n_in) for i, w in self.input_names(spec).items()})
        if spec.biases:
            shapes.update({f"b{i}": (n[i],) for i in range(len(n))})
        return shapes

    def bptt_span(self, spec, K: int) -> int:
        return K + 1 if spec.flavor == "official-code" else K

    def output_sigma_prime(self, spec) -> bool:
        return spec.flavor == "paper"

    def flops(self, spec):
        shapes = self.param_shapes(spec)
        drive = sum(2 * shapes[w][0] * shapes[w][1] for w in self.input_names(spec).values())
        recurrent = sum(2 * shapes[w][0] * shapes[w][1] for w in self.lateral_names(spec))
        return drive, 2 * recurrent, drive + recurrent, drive

    # ----- dynamics --------------------------------------------------------------------------
    def _u(self, ops, spec, x):
        u = ops.xp.reshape(x, (x.shape[0], -1))
        return ops.rho(spec.activation, u) if spec.sigma_on_input else u

    def prepare(self, ops, spec, params, x):
        """Step inputs: the lateral weights, the biases of layers without input, and the drives
        ``d_i = W_{i,x} u + b_i``; ctx: u."""
        u = self._u(ops, spec, x)
        drives = self.input_names(spec)
        inputs = {w: params[w] for w in self.lateral_names(spec)}
        for i in range(self.n_layers(spec)):
            if i in drives:
                inputs[f"d{i}"] = ops.linear(u, params[drives[i]], params[f"b{i}"] if spec.biases else None)
            elif spec.biases:
                inputs[f"b{i}"] = params[f"b{i}"]
        return inputs, {"u": u}

    def plan(self, spec) -> "_Plan":
        """The step's constants and, per layer, the terms of pre_i (computed once per spec)."""
        return _plan(self, spec)

    def _signals(self, ops, pl: "_Plan", s):
        """(r, g): r = ρ(s), g = ρ'(s) (g_0 = None without σ'(s0)) for EB/toy; r = s, g = None for P."""
        if not self.energy_based:
            return s, [None] * len(s)
        r, g = [], []
        for i, si in enumerate(s):
            if i > 0 or pl.g0:
                ri, gi = ops.rho_rho_prime(pl.act, si)
            else:
                ri, gi = ops.rho(pl.act, si), None
            r.append(ri)
            g.append(gi)
        return r, g

    def _pre(self, ops, pl: "_Plan", inputs, r, i: int):
        """pre_i = W_{i,i+1} r_{i+1} + W_{i−1,i}ᵀ r_{i−1} + d_i (or b_i)."""
        drive, up, bias, down = pl.terms[i]
        p = inputs[drive] if drive else None
        if up:
            w = inputs[up]
            p = ops.linear(r[i + 1], w, inputs[bias] if bias else p)
        elif p is None:
            p = inputs[bias]
        if down:
            p = ops.matmul_add(p, r[i - 1], inputs[down])
        return p

    def pre(self, ops, spec, inputs, r, i: int):
        return self._pre(ops, self.plan(spec), inputs, r, i)

    def step(self, ops, spec, inputs, ctx, s, nudge=None, layers=None):
        pl = self.plan(spec)
        r, g = self._signals(ops, pl, s)
        h = pl.h
        out = []
        for i, si in enumerate(s):
            if layers is not None and i not in layers:
                out.append(si)
                continue
            pre = self._pre(ops, pl, inputs, r, i)
            if g[i] is not None:
                d = g[i] * pre - si
            elif self.energy_based:
                d = pre - si
            else:
                d = ops.rho(pl.act, pre) - si
            if i == 0 and nudge is not None:
                beta, y = nudge
                d = d + beta * (y - si)
            new = ops.add_scaled(si, d, h)
            out.append(ops.clip01(new) if pl.clamp else new)
        return out

    def supports_alternate(self, spec) -> bool:
        return not self.energy_based

    def phi(self, ops, spec, params, x, s):
        xp = ops.xp
        u = self._u(ops, spec, x)
        r = [ops.rho(spec.activation, si) for si in s] if self.energy_based else list(s)
        e = xp.sum(xp.zeros_like(r[0][:1, :1]))
        for i, w in enumerate(self.lateral_names(spec)):
            e = e + xp.sum(r[i] * ops.linear(r[i + 1], params[w]))
        for i, w in self.input_names(spec).items():
            e = e + xp.sum(r[i] * ops.linear(u, params[w]))
        if spec.biases:
            for i in range(len(s)):
                e = e + xp.sum(r[i] * params[f"b{i}"])
        if not self.energy_based:
            return e
        h = spec.step
        return 0.5 * (1.0 - h) * sum(xp.sum(si * si) for si in s) + h * e

    def dphi_increment(self, ops, spec, params, ctx, s, q, s_at=None, q_at=None, scale=1.0):
        """``c·([ρ(s_i)−ρ(q_i); ρ(q_i)]ᵀ[ρ(s_j); ρ(s_j)−ρ(q_j)])`` for W_{i,j} (one product, exactly
        0 where nothing moved), ``c·(ρ(s_i)−ρ(q_i))ᵀu`` for W_{i,x}, ``c·Σ_batch(ρ(s_i)−ρ(q_i))``
        for b_i; c = dt/(B·scale) (ρ → identity for P, whose increments are those of dt·Φ_P:
        ``ModelSpec.ep_scale``)."""
        xp = ops.xp
        B = s[0].shape[0]
        if self.energy_based:
            r = [ops.rho(spec.activation, v) for v in s]
            rq = [ops.rho(spec.activation, v) for v in q]
            c = spec.step / (B * scale)
        else:
            r, rq, c = list(s), list(q), spec.ep_phi_factor / (B * scale)
        d = [a - b for a, b in zip(r, rq)]
        out = {}
        for i, w in enumerate(self.lateral_names(spec)):
            out[w] = ops.matmul(xp.concat([d[i], rq[i]], axis=0).T, xp.concat([r[i + 1], d[i + 1]], axis=0)) * c
        for i, w in self.input_names(spec).items():
            out[w] = ops.matmul(d[i].T, ctx["u"]) * c
        if spec.biases:
            for i in range(len(s)):
                out[f"b{i}"] = xp.sum(d[i], axis=0) * c
        return out

    def pre_cotangents(self, ops, spec, inputs, ctx, s, a, layers=None):
        """What a VJP of one step at s needs: ``(r, g, pre, a, c)`` with r = ρ(s) (or s), g = ρ'(s),
        the pre-activations, the cotangent ``a = ∂L/∂s'`` zeroed where the clamp cut the step, and
        c_i = ∂L/∂pre_i (EB: dt·a_i ⊙ g_i; P: dt·a_i ⊙ ρ'(pre_i); 0 for layers not in ``layers``)."""
        xp = ops.xp
        pl = self.plan(spec)
        moved = range(len(s)) if layers is None else layers
        r, g = self._signals(ops, pl, s)
        pre = [self._pre(ops, pl, inputs, r, i) if i in moved else None for i in range(len(s))]
        a = list(a)
        if pl.clamp:
            z = self.step(ops, spec.model_copy(update={"clamp": False}), inputs, ctx, s, layers=layers)
            a = [ai * xp.astype((zi >= 0) & (zi <= 1), ai.dtype) if i in moved else ai
                 for i, (ai, zi) in enumerate(zip(a, z))]
        c = []
        for i, ai in enumerate(a):
            if i not in moved:
                c.append(xp.zeros_like(ai))
            elif self.energy_based:
                c.append(pl.h * ai if g[i] is None else pl.h * ai * g[i])
            else:
                c.append(pl.h * ai * ops.rho_prime(pl.act, pre[i]))
        return r, g, pre, a, c

    def step_vjp(self, ops, spec, params, inputs, ctx, s, a, layers=None):
        """Transposed Jacobian of one free step at s applied to ``a = ∂L/∂s'`` (eqs 32-33 for one
        t): ``(∂L/∂s, ∂L/∂θ)``. With c_i = ∂L/∂pre_i (:meth:`pre_cotangents`),
        EB: ∂L/∂s_i = (1−dt) a_i + dt·a_i ⊙ g_i' ⊙ pre_i + ρ'(s_i) ⊙ (c_{i−1} W_{i−1,i} + c_{i+1} W_{i,i+1}ᵀ);
        P:  ∂L/∂s_i = (1−dt) a_i + c_{i−1} W_{i−1,i} + c_{i+1} W_{i,i+1}ᵀ;
        ∂L/∂W_{i,i+1} = c_iᵀ r_{i+1} + r_iᵀ c_{i+1}, ∂L/∂W_{i,x} = c_iᵀ u, ∂L/∂b_i = Σ_batch c_i.
        ``layers``: the step updated only those (alternation); the others pass a_i through."""
        xp = ops.xp
        pl = self.plan(spec)
        act, h = pl.act, pl.h
        L = len(s) - 1
        moved = range(L + 1) if layers is None else layers
        names = self.lateral_names(spec)
        r, g, pre, a, c = self.pre_cotangents(ops, spec, inputs, ctx, s, a, layers)
        grads = []
        for i in range(L + 1):
            back = xp.zeros_like(s[i])
            if i > 0:
                back = back + ops.matmul(c[i - 1], inputs[names[i - 1]])
            if i < L:
                back = back + ops.linear(c[i + 1], inputs[names[i]])
            own = (1.0 - h) * a[i] if i in moved else a[i]
            if not self.energy_based:
                grads.append(own + back)
            elif g[i] is None or i not in moved:
                grads.append(own + ops.rho_prime(act, s[i]) * back)
            else:
                grads.append(own + h * a[i] * ops.rho_second(act, s[i]) * pre[i] + ops.rho_prime(act, s[i]) * back)
        dtheta = {w: ops.matmul(c[i].T, r[i + 1]) + ops.matmul(r[i].T, c[i + 1]) for i, w in enumerate(names)}
        for i, w in self.input_names(spec).items():
            dtheta[w] = ops.matmul(c[i].T, ctx["u"])
        if spec.biases:
            for i in range(L + 1):
                dtheta[f"b{i}"] = xp.sum(c[i], axis=0)
        return grads, dtheta


class EB(Dense):
    kind = "eb"
    summary = "layered energy-based network (eqs 70-71)"
    energy_based = True

    def default_dt(self, spec) -> float:
        return 0.2


class P(Dense):
    kind = "p"
    summary = "layered prototypical network (eqs 72-73, appendix C.4)"
    energy_based = False

    def default_dt(self, spec) -> float:
        return 0.2 if spec.flavor == "official-code" else 1.0


class Toy(Dense):
    """The toy model of appendix C.2: two layers, connected to each other and both to the input."""

    kind = "toy"
    summary = "toy energy-based model, two layers all connected to the input (appendix C.2)"
    energy_based = True

    def validate(self, spec) -> None:
        if len(spec.hidden) != 1:
            raise ValueError("the toy model has exactly one hidden layer")

    def input_layers(self, spec) -> tuple[int, ...]:
        return (0, 1)

    def default_dt(self, spec) -> float:
        return 0.08

    def bptt_span(self, spec, K: int) -> int:
        return K

    def output_sigma_prime(self, spec) -> bool:
        return True
