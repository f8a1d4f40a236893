"""The ``numpy`` backend: EP and BPTT for the fully connected EB and P models (1-3 hidden layers).

Native parameters are a ``dict`` of NumPy arrays in the dtype given to ``from_numpy`` (a phase
whose ``dtype`` differs casts them for that call).
BPTT is the Prop. 4 recursion (appendix eqs 31-33): one backward sweep that applies
:meth:`epbench_numpy.model.Net.vjp` (the hand-written transposed Jacobian of one step) from
``∂L/∂s_T = (s0_T − y)/B`` down through the stored states.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Mapping

import numpy as np

from epbench.backend import Availability, Backend, Capabilities, EpochResult, GDUProcesses, NDict
from epbench.params import check_params
from epbench.spec import ModelSpec, PhaseSettings, TrainSettings
from epbench_numpy.model import Net, States

MAX_HIDDEN = 3


def _one_hot(labels: np.ndarray, n: int, dtype) -> np.ndarray:
    return np.eye(n, dtype=dtype)[np.asarray(labels, dtype=np.int64).ravel()]


def _finite(arrays) -> bool:
    return all(bool(np.all(np.isfinite(a))) for a in arrays)


class NumpyBackend(Backend):
    """Pure-NumPy implementation of docs/equations.md for the ``eb`` and ``p`` models."""

    name = "numpy"
    framework = "numpy"
    capabilities = Capabilities(kinds=("eb", "p"))
    #: the model class (step, one-step VJP, Φ, ∂Φ/∂θ)
    net_class = Net

    # ----- discovery ------------------------------------------------------------------------
    def availability(self, probe: bool = False) -> Availability:
        return Availability(True, device="cpu")

    def supports(self, spec: ModelSpec, dtype: str) -> str | None:
        reason = super().supports(spec, dtype)
        if reason is None and len(spec.hidden) > MAX_HIDDEN:
            reason = f"{self.name} implements 1 to {MAX_HIDDEN} hidden layers, not {len(spec.hidden)}"
        return reason

    # ----- parameters -------------------------------------------------------------------------
    def from_numpy(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str) -> NDict:
        check_params(spec, dict(params))
        return {k: np.array(params[k], dtype=np.dtype(dtype), copy=True) for k in spec.param_shapes}

    def to_numpy(self, spec: ModelSpec, params: NDict) -> NDict:
        return {k: np.array(params[k], copy=True) for k in spec.param_shapes}

    # ----- phases -------------------------------------------------------------------------------
    @staticmethod
    def _free(net: Net, u: np.ndarray, T: int, keep: int = 0) -> list[States]:
        """The last ``keep + 1`` states of T free steps from s = 0: [s_{T−keep}, ..., s_T]."""
        s = net.zeros(len(u))
        traj = deque([s], maxlen=keep + 1)
        for _ in range(T):
            s = net.step(s, u)
            traj.append(s)
        return list(traj)

    @staticmethod
    def _nudged(net: Net, u, y, s_star: States, beta: float, steps: int) -> list[States]:
        """[s^β_0 = s*, ..., s^β_steps], each step with β(y − s0) added to dsdt_0."""
        traj = [s_star]
        for _ in range(steps):
            traj.append(net.step(traj[-1], u, y, beta))
        return traj

    @staticmethod
    def _backward(net: Net, u: np.ndarray, traj: list[States], y: np.ndarray, record: bool):
        """Prop. 4: ∇s(0) = ∂L/∂s_T, (∇s(t), ∇θ(t)) = vjp(step at s_{T−t})(∇s(t−1)) for
        t = 1..len(traj)−1. Returns Σ_t ∇θ(t) and, if ``record``, the per-step processes."""
        B = len(y)
        a = [np.zeros_like(si) for si in traj[-1]]
        a[0] = (traj[-1][0] - y) / B
        total = None
        s_proc = [[ai.sum(axis=0)] for ai in a] if record else None
        th_proc: dict[str, list[np.ndarray]] = {}
        for t in range(1, len(traj)):
            a, dth = net.vjp(traj[-1 - t], u, a)
            total = dict(dth) if total is None else {k: total[k] + v for k, v in dth.items()}
            if record:
                for i, ai in enumerate(a):
                    s_proc[i].append(ai.sum(axis=0))
                for k, v in dth.items():
                    th_proc.setdefault(k, [np.zeros_like(v)]).append(v)
        return total, s_proc, th_proc

    def _ep_processes(self, net: Net, spec: ModelSpec, u, y, s_star: States, beta: float, K: int):
        """One-sided EP processes at β: ep_s[i][t] = Σ_batch (s^β_{t+1} − s^β_t)/(B·scale),
        ep_theta[p][t] = (∂Φ/∂θ(s^β_t) − ∂Φ/∂θ(s^β_{t−1}))/scale, t = 0..K."""
        scale = spec.ep_scale(beta)
        traj = self._nudged(net, u, y, s_star, beta, K + 1)
        zero_at_bounds = spec.flavor == "official-code" and spec.clamp
        ep_s = []
        for i in range(spec.n_layers):
            rows = []
            for t in range(K + 1):
                d = traj[t + 1][i] - traj[t][i]
                if zero_at_bounds:
                    d = np.where((traj[t + 1][i] == 0) | (traj[t + 1][i] == 1), 0, d)
                rows.append(d.sum(axis=0) / (len(y) * scale))
            ep_s.append(np.stack(rows))
        dphi = [net.dphi_dtheta(traj[t], u) for t in range(K + 1)]
        ep_theta = {k: np.stack([np.zeros_like(dphi[0][k])]
                                + [(dphi[t][k] - dphi[t - 1][k]) / scale for t in range(1, K + 1)])
                    for k in spec.param_shapes}
        return ep_s, ep_theta

    def _ep_update(self, net: Net, spec: ModelSpec, u, y, s_star: States, phase: PhaseSettings) -> NDict:
        beta, K = phase.beta, phase.K
        end = net.dphi_dtheta(self._nudged(net, u, y, s_star, beta, K)[-1], u)
        if phase.symmetric:
            start = net.dphi_dtheta(self._nudged(net, u, y, s_star, -beta, K)[-1], u)
            scale = 2.0 * spec.ep_scale(beta)
        else:
            start = net.dphi_dtheta(s_star, u)
            scale = spec.ep_scale(beta)
        return {k: (end[k] - start[k]) / scale for k in spec.param_shapes}

    @staticmethod
    def _span(spec: ModelSpec, phase: PhaseSettings) -> int:
        return min(spec.bptt_span(phase.K), phase.T)

    @staticmethod
    def _cast(params: NDict, dtype: str) -> NDict:
        """The parameters in the phase's dtype (the same dict when they already are)."""
        dt = np.dtype(dtype)
        if all(v.dtype == dt for v in params.values()):
            return params
        return {k: v.astype(dt) for k, v in params.items()}

    def _prepare(self, spec: ModelSpec, params: NDict, x, y=None, dtype: str | None = None):
        """(Net, u, y) in the dtype of the parameters, or in ``dtype`` (a phase's) when given."""
        net = self.net_class(spec, params if dtype is None else self._cast(params, dtype))
        u = net.input(x)
        yy = None if y is None else np.asarray(y, dtype=net.dtype)
        return net, u, yy

    # ----- the contract -------------------------------------------------------------------------
    def first_phase(self, spec: ModelSpec, params: NDict, x: np.ndarray, T: int) -> States:
        """s_T: T free steps from s = 0."""
        net, u, _ = self._prepare(spec, params, x)
        return [np.array(si) for si in self._free(net, u, T)[-1]]

    def ep_update(self, spec: ModelSpec, params: NDict, x: np.ndarray, y: np.ndarray,
                  phase: PhaseSettings) -> NDict:
        """(∂Φ/∂θ(s^β_K) − ∂Φ/∂θ(s*)) / ep_scale (symmetric: s^{+β}_K vs s^{−β}_K over 2·ep_scale)."""
        net, u, y = self._prepare(spec, params, x, y, phase.dtype)
        s_star = self._free(net, u, phase.T)[-1]
        return self._ep_update(net, spec, u, y, s_star, phase)

    def bptt_grad(self, spec: ModelSpec, params: NDict, x: np.ndarray, y: np.ndarray,
                  phase: PhaseSettings) -> NDict:
        """∂L/∂θ = Σ_{t=1..span} ∇θ(t), the Prop. 4 sweep through the last ``bptt_span(K)`` steps."""
        net, u, y = self._prepare(spec, params, x, y, phase.dtype)
        traj = self._free(net, u, phase.T, keep=self._span(spec, phase))
        total, _, _ = self._backward(net, u, traj, y, record=False)
        return total

    def gdu(self, spec: ModelSpec, params: NDict, x: np.ndarray, y: np.ndarray,
            phase: PhaseSettings) -> GDUProcesses:
        """BPTT processes from one Prop. 4 sweep over K steps, EP processes from K+1 nudged steps."""
        t0 = time.perf_counter()
        net, u, y = self._prepare(spec, params, x, y, phase.dtype)
        K = phase.K
        traj = self._free(net, u, phase.T, keep=K)
        t1 = time.perf_counter()
        s_star = traj[-1]
        convergence = max(float(np.max(np.abs(a - b))) for a, b in zip(traj[-1], traj[-2]))
        _, bptt_s, bptt_theta = self._backward(net, u, traj, y, record=True)
        t2 = time.perf_counter()
        ep_s, ep_theta = self._ep_processes(net, spec, u, y, s_star, phase.beta, K)
        if phase.symmetric:
            ep_s_m, ep_theta_m = self._ep_processes(net, spec, u, y, s_star, -phase.beta, K)
            ep_s = [0.5 * (a + b) for a, b in zip(ep_s, ep_s_m)]
            ep_theta = {k: 0.5 * (ep_theta[k] + ep_theta_m[k]) for k in ep_theta}
        t3 = time.perf_counter()
        return GDUProcesses(
            ep_s=ep_s,
            bptt_s=[np.stack(p) for p in bptt_s],
            ep_theta=ep_theta,
            bptt_theta={k: np.stack(bptt_theta[k]) for k in spec.param_shapes},
            s_free=[np.array(si) for si in s_star],
            convergence=convergence,
            timings={"first_phase_s": t1 - t0, "bptt_s": t2 - t1, "ep_s": t3 - t2},
        )

    def train_epoch(self, spec: ModelSpec, params: NDict, x: np.ndarray, labels: np.ndarray,
                    phase: PhaseSettings, train: TrainSettings, algorithm: str) -> EpochResult:
        """SGD over consecutive mini-batches: EP θ += lr·ep_update, BPTT θ −= lr·bptt_grad."""
        if algorithm not in ("ep", "bptt"):
            raise ValueError(f"unknown algorithm {algorithm!r}")
        start_time = time.perf_counter()
        p = {k: v.copy() for k, v in self._cast(params, phase.dtype).items()}
        lr_layer = train.lr_of_layer(spec)
        labels = np.asarray(labels).ravel()
        errors = seen = 0
        diverged = False
        span = self._span(spec, phase)
        for lo in range(0, len(x), train.batch_size):
            xb, lb = x[lo:lo + train.batch_size], labels[lo:lo + train.batch_size]
            net, u, _ = self._prepare(spec, p, xb)
            y = _one_hot(lb, spec.n_out, net.dtype)
            traj = self._free(net, u, phase.T, keep=span if algorithm == "bptt" else 0)
            s_star = traj[-1]
            if not _finite(s_star):
                diverged = True
                break
            errors += int(np.sum(np.argmax(s_star[0], axis=1) != lb))
            seen += len(lb)
            if algorithm == "ep":
                delta = self._ep_update(net, spec, u, y, s_star, phase)
                for k, d in delta.items():
                    p[k] = p[k] + lr_layer[spec.param_layer(k)] * d
            else:
                grad, _, _ = self._backward(net, u, traj, y, record=False)
                for k, g in grad.items():
                    p[k] = p[k] - lr_layer[spec.param_layer(k)] * g
            if not _finite(p.values()):
                diverged = True
                break
        return EpochResult(params=p, train_error=100.0 * errors / max(seen, 1), diverged=diverged,
                           timings={"epoch_s": time.perf_counter() - start_time})

    def evaluate(self, spec: ModelSpec, params: NDict, x: np.ndarray, labels: np.ndarray, T: int,
                 batch_size: int = 1000) -> float:
        """% of argmax(s0 after the first phase) ≠ label, in batches of ``batch_size``."""
        labels = np.asarray(labels).ravel()
        if len(labels) == 0:
            return 0.0
        wrong = 0
        for lo in range(0, len(x), batch_size):
            s0 = self.first_phase(spec, params, x[lo:lo + batch_size], T)[0]
            wrong += int(np.sum(np.argmax(s0, axis=1) != labels[lo:lo + batch_size]))
        return 100.0 * wrong / len(labels)

    # ----- optional hooks of the conformance kit ------------------------------------------------
    def step_function(self, spec: ModelSpec, params: NDict, x: np.ndarray, states: States) -> States:
        """One free step F = s + h·dsdt(s), before the clip to [0, 1] of ``spec.clamp`` (the caller
        clips), so that F = ∂Φ/∂s holds wherever the model makes it hold."""
        net, u, _ = self._prepare(spec, params, x)
        s = [np.asarray(si, dtype=net.dtype).reshape(len(u), -1) for si in states]
        return [si + net.h * di for si, di in zip(s, net.dsdt(s, u))]

    def phi(self, spec: ModelSpec, params: NDict, x: np.ndarray, states: States) -> float:
        """Φ(x, s, θ) summed over the batch."""
        net, u, _ = self._prepare(spec, params, x)
        s = [np.asarray(si, dtype=net.dtype).reshape(len(u), -1) for si in states]
        return net.phi(s, u)

