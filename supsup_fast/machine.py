"""Which CPU this is, from ``/proc/cpuinfo``: benchmark and run records name it, and a VM's model
name ("AMD EPYC") often hides the core generation that the kernels' speed depends on."""
from __future__ import annotations

import os
import platform

import torch

# Zen 4 issues a 512-bit op as two 256-bit halves, Zen 5 does not: the same ISA, different speeds.
# Family 19h holds both Zen 3 and Zen 4 (told apart by AVX-512 below).
_AMD_FAMILIES = {0x17: "Zen / Zen 2", 0x1A: "Zen 5"}


def cpu_identity(cpuinfo: str) -> dict:
    """The first CPU of a ``/proc/cpuinfo`` text: its model name, vendor, family, model and, for AMD, the
    core generation (``microarchitecture``). Keys whose line is missing (e.g. on ARM) are left out."""
    fields: dict = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block only
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info: dict = {}
    if "model name" in fields:
        info["cpu_model"] = fields["model name"]
    if "vendor_id" in fields:
        info["cpu_vendor_id"] = fields["vendor_id"]
    try:
        family, model = int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return info
    info["cpu_family"], info["cpu_model_number"] = family, model
    if fields.get("vendor_id") == "AuthenticAMD":
        if family == 0x19:
            info["microarchitecture"] = "Zen 4" if "avx512f" in fields.get("flags", "").split() else "Zen 3"
        elif family in _AMD_FAMILIES:
            info["microarchitecture"] = _AMD_FAMILIES[family]
    return info


def cpu_label(info: dict) -> str:
    """A machine dict's CPU in words for titles: its model name, with the AMD core generation where known."""
    name = info.get("cpu_model") or info.get("processor") or "unknown CPU"
    return f"{name} ({info['microarchitecture']})" if "microarchitecture" in info else name


def read_cpu_identity(path: str = "/proc/cpuinfo") -> dict:
    """``cpu_identity`` of this machine; empty where the file cannot be read (not Linux)."""
    try:
        with open(path) as fh:
            return cpu_identity(fh.read())
    except OSError:
        return {}


def host_record() -> dict:
    """The machine part that every benchmark and run record shares: platform, CPU (``read_cpu_identity``),
    core count, torch, its threads and the ISA of torch's own kernels (``torch_cpu_capability``).
    Records add what is theirs: the backend, the ISA this package's C++ kernels ran (``cpu_isa``), a GPU."""
    try:  # other work on the machine (a load above the core count makes timings worthless)
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        load = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average_1min": load,
            **read_cpu_identity()}
