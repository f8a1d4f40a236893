"""Training, written once for every backend: SGD epochs with an algorithm's gradient estimate,
the online training error, the divergence policy, evaluation, and the verdict on a trial.

One epoch (:func:`train_epochs`) runs the consecutive mini-batches of ``train.batch_size`` (the
runner shuffles before the call; a last short batch is used as it is) in chunks of
:data:`CHUNK` batches, each chunk one program (:func:`chunk_program`: a scan over its batches,
compiled whole on a compiling backend). Per batch: the first phase, the online error of s*
(argmax of s0 before the update), then ``θ_p ← θ_p − lr_layer(p) · g_p`` with ``g`` the
algorithm's estimate of ∂L/∂θ (EP: −Δθ, BPTT: ∂L/∂θ).

Divergence: a batch whose first-phase states are not all finite stops the trial (it and every
later batch of the epoch leave θ unchanged), and so do non-finite parameters at the end of a
chunk (non-finite weights are otherwise caught by the next batch's first phase).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from array_api_compat import device

from epbench.algorithms import FreePhase
from epbench.backend import Backend, Params
from epbench.phases import all_finite, first_phase, wrong
from epbench.spec import ModelSpec, PhaseSettings, TrainSettings, check_alternation

#: batches per compiled training program (one more program for a remainder chunk)
CHUNK = 100


@dataclasses.dataclass
class EpochResult:
    params: Params
    train_error: float  # % of argmax(s0 after first phase) != label, online, before each update
    diverged: bool = False
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def chunk_program(backend: Backend, spec: ModelSpec, phase: PhaseSettings, algorithm_name: str):
    """``run(params, xs, ys, labels, lrs, beta) -> (θ, n_wrong, n_seen, diverged)`` over stacked
    mini-batches ``xs`` (n_batches, B, ...); every batch after one diverges is skipped."""
    from epbench.compute import algorithm, steps

    alg = algorithm(algorithm_name)
    st = steps(spec, phase)
    n_hist = alg.history(st, spec)
    ops = backend.ops

    def sgd_step(params, x, y, labels, lrs, beta):
        dyn = backend.dynamics(spec, params, x, phase.alternate)
        s_star, hist = first_phase(ops, dyn, st.T, n_hist)
        g = alg.gradient(ops, dyn, FreePhase(s_star, hist), y, beta, st, phase)
        new = {k: params[k] - lrs[k] * g[k] for k in params}
        return new, wrong(ops, s_star, labels), all_finite(ops, s_star)

    def run(params, xs, ys, labels, lrs, beta):
        xp = ops.xp
        bs = xs.shape[1]
        dev = device(xs)  # constants filled on the data's device: no host-to-device copy inside the program

        def count(n):
            return xp.full((), n, dtype=xp.int32, device=dev)

        def body(carry, batch):
            p, diverged, n_wrong, seen = carry
            x, y, lab = batch

            def live(p):
                new, w, finite = sgd_step(p, x, y, lab, lrs, beta)
                return new, ~finite, w, count(bs)

            def skip(p):
                return p, diverged, count(0), count(0)

            p, div, w, n = ops.cond(~diverged, live, skip, p)
            return (p, div, n_wrong + w, seen + n), None

        init = (params, xp.zeros((), dtype=xp.bool, device=dev), count(0), count(0))
        (p, div, n_wrong, seen), _ = ops.scan(body, init, (xs, ys, labels))
        return p, n_wrong, seen, div | ~all_finite(ops, list(p.values()))

    return run


def _chunks(spec: ModelSpec, x, labels, bs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Full batches in chunks of :data:`CHUNK`, the remainder in one chunk of its own size, a
    last short batch in its own: ``(xs, labels)`` of shapes ``(n, B, *input_shape)``, ``(n, B)``."""
    x = np.asarray(x)
    x = x.reshape((x.shape[0],) + tuple(spec.input_shape))
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    n = x.shape[0]
    n_full = n // bs
    chunks = []
    for start in range(0, n_full, CHUNK):
        m = min(CHUNK, n_full - start)
        chunks.append((x[start * bs:(start + m) * bs].reshape((m, bs) + x.shape[1:]),
                       labels[start * bs:(start + m) * bs].reshape(m, bs)))
    if n % bs:
        chunks.append((x[n_full * bs:][None], labels[n_full * bs:][None]))
    return chunks


def train_epochs(backend: Backend, spec: ModelSpec, params: list[Params], xs: list[np.ndarray],
                 labels: list[np.ndarray], phase: PhaseSettings, train: TrainSettings,
                 algorithm_name: str) -> list[EpochResult]:
    """One epoch of SGD for each of several independent trials (their own parameters and data
    order, the same data size). With ``backend.batch_trials`` the trials run as one program
    mapped over them (``ops.map``); otherwise one after the other. The inputs stay untouched."""
    check_alternation(spec, phase)
    if len({len(x) for x in xs}) != 1:
        raise ValueError("trials trained together need the same number of samples")
    batched = backend.batch_trials and len(params) > 1
    groups = [list(range(len(params)))] if batched else [[i] for i in range(len(params))]
    out: list[EpochResult] = [None] * len(params)  # type: ignore[list-item]
    for group in groups:
        for i, result in zip(group, _train_group(backend, spec, [params[i] for i in group], [xs[i] for i in group],
                                                 [labels[i] for i in group], phase, train, algorithm_name, batched)):
            out[i] = result
    return out


def _train_group(backend, spec, params, xs, labels, phase, train, algorithm_name, batched) -> list[EpochResult]:
    dtype = phase.dtype
    layer_lr = train.lr_of_layer(spec)
    per_trial = [_chunks(spec, x, lab, train.batch_size) for x, lab in zip(xs, labels)]
    n_trials = len(params)
    key = ("train", spec, phase.model_copy(update={"beta": 1.0}), algorithm_name, batched)
    ops = backend.ops

    def build():
        run = chunk_program(backend, spec, phase, algorithm_name)
        if not batched:
            return run
        return lambda p, xc, yc, lc, lrs, beta: ops.map(lambda a, b, c, d: run(a, b, c, d, lrs, beta),
                                                        p, xc, yc, lc, batched=True)

    timings = {"compile_s": 0.0, "run_s": 0.0}
    n_wrong, seen = np.zeros(n_trials, np.int64), np.zeros(n_trials, np.int64)
    diverged = np.zeros(n_trials, bool)
    with backend.precision(dtype):
        natives = [backend.cast(p, dtype) for p in params]
        p = ops.stack(natives) if batched else natives[0]
        lrs = {k: backend.asarray(np.asarray(layer_lr[spec.param_layer(k)]), dtype) for k in natives[0]}
        beta = backend.asarray(np.asarray(phase.beta), dtype)
        for c in range(len(per_trial[0])):
            xc = np.stack([t[c][0] for t in per_trial]) if batched else per_trial[0][c][0]
            lc = np.stack([t[c][1] for t in per_trial]) if batched else per_trial[0][c][1]
            (p, w, s, div), t = backend.run(key, build, p, backend.asarray(xc, dtype),
                                            backend.asarray(np.eye(spec.n_out)[lc], dtype),
                                            backend.asarray(lc), lrs, beta)
            for k in timings:
                timings[k] += t[k]
            n_wrong += np.atleast_1d(np.asarray(backend.to_host(w))).astype(np.int64)
            seen += np.atleast_1d(np.asarray(backend.to_host(s))).astype(np.int64)
            diverged |= np.atleast_1d(np.asarray(backend.to_host(div))).astype(bool)
            if diverged.all():
                break
    share = {k: v / n_trials for k, v in timings.items()}
    trials = [ops.tree_map(lambda a, i=i: a[i], p) for i in range(n_trials)] if batched else [p]
    return [EpochResult(params=trials[i], train_error=100.0 * n_wrong[i] / max(seen[i], 1),
                        diverged=bool(diverged[i]), timings=dict(share)) for i in range(n_trials)]


def evaluate(backend: Backend, spec: ModelSpec, params: Params, x: np.ndarray, labels: np.ndarray,
             T: int, batch_size: int = 1000) -> float:
    """Test error in % (argmax of s0 after the first phase); NaN for an empty set."""
    x = np.asarray(x)
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    n = x.shape[0]
    if n == 0:
        return float("nan")
    dtype = backend.dtype_of(params)
    x = x.reshape((n,) + tuple(spec.input_shape))

    def build():
        def program(p, xb, lb):
            dyn = backend.dynamics(spec, p, xb)
            return wrong(backend.ops, first_phase(backend.ops, dyn, T)[0], lb)
        return program

    n_wrong = 0
    with backend.precision(dtype):
        p = backend.cast(params, dtype)
        for i in range(0, n, batch_size):
            w, _ = backend.run(("evaluate", spec, T), build, p, backend.asarray(x[i:i + batch_size], dtype),
                               backend.asarray(labels[i:i + batch_size]))
            n_wrong += int(np.asarray(backend.to_host(w)))
    return 100.0 * n_wrong / n


# ----- the verdict on a training trial ----------------------------------------------------------
#: percentage points below chance-level error (100·(1 − 1/n_classes)) that still count as chance.
#: A network that predicts one class scores 100 − that class's share: 88.6-91.1 % on MNIST's test
#: set (class shares 8.9-11.4 %), 90 % on mnist-5k; random guessing on 500 test images is 90 ± 1.3
#: (one std). Measured (torch-cpu, float32, seed 0, P-1h and EB-1h of Table 4, two epochs on 1000
#: mnist-5k training images, 500 test images): at the Table 4 rates test error 16-29 %, at 100x
#: those rates exactly 90.0 % for both models and both algorithms.
CHANCE_MARGIN = 5.0
#: a parameter whose magnitude grows beyond this many times the largest initial one has exploded.
#: Same measurement: at the Table 4 rates the largest magnitude grows 1.3x in two epochs; at 1000x
#: the rates it grows 110-1600x (EP and BPTT, both models), every unit saturated (σ'(10) ≈ 5e-5)
#: with no NaN or inf for the backend to see.
EXPLODE_FACTOR = 100.0


def chance_threshold(n_classes: int) -> float:
    """Test error (%) at or above which a trial is at chance level: 100·(1 − 1/n) − CHANCE_MARGIN."""
    return 100.0 * (1.0 - 1.0 / n_classes) - CHANCE_MARGIN


def _max_abs(params: dict) -> float:
    """max |θ| over every element of every parameter (NumPy arrays)."""
    return max((float(np.max(np.abs(v))) for v in params.values() if np.size(v)), default=0.0)


def train_status(diverged: bool, exploded: bool, final_test_error: float, n_classes: int) -> str:
    """The verdict on one trial × algorithm after its last epoch, first that applies:
    ``diverged`` (the backend met NaN/inf in the states or parameters), ``exploded`` (a
    parameter's magnitude beyond EXPLODE_FACTOR × the largest initial one), ``chance`` (final
    test error ≥ :func:`chance_threshold`), else ``ok``."""
    if diverged or not math.isfinite(final_test_error):
        return "diverged"
    if exploded:
        return "exploded"
    if final_test_error >= chance_threshold(n_classes):
        return "chance"
    return "ok"


def status_text(status: str, n_classes: int = 10) -> str:
    """The rule behind a verdict of :func:`train_status`, with its threshold (messages, report)."""
    return {
        "ok": "none of the rules below",
        "diverged": "NaN or inf in the states or parameters",
        "exploded": f"a parameter grew beyond {EXPLODE_FACTOR:g}x the largest initial magnitude",
        "chance": f"final test error ≥ {chance_threshold(n_classes):g} % (chance: "
                  f"{100 * (1 - 1 / n_classes):g} % for {n_classes} classes)",
    }.get(status, status)


# ----- the run -----------------------------------------------------------------------------
