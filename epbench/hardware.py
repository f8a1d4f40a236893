"""The hardware a run ran on, for its provenance (every row of the results table and meta.json
``host``; ``epbench bench`` rows too).

* CPU: the model name and its vector extensions, the ones that decide how fast the kernels
  run: x86 ``avx``* (avx, avx2, avx512f and the other avx512*, avx_vnni, ...), ``fma``,
  ``amx``*; arm ``neon``, ``asimd``*, ``sve``*. Read from /proc/cpuinfo on Linux, sysctl on
  macOS, else only the model from :mod:`platform`.
* GPU, when the backend's device is a CUDA one: its name and the CUDA version from the
  backend's framework (torch.cuda, or JAX's devices and CUDA plugin), the NVIDIA driver version
  from /proc/driver/nvidia/version. Empty strings where not available (a CPU backend, another
  OS). A framework is only asked if the backend already imported it.

:func:`columns` gives them as the table's columns: ``cpu_model``, ``cpu_flags`` (space
separated, sorted), ``gpu_name``, ``gpu_driver``, ``cuda_version``; :func:`host` adds the
platform, Python and the usable cores for meta.json.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")

#: vector extensions kept: a flag is kept if it is one of EXACT or starts with one of PREFIXES
EXACT = ("fma", "neon")
PREFIXES = ("avx", "amx", "asimd", "sve")
#: /proc/cpuinfo keys that name the CPU model (x86 first; arm and others)
MODEL_KEYS = ("model name", "Model", "Hardware", "cpu model", "Processor")


def relevant_flags(flags) -> list[str]:
    """The vector extensions among ``flags`` (lower case, sorted, unique)."""
    kept = {f.lower() for f in flags if f.lower() in EXACT or f.lower().startswith(PREFIXES)}
    return sorted(kept)


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(model, vector extensions) from the text of /proc/cpuinfo: the first processor's model
    line and its ``flags`` (x86) or ``Features`` (arm) line."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key not in fields:
            fields[key] = value.strip()
    model = next((fields[k] for k in MODEL_KEYS if fields.get(k)), "")
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    return model, relevant_flags(flags)


def parse_sysctl(values: dict[str, str]) -> tuple[str, list[str]]:
    """(model, vector extensions) from macOS sysctl values: ``machdep.cpu.brand_string``; on
    Intel ``machdep.cpu.features`` and ``machdep.cpu.leaf7_features`` (``AVX1.0`` is avx); on
    Apple silicon the ``hw.optional.*`` switches set to 1 (``neon``, ``arm.FEAT_SVE``, ...)."""
    model = values.get("machdep.cpu.brand_string", "")
    flags = []
    for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
        flags += [f.lower().replace("avx1.0", "avx") for f in values.get(key, "").split()]
    for key, value in values.items():
        if key.startswith("hw.optional.") and value.strip() == "1":
            flags.append(key.rsplit(".", 1)[-1].lower().removeprefix("feat_"))
    return model, relevant_flags(flags)


def _sysctl() -> dict[str, str]:
    try:
        text = subprocess.run(["sysctl", "machdep.cpu", "hw.optional"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, sep, v in (line.partition(":") for line in text.splitlines()) if sep}


@functools.lru_cache(maxsize=1)
def cpu() -> dict[str, str]:
    """``{"cpu_model", "cpu_flags"}`` of this machine (probed once per process)."""
    model, flags = "", []
    if sys.platform.startswith("linux"):
        try:
            model, flags = parse_cpuinfo(CPUINFO.read_text())
        except OSError:
            pass
    elif sys.platform == "darwin":
        model, flags = parse_sysctl(_sysctl())
    return {"cpu_model": model or platform.processor() or platform.machine(), "cpu_flags": " ".join(flags)}


def parse_nvidia_driver(text: str) -> str:
    """The driver version from /proc/driver/nvidia/version (``NVRM version: NVIDIA UNIX x86_64
    Kernel Module  550.54.15  ...``, or ``... Open Kernel Module for x86_64  570.86.15 ...``)."""
    first = text.splitlines()[0] if text.strip() else ""
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", first)
    return found.group(1) if found else ""


def cuda_version_of(number: int | None) -> str:
    """``"12.3"`` from the CUDA runtime's version number 12030 (1000·major + 10·minor)."""
    if not number:
        return ""
    return f"{number // 1000}.{number % 1000 // 10}"


def is_gpu_device(device: str) -> bool:
    """Whether a backend's device string (``Availability.device``) names a CUDA GPU."""
    return device.strip().lower().startswith(("cuda", "gpu"))


def _torch_gpu() -> dict[str, str]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    return {"gpu_name": torch.cuda.get_device_name(torch.cuda.current_device()),
            "cuda_version": torch.version.cuda or ""}


def _jax_gpu() -> dict[str, str]:
    if "jax" not in sys.modules:
        return {}
    import jax

    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return {}
    info = {"gpu_name": getattr(devices[0], "device_kind", "")} if devices else {}
    try:
        from jax._src.lib import cuda_versions

        info["cuda_version"] = cuda_version_of(cuda_versions.cuda_runtime_get_version()) if cuda_versions else ""
    except (ImportError, AttributeError, RuntimeError):
        pass
    return info


#: the GPU readers by backend framework
GPU_READERS = {"torch": _torch_gpu, "jax": _jax_gpu}


def gpu(framework: str, device: str) -> dict[str, str]:
    """``{"gpu_name", "gpu_driver", "cuda_version"}`` of a backend on a CUDA device (empty
    strings for a CPU device, or for what its framework does not report)."""
    info = {"gpu_name": "", "gpu_driver": "", "cuda_version": ""}
    if not is_gpu_device(device):
        return info
    try:
        info["gpu_driver"] = parse_nvidia_driver(NVIDIA_DRIVER.read_text())
    except OSError:
        pass
    reader = GPU_READERS.get(framework)
    if reader is not None:
        try:
            info.update({k: v for k, v in reader().items() if v})
        except Exception:  # noqa: BLE001 - provenance must never stop a run
            pass
    return info


def columns(framework: str, device: str) -> dict[str, str]:
    """The hardware provenance columns of a backend's rows."""
    return {**cpu(), **gpu(framework, device)}


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def host(framework: str = "", device: str = "cpu") -> dict:
    """meta.json's ``host``: the platform, Python, the usable cores and :func:`columns` (the GPU
    ones empty unless ``device`` is a CUDA device of ``framework``)."""
    return {"platform": platform.platform(), "python": sys.version.split()[0], "cores": cores(),
            **columns(framework, device)}
