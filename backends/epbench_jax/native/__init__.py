"""A fused CPU kernel for the phases of the one-hidden-layer models (EB-1h, P-1h), called from
the jax-cpu programs through XLA's FFI.

Why: a step of these models is two 20×512×10 products and a few element-wise passes, and XLA
runs each as its own kernel; ``one_hidden.cc`` runs all the steps of a phase for one sample
with its states in L1 cache, and shares the samples among XLA's intra-op threads (they are
independent until the update). Same equations as ``models.step`` (float32 only; float64 and
every other model keep the XLA loop).

The library is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``,
``g++``) for this CPU, against the FFI headers that jaxlib ships, and cached under
``$EPBENCH_CACHE`` (default ``~/.cache/epbench``). Without a compiler, or with
``EPBENCH_JAX_NATIVE=0``, the backend uses the XLA loop: the same results to float32
rounding, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from epbench.spec import ModelSpec

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("one_hidden.cc")
TARGET = "epbench_one_hidden_phase"
ACTIVATIONS = {"sigmoid": 0, "hard_sigmoid": 1}
CXXFLAGS = ["-std=c++17", "-O3", "-march=native", "-ffast-math", "-fPIC", "-w"]
# linked without -ffast-math, which would set flush-to-zero for the whole process on load
LDFLAGS = ["-shared"]
LIBS = ["-lm"]

_lock = threading.Lock()
_state: dict = {}


def enabled_by_user() -> bool:
    return os.environ.get("EPBENCH_JAX_NATIVE", "1") != "0"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_fingerprint() -> str:
    """-march=native code is for this CPU only: the cache key includes its model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def cache_dir() -> Path:
    root = os.environ.get("EPBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "epbench")
    return Path(root) / "native"


def _build(cxx: str, include: str) -> Path:
    """Compile (once per source, flags, compiler, jaxlib and CPU) and return the library path."""
    import jaxlib

    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(CXXFLAGS + LDFLAGS + LIBS), cxx,
                                     jaxlib.__version__, platform.machine(), _cpu_fingerprint()]).encode())
    out = cache_dir() / f"one_hidden-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "one_hidden.o", Path(tmp) / "one_hidden.so"
        for cmd in ([cxx, *CXXFLAGS, f"-I{include}", "-c", str(SOURCE), "-o", str(obj)],
                    [cxx, *LDFLAGS, str(obj), "-o", str(lib), *LIBS]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:2])} ... failed: {done.stderr.strip()[-500:]}")
        os.replace(lib, out)
    return out


def available() -> bool:
    """Whether the kernel is built and registered with XLA (building it on first call)."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        _state["ok"] = False
        if not enabled_by_user():
            _state["reason"] = "EPBENCH_JAX_NATIVE=0"
            return False
        cxx = _compiler()
        if cxx is None or platform.system() != "Linux":
            _state["reason"] = "no C++ compiler found" if cxx is None else f"not built on {platform.system()}"
            log.info("jax-cpu: fused one-hidden-layer kernel unavailable (%s); using XLA loops", _state["reason"])
            return False
        try:
            import jax

            path = _build(cxx, jax.ffi.include_dir())
            lib = ctypes.cdll.LoadLibrary(str(path))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.EpbenchOneHiddenPhase), platform="cpu")
        except (OSError, RuntimeError, AttributeError) as exc:
            _state["reason"] = str(exc)
            log.warning("jax-cpu: fused one-hidden-layer kernel unavailable (%s); using XLA loops", exc)
            return False
        _state["lib"] = lib
        _state["ok"] = True
        return True


def unavailable_reason() -> str | None:
    return None if available() else _state.get("reason")


def handles(spec: ModelSpec, dtype) -> bool:
    """The models the kernel implements: layered EB or P with one hidden layer of a multiple of
    16 units, sigmoid or hard sigmoid (Table 4's training activations), float32."""
    return (spec.kind in ("eb", "p") and len(spec.hidden) == 1 and spec.hidden[0] % 16 == 0
            and spec.activation in ACTIVATIONS and np.dtype(dtype) == np.float32)


def phase(spec: ModelSpec, ps: dict, d, s, n: int, nudge=None):
    """n steps of ``models.step`` from s = (s0, s1), inside a jitted program. ``ps``: the step
    parameters (W01, and b0 with biases), ``d``: the drive tuple (d[1] = W1x u + b1),
    ``nudge``: (β, y) for the nudged phase."""
    import jax
    import jax.numpy as jnp

    s0, s1 = s
    w = ps["W01"]
    b0 = ps["b0"] if spec.biases else jnp.zeros((1,), s0.dtype)
    beta, y = nudge if nudge is not None else (jnp.zeros((), s0.dtype), jnp.zeros((1,), s0.dtype))
    call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(s0.shape, s0.dtype), jax.ShapeDtypeStruct(s1.shape, s1.dtype)),
                            vmap_method="sequential")
    out0, out1 = call(w, b0, d[1], s0, s1, y, jnp.asarray(beta, s0.dtype), n=np.int64(n),
                      energy_based=spec.kind == "eb", activation=np.int32(ACTIVATIONS[spec.activation]),
                      sigma_prime_out=bool(spec.output_sigma_prime), clamp=bool(spec.clamp),
                      has_bias=bool(spec.biases), nudged=nudge is not None, dt=np.float32(spec.step))
    return out0, out1
