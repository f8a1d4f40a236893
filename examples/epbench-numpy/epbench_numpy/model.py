"""Fully connected EB (eqs 70-71) and P (eqs 72-73) models in NumPy: one step, the
vector-Jacobian product of one step, Φ and ∂Φ/∂θ, all written out by hand.

Batch-major arrays: a state layer is ``(B, n_i)``; ``W[i]`` is ``W_{i,i+1}`` of shape
``(n_i, n_{i+1})`` and ``Wx`` is ``W_{L,x}`` of shape ``(n_L, n_in)``, so that, with the emitted
signal ``r`` (``ρ(s)`` for EB, ``s`` for P),

    pre_i = r_{i+1} W_{i,i+1}ᵀ + r_{i-1} W_{i-1,i} + b_i        (u W_{L,x}ᵀ for i = L).
"""

from __future__ import annotations

import numpy as np

from epbench.spec import ModelSpec

States = list[np.ndarray]


# ----- activations: ρ, ρ', ρ'' ---------------------------------------------------------------
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-4.0 * (x - 0.5)))


def _sigmoid_d(x):
    r = _sigmoid(x)
    return 4.0 * r * (1.0 - r)


def _sigmoid_dd(x):
    r = _sigmoid(x)
    return 16.0 * r * (1.0 - r) * (1.0 - 2.0 * r)


def _hard(x):
    return np.clip(x, 0.0, 1.0)


def _hard_d(x):
    return ((x >= 0) & (x <= 1)).astype(x.dtype)


def _hard_dd(x):
    return np.zeros_like(x)


def _tanh_d(x):
    t = np.tanh(x)
    return 1.0 - t * t


def _tanh_dd(x):
    t = np.tanh(x)
    return -2.0 * t * (1.0 - t * t)


ACTIVATIONS = {
    "sigmoid": (_sigmoid, _sigmoid_d, _sigmoid_dd),
    "hard_sigmoid": (_hard, _hard_d, _hard_dd),
    "tanh": (np.tanh, _tanh_d, _tanh_dd),
}


class Net:
    """One layered model (``spec.kind`` in ``eb``, ``p``) with its parameters in one dtype."""

    def __init__(self, spec: ModelSpec, params: dict[str, np.ndarray]):
        if spec.kind not in ("eb", "p"):
            raise ValueError(f"epbench-numpy implements the eb and p models, not {spec.kind}")
        self.spec = spec
        self.L = spec.n_layers - 1
        self.W = [params[f"W{i}{i + 1}"] for i in range(self.L)]
        self.Wx = params[f"W{self.L}x"]
        self.b = [params[f"b{i}"] for i in range(self.L + 1)] if spec.biases else None
        self.dtype = self.Wx.dtype
        self.h = float(spec.step)
        self.eb = spec.energy_based
        self.rho, self.drho, self.ddrho = ACTIVATIONS[spec.activation]

    # ----- inputs and states ------------------------------------------------------------------
    def input(self, x: np.ndarray) -> np.ndarray:
        """u = ρ(x) if ``spec.sigma_on_input`` else x."""
        x = np.asarray(x, dtype=self.dtype).reshape(len(x), -1)
        return self.rho(x) if self.spec.sigma_on_input else x

    def zeros(self, batch: int) -> States:
        return [np.zeros((batch, n[0]), dtype=self.dtype) for n in self.spec.state_shapes]

    def _signal(self, s: States) -> States:
        return [self.rho(si) for si in s] if self.eb else list(s)

    def _pre(self, r: States, u: np.ndarray) -> States:
        """pre_i = r_{i+1} W_{i,i+1}ᵀ + r_{i-1} W_{i-1,i} + b_i."""
        out = []
        for i in range(self.L + 1):
            p = r[i + 1] @ self.W[i].T if i < self.L else u @ self.Wx.T
            if i > 0:
                p = p + r[i - 1] @ self.W[i - 1]
            if self.b is not None:
                p = p + self.b[i]
            out.append(p)
        return out

    def _gain(self, s: States) -> tuple[States, States]:
        """EB: g_i = ρ'(s_i) (g_0 = 1 without ``output_sigma_prime``) and ∂g_i/∂s_i."""
        g = [self.drho(si) for si in s]
        dg = [self.ddrho(si) for si in s]
        if not self.spec.output_sigma_prime:
            g[0] = np.ones_like(s[0])
            dg[0] = np.zeros_like(s[0])
        return g, dg

    # ----- one step ---------------------------------------------------------------------------
    def dsdt(self, s: States, u: np.ndarray) -> States:
        """EB: −s_i + g_i ⊙ pre_i(ρ(s));  P: −s_i + ρ(pre_i(s))."""
        pre = self._pre(self._signal(s), u)
        if self.eb:
            g, _ = self._gain(s)
            return [-si + gi * pi for si, gi, pi in zip(s, g, pre)]
        return [-si + self.rho(pi) for si, pi in zip(s, pre)]

    def step(self, s: States, u: np.ndarray, y: np.ndarray | None = None, beta: float = 0.0) -> States:
        """s_i ← s_i + h·dsdt_i (+ h·β(y − s0) on the output), then clip to [0, 1] if ``clamp``."""
        d = self.dsdt(s, u)
        if beta:
            d[0] = d[0] + beta * (y - s[0])
        new = [si + self.h * di for si, di in zip(s, d)]
        if self.spec.clamp:
            new = [np.clip(n, 0.0, 1.0) for n in new]
        return new

    def vjp(self, s: States, u: np.ndarray, a: States) -> tuple[States, dict[str, np.ndarray]]:
        """Transposed Jacobian-vector product of one free step at ``s``: given ``a = ∂L/∂s'``,
        return ``(∂L/∂s, ∂L/∂θ)`` for ``s' = step(s)`` (eqs 31-33 for one t).

        With c_i = ∂L/∂pre_i (EB: h a_i ⊙ g_i; P: h a_i ⊙ ρ'(pre_i)):
        EB: ∂L/∂s_i = (1−h) a_i + h a_i ⊙ g_i' ⊙ pre_i + ρ'(s_i) ⊙ (c_{i-1} W_{i-1,i} + c_{i+1} W_{i,i+1}ᵀ);
        P:  ∂L/∂s_i = (1−h) a_i + c_{i-1} W_{i-1,i} + c_{i+1} W_{i,i+1}ᵀ;
        ∂L/∂W_{i,i+1} = c_iᵀ r_{i+1} + r_iᵀ c_{i+1},  ∂L/∂W_{L,x} = c_Lᵀ u,  ∂L/∂b_i = Σ_batch c_i.
        """
        h, L = self.h, self.L
        if self.spec.clamp:
            z = [si + h * di for si, di in zip(s, self.dsdt(s, u))]
            a = [ai * ((zi >= 0) & (zi <= 1)) for ai, zi in zip(a, z)]
        r = self._signal(s)
        pre = self._pre(r, u)
        if self.eb:
            g, dg = self._gain(s)
            c = [h * ai * gi for ai, gi in zip(a, g)]
        else:
            c = [h * ai * self.drho(pi) for ai, pi in zip(a, pre)]
        grads = []
        for i in range(L + 1):
            back = np.zeros_like(s[i])
            if i > 0:
                back = back + c[i - 1] @ self.W[i - 1]
            if i < L:
                back = back + c[i + 1] @ self.W[i].T
            if self.eb:
                gi = (1.0 - h) * a[i] + h * a[i] * dg[i] * pre[i] + self.drho(s[i]) * back
            else:
                gi = (1.0 - h) * a[i] + back
            grads.append(gi)
        dtheta = {f"W{i}{i + 1}": c[i].T @ r[i + 1] + r[i].T @ c[i + 1] for i in range(L)}
        dtheta[f"W{L}x"] = c[L].T @ u
        if self.b is not None:
            for i in range(L + 1):
                dtheta[f"b{i}"] = c[i].sum(axis=0)
        return grads, dtheta

    # ----- energy function ----------------------------------------------------------------------
    def phi(self, s: States, u: np.ndarray) -> float:
        """Φ summed over the batch. EB: (1−h)/2 Σ‖s_i‖² + h [Σ ρ(s_i)·W ρ(s_{i+1}) + ρ(s_L)·W_{L,x}u + Σ b_i·ρ(s_i)];
        P: Σ s_i·W s_{i+1} + s_L·W_{L,x}u + Σ b_i·s_i."""
        r = self._signal(s)
        total = sum(float(np.sum((r[i] @ self.W[i]) * r[i + 1])) for i in range(self.L))
        total += float(np.sum(r[self.L] * (u @ self.Wx.T)))
        if self.b is not None:
            total += sum(float(np.sum(ri * bi)) for ri, bi in zip(r, self.b))
        if self.eb:
            return 0.5 * (1.0 - self.h) * sum(float(np.sum(si * si)) for si in s) + self.h * total
        return total

    def dphi_dtheta(self, s: States, u: np.ndarray) -> dict[str, np.ndarray]:
        """∂Φ/∂θ, batch-averaged: EB h ρ(s_i)ᵀρ(s_{i+1})/B, h ρ(s_L)ᵀu/B, h ⟨ρ(s_i)⟩; P the same
        without h and ρ."""
        r = self._signal(s)
        scale = (self.h if self.eb else 1.0) / len(u)
        out = {f"W{i}{i + 1}": scale * (r[i].T @ r[i + 1]) for i in range(self.L)}
        out[f"W{self.L}x"] = scale * (r[self.L].T @ u)
        if self.b is not None:
            for i, ri in enumerate(r):
                out[f"b{i}"] = scale * ri.sum(axis=0)
        return out
