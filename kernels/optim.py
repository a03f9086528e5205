"""The fused straight-through optimiser steps of a threshold supermask layer: one pass that turns the
weight gradient into the score gradient (dL/dW_eff ⊙ W), applies torch.optim.RMSprop's rule (no
momentum, not centred) or torch.optim.Adam's (no amsgrad) to the scores, and writes the next step's
masked weight W ⊙ 1[s ≥ 0]."""
import math
import struct

from torch import Tensor
from torch.library import triton_op, wrap_triton
import triton
import triton.language as tl

from .common import INTERPRET


@triton.jit
def _score_gradient(p_ptr, dw_ptr, w_ptr, i, inside, wd):
    """The scores p, the weight w and the straight-through score gradient g = dW ⊙ w (+ wd·p) at i."""
    p = tl.load(p_ptr + i, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + i, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(dw_ptr + i, mask=inside, other=0.0).to(tl.float32) * w
    if wd != 0:
        g = g + wd * p
    return p, w, g


@triton.jit
def ste_rmsprop_kernel(p_ptr, dw_ptr, w_ptr, sq_ptr, out_ptr, numel, lr, alpha, one_minus_alpha, eps, wd,
                       BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < numel
    p, w, g = _score_gradient(p_ptr, dw_ptr, w_ptr, i, inside, wd)
    sq = tl.load(sq_ptr + i, mask=inside, other=0.0).to(tl.float32) * alpha + one_minus_alpha * g * g
    # IEEE-rounded sqrt and division (Triton's defaults are approximate on NVIDIA), as torch computes them
    p = p + tl.div_rn(-lr * g, tl.sqrt_rn(sq) + eps)
    tl.store(sq_ptr + i, sq, mask=inside)
    tl.store(p_ptr + i, p, mask=inside)
    tl.store(out_ptr + i, tl.where(p >= 0, w, 0.0), mask=inside)


@triton_op("supsup_triton::ste_rmsprop_step_", mutates_args={"param", "square_avg", "masked_weight"})
def ste_rmsprop_step_(param: Tensor, weight_grad: Tensor, weight: Tensor, square_avg: Tensor, masked_weight: Tensor,
                      lr: float, alpha: float, eps: float, weight_decay: float) -> None:
    numel = param.numel()
    block = 4096 if INTERPRET else 1024
    if numel:
        wrap_triton(ste_rmsprop_kernel)[(triton.cdiv(numel, block),)](param, weight_grad, weight, square_avg, masked_weight,
                                                                      numel, lr, alpha, 1 - alpha, eps, weight_decay,
                                                                      BLOCK=block)


@triton.jit
def ste_adam_kernel(p_ptr, dw_ptr, w_ptr, m_ptr, v_ptr, out_ptr, numel, m_coef, beta2, one_minus_beta2,
                    step_size, bc2_sqrt, eps, wd, BLOCK: tl.constexpr, M_FROM_G: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < numel
    p, w, g = _score_gradient(p_ptr, dw_ptr, w_ptr, i, inside, wd)
    m = tl.load(m_ptr + i, mask=inside, other=0.0).to(tl.float32)
    # torch's lerp(m, g, w = 1 - beta1): m + w (g - m) for w < 0.5, else g + (w - 1)(g - m) (adam_m_coef)
    m = (g if M_FROM_G else m) + m_coef * (g - m)
    v = tl.load(v_ptr + i, mask=inside, other=0.0).to(tl.float32) * beta2 + one_minus_beta2 * g * g
    p = p + tl.div_rn(-step_size * m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
    tl.store(m_ptr + i, m, mask=inside)
    tl.store(v_ptr + i, v, mask=inside)
    tl.store(p_ptr + i, p, mask=inside)
    tl.store(out_ptr + i, tl.where(p >= 0, w, 0.0), mask=inside)


@triton_op("supsup_triton::ste_adam_step_", mutates_args={"param", "exp_avg", "exp_avg_sq", "masked_weight"})
def ste_adam_step_(param: Tensor, weight_grad: Tensor, weight: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                   masked_weight: Tensor, step: int, lr: float, beta1: float, beta2: float, eps: float,
                   weight_decay: float) -> None:
    numel = param.numel()
    block = 4096 if INTERPRET else 1024
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    m_coef, m_from_g = adam_m_coef(beta1)
    if numel:
        wrap_triton(ste_adam_kernel)[(triton.cdiv(numel, block),)](param, weight_grad, weight, exp_avg, exp_avg_sq,
                                                                   masked_weight, numel, m_coef, beta2, 1 - beta2, step_size,
                                                                   bc2_sqrt, eps, weight_decay, BLOCK=block, M_FROM_G=m_from_g)


def adam_m_coef(beta1: float) -> tuple:
    """(coefficient, from g) of Adam's exp_avg update as torch's lerp(m, g, w = 1 - beta1) makes it
    (w and w - 1 rounded to fp32 as there): m + w (g - m) for |w| < 0.5, else g + (w - 1)(g - m)."""
    w = struct.unpack("f", struct.pack("f", 1 - beta1))[0]
    return (w, False) if abs(w) < 0.5 else (w - 1.0, True)  # w - 1 is exact in fp32 for w in [0.5, 1]
