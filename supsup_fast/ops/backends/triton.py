"""The Triton backend: the op contract on CUDA tensors through the kernels in
``supsup_fast.kernels`` (``torch.library.triton_op``s). Linear layers run the fused unpack-GEMMs;
conv layers materialise W ⊙ M with one bit kernel and call cuDNN; the α-gradient is one pass over
the bits (``mask_dot`` on v = G ⊙ W, built in the weight-gradient GEMM's epilogue).

Under ``TRITON_INTERPRET=1`` (tests on a CPU machine) it also runs on CPU tensors when chosen
explicitly; ``auto`` never picks it there."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...bits import BITS_PER_WORD
from .reference import DenseLinear, ReferenceBackend, fused_step_ready, mask_dot_ieee

try:  # the launchers need Triton; without it this backend is simply unavailable
    from ...kernels import ops as kernel_ops
except ImportError as exc:
    kernel_ops, _IMPORT_ERROR = None, exc

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def load_kernels():
    """The kernels' launchers, or RuntimeError saying why the backend cannot run here."""
    if kernel_ops is None:
        raise RuntimeError(f"Triton is not installed: {_IMPORT_ERROR}") from _IMPORT_ERROR
    if not kernel_ops.INTERPRET and not torch.cuda.is_available():
        raise RuntimeError("the Triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 for tests)")
    return kernel_ops


def pad_to_words(v: torch.Tensor, words: int) -> torch.Tensor:
    """v [..., n] as a flat fp32 vector of 32·words per leading row (zero pad bits)."""
    n = v.shape[-1]
    v = v.float()
    if words * BITS_PER_WORD != n:
        v = F.pad(v, (0, words * BITS_PER_WORD - n))
    return v.contiguous()


class OnTensorsDevice:
    """The kernel launchers, each run with its first tensor's GPU as the current device. Triton
    launches on the current device and its stream: a layer on cuda:1 in a process whose current
    device is cuda:0 (``--device cuda:1`` without torchrun) would otherwise have its kernels read
    cuda:1's memory from cuda:0. The guard is entered only where the devices differ."""

    def __init__(self, kernels):
        self.launchers = kernels

    def __getattr__(self, name: str):
        launcher = getattr(self.launchers, name)
        if not callable(launcher):
            return launcher

        def launch(*args, **kwargs):
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
            if device is None or device.type != "cuda" or device.index == torch.cuda.current_device():
                return launcher(*args, **kwargs)
            with torch.cuda.device(device):
                return launcher(*args, **kwargs)
        return launch


class TritonBackend(ReferenceBackend):
    name = "triton"
    fast_batched_inference = True

    def __init__(self):
        self.kernels = OnTensorsDevice(load_kernels())
        self.interpret = self.kernels.INTERPRET

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" or (self.interpret and device.type == "cpu")

    # -- bits ---------------------------------------------------------------------------------
    def pack_bits(self, mask):
        n = mask.shape[-1]
        return self.kernels.pack_bits(mask.reshape(-1, n).contiguous()).reshape(*mask.shape[:-1], (n + 31) // 32)

    def unpack_bits(self, words, n):
        return self.kernels.unpack_bits(words.reshape(-1, words.shape[-1]).contiguous(), n).reshape(*words.shape[:-1], n)

    def masked_weight(self, weight, mask_words):
        if weight.dtype not in FLOAT_TYPES:
            return super().masked_weight(weight, mask_words)
        w2 = weight.reshape(weight.shape[0], -1).contiguous()
        return self.kernels.masked_weight(w2, mask_words.contiguous()).view_as(weight)

    def threshold_masked_weight(self, scores, weight):
        if weight.dtype not in FLOAT_TYPES or scores.dtype != weight.dtype:
            return super().threshold_masked_weight(scores, weight)
        return self.kernels.threshold_masked_weight(scores.contiguous(), weight.contiguous())

    def ste_adam_step_(self, param, weight_grad, weight, exp_avg, exp_avg_sq, masked_weight, step, lr, beta1, beta2, eps,
                       weight_decay):
        tensors = (param, weight_grad, weight, exp_avg, exp_avg_sq, masked_weight)
        if not fused_step_ready(tensors):
            return super().ste_adam_step_(*tensors, step, lr, beta1, beta2, eps, weight_decay)
        self.kernels.ste_adam_step_(*tensors, int(step), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))

    def ste_rmsprop_step_(self, param, weight_grad, weight, square_avg, masked_weight, lr, alpha, eps, weight_decay):
        tensors = (param, weight_grad, weight, square_avg, masked_weight)
        if not fused_step_ready(tensors):
            return super().ste_rmsprop_step_(*tensors, lr, alpha, eps, weight_decay)
        self.kernels.ste_rmsprop_step_(*tensors, float(lr), float(alpha), float(eps), float(weight_decay))

    def compare_pack(self, values: torch.Tensor, threshold: float, absolute: bool = False) -> torch.Tensor:
        """Pack 1[v ≥ t] (or 1[|v| ≥ t]) of a [out, n] score tensor straight into words. The kernel
        compares in fp32, exact for fp16/bf16/fp32 scores; float64 ones (-1e-50 is -0.0 in fp32, and
        ≥ 0) go to the reference."""
        if values.dtype not in FLOAT_TYPES:
            return super().compare_pack(values, threshold, absolute)
        v2 = values.reshape(values.shape[0], -1).float().contiguous()
        return self.kernels.compare_pack(v2, float(threshold), bool(absolute))

    # -- bank products ------------------------------------------------------------------------
    # The kernels sum in fp32: float64 α and v go to the reference, which sums in their dtype.
    def superpose(self, bank, alpha, n, active=None):
        if alpha.dtype not in FLOAT_TYPES:
            return super().superpose(bank if active is None else bank[active], alpha, n)
        k = bank.shape[0]
        lead, w = bank.shape[1:-1], bank.shape[-1]
        flat = bank.reshape(k, -1).contiguous()
        a = alpha.float().contiguous()
        out = self.kernels.superpose(flat, a, None if active is None else active.to(torch.int64).contiguous())
        return out.view(*lead, w * BITS_PER_WORD)[..., :n].to(alpha.dtype).contiguous()

    def mask_dot(self, bank, v, active=None):
        if v.dtype not in FLOAT_TYPES:
            return super().mask_dot(bank if active is None else bank[active], v)
        k, w = bank.shape[0], bank.shape[-1]
        out = self.kernels.mask_dot(bank.reshape(k, -1).contiguous(), pad_to_words(v, w).reshape(-1),
                              None if active is None else active.to(torch.int64).contiguous())
        return out.to(v.dtype)

    def mask_dot_batched(self, bank, v, active=None):
        if v.dtype not in FLOAT_TYPES:
            return super().mask_dot_batched(bank if active is None else bank[active], v)
        k, w = bank.shape[0], bank.shape[-1]
        q = v.shape[0]
        out = self.kernels.mask_dot_batched(bank.reshape(k, -1).contiguous(), pad_to_words(v, w).reshape(q, -1),
                                      None if active is None else active.to(torch.int64).contiguous())
        return out.to(v.dtype)

    # -- single-task layers -------------------------------------------------------------------
    def _linear_ok(self, dense, x, weight) -> bool:
        return isinstance(dense, DenseLinear) and x.dtype in FLOAT_TYPES and weight.dtype == x.dtype

    def masked_forward(self, dense, x, weight, mask_words, bias):
        if not self._linear_ok(dense, x, weight):
            return super().masked_forward(dense, x, weight, mask_words, bias)  # conv: W ⊙ M kernel + cuDNN
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = self.kernels.masked_linear(x2, weight.contiguous(), None, mask_words.contiguous(),
                                 None if bias is None else bias.to(x.dtype).contiguous(), 1.0)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def masked_backward(self, dense, grad, x, weight, mask_words, need_input, need_weight):
        if not self._linear_ok(dense, x, weight) or grad.dtype != x.dtype:
            return super().masked_backward(dense, grad, x, weight, mask_words, need_input, need_weight)
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        words = mask_words.contiguous()
        dx = self.kernels.masked_linear_dx(g2, weight.contiguous(), words).reshape(x.shape) if need_input else grad.new_empty(0)
        dw = self.kernels.grad_weight(g2, x2, None, words).to(weight.dtype) if need_weight else grad.new_empty(0)
        return dx, dw

    def signed_masked_linear(self, x, sign_words, mask_words, scale, bias):
        if x.dtype not in FLOAT_TYPES:
            return super().signed_masked_linear(x, sign_words, mask_words, scale, bias)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = self.kernels.masked_linear(x2, None, sign_words.contiguous(), mask_words.contiguous(),
                                 None if bias is None else bias.to(x.dtype).contiguous(), float(scale))
        return y.reshape(*x.shape[:-1], mask_words.shape[0])

    # -- superposed ---------------------------------------------------------------------------
    def superposed_backward(self, dense, grad, x, weight, bank, alpha, s, need_input, need_alpha, need_weight):
        if not (self._linear_ok(dense, x, weight) and need_alpha and not need_weight and grad.dtype == x.dtype):
            return super().superposed_backward(dense, grad, x, weight, bank, alpha, s, need_input, need_alpha, need_weight)
        return fused_alpha_backward(self, self.kernels, dense, grad, x, weight, bank, alpha, s, need_input)


def fused_alpha_backward(backend, kernels, dense, grad, x, weight, bank, alpha, s, need_input: bool):
    """The α-gradient of a superposed linear layer: v = (Gᵀx) ⊙ W from the weight-gradient GEMM's
    epilogue (Triton ``kernels``), then one pass over the bits with ``backend.mask_dot`` (Triton's
    or the CUDA lookup-table kernel; the reference's where v is not finite); dx through the dense
    path when asked."""
    g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    v = kernels.grad_weight(g2, x2, weight.contiguous(), None)
    dalpha = mask_dot_ieee(backend, bank, v).to(alpha.dtype)
    dx = grad.new_empty(0)
    if need_input:
        if s is None:
            s = backend.superpose(bank, alpha.to(weight.dtype), weight.shape[1])
        dx = dense.grad_input(grad, x, weight * s.view_as(weight))
    return dx, dalpha, grad.new_empty(0)
