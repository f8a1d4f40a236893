"""Algorithms: how a parameter update (and, for the GDU table, per-step processes) is computed
from the dynamics of a model. Each is a small value registered through the
``epbench_algorithms`` hook, the built-ins exactly like third-party ones
(:mod:`epbench.builtin_plugin`):

* :class:`~epbench.algorithms.ep.EP`: Equilibrium Propagation (one-sided, or symmetric nudging
  with ``PhaseSettings.symmetric``), main-text eq. 10;
* :class:`~epbench.algorithms.bptt.BPTT`: backpropagation through time by the recursion of
  Proposition 4 (appendix eqs 31-33), the reference every other algorithm is compared with.

An algorithm is written once, against :class:`~epbench.ops.Ops` and a backend's
:class:`~epbench.backend.Dynamics`, so it runs on every backend (and is compiled whole on JAX).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class Steps:
    """Step counts of one call in units of the dynamics' step: ``T`` free steps, ``K`` nudged
    steps, and the BPTT ``span`` (time steps, or double steps under ``PhaseSettings.alternate``)."""

    T: int
    K: int
    span: int


@dataclasses.dataclass
class FreePhase:
    """The end of the first phase shared by every algorithm of a GDU experiment: ``s_T`` and the
    ``K`` states before it, ``s_{T−K} .. s_{T−1}`` stacked in time order."""

    s_T: Any
    history: Any


class Algorithm:
    """Base class of an algorithm (subclass it, or any object with these attributes).

    ``gradient`` is what training uses; ``processes`` (optional) what the GDU table compares
    with BPTT's per-step processes."""

    #: registry name, e.g. "ep"
    name: ClassVar[str] = ""
    #: one line for ``epbench plugins`` and the reports
    summary: ClassVar[str] = ""
    #: sign with which ``processes`` estimate BPTT's (∇s(t), ∇θ(t)): EP's ΔEP → −∇ (−1)
    process_sign: ClassVar[float] = 1.0
    #: the algorithm uses the nudging strength β
    uses_beta: ClassVar[bool] = False
    #: how its gradient relates to BPTT's, which the conformance kit checks on every model:
    #: "exact" (equal: BPTT itself, checked against finite differences of L), "fixed-point"
    #: (equal when the first phase has converged), "small-beta" (→ BPTT's as β → 0 when
    #: F = ∂Φ/∂s, Theorem 1), or "" (nothing to check)
    agrees_with_bptt: ClassVar[str] = ""

    #: first-phase states (before s_T) that ``gradient`` needs, as a function of the steps
    def history(self, steps: Steps, spec) -> int:
        return 0

    def gradient(self, ops, dyn, free: FreePhase, y, beta, steps: Steps, phase) -> dict:
        """Its estimate of ∂L/∂θ for the batch (the direction *subtracted*: θ ← θ − lr·g),
        from the first phase's end ``free`` (with ``history(steps)`` states before s_T)."""
        raise NotImplementedError

    def processes(self, ops, dyn, free: FreePhase, y, beta, K: int, phase) -> tuple[list, dict] | None:
        """Per-step processes for t = 0..K, ``(proc_s, proc_θ)``: ``proc_s[i]`` of shape
        ``(K+1, *state_shape)`` (batch-summed or batch-averaged as BPTT's, see
        :class:`epbench.backend.GDUProcesses`), ``proc_θ[p]`` of shape ``(K+1, *param_shape)``;
        ``None`` if the algorithm has none."""
        return None
