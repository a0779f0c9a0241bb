"""What machine a figure was measured on. These VMs move between hosts from one boot to the next
(AVX-512 VNNI on one, AVX2 only on another), and INT8 and FP32 speed depend on exactly that, so
every benchmark part records the CPU it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# the vector instructions that decide how fast ONNX Runtime runs FP32 and INT8 convolutions
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu() -> dict:
    """The CPU's model name, the `SPEED_FLAGS` it has, and the CPUs this process may use."""
    model, flags = platform.processor(), set()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the model name platform gives, no flags
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {
        "model": model,
        "speed_flags": [flag for flag in SPEED_FLAGS if flag in flags],
        "cpus": len(os.sched_getaffinity(0)),
    }


def described(cpu_info: dict) -> str:
    """One line, e.g. 'AMD EPYC (avx2), 2 CPUs'."""
    flags = ", ".join(cpu_info["speed_flags"]) or "no AVX2"
    count = cpu_info["cpus"]
    return f"{cpu_info['model'] or 'unknown CPU'} ({flags}), {count} CPU{'s' * (count != 1)}"
