"""The backends beneath the op contract. ``reference`` (pure torch) is every other backend's oracle;
``cpu`` (C++ kernels), ``triton`` and ``cuda`` are built lazily, when first chosen, and register
here with a priority (``auto`` picks the highest that supports the tensors' device)."""
import os

from ..registry import register_backend
from .reference import ReferenceBackend


def _cpu_backend():
    from .cpu import CpuBackend
    return CpuBackend()


def _triton_backend():
    from .triton import TritonBackend
    return TritonBackend()


def _cuda_backend():
    from .cuda import CudaBackend
    return CudaBackend()


register_backend("reference", ReferenceBackend, priority=0)
register_backend("cpu", _cpu_backend, priority=10)
# On a GPU Triton is the default; under TRITON_INTERPRET=1 (CPU tests) it runs only when chosen.
register_backend("triton", _triton_backend, priority=-1 if os.environ.get("TRITON_INTERPRET") == "1" else 20)
# Above Triton: under "auto" it keeps only the ops the measured table (gpu_op_table.json) gives it.
register_backend("cuda", _cuda_backend, priority=30)
