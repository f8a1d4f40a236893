"""Useful floating-point operations, counted analytically from the model.

Only matrix products and convolutions count (2 FLOPs per multiply-add); activations and other
element-wise work are free. "Useful" means what a careful implementation has to do: the input
drive (``W_{L,x} u``, or the first convolution of ``x``) once per batch, two products per
connection per step (bottom-up and top-down), and the parameter derivatives of Φ where the
algorithm needs them.
"""

from __future__ import annotations

from epbench.spec import ModelSpec, PhaseSettings


def _connections(spec: ModelSpec) -> tuple[float, float, float, float]:
    """(input-drive FLOPs, FLOPs of one step, FLOPs of one ∂Φ/∂θ evaluation, the part of it
    for the input-side weights), per sample: the model's own count (``Model.flops``)."""
    return spec.model.flops(spec)


def step_flops(spec: ModelSpec, batch: int) -> float:
    """One synchronous step of the dynamics (both products of every connection), per batch."""
    return batch * _connections(spec)[1]


def ep_train_flops(spec: ModelSpec, phase: PhaseSettings, batch: int) -> float:
    """One EP training step: drive, T free + K nudged steps (2K with symmetric nudging; half the
    products each with ``phase.alternate``), and
    the update ∂Φ/∂θ(s^β_K) − ∂Φ/∂θ(s*) (eq. 10 summed): the recurrent parameters need ∂Φ/∂θ at
    both states, the input-side ones a single product with the state difference (u is fixed)."""
    drive, step, dphi, dphi_input = _connections(spec)
    nudged = phase.K * (2 if phase.symmetric else 1)
    steps = (phase.T + nudged) * _step_share(phase)
    return batch * (drive + steps * step + 2 * (dphi - dphi_input) + dphi_input)


def _step_share(phase: PhaseSettings) -> float:
    """Share of a synchronous step's products that one time step costs: ½ under
    ``phase.alternate`` (each layer is updated every other step)."""
    return 0.5 if phase.alternate else 1.0


def bptt_train_flops(spec: ModelSpec, phase: PhaseSettings, batch: int) -> float:
    """One BPTT training step: drive, T free steps, then over the span a vector-Jacobian
    product per step (state part ≈ one step, recurrent-parameter part ≈ their ∂Φ/∂θ); the
    input-side weights see a static input, so their gradient needs one product, not one per step."""
    drive, step, dphi, dphi_input = _connections(spec)
    share = _step_share(phase)
    span = spec.bptt_span(phase.K)
    return batch * (drive + phase.T * share * step + span * share * (step + dphi - dphi_input) + dphi_input)


def gdu_flops(spec: ModelSpec, phase: PhaseSettings, batch: int) -> float:
    """GDU processes: drive, T free steps, K+1 nudged steps with ∂Φ/∂θ at each, and the
    Prop. 4 sweep over K steps."""
    drive, step, dphi, _ = _connections(spec)
    K = phase.K
    return batch * (drive + phase.T * step + (K + 1) * (step + dphi) + K * (step + dphi))
