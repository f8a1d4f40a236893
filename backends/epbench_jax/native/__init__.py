"""A fused CPU kernel for the phases of the one-hidden-layer models (EB-1h, P-1h), called from
the jax-cpu programs through XLA's FFI.

Why: a step of these models is two 20×512×10 products and a few element-wise passes, and XLA
runs each as its own kernel; ``one_hidden.cc`` runs all the steps of a phase for one sample
with its states in L1 cache, and shares the samples among XLA's intra-op threads (they are
independent until the update). Same equations as the core's ``Dense.step`` (float32 only; float64 and
every other model keep the XLA loop).

Which one runs a phase the kernel handles (:func:`chosen`), by ``EPBENCH_JAX_NATIVE``:

* unset: the faster one on this machine, measured the first time the phase is met and stored
  (:mod:`.choice`);
* ``1``: the kernel; ``0``: the XLA loop.

The library is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``,
``g++``) for this CPU, against the FFI headers that jaxlib ships, and cached, checksummed, in a
private folder under ``$EPBENCH_CACHE`` (default ``~/.cache/epbench``; :mod:`.build`). Where it
cannot be built or loaded, the backend warns once and uses the XLA loop: the same results to
float32 rounding. Each compiled program records which ran (:func:`recording`), and the backend
reports it (``xla-loop``, ``fused-cpp``) in the results' ``implementation`` column.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import os
import platform
import threading
import warnings

import numpy as np

from epbench.errors import EpbenchError
from epbench.spec import ModelSpec
from epbench_jax.native import build, choice
from epbench_jax.native.choice import KERNEL, LOOP

log = logging.getLogger(__name__)

TARGET = "epbench_one_hidden_phase"
ACTIVATIONS = {"sigmoid": 0, "hard_sigmoid": 1}
#: EPBENCH_JAX_NATIVE values: unset (or empty) measures, "1" forces the kernel, "0" the XLA loop
MODES = {"": "measure", "1": "kernel", "0": "loop"}

_lock = threading.Lock()
_state: dict = {}
_choices: dict = {}
#: while a program is traced: the implementations its phases use (see :func:`recording`)
_RECORD: contextvars.ContextVar = contextvars.ContextVar("epbench_native_record", default=None)


class KernelWarning(UserWarning):
    """The fused kernel could not be built or loaded: the XLA loop runs instead."""


def mode() -> str:
    """``measure``, ``kernel`` or ``loop``, from ``EPBENCH_JAX_NATIVE``."""
    value = os.environ.get("EPBENCH_JAX_NATIVE", "").strip()
    if value not in MODES:
        raise EpbenchError(f"EPBENCH_JAX_NATIVE must be 1 (fused kernel), 0 (XLA loop) or unset (the faster, "
                           f"measured), not {value!r}")
    return MODES[value]


def available() -> bool:
    """Whether the kernel is built and registered with XLA (building it on first call). A
    failure to build or load it is warned about once."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        _state["ok"] = False
        cxx = build.compiler()
        if cxx is None or platform.system() != "Linux":
            _state["reason"] = "no C++ compiler found" if cxx is None else f"not built on {platform.system()}"
            log.info("jax-cpu: fused one-hidden-layer kernel unavailable (%s); using XLA loops", _state["reason"])
            return False
        try:
            import jax

            path = build.library(cxx, jax.ffi.include_dir())
            lib = ctypes.cdll.LoadLibrary(str(path))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.EpbenchOneHiddenPhase), platform="cpu")
        except (OSError, RuntimeError, AttributeError) as exc:
            _state["reason"] = str(exc)
            warnings.warn(f"jax-cpu: fused one-hidden-layer kernel unavailable ({exc}); using XLA loops",
                          KernelWarning, stacklevel=2)
            return False
        _state["lib"] = lib
        _state["path"] = path
        _state["ok"] = True
        return True


def unavailable_reason() -> str | None:
    return None if available() else _state.get("reason")


@contextlib.contextmanager
def recording():
    """Collect, while a program is traced, the implementations (``fused-cpp``, ``xla-loop``)
    that :func:`chosen` picks for its phases; yields the set."""
    used: set[str] = set()
    token = _RECORD.set(used)
    try:
        yield used
    finally:
        _RECORD.reset(token)


def chosen(spec: ModelSpec, dtype, batch: int, steps: int, nudged: bool) -> bool:
    """Whether a phase of ``steps`` steps (``nudged`` or free) on ``batch`` samples runs as one
    kernel call: only where the kernel handles the model and is available, then by
    :func:`mode` (measured: :func:`choice.decide`). Records the implementation picked."""
    if not handles(spec, dtype):
        return False
    how = mode()
    use = how != "loop" and available()
    if use and how == "measure":
        use = choice.decide(_state["path"], spec, batch, steps, nudged, _choices) == KERNEL
    used = _RECORD.get()
    if used is not None:
        used.add(KERNEL if use else LOOP)
    return use


def handles(spec: ModelSpec, dtype) -> bool:
    """The models the kernel implements: layered EB or P with one hidden layer of a multiple of
    16 units, sigmoid or hard sigmoid (Table 4's training activations), float32."""
    return (spec.kind in ("eb", "p") and len(spec.hidden) == 1 and spec.hidden[0] % 16 == 0
            and spec.activation in ACTIVATIONS and np.dtype(dtype) == np.float32)


def phase(spec: ModelSpec, inputs: dict, s, n: int, nudge=None) -> list:
    """n steps of the model's step from s = (s0, s1), inside a jitted program. ``inputs``: the
    step inputs of ``Dense.prepare`` (W01, b0 with biases, and the drive d1 = W1x u + b1),
    ``nudge``: (β, y) for the nudged phase."""
    import jax
    import jax.numpy as jnp

    s0, s1 = s
    w = inputs["W01"]
    b0 = inputs["b0"] if spec.biases else jnp.zeros((1,), s0.dtype)
    beta, y = nudge if nudge is not None else (jnp.zeros((), s0.dtype), jnp.zeros((1,), s0.dtype))
    call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(s0.shape, s0.dtype), jax.ShapeDtypeStruct(s1.shape, s1.dtype)),
                            vmap_method="sequential")
    out0, out1 = call(w, b0, inputs["d1"], s0, s1, y, jnp.asarray(beta, s0.dtype), n=np.int64(n),
                      energy_based=spec.kind == "eb", activation=np.int32(ACTIVATIONS[spec.activation]),
                      sigma_prime_out=bool(spec.output_sigma_prime), clamp=bool(spec.clamp),
                      has_bias=bool(spec.biases), nudged=nudge is not None, dt=np.float32(spec.step))
    return [out0, out1]
