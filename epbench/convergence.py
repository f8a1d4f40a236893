"""When a GDU measurement's first phase counts as converged, and what Theorem 1 predicts.

Theorem 1 compares ΔEP with −∇BPTT from a *steady state* s* (appendix eqs 29-35). The first
phase stops after T steps at s_T, whose leftover step ``d = ‖s_T − s_{T−1}‖_∞`` (the
``convergence`` metric, max over layers, units and batch) carries on into the nudged phase. The
one-sided EP neuron process divides each step by the nudge, ``ΔEP_s(t) = (s^β_{t+1} − s^β_t) /
ep_scale(β)`` with ``ep_scale = dt·β`` (ε·β for EB and toy, the leak times β for P), so the drift alone adds up to

    r = d / ep_scale(β)                                                   (drift ratio)

to every entry of ΔEP_s (docs/equations.md, "GDU processes"). RelMSE (eq. 67) divides each
element's difference by the size of its processes, so the drift shows up in RelMSE as roughly r
divided by the size of the processes: measured in float64, EB-1h (paper flavour, β = 1e-3) at
T = 800 has r = 0.011 and RelMSE(s1) = 9.7e-3 against 8.7e-4 once converged (T = 1600); EB-3h
at Table 3's T = 30000 has r = 0.022 and a neuron-mean RelMSE of 0.22 against 0.125 once
converged (T = 60000, float32), its deep layers having small processes.

With symmetric nudging (±β, ``ΔEP = (Δs^{+β} − Δs^{−β}) / (2 ep_scale)``) both nudged
trajectories start from the same s_T and carry the same drift, which cancels in their difference;
what is left is the drift's effect on the dynamics themselves, of the order of d against the step
size, so there ``r = d / (ep_scale(β) / |β|)`` = d / ε (EB, toy) or d (P), without the 1/β.

A measurement is flagged **not converged** when ``r > DRIFT_SHARE × RelMSE`` (RelMSE averaged
over the neuron layers, the quantity of the Theorem 1 sweeps). The rule is the same for a Table 3
row and a point of a β sweep: as β shrinks, the one-sided r grows like 1/β while RelMSE falls
like β, so a sweep needs a first phase converged far enough for its smallest β.

An algorithm without β (``Algorithm.uses_beta`` false, e.g. recurrent backpropagation) divides
nothing by the nudge: it assumes s_T is a fixed point, and its distance to BPTT is the drift's
effect itself. Its rows count as converged when ``d ≤ FIXED_POINT_ULPS`` units of the dtype's
rounding (float32: 1.2e-5, float64: 2.2e-14).
"""

from __future__ import annotations

import math

#: Largest accepted drift ratio r = ‖s_T − s_{T−1}‖_∞ / ep_scale(β), as a share of the RelMSE it
#: measures. The drift's share of RelMSE was measured at about 0.4 r (EB-1h) to 3 r (EB-3h's deep
#: layers, whose processes are small); r ≤ 0.01 × RelMSE keeps it to a few per cent of the value.
DRIFT_SHARE = 0.01


def ep_scale(kind: str, dt: float, beta: float) -> float:
    """The divisor of the EP differences, from the model kind and its dt (ε of EB/toy, leak of P):
    :meth:`epbench.spec.ModelSpec.ep_scale` (NaN where dt is unknown)."""
    from epbench.spec import ModelSpec

    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and 0 < dt <= 1):
        return float("nan")
    try:
        spec = ModelSpec(kind=kind, dt=dt)
    except ValueError:  # a plugin's model that is not installed here
        return float("nan")
    return spec.ep_scale(abs(beta))


def drift_ratio(convergence: float, kind: str, dt: float, beta: float, symmetric: bool = False) -> float:
    """r = ‖s_T − s_{T−1}‖_∞ / ep_scale(β): the largest entry the first phase's leftover drift adds
    to the one-sided ΔEP_s; with symmetric nudging r = ‖s_T − s_{T−1}‖_∞ / (ep_scale(β) / |β|), the
    drift cancelling between +β and −β (NaN if either is unknown)."""
    scale = ep_scale(kind, dt, beta)
    if symmetric:
        scale /= abs(beta)
    if not (math.isfinite(convergence) and math.isfinite(scale)):
        return float("nan")
    return convergence / scale


#: an algorithm without β: converged when ‖s_T − s_{T−1}‖_∞ is within this many units of rounding
FIXED_POINT_ULPS = 100


def uses_beta(algorithm: str) -> bool:
    """Whether a registered algorithm divides by the nudge (EP); an unknown one counts as if it did."""
    from epbench.plugins import algorithms

    found = algorithms().get(algorithm)
    return True if found is None else bool(found.uses_beta)


def converged_for(algorithm: str, ratio: float, relmse: float, convergence: float, dtype: str) -> bool | None:
    """The verdict on a row of ``algorithm``: :func:`converged` for algorithms that use β, else
    ``convergence ≤ FIXED_POINT_ULPS × eps(dtype)`` (None when unknown)."""
    if uses_beta(algorithm):
        return converged(ratio, relmse)
    import numpy as np

    if not math.isfinite(convergence):
        return None
    return convergence <= FIXED_POINT_ULPS * float(np.finfo(np.dtype(dtype)).eps)


def converged(ratio: float, relmse: float) -> bool | None:
    """True when ``ratio ≤ DRIFT_SHARE × relmse``; None when either is unknown (NaN)."""
    if not (math.isfinite(ratio) and math.isfinite(relmse)):
        return None
    return ratio <= DRIFT_SHARE * relmse


def theorem1_prediction(kind: str, flavor: str, symmetric: bool) -> str:
    """What Theorem 1 predicts for a β sweep of this model (appendix section 3, docs/equations.md):
    with F = ∂Φ/∂s (toy in both flavours, EB with σ'(s⁰), i.e. the paper flavour) RelMSE falls
    like β (one-sided) or β² (symmetric ±β) until float64 rounding; otherwise (EB without σ'(s⁰),
    the official code's; P models, whose F is ∂Φ/∂s only when the activation is ignored, eq. 73)
    it levels off at a floor."""
    from epbench.spec import ModelSpec

    spec = ModelSpec(kind=kind, flavor=flavor)
    if spec.energy_based and spec.output_sigma_prime:
        return "∝ β² (slope 2)" if symmetric else "∝ β (slope 1)"
    return "a floor (slope → 0)"
