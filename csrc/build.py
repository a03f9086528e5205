"""What the C++/CUDA extensions are built from, and how: the one list of sources and compiler flags
that setup.py (ahead of time) and ``supsup_fast.ops.backends.cpu`` / ``supsup_fast.ops.backends.cuda`` (compile on
first use) all read. Installed as ``supsup_fast.csrc.build``; setup.py loads it by path."""
from __future__ import annotations

from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent

CPU_CFLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-Wno-maybe-uninitialized"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CXXFLAGS = ["-O3"]
CUDA_NVCCFLAGS = ["-O3", "-std=c++17"]
# Defined when setup.py builds the CUDA extension as the Python module supsup_fast._cuda (the CPU one
# is always a module: csrc/cpu/python_module.cpp).
PYTHON_MODULE_MACRO = ("SUPSUP_PYTHON_MODULE", None)


def cpu_sources(root: Path = HERE) -> List[str]:
    """The C++ CPU kernels and their TORCH_LIBRARY bindings (empty if the sources are absent)."""
    return sorted(str(p) for p in (Path(root) / "cpu").glob("*.cpp"))


def cuda_sources(root: Path = HERE) -> List[str]:
    """The CUDA kernels and their bindings (empty if the sources are absent)."""
    folder = Path(root) / "cuda"
    if not (folder / "bindings.cpp").is_file():
        return []
    return sorted(str(p) for p in folder.glob("*.cu")) + [str(folder / "bindings.cpp")]
