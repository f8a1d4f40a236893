"""The activations ρ of docs/equations.md, with ρ' and ρ'' (for analytic VJPs), in ``ops.xp``."""

from __future__ import annotations


def clip01(xp, v):
    """clip(v, 0, 1), written so that autodiff gives derivative 1 on 0 ≤ v ≤ 1 inclusive."""
    return xp.where(v < 0, xp.zeros_like(v), xp.where(v > 1, xp.ones_like(v), v))


def rho(xp, name: str, v):
    """ρ: sigmoid(v) = 1/(1 + exp(−4(v − ½))), hard_sigmoid(v) = clip(v, 0, 1), or tanh(v)."""
    if name == "sigmoid":
        return 1.0 / (1.0 + xp.exp(-4.0 * (v - 0.5)))
    if name == "hard_sigmoid":
        return clip01(xp, v)
    if name == "tanh":
        return xp.tanh(v)
    raise ValueError(f"unknown activation {name!r}")


def rho_prime(xp, name: str, v):
    """ρ': 4ρ(1 − ρ); 1 on [0, 1], else 0; 1 − tanh²."""
    if name == "sigmoid":
        r = rho(xp, name, v)
        return 4.0 * r * (1.0 - r)
    if name == "hard_sigmoid":
        return xp.where((v >= 0) & (v <= 1), xp.ones_like(v), xp.zeros_like(v))
    t = xp.tanh(v)
    return 1.0 - t * t


def rho_rho_prime(xp, name: str, v):
    """(ρ(v), ρ'(v)), sharing the work."""
    r = rho(xp, name, v)
    if name == "sigmoid":
        return r, 4.0 * r * (1.0 - r)
    if name == "tanh":
        return r, 1.0 - r * r
    return r, rho_prime(xp, name, v)


def rho_second(xp, name: str, v):
    """ρ'': 16ρ(1 − ρ)(1 − 2ρ); 0; −2 tanh (1 − tanh²)."""
    if name == "sigmoid":
        r = rho(xp, name, v)
        return 16.0 * r * (1.0 - r) * (1.0 - 2.0 * r)
    if name == "hard_sigmoid":
        return xp.zeros_like(v)
    t = xp.tanh(v)
    return -2.0 * t * (1.0 - t * t)
