"""Comparison metrics between an EP process and the matching −BPTT process, in NumPy.

Processes are arrays of shape ``(K, *element_shape)``: time first, then the elements of one
layer (neurons or synapses).
"""

from __future__ import annotations

import numpy as np


def _as_time_major(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1)


def rms_over_time(f: np.ndarray) -> np.ndarray:
    """‖f‖_{2,K} = sqrt((1/K) Σ_t f(t)²) for every element (appendix eq. 67)."""
    f = _as_time_major(f)
    return np.sqrt(np.mean(f * f, axis=0))


def relmse(f: np.ndarray, g: np.ndarray) -> float:
    """RelMSE(f, g) = ⟨ ‖f − g‖_{2,K} / max(‖f‖_{2,K}, ‖g‖_{2,K}) ⟩ over the elements (eq. 67).

    An element whose two processes are both identically zero scores 0. Despite its name this
    is a ratio of RMS norms: 0 when f = g, at most 2.
    """
    f, g = _as_time_major(f), _as_time_major(g)
    if f.shape != g.shape:
        raise ValueError(f"shapes differ: {f.shape} vs {g.shape}")
    num = rms_over_time(f - g)
    den = np.maximum(rms_over_time(f), rms_over_time(g))
    ratio = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return float(ratio.mean()) if ratio.size else 0.0


def sign_agreement(f: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """(% of elements where f and g have the same sign, % where both are exactly 0).

    Both zero counts as the same sign. Applied to the cumulative updates (the sum over t),
    as in the official code's 'receipe' check.
    """
    f, g = np.asarray(f, dtype=np.float64).ravel(), np.asarray(g, dtype=np.float64).ravel()
    if f.shape != g.shape:
        raise ValueError(f"shapes differ: {f.shape} vs {g.shape}")
    if f.size == 0:
        return 100.0, 0.0
    same = np.sign(f) == np.sign(g)
    both_zero = (f == 0) & (g == 0)
    return 100.0 * float(same.mean()), 100.0 * float(both_zero.mean())


def cosine(f: np.ndarray, g: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays; 1.0 if both are zero, 0.0 if only one is."""
    f, g = np.asarray(f, dtype=np.float64).ravel(), np.asarray(g, dtype=np.float64).ravel()
    nf, ng = np.linalg.norm(f), np.linalg.norm(g)
    if nf == 0 and ng == 0:
        return 1.0
    if nf == 0 or ng == 0:
        return 0.0
    return float(np.dot(f, g) / (nf * ng))


def error_rate(scores: np.ndarray, labels: np.ndarray) -> float:
    """% of samples whose argmax score differs from the label."""
    scores = np.asarray(scores)
    labels = np.asarray(labels).ravel()
    if scores.shape[0] != labels.shape[0]:
        raise ValueError("scores and labels differ in length")
    if labels.size == 0:
        return 0.0
    return 100.0 * float(np.mean(np.argmax(scores, axis=1) != labels))
