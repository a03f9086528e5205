"""Kernels over a bank of k packed masks, task-major ``[k, L]`` words (L = words per task):

- ``superpose``: S = Σᵢ αᵢ Mᵢ, each program owns a block of words and walks the tasks in a fixed
  order (deterministic, no atomics);
- ``mask_dot``: (⟨Mᵢ, v⟩)ᵢ, each program owns a block of tasks × a block of words and writes a
  partial sum; the partials are reduced in a fixed order on the host side (two-stage, deterministic);
- ``mask_dot_batched``: the same for q vectors at once, (⟨Mᵢ, v_j⟩)ᵢⱼ, as a bit-matrix × dense
  matrix product on tensor cores (0/1 is exact in bf16; v is split into three bf16 parts so the
  product keeps fp32 accuracy).

Every bit is read once per call. ``active`` (optional) lists the bank rows to use.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton
import triton
import triton.language as tl

from .common import INTERPRET, expand_bits


@triton.jit
def superpose_kernel(bank_ptr, alpha_ptr, active_ptr, out_ptr, k, L,
                     HAS_ACTIVE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[32·l + b] = Σᵢ αᵢ · bit b of word l of task i. Grid: (cdiv(L, BLOCK_L),)."""
    offs_l = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)  # int64: 32·l passes 2^31 at L = 2^26
    shifts = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_L, 32), dtype=tl.float32)
    for i0 in range(0, k, BLOCK_K):
        rows = i0 + tl.arange(0, BLOCK_K)
        valid = rows < k
        if HAS_ACTIVE:
            task = tl.load(active_ptr + rows, mask=valid, other=0).to(tl.int64)
        else:
            task = rows.to(tl.int64)
        a = tl.load(alpha_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        words = tl.load(bank_ptr + task[:, None] * L + offs_l[None, :],
                        mask=valid[:, None] & (offs_l[None, :] < L), other=0)
        bits = expand_bits(words).to(tl.float32)
        acc += tl.sum(a[:, None, None] * bits, axis=0)
    out = offs_l[:, None] * 32 + shifts[None, :]
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=offs_l[:, None] < L)


@triton.jit
def mask_dot_kernel(bank_ptr, v_ptr, active_ptr, partial_ptr, k, L,
                    HAS_ACTIVE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """partial[pid_l, i] = Σ over this program's words of ⟨bits of task i, v⟩.
    Grid: (cdiv(L, BLOCK_L), cdiv(k, BLOCK_K)); v is padded to 32·L entries."""
    pid_l = tl.program_id(0).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    rows = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid = rows < k
    shifts = tl.arange(0, 32)
    in_l = offs_l < L
    v = tl.load(v_ptr + offs_l[:, None] * 32 + shifts[None, :], mask=in_l[:, None], other=0.0).to(tl.float32)
    if HAS_ACTIVE:
        task = tl.load(active_ptr + rows, mask=valid, other=0).to(tl.int64)
    else:
        task = rows.to(tl.int64)
    words = tl.load(bank_ptr + task[:, None] * L + offs_l[None, :], mask=valid[:, None] & in_l[None, :], other=0)
    bits = expand_bits(words).to(tl.float32)
    dots = tl.sum(tl.sum(bits * v[None, :, :], axis=2), axis=1)
    tl.store(partial_ptr + pid_l * k + rows, dots, mask=valid)


@triton.jit
def mask_dot_batched_kernel(bank_ptr, v_ptr, active_ptr, partial_ptr, k, L, q, words_per_split,
                            HAS_ACTIVE: tl.constexpr, SPLIT3: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_Q: tl.constexpr, BLOCK_LW: tl.constexpr):
    """partial[s, i, j] = Σ over split s of the words of ⟨bits of task i, v_j⟩, with v [q, 32·L].
    Grid: (splits, cdiv(k, BLOCK_K), cdiv(q, BLOCK_Q)). Each step decodes BLOCK_K × 32·BLOCK_LW
    bits into a 0/1 tile and multiplies it with a (32·BLOCK_LW) × BLOCK_Q tile of v on tensor cores."""
    pid_s = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid, in_q = rows < k, cols < q
    if HAS_ACTIVE:
        task = tl.load(active_ptr + rows, mask=valid, other=0).to(tl.int64)
    else:
        task = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_Q), dtype=tl.float32)
    l_begin = pid_s * words_per_split
    for l0 in range(l_begin, l_begin + words_per_split, BLOCK_LW):
        offs_l = l0 + tl.arange(0, BLOCK_LW)
        in_l = (offs_l < L) & (offs_l < l_begin + words_per_split)
        words = tl.load(bank_ptr + task[:, None] * L + offs_l[None, :], mask=valid[:, None] & in_l[None, :], other=0)
        bits = tl.reshape(expand_bits(words), (BLOCK_K, BLOCK_LW * 32))
        word_of_j = l0 + tl.arange(0, BLOCK_LW * 32) // 32
        in_j = (word_of_j < L) & (word_of_j < l_begin + words_per_split)
        j = word_of_j.to(tl.int64) * 32 + tl.arange(0, BLOCK_LW * 32) % 32  # int64, as the row offset below
        vt = tl.load(v_ptr + cols[None, :].to(tl.int64) * L * 32 + j[:, None],
                     mask=in_j[:, None] & in_q[None, :], other=0.0).to(tl.float32)
        if SPLIT3:
            b = bits.to(tl.bfloat16)
            hi = vt.to(tl.bfloat16)
            r1 = vt - hi.to(tl.float32)
            mid = r1.to(tl.bfloat16)
            lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
            acc += tl.dot(b, hi)
            acc += tl.dot(b, mid)
            acc += tl.dot(b, lo)
        else:
            acc += tl.dot(bits.to(tl.float32), vt, input_precision="ieee")
    out = partial_ptr + pid_s.to(tl.int64) * k * q + rows[:, None].to(tl.int64) * q + cols[None, :]
    tl.store(out, acc, mask=valid[:, None] & in_q[None, :])


# -- launchers (torch.library.triton_op, namespace supsup_triton) ------------------------------
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
