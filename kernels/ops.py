"""Launchers, registered as ``torch.library.triton_op`` (namespace ``supsup_triton``) so
``torch.compile`` sees the kernels. The public ``supsup::*`` ops (fake impls, autograd) dispatch
to these through :class:`supsup_fast.ops.triton.TritonBackend`.

Under ``TRITON_INTERPRET=1`` the same launchers run on CPU tensors (tests): large tiles, one
autotune config, and fp16/bf16 computed in fp32 (the interpreter's low-precision ``tl.dot`` is wrong).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .bank import mask_dot_batched_kernel, mask_dot_kernel, superpose_kernel
from .bits import (compare_pack_kernel, masked_weight_kernel, pack_bits_kernel, signed_masked_weight_kernel,
                   threshold_masked_weight_kernel, unpack_bits_kernel)
from .gemm import grad_weight_kernel, masked_linear_dx_kernel, masked_linear_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _words(n: int) -> int:
    return (n + 31) // 32


def _precision(dtype: torch.dtype) -> str:
    """fp32 tl.dot runs as TF32 on the GPU unless told otherwise: follow torch's own matmul setting."""
    if INTERPRET or dtype != torch.float32:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _upcast(*ts):
    """In the interpreter compute low-precision inputs in fp32."""
    if not INTERPRET:
        return ts
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in ts)


# -- bits ------------------------------------------------------------------------------------
@triton_op("supsup_triton::pack_bits", mutates_args={})
def pack_bits(mask: Tensor) -> Tensor:
    """bool [R, n] -> int32 [R, W]."""
    rows, n = mask.shape
    out = torch.empty(rows, _words(n), dtype=torch.int32, device=mask.device)
    bw = 64 if INTERPRET else 32
    if rows and n:
        wrap_triton(pack_bits_kernel)[(rows, triton.cdiv(_words(n), bw))](mask.view(torch.uint8), out, n, _words(n), BLOCK_W=bw)
    return out


@triton_op("supsup_triton::compare_pack", mutates_args={})
def compare_pack(values: Tensor, threshold: float, absolute: bool) -> Tensor:
    """1[v >= threshold] (or |v|) packed: float [R, n] -> int32 [R, W]."""
    rows, n = values.shape
    out = torch.empty(rows, _words(n), dtype=torch.int32, device=values.device)
    bw = 64 if INTERPRET else 32
    if rows and n:
        wrap_triton(compare_pack_kernel)[(rows, triton.cdiv(_words(n), bw))](values, out, threshold, n, _words(n),
                                                                            ABS=absolute, BLOCK_W=bw)
    return out


@triton_op("supsup_triton::unpack_bits", mutates_args={})
def unpack_bits(words: Tensor, n: int) -> Tensor:
    """int32 [R, W] -> bool [R, n]."""
    rows = words.shape[0]
    out = torch.empty(rows, n, dtype=torch.uint8, device=words.device)
    bn = 2048 if INTERPRET else 1024
    if rows and n:
        wrap_triton(unpack_bits_kernel)[(rows, triton.cdiv(n, bn))](words, out, n, words.shape[1], BLOCK_N=bn)
    return out.view(torch.bool)


@triton_op("supsup_triton::masked_weight", mutates_args={})
def masked_weight(weight: Tensor, words: Tensor) -> Tensor:
    """W [R, n] ⊙ M -> [R, n] (W's dtype)."""
    rows, n = weight.shape
    out = torch.empty_like(weight)
    bn = 2048 if INTERPRET else 1024
    if rows and n:
        wrap_triton(masked_weight_kernel)[(rows, triton.cdiv(n, bn))](weight, words, out, n, words.shape[1], BLOCK_N=bn)
    return out


@triton_op("supsup_triton::signed_masked_weight", mutates_args={})
def signed_masked_weight(sign_words: Tensor, words: Tensor, scale: float, n: int, dtype: torch.dtype) -> Tensor:
    rows = words.shape[0]
    out = torch.empty(rows, n, dtype=dtype, device=words.device)
    bn = 2048 if INTERPRET else 1024
    if rows and n:
        wrap_triton(signed_masked_weight_kernel)[(rows, triton.cdiv(n, bn))](sign_words, words, out, scale, n,
                                                                            words.shape[1], BLOCK_N=bn)
    return out


@triton_op("supsup_triton::threshold_masked_weight", mutates_args={})
def threshold_masked_weight(scores: Tensor, weight: Tensor) -> Tensor:
    out = torch.empty_like(weight)
    numel = weight.numel()
    block = 4096 if INTERPRET else 1024
    if numel:
        wrap_triton(threshold_masked_weight_kernel)[(triton.cdiv(numel, block),)](scores, weight, out, numel, BLOCK=block)
    return out


# -- bank products ---------------------------------------------------------------------------
@triton_op("supsup_triton::superpose", mutates_args={})
def superpose(bank: Tensor, alpha: Tensor, active: Optional[Tensor]) -> Tensor:
    """bank [k_all, L] int32, alpha [k] -> float [32·L] (alpha's dtype); ``active`` [k] rows of bank."""
    L = bank.shape[1]
    k = alpha.shape[0]
    out = torch.empty(L * 32, dtype=alpha.dtype, device=bank.device)
    bk, bl = (32, 256) if INTERPRET else (8, 32)
    if L:
        wrap_triton(superpose_kernel)[(triton.cdiv(L, bl),)](
            bank, alpha, active if active is not None else bank, out, k, L,
            HAS_ACTIVE=active is not None, BLOCK_K=bk, BLOCK_L=bl)
    return out


@triton_op("supsup_triton::mask_dot", mutates_args={})
def mask_dot(bank: Tensor, v: Tensor, active: Optional[Tensor]) -> Tensor:
    """bank [k_all, L], v [32·L] -> float32 [k] (two-stage: partials per word block, then a fixed-order sum)."""
    L = bank.shape[1]
    k = active.shape[0] if active is not None else bank.shape[0]
    bk, bl = (64, 128) if INTERPRET else (16, 32)
    blocks = triton.cdiv(L, bl)
    partial = torch.empty(max(blocks, 1), k, dtype=torch.float32, device=bank.device)
    if L == 0 or k == 0:
        return torch.zeros(k, dtype=torch.float32, device=bank.device)
    wrap_triton(mask_dot_kernel)[(blocks, triton.cdiv(k, bk))](
        bank, v, active if active is not None else bank, partial, k, L,
        HAS_ACTIVE=active is not None, BLOCK_K=bk, BLOCK_L=bl)
    return partial.sum(0)


@triton_op("supsup_triton::mask_dot_batched", mutates_args={})
def mask_dot_batched(bank: Tensor, v: Tensor, active: Optional[Tensor]) -> Tensor:
    """bank [k_all, L], v [q, 32·L] -> float32 [q, k]: q α-gradients in one pass over the bits."""
    L = bank.shape[1]
    q = v.shape[0]
    k = active.shape[0] if active is not None else bank.shape[0]
    if L == 0 or k == 0 or q == 0:
        return torch.zeros(q, k, dtype=torch.float32, device=bank.device)
    bk, bq, blw = (64, 16, 64) if INTERPRET else (64, 64, 2)
    splits = 1 if INTERPRET else max(1, min(triton.cdiv(L, 64 * blw), 132 // max(1, triton.cdiv(k, bk) * triton.cdiv(q, bq))))
    per = triton.cdiv(triton.cdiv(L, splits), blw) * blw
    splits = triton.cdiv(L, per)
    partial = torch.empty(splits, k, q, dtype=torch.float32, device=bank.device)
    wrap_triton(mask_dot_batched_kernel)[(splits, triton.cdiv(k, bk), triton.cdiv(q, bq))](
        bank, v, active if active is not None else bank, partial, k, L, q, per,
        HAS_ACTIVE=active is not None, SPLIT3=not INTERPRET, BLOCK_K=bk, BLOCK_Q=bq, BLOCK_LW=blw)
    return partial.sum(0).t().contiguous()


# -- GEMMs -----------------------------------------------------------------------------------
@triton_op("supsup_triton::masked_linear", mutates_args={})
def masked_linear(x: Tensor, weight: Optional[Tensor], sign_words: Optional[Tensor], words: Tensor,
                  bias: Optional[Tensor], scale: float) -> Tensor:
    """x [M, K] (W ⊙ M)ᵀ + b; W given as a float tensor or (sign_words, scale)."""
    dtype = x.dtype
    x, weight, bias = _upcast(x, weight, bias)
    m, k = x.shape
    n = words.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        wrap_triton(masked_linear_kernel)[grid](
            x, weight if weight is not None else words, sign_words if sign_words is not None else words, words,
            bias if bias is not None else x, y, m, n, k, words.shape[1], scale,
            SIGNED=weight is None, HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype))
    return y.to(dtype)


@triton_op("supsup_triton::masked_linear_dx", mutates_args={})
def masked_linear_dx(g: Tensor, weight: Tensor, words: Tensor) -> Tensor:
    """g [M, N] (W ⊙ M) -> [M, K]."""
    dtype = g.dtype
    g, weight = _upcast(g, weight)
    m, n = g.shape
    k = weight.shape[1]
    dx = torch.empty(m, k, dtype=g.dtype, device=g.device)
    if m and k:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
        wrap_triton(masked_linear_dx_kernel)[grid](
            g, weight, words, dx, m, n, k, words.shape[1], PRECISION=_precision(g.dtype))
    return dx.to(dtype)


@triton_op("supsup_triton::grad_weight", mutates_args={})
def grad_weight(g: Tensor, x: Tensor, weight: Optional[Tensor], words: Optional[Tensor]) -> Tensor:
    """(gᵀ x) ⊙ W (if weight) ⊙ M (if words): [N, K], always fp32 (the α-gradient's v; callers cast)."""
    g, x, weight = _upcast(g, x, weight)
    m, n = g.shape
    k = x.shape[1]
    out = torch.empty(n, k, dtype=torch.float32, device=x.device)
    if n and k:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
        wrap_triton(grad_weight_kernel)[grid](
            g, x, weight if weight is not None else x, words if words is not None else g, out, m, n, k,
            words.shape[1] if words is not None else 0,
            MUL_W=weight is not None, HAS_MASK=words is not None, PRECISION=_precision(x.dtype))
    return out


KERNELS: List = [pack_bits_kernel, compare_pack_kernel, unpack_bits_kernel, masked_weight_kernel,
                 signed_masked_weight_kernel, threshold_masked_weight_kernel, superpose_kernel, mask_dot_kernel,
                 mask_dot_batched_kernel, masked_linear_kernel, masked_linear_dx_kernel, grad_weight_kernel]
