"""The ``cpu`` backend: C++ kernels (csrc/cpu, AVX-512 / AVX2 / scalar chosen at run time).

The extension is the ``supsup_fast._C`` module when setup.py built it (``pip install
--no-build-isolation``), otherwise it is compiled once on first use with
``torch.utils.cpp_extension.load`` (about a minute; cached under ``TORCH_EXTENSIONS_DIR``).
``SUPSUP_NO_CPU_EXT=1`` disables it; ``SUPSUP_CPU_ISA=avx2|scalar`` caps the instruction set.
Float32 tensors run in C++; other dtypes fall back to the reference implementation.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Optional

import torch

from ...csrc import build as csrc_build
from ..checks import outer_in_range
from .reference import DenseLinear, ReferenceBackend, fused_step_ready

SMALL_BATCH = 16  # rows of x up to which the small-batch masked GEMM (small_gemm.cpp) runs
# Rows of x up to which the packed masked GEMM (masked_gemm.cpp) runs, by CPU vendor and ISA, for
# layers of at least GEMM_MIN_OUT outputs; above, W ⊙ M is materialised once and BLAS runs. Measured
# against dense BLAS on 1024 x 1024, 300 x 784 and 1024 x 784 layers, the GEMM's blocks of b33a441.
# AMD Zen 4 VM: AVX-512 1.01-1.13x at 512-4096 rows where materialise + BLAS gave 0.87-0.99x, but
# 0.94x against 1.00x at 8,192 (1024 x 1024); AVX2 0.92-1.01x against 0.85-0.95x at 512, no better at
# 1,024, worse at 4,096. Intel Xeon VM (MKL's own kernels are stronger there): AVX2 the two alike at
# 256 rows, materialise + BLAS ahead at 512 (0.81-0.90x against 0.91-0.94x); AVX-512 since the 64 x 6
# tile (wide_gemm_tiles), interleaved in one process, packed against materialised at 384 / 512 rows:
# 1024 x 1024 1.03 / 1.00x against 0.94 / 0.95x, 1024 x 784 1.00 / 0.99 against 0.94 / 0.96, 500 x 1024
# 1.07 / 0.98 against 0.94 / 0.91, 300 x 784 0.97 / 0.97 against 0.88 / 0.90, but 4096 x 256 0.92 /
# 0.90 against 0.94 / 0.95; at 1,024 rows 0.97 against 0.96 (1024 x 1024), 0.95 against 0.98 (1024 x 784).
# Since its blocks grow to 512 KiB of panels from 512 rows of x on Intel CPUs (masked_gemm.cpp,
# kLargePanelFloats; the second Xeon VM, 2026-12-08), at 1,024 rows: 1024 x 1024 0.97-0.99x dense against
# 0.96x materialised, 1024 x 784 0.95-0.98x against 0.95-0.97x, 300 x 784 1.04-1.06x against 0.93-0.94x,
# 2048 x 1024 0.96-0.97x against 0.93-0.95x; at 2,048 rows materialising is ahead on 1024 x 1024
# (0.96-0.98x against 0.95-0.96x packed; 1024 x 784 0.96-0.97x against 0.97x), so it stops at 1,024.
# Intel AVX2's packed GEMM (one 24-row tile a block) ran 0.78-0.83x dense at 1,024 rows against
# 0.96-0.98x materialised.
GEMM_BATCH = {("amd", "avx512"): 4096, ("amd", "avx2"): 512, ("intel", "avx512"): 1024, ("intel", "avx2"): 256}
GEMM_BATCH_OTHER = 256
# Rows of x up to which the MLP training step may keep its masks as bits (measured at 128).
BITS_STEP_MAX_BATCH = 256
# Weights (all layers) from which the AVX2 MLP training step keeps its masks as bits: there the
# float step's 16 bytes a weight of state no longer stay in cache (mask_bits_training_step).
BITS_STEP_MIN_WEIGHTS_AVX2 = 1 << 20
GEMM_MIN_OUT = 64
_lock = threading.Lock()
_loaded: Optional[str] = None
_module = None  # the extension as a Python module (csrc/cpu/python_module.cpp)


def _sources() -> list:
    sources = csrc_build.cpu_sources()
    if not any(p.endswith("bindings.cpp") for p in sources):
        raise RuntimeError("the C++ sources (csrc/cpu) are not installed with this package")
    return sources


def _has_ops() -> bool:
    try:
        torch.ops.supsup_cpu.isa
        return True
    except (AttributeError, RuntimeError):
        return False


def load_cpu_extension() -> str:
    """Make ``torch.ops.supsup_cpu`` available; returns how ("prebuilt" or "jit")."""
    global _loaded, _module
    with _lock:
        if _loaded:
            return _loaded
        if os.environ.get("SUPSUP_NO_CPU_EXT") == "1":
            raise RuntimeError("disabled by SUPSUP_NO_CPU_EXT=1")
        # SUPSUP_CPU_PORTABLE=1: compile only the portable (scalar) kernels, as on an ARM CPU, whatever
        # this CPU has (the test of that build; csrc/cpu/kernels.h SUPSUP_X86).
        portable = os.environ.get("SUPSUP_CPU_PORTABLE") == "1"
        try:
            if portable:
                raise ImportError("the prebuilt module has the x86 kernels")
            import supsup_fast._C as module  # registers the ops on import
            _loaded = "prebuilt"
        except ImportError:
            from torch.utils import cpp_extension
            # A cached build loads in well under a second; only a compile (the first load, or after the
            # sources changed) outlasts the timer, and under torchrun one notice per host, not per rank.
            notice = threading.Timer(2.0, lambda: print(
                "supsup_fast: compiling the C++ CPU kernels (once per source change, about a minute)",
                file=sys.stderr, flush=True))
            if os.environ.get("LOCAL_RANK", "0") == "0":
                notice.start()
            try:
                module = cpp_extension.load(name="supsup_fast_cpu_portable" if portable else "supsup_fast_cpu",
                                            sources=_sources(), is_python_module=True,
                                            extra_cflags=csrc_build.CPU_CFLAGS + (["-DSUPSUP_PORTABLE"] if portable else []),
                                            extra_ldflags=csrc_build.CPU_LDFLAGS, verbose=False)
            except Exception as exc:  # no compiler, no ninja, headers missing...
                raise RuntimeError(f"could not build the C++ CPU kernels: {exc}") from exc
            finally:
                notice.cancel()
            _loaded = "jit"
        if not _has_ops():
            raise RuntimeError("the C++ extension loaded but registered no supsup_cpu ops")
        _module = module
        return _loaded


def cpu_module():
    """The loaded extension as a Python module (its direct small-batch functions)."""
    load_cpu_extension()
    return _module


def cpu_isa() -> str:
    load_cpu_extension()
    return torch.ops.supsup_cpu.isa()


class CpuBackend(ReferenceBackend):
    name = "cpu"
    # mask_dot_batched is a native one-pass lookup-table kernel (csrc/cpu/lut.cpp): evaluation infers
    # the tasks of all of a task's test batches in one batched call.
    fast_batched_inference = True
    fast_bank_linear = True  # csrc/cpu/lut.cpp mask_dot_rows
    reads_interleaved = True  # csrc/cpu/lut_interleaved.cpp

    def __init__(self):
        load_cpu_extension()
        self.ops = torch.ops.supsup_cpu
        self.isa = cpu_isa()  # fixed when the extension loads (SUPSUP_CPU_ISA is read once)
        self.vendor = str(self.ops.vendor())
        # On the scalar ISA (ARM and other non-x86 CPUs, x86 without AVX2) a layer's forward forms W ⊙ M
        # (a select that compilers vectorise) and runs BLAS at every batch: the portable small-batch
        # kernel was slower from one row on (Xeon VM, SUPSUP_CPU_ISA=scalar, torch capped to SSE4.2 as
        # a stand-in for NEON's width: 1024 x 1024 0.35 against 0.32 ms at 1 row, 1.93 against 1.29 at
        # 16; 300 x 784 0.10 against 0.06 at 1 row), and there is no portable packed GEMM.
        self.small_batch = 0 if self.isa == "scalar" else SMALL_BATCH
        self.gemm_batch = 0 if self.isa == "scalar" else GEMM_BATCH.get((self.vendor, self.isa), GEMM_BATCH_OTHER)
        # Plain Python functions that run the small-batch ops where a call may skip the public op's
        # checks and the dispatcher, else return None (csrc/cpu/python_module.cpp).
        module = cpu_module()
        self.direct_masked_linear = module.direct_masked_linear if self.small_batch else None
        self.direct_signed_masked_linear = module.direct_signed_masked_linear if self.small_batch else None
        self.interleaved_copy_matches = module.interleaved_copy_matches
        self.weight_copy_matches = module.weight_copy_matches
        self.transposed_copy_matches = module.transposed_copy_matches
        # Per-thread scratch for the materialised W ⊙ M of a large-batch forward: a fresh multi-MB
        # buffer per call costs page faults comparable to the unpacking itself.
        self._local = threading.local()

    def _scratch(self, shape, dtype, name: str = "weight") -> torch.Tensor:
        if torch.jit.is_tracing():  # a trace records each call's allocation (its check re-runs the forward)
            return torch.empty(shape, dtype=dtype)
        buf = getattr(self._local, name, None)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype)
            setattr(self._local, name, buf)
        return buf

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def pack_bits(self, mask):
        return self.ops.pack_bits(mask.contiguous())

    def unpack_bits(self, words, n):
        return self.ops.unpack_bits(words.contiguous(), n)

    def masked_weight(self, weight, mask_words):
        if weight.dtype != torch.float32:
            return super().masked_weight(weight, mask_words)
        return self.ops.masked_weight(weight.contiguous(), mask_words.contiguous())

    def superpose(self, bank, alpha, n):
        if alpha.dtype != torch.float32:
            return super().superpose(bank, alpha, n)
        return self.ops.superpose(bank.contiguous(), alpha.contiguous(), n)

    def superpose_interleaved(self, bank_w, k, alpha, n):
        if alpha.dtype != torch.float32:
            return super().superpose_interleaved(bank_w, k, alpha, n)
        return self.ops.superpose_interleaved(bank_w.contiguous(), k, alpha.contiguous(), n)

    def interleave_weights(self, bank, n):
        return self.ops.interleave_weights(bank.contiguous(), n)

    def mask_dot(self, bank, v):
        if v.dtype != torch.float32:
            return super().mask_dot(bank, v)
        return self.ops.mask_dot(bank.contiguous(), v.contiguous())

    def mask_dot_interleaved(self, bank_t, k, v):
        if v.dtype != torch.float32:
            return super().mask_dot_interleaved(bank_t, k, v)
        # ⟨Mᵢ, v⟩ = ⟨Mᵢ, (1 1ᵀ) ⊙ v⟩: the rank-1 kernel over the task-interleaved copy, whose tables
        # (of 1 · 1 · v, exactly v) stay in registers while all tasks' words stream past
        n = v.shape[-1]
        rows = v.numel() // max(n, 1)
        ones_r, ones_n = v.new_ones(1, rows), v.new_ones(1, n)
        # (v is finite: ops.mask_dot sends any other v to the reference)
        return self.ops.mask_dot_rank1_interleaved(bank_t.reshape(rows, bank_t.shape[-2], bank_t.shape[-1]), k, ones_r,
                                                   ones_n, v.reshape(rows, n), inputs_finite=True)[0]

    def mask_dot_batched(self, bank, v):
        if v.dtype != torch.float32:
            return super().mask_dot_batched(bank, v)
        return self.ops.mask_dot_batched(bank.contiguous(), v.contiguous())

    def mask_dot_outer(self, bank, g, x, weight, bank_t=None):
        if weight.dtype != torch.float32:
            return super().mask_dot_outer(bank, g, x, weight)
        # v_j = (g_j x_jᵀ) ⊙ W is formed inside the lookup-table build, never materialised.
        return self.ops.mask_dot_rank1_batched(bank.contiguous(), g.contiguous(), x.contiguous(), weight.contiguous(),
                                               None if bank_t is None else bank_t.contiguous())

    def interleave_tasks(self, bank):
        return self.ops.interleave_tasks(bank.contiguous())

    def mask_dot_outer_interleaved(self, bank_t, k, g, x, weight):
        if weight.dtype != torch.float32:
            return super().mask_dot_outer_interleaved(bank_t, k, g, x, weight)
        return self.ops.mask_dot_rank1_interleaved(bank_t.contiguous(), k, g.contiguous(), x.contiguous(), weight.contiguous())

    def mlp_mask_dot_outer(self, banks, copies, transposed, weights, backward_weights, inputs, g):
        """ops.mlp_mask_dot_outer in one C++ call; None where it cannot run (not float32, or a layer's
        products may not be finite): the caller then goes op by op."""
        if any(t.dtype != torch.float32 for t in (g, *weights, *backward_weights, *inputs)):
            return None
        contiguous = lambda ts: [t.contiguous() for t in ts]
        out, ok = self.ops.mlp_mask_dot_outer(contiguous(banks), contiguous(copies), transposed, contiguous(weights),
                                              contiguous(backward_weights), contiguous(inputs), g.contiguous())
        return out if ok else None

    def mlp_logit_gradients(self, x, weights, biases, objective, num_labels):
        """ops.mlp_logit_gradients in one C++ call; None where it cannot run (not float32)."""
        if any(t is not None and t.dtype != torch.float32 for t in (x, *weights, *biases)):
            return None
        inputs, g, nonzero = self.ops.mlp_logit_gradients(
            x.contiguous(), [w.contiguous() for w in weights], [None if b is None else b.contiguous() for b in biases],
            objective, num_labels)
        return list(inputs), g, list(nonzero)

    def transpose_masks(self, words, n):
        return self.ops.transpose_masks(words.contiguous(), n)

    def threshold_masked_weight(self, scores, weight):
        if weight.dtype != torch.float32 or scores.dtype != torch.float32:
            return super().threshold_masked_weight(scores, weight)
        return self.ops.threshold_masked_weight(scores.contiguous(), weight.contiguous())

    def mlp_cross_entropy_grads(self, x, y, weights):
        if x.dtype != torch.float32 or any(w.dtype != torch.float32 for w in weights):
            return super().mlp_cross_entropy_grads(x, y, weights)
        loss, grads = self.ops.mlp_cross_entropy_grads(x.contiguous(), y.contiguous(), [w.contiguous() for w in weights])
        return loss, list(grads)

    def mlp_ste_rmsprop_step_(self, x, y, masked_weights, weights, params, square_avgs, lr, alpha, eps, weight_decay):
        # one C++ call for the step: each weight gradient meets its update while still in cache, and
        # the Python glue of three layers' updates (~0.1 ms of a 1.4 ms LeNet step) is gone
        if x.dtype != torch.float32 or not all(fused_step_ready(ts) for ts in (masked_weights, weights, params, square_avgs)):
            return super().mlp_ste_rmsprop_step_(x, y, masked_weights, weights, params, square_avgs, lr, alpha, eps, weight_decay)
        return self.ops.mlp_ste_rmsprop_step_(x.contiguous(), y.contiguous(), masked_weights, weights, params, square_avgs,
                                              float(lr), float(alpha), float(eps), float(weight_decay))

    def mlp_ste_rmsprop_bits_step_(self, x, y, weights, sign_words, scales, mask_words, params, square_avgs, lr, alpha,
                                   eps, weight_decay):
        words_ready = all(m.dtype == torch.int32 and m.is_contiguous() for m in (*mask_words, *(s for s in sign_words if s is not None)))
        if x.dtype != torch.float32 or not words_ready or not all(fused_step_ready(ts) for ts in (weights, params, square_avgs)):
            return super().mlp_ste_rmsprop_bits_step_(x, y, weights, sign_words, scales, mask_words, params, square_avgs,
                                                      lr, alpha, eps, weight_decay)
        return self.ops.mlp_ste_rmsprop_bits_step_(x.contiguous(), y.contiguous(), weights, sign_words,
                                                   [float(s) for s in scales], mask_words, params, square_avgs,
                                                   float(lr), float(alpha), float(eps), float(weight_decay))

    def mask_bits_training_step(self, batch: int, num_weights: int) -> bool:
        # Measured on the Zen 4 VM, batch 128. AVX-512: the bits step took 0.89x the float step's time
        # on LeNet and 0.85x on FC1024. AVX2: 1.05-1.14x on LeNet (315 K weights, its float state stays
        # in cache; 1.04-1.09x again after the packed GEMM was re-blocked), 0.94-0.97x on FC1024 (1.9 M).
        # Intel Xeon VM, alternating processes, against the plain-torch step: AVX-512 alike (FC1024 1.92-2.12x
        # bits, 2.02-2.16x float); AVX2 FC1024 1.46-1.60x bits (18.2-20.7 ms), 1.60-1.76x float (15.1-16.3
        # ms), its bits step's packed GEMMs being slower than MKL there: Intel AVX2 keeps the float step.
        if batch > BITS_STEP_MAX_BATCH:
            return False
        return self.isa == "avx512" or (self.isa == "avx2" and self.vendor != "intel"
                                        and num_weights >= BITS_STEP_MIN_WEIGHTS_AVX2)

    def ste_adam_step_(self, param, weight_grad, weight, exp_avg, exp_avg_sq, masked_weight, step, lr, beta1, beta2, eps,
                       weight_decay):
        tensors = (param, weight_grad, weight, exp_avg, exp_avg_sq, masked_weight)
        if not fused_step_ready(tensors):
            return super().ste_adam_step_(*tensors, step, lr, beta1, beta2, eps, weight_decay)
        self.ops.ste_adam_step_(*tensors, int(step), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))

    def ste_rmsprop_step_(self, param, weight_grad, weight, square_avg, masked_weight, lr, alpha, eps, weight_decay):
        tensors = (param, weight_grad, weight, square_avg, masked_weight)
        if not fused_step_ready(tensors):
            return super().ste_rmsprop_step_(*tensors, lr, alpha, eps, weight_decay)
        self.ops.ste_rmsprop_step_(*tensors, float(lr), float(alpha), float(eps), float(weight_decay))

    def bank_linear(self, x, weight, bank, bank_t=None):
        rows = x.numel() // max(x.shape[-1], 1)
        if not (x.dtype == torch.float32 and weight.dtype == torch.float32 and rows > 0):
            return super().bank_linear(x, weight, bank)
        # one lookup-table pass over the bits per row of x (tables of W ⊙ x shared by all k tasks; the
        # reference's bit-plane einsums cost more per row at any row count, and allocate more); from
        # the task-interleaved copy, each word's tables stay in registers while all tasks stream past
        x2 = x.reshape(rows, x.shape[-1]).contiguous()
        k = bank.shape[0]
        per_row = [self.ops.mask_dot_rows(bank, x2[i], weight) if bank_t is None
                   else self.ops.mask_dot_rows_interleaved(bank_t, k, x2[i], weight) for i in range(rows)]
        out = per_row[0].unsqueeze(0) if rows == 1 else torch.stack(per_row)  # one image: no copy
        return out.reshape(*x.shape[:-1], weight.shape[0], bank.shape[0])

    def masked_forward(self, dense, x, weight, mask_words, bias):
        bias = None if bias is None else bias.contiguous()
        rows = x.numel() // max(x.shape[-1], 1)
        if weight.dtype == torch.float32 and x.dtype == torch.float32:
            if isinstance(dense, DenseLinear) and 0 < rows <= self.small_batch:
                return self.ops.masked_linear_small(x.contiguous(), weight, mask_words, bias)
            if isinstance(dense, DenseLinear) and rows <= self.gemm_batch and weight.shape[0] >= GEMM_MIN_OUT:
                return self.ops.masked_linear_gemm(x.contiguous(), weight, mask_words, bias)
            w_eff = self._scratch(weight.shape, weight.dtype)
            self.ops.masked_weight_into(weight.contiguous(), mask_words.contiguous(), w_eff)
            return dense.forward(x, w_eff, bias)  # a new tensor: the scratch never escapes
        return super().masked_forward(dense, x, weight, mask_words, bias)

    def superposed_forward(self, dense, x, weight, bank, alpha, s, bias):
        rows = x.numel() // max(x.shape[-1], 1)
        if not (isinstance(dense, DenseLinear) and 0 < rows <= SMALL_BATCH and x.dtype == torch.float32
                and weight.dtype == torch.float32 and alpha.dtype == torch.float32
                and (s is None or s.dtype == torch.float32) and (bias is None or bias.dtype == torch.float32)):
            return super().superposed_forward(dense, x, weight, bank, alpha, s, bias)
        if s is None:
            s = self.superpose(bank, alpha, weight.shape[1])
        # y = x (W ⊙ S)ᵀ + b for a few images (task inference), W ⊙ S never materialised
        return self.ops.scaled_linear_small(x.contiguous(), weight, s.view_as(weight).contiguous(),
                                            None if bias is None else bias.contiguous())

    def superposed_backward(self, dense, grad, x, weight, bank, alpha, s, need_input, need_alpha, need_weight,
                            bank_t=None):
        rows = x.numel() // max(x.shape[-1], 1)
        if not (isinstance(dense, DenseLinear) and rows == 1 and need_alpha and not need_weight
                and x.dtype == torch.float32 and weight.dtype == torch.float32 and grad.dtype == torch.float32
                and outer_in_range(grad, x, weight)):  # else 0·inf must be NaN for clear bits: the generic path
            return super().superposed_backward(dense, grad, x, weight, bank, alpha, s, need_input, need_alpha, need_weight)
        # One image (the paper's one-shot inference): G = g xᵀ is rank 1, so the α-gradient
        # ⟨Mᵢ, G ⊙ W⟩ is computed with v formed on the fly inside mask_dot, never materialised.
        if bank_t is not None:  # the task-interleaved copy: no transpose, tables held across all tasks
            dalpha = self.ops.mask_dot_rank1_interleaved(bank_t, bank.shape[0], grad.reshape(1, -1).contiguous(),
                                                         x.reshape(1, -1).contiguous(), weight, inputs_finite=True)[0]
        else:
            dalpha = self.ops.mask_dot_rank1(bank, grad.reshape(-1).contiguous(), x.reshape(-1).contiguous(), weight,
                                             inputs_finite=True)
        dx = grad.new_empty(0)
        if need_input:
            if s is None:
                s = self.superpose(bank, alpha.to(weight.dtype), weight.shape[1])
            if s.dtype == torch.float32:  # dx = g (W ⊙ S), W ⊙ S never materialised
                dx = self.ops.scaled_linear_small_t(grad.contiguous(), weight, s.view_as(weight).contiguous()).view_as(x)
            else:
                dx = dense.grad_input(grad, x, weight * s.view_as(weight))
        return dx, dalpha.to(alpha.dtype), grad.new_empty(0)

    def signed_masked_linear(self, x, sign_words, mask_words, scale: float, bias):
        bias = None if bias is None else bias.contiguous()
        rows = x.numel() // max(x.shape[-1], 1)
        if x.dtype != torch.float32:
            return super().signed_masked_linear(x, sign_words, mask_words, scale, bias)
        if 0 < rows <= self.small_batch:
            return self.ops.signed_masked_linear_small(x.contiguous(), sign_words, mask_words, scale, bias)
        # Larger batches: the packed GEMM builds each block of W ⊙ M from the sign and mask bits (2 bits
        # read per weight); above GEMM_BATCH, W ⊙ M is built once and BLAS runs.
        if rows <= self.gemm_batch and mask_words.shape[0] >= GEMM_MIN_OUT:
            return self.ops.signed_masked_linear_gemm(x.contiguous(), sign_words, mask_words, scale, bias)
        w_eff = self._scratch((mask_words.shape[0], x.shape[-1]), x.dtype)
        self.ops.signed_masked_weight_into(sign_words, mask_words, scale, w_eff)
        return torch.nn.functional.linear(x, w_eff, bias)
