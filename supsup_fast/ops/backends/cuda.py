"""The CUDA C++ backend (``csrc/cuda``): lookup-table ``mask_dot``, ``superpose``, the 2-bit
signed-constant GEMV for batches of 1–16 and the masked-weight materialisation for convolutions.
Every other op, and every op where the measured table says Triton is faster, goes to the Triton
backend (or the reference one when Triton is missing).

The extension is built by setup.py on machines with a CUDA torch and nvcc (``supsup_fast._cuda``),
or JIT-compiled on first use there. ``auto`` consults ``gpu_op_table.json`` (written by
``benchmarks/gpu_check.py``) to pick, per op, the faster of ``cuda`` and ``triton``; with no
measurement for an op, Triton keeps it."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch

from ...csrc import build as csrc_build
from .reference import DenseLinear, ReferenceBackend
from .triton import FLOAT_TYPES, TritonBackend, fused_alpha_backward, pad_to_words
from ..registry import AUTO, get_backend_name

TABLE = Path(__file__).resolve().parent.parent / "gpu_op_table.json"
_loaded = None


def load_cuda_extension() -> str:
    """Load the CUDA kernels (prebuilt, else JIT); RuntimeError says why they cannot run here."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if torch.version.cuda is None or not torch.cuda.is_available():
        raise RuntimeError("the CUDA backend needs a CUDA build of torch and a GPU")
    try:
        import supsup_fast._cuda  # noqa: F401  (built by setup.py)
        _loaded = "prebuilt"
    except ImportError:
        from torch.utils import cpp_extension
        if cpp_extension.CUDA_HOME is None:  # torch's own search: CUDA_HOME / CUDA_PATH, nvcc on PATH, /usr/local/cuda
            raise RuntimeError("the CUDA extension is not built and no CUDA toolkit (nvcc) was found to build it; "
                               "set CUDA_HOME")
        try:
            cpp_extension.load(name="supsup_fast_cuda", sources=csrc_build.cuda_sources(), is_python_module=False,
                               extra_cuda_cflags=csrc_build.CUDA_NVCCFLAGS, extra_cflags=csrc_build.CUDA_CXXFLAGS)
        except Exception as exc:
            raise RuntimeError(f"could not build the CUDA kernels: {exc}") from exc
        _loaded = "jit"
    if not hasattr(torch.ops, "supsup_cuda") or not hasattr(torch.ops.supsup_cuda, "mask_dot"):
        _loaded = None
        raise RuntimeError("the CUDA extension loaded but registered no supsup_cuda ops")
    try:
        probe_kernels(_launch_one_kernel, torch.cuda.get_device_capability())
    except RuntimeError:
        _loaded = None
        raise
    return _loaded


def _launch_one_kernel() -> None:
    w = torch.ones(1, 1, device="cuda")
    torch.ops.supsup_cuda.masked_weight(w, torch.ones(1, 1, dtype=torch.int32, device="cuda"), False)
    torch.cuda.synchronize()


def probe_kernels(launch: Callable[[], object], capability: Tuple[int, int]) -> None:
    """Run ``launch`` (one tiny kernel) and turn its failure into a RuntimeError that says why: an
    extension built for other GPUs (setup.py builds sm_80 / sm_90 machine code and sm_90 PTX by
    default) registers its ops on an older card and only fails at the first launch ("no kernel image
    is available"). Refusing the backend here lets ``auto`` take Triton instead."""
    try:
        launch()
    except RuntimeError as exc:
        arch = f"{capability[0]}.{capability[1]}"
        raise RuntimeError(f"the CUDA kernels cannot run on this GPU (compute capability {arch}): {exc}. Rebuild "
                           f"them for it: TORCH_CUDA_ARCH_LIST=\"{arch}\" pip install --no-build-isolation -e .") from exc


def op_table() -> Dict[str, str]:
    """Measured winner per op ({"mask_dot": "cuda", ...}); empty when no GPU check has run."""
    try:
        data = json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.get("winner", {}).items() if v in ("cuda", "triton")}


class CudaBackend(ReferenceBackend):
    name = "cuda"

    def __init__(self):
        load_cuda_extension()
        self.ops = torch.ops.supsup_cuda
        try:
            self.fallback = TritonBackend()
        except RuntimeError:
            self.fallback = ReferenceBackend()
        self.fast_batched_inference = self.fallback.fast_batched_inference
        self.table = op_table()

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _mine(self, op: str) -> bool:
        """Forced `cuda`: always the CUDA kernel. Under `auto`: only where it measured faster."""
        return get_backend_name() != AUTO or self.table.get(op) == "cuda"

    def mask_dot(self, bank, v):
        if v.dtype != torch.float32 or not self._mine("mask_dot"):
            return self.fallback.mask_dot(bank, v)
        k, w = bank.shape[0], bank.shape[-1]
        return self.ops.mask_dot(bank.reshape(k, -1).contiguous(), pad_to_words(v, w).reshape(-1), None)

    def superpose(self, bank, alpha, n):
        if alpha.dtype != torch.float32 or not self._mine("superpose"):
            return self.fallback.superpose(bank, alpha, n)
        k, w = bank.shape[0], bank.shape[-1]
        out = self.ops.superpose(bank.reshape(k, -1).contiguous(), alpha.contiguous(), None)
        return out.view(*bank.shape[1:-1], w * 32)[..., :n].contiguous()

    def masked_weight(self, weight, mask_words):
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not self._mine("masked_weight"):
            return self.fallback.masked_weight(weight, mask_words)
        return self.ops.masked_weight(weight.contiguous(), mask_words.contiguous(), False)

    def signed_masked_linear(self, x, sign_words, mask_words, scale, bias):
        rows = x.numel() // max(x.shape[-1], 1)
        # The GEMV adds 0 · x at the cleared bits where x is not finite (in the kernel, no host sync); a
        # scale that is not finite would turn its 0 · scale into NaN: the fallback gives the contract's.
        if (x.dtype != torch.float32 or not 1 <= rows <= 16 or not self._mine("signed_gemv")
                or not math.isfinite(scale)):
            return self.fallback.signed_masked_linear(x, sign_words, mask_words, scale, bias)
        y = self.ops.signed_gemv(x.reshape(rows, -1).contiguous(), sign_words.contiguous(), mask_words.contiguous(),
                                 None if bias is None else bias.float().contiguous(), float(scale))
        return y.reshape(*x.shape[:-1], mask_words.shape[0])

    # Everything else: the fallback backend (Triton on a GPU).
    def pack_bits(self, mask):
        return self.fallback.pack_bits(mask)

    def unpack_bits(self, words, n):
        return self.fallback.unpack_bits(words, n)

    def mask_dot_batched(self, bank, v):
        return self.fallback.mask_dot_batched(bank, v)

    def threshold_masked_weight(self, scores, weight):
        return self.fallback.threshold_masked_weight(scores, weight)

    def ste_rmsprop_step_(self, param, weight_grad, weight, square_avg, masked_weight, lr, alpha, eps, weight_decay):
        return self.fallback.ste_rmsprop_step_(param, weight_grad, weight, square_avg, masked_weight, lr, alpha, eps, weight_decay)

    def ste_adam_step_(self, *args):
        return self.fallback.ste_adam_step_(*args)

    def masked_forward(self, dense, x, weight, mask_words, bias):
        if isinstance(dense, DenseLinear):
            return self.fallback.masked_forward(dense, x, weight, mask_words, bias)
        return super().masked_forward(dense, x, weight, mask_words, bias)  # conv: W ⊙ M (here) + cuDNN

    def masked_backward(self, dense, grad, x, weight, mask_words, need_input, need_weight):
        if isinstance(dense, DenseLinear):
            return self.fallback.masked_backward(dense, grad, x, weight, mask_words, need_input, need_weight)
        return super().masked_backward(dense, grad, x, weight, mask_words, need_input, need_weight)

    def superposed_backward(self, dense, grad, x, weight, bank, alpha, s, need_input, need_alpha, need_weight):
        if (isinstance(dense, DenseLinear) and isinstance(self.fallback, TritonBackend) and need_alpha and not need_weight
                and x.dtype in FLOAT_TYPES and grad.dtype == x.dtype == weight.dtype):  # the GEMM kernels: no float64
            return fused_alpha_backward(self, self.fallback.kernels, dense, grad, x, weight, bank, alpha, s, need_input)
        return super().superposed_backward(dense, grad, x, weight, bank, alpha, s, need_input, need_alpha, need_weight)
