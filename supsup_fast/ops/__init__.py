"""The public op contract (docs/design.md, Op contract). Every function here is a thin wrapper over a
``torch.ops.supsup.*`` custom op that normalises Python arguments (ints -> lists)."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import checks
from .library import (mask_dot_batched_op, mask_dot_op, masked_conv2d_op, masked_linear_op, pack_bits_op, superpose_op,
                      superposed_conv2d_op, superposed_given_s_op, superposed_linear_op, unpack_bits_op,
                      _flatten_conv)
from .library import signed_masked_linear_op
from .reference import ReferenceBackend
from .registry import available, backend_for, get_backend_name, register_backend, set_backend, use_backend

IntPair = Union[int, Sequence[int]]


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

__all__ = ["signed_masked_linear", "pack_bits", "unpack_bits", "masked_linear", "masked_conv2d", "superpose", "mask_dot", "mask_dot_batched",
           "superposed_linear", "superposed_conv2d", "superposed_with_s"]


def pack_bits(mask: Tensor) -> Tensor:
    """bool[..., n] -> int32[..., ceil(n/32)] (LSB-first, zero pad bits)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() < 1 or mask.shape[-1] < 1:
        raise ValueError(f"mask must be [..., n] with n >= 1, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() and torch.isnan(mask).any():
            raise ValueError("mask contains NaN; expected 0/1 values")
        mask = mask != 0
    return pack_bits_op(mask)


def unpack_bits(words: Tensor, n: int) -> Tensor:
    """int32[..., W] -> bool[..., n]; W must equal ceil(n/32)."""
    checks.words_tensor("words", words)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if words.dim() < 1 or words.shape[-1] != (n + 31) // 32:
        raise ValueError(f"words must have ceil(n/32) = {(n + 31) // 32} words in its last dimension "
                         f"for n = {n}, got shape {tuple(words.shape)}")
    return unpack_bits_op(words, n)


def masked_linear(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x (W ⊙ M)ᵀ + b with M unpacked from ``mask_words`` [out, ceil(in/32)]."""
    return masked_linear_op(x, weight, mask_words, bias)


def masked_conv2d(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor] = None,
                  stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1) -> Tensor:
    """conv2d with weight W ⊙ M; ``mask_words`` is [out, ceil(in/groups·kh·kw / 32)]."""
    return masked_conv2d_op(x, weight, mask_words, bias, checks.pair("stride", stride),
                            checks.pair("padding", padding), checks.pair("dilation", dilation), int(groups))


def superpose(bank: Tensor, alpha: Tensor, n: int) -> Tensor:
    """Σᵢ αᵢ Mᵢ: bank [k, *lead, W], alpha [k] -> float [*lead, n]."""
    return superpose_op(bank, alpha, n)


def mask_dot(bank: Tensor, v: Tensor) -> Tensor:
    """(⟨Mᵢ, v⟩)ᵢ: bank [k, *lead, W], v [*lead, n] -> float [k]."""
    return mask_dot_op(bank, v)


def mask_dot_batched(bank: Tensor, v: Tensor) -> Tensor:
    """(⟨Mᵢ, v_j⟩)ⱼᵢ for q vectors at once: bank [k, *lead, W], v [q, *lead, n] -> float [q, k].
    One pass over the bits for all q (batched task inference: q α-gradients)."""
    return mask_dot_batched_op(bank, v)


def superposed_linear(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x (W ⊙ Σᵢ αᵢ Mᵢ)ᵀ + b; differentiable in x, alpha, weight, bias."""
    return superposed_linear_op(x, weight, bank, alpha, bias)


def superposed_conv2d(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, bias: Optional[Tensor] = None,
                      stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1) -> Tensor:
    """conv2d with weight W ⊙ Σᵢ αᵢ Mᵢ; differentiable in x, alpha, weight, bias."""
    return superposed_conv2d_op(x, weight, bank, alpha, bias, checks.pair("stride", stride),
                                checks.pair("padding", padding), checks.pair("dilation", dilation), int(groups))


def superposed_with_s(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, s: Tensor,
                      bias: Optional[Tensor] = None, conv: Optional[dict] = None) -> Tensor:
    """Like ``superposed_linear``/``superposed_conv2d`` (``conv`` = their keyword arguments) when the
    caller already holds ``s`` = Σᵢ αᵢ Mᵢ shaped like ``weight`` (e.g. a cached count of set bits
    divided by k). The forward reads no mask bit; the α-gradient still reads each bit once."""
    if conv is None:
        checks.check_superposed(x, weight, bank, alpha, bias, conv=False)
        params = None
    else:
        checks.check_superposed(x, weight, bank, alpha, bias, conv=True)
        params = _flatten_conv(checks.pair("stride", conv.get("stride", 1)), checks.pair("padding", conv.get("padding", 0)),
                               checks.pair("dilation", conv.get("dilation", 1)), int(conv.get("groups", 1)))
    if tuple(s.shape) != tuple(weight.shape):
        raise ValueError(f"s must be shaped like weight {tuple(weight.shape)}, got {tuple(s.shape)}")
    return superposed_given_s_op(x, weight, bank, alpha, s.to(weight.dtype), bias, params)


def signed_masked_linear(x: Tensor, sign_words: Tensor, mask_words: Tensor, scale: float,
                         bias: Optional[Tensor] = None, in_features: Optional[int] = None) -> Tensor:
    """y = x (W ⊙ M)ᵀ + b for a signed-constant W = scale · (±1) given as sign bits
    (bit set = +scale): two bits per weight, for the small-batch forward of signed-constant layers.

    The words alone do not fix the feature count (65 and 70 features both take 3 words): x's last
    dimension must equal ``in_features`` when given, and set bits past x's features in the words
    (words built for a wider x) are refused."""
    if in_features is not None and (isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1):
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    return signed_masked_linear_op(x, sign_words, mask_words, float(scale), bias, in_features)


def threshold_masked_weight(scores: Tensor, weight: Tensor) -> Tensor:
    """W ⊙ 1[scores ≥ 0] in one pass on the active backend (no autograd: the layers wrap it in the
    straight-through estimator)."""
    if scores.shape != weight.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and weight {tuple(weight.shape)} must have the same shape")
    return backend_for(weight.device).threshold_masked_weight(scores.detach(), weight)
