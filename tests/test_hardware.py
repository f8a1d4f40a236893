"""The hardware probe (epbench.hardware): parsing of /proc/cpuinfo, macOS sysctl and the NVIDIA
driver file, on sample texts of each; the probe of this machine."""

from __future__ import annotations

import sys

import pytest

from epbench import hardware

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""

SAPPHIRE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 fma avx avx2 avx512f avx512dq avx512bw avx512vl avx_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 fma4x
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve sve2 svebf16
CPU implementer\t: 0x41
"""


def test_cpuinfo_x86_keeps_the_vector_extensions_only():
    model, flags = hardware.parse_cpuinfo(X86)
    assert model == "AMD EPYC 7B13"
    assert flags == ["avx", "avx2", "fma"]


def test_cpuinfo_avx512_and_amx():
    model, flags = hardware.parse_cpuinfo(SAPPHIRE)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == ["amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512bw", "avx512dq",
                     "avx512f", "avx512vl", "avx_vnni", "fma"]


def test_cpuinfo_arm_features_without_a_model_line():
    model, flags = hardware.parse_cpuinfo(ARM)
    assert model == ""
    assert flags == ["asimd", "asimdhp", "asimdrdm", "sve", "sve2", "svebf16"]


def test_sysctl_intel_and_apple_silicon():
    intel = {"machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz",
             "machdep.cpu.features": "FPU SSE SSE2 FMA AVX1.0 F16C", "machdep.cpu.leaf7_features": "BMI1 AVX2 SMEP"}
    assert hardware.parse_sysctl(intel) == ("Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", ["avx", "avx2", "fma"])
    apple = {"machdep.cpu.brand_string": "Apple M2", "hw.optional.neon": "1", "hw.optional.AdvSIMD": "1",
             "hw.optional.arm.FEAT_SVE": "0", "hw.optional.floatingpoint": "1"}
    assert hardware.parse_sysctl(apple) == ("Apple M2", ["neon"])


def test_nvidia_driver_and_cuda_versions():
    proprietary = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                   "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder)\n"
    assert hardware.parse_nvidia_driver(proprietary) == "550.54.15"
    assert hardware.parse_nvidia_driver(open_module) == "570.86.15"
    assert hardware.parse_nvidia_driver("") == ""
    assert hardware.cuda_version_of(12030) == "12.3" and hardware.cuda_version_of(13000) == "13.0"
    assert hardware.cuda_version_of(None) == ""


def test_gpu_columns_are_empty_on_a_cpu_device():
    assert hardware.is_gpu_device("cuda:0 (NVIDIA H100)") and hardware.is_gpu_device("gpu:0 NVIDIA H100")
    assert not hardware.is_gpu_device("cpu") and not hardware.is_gpu_device("cpu:0 cpu")
    assert hardware.gpu("torch", "cpu") == {"gpu_name": "", "gpu_driver": "", "cuda_version": ""}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_this_machine():
    """The probe of this machine: its model line and the vector extensions of its flags."""
    info = hardware.columns("torch", "cpu")
    model, flags = hardware.parse_cpuinfo(hardware.CPUINFO.read_text())
    assert info["cpu_model"] == (model or info["cpu_model"]) and info["cpu_model"]
    assert info["cpu_flags"].split() == flags
    assert info["gpu_name"] == info["gpu_driver"] == info["cuda_version"] == ""
