"""Elementwise bit kernels over the canonical layout (row-major ``[rows, n]`` bits packed
LSB-first into ``[rows, W]`` int32 words, W = ceil(n/32)): pack, unpack, masked-weight
materialisation (float or signed-constant sign bits) and the training-time compare-and-pack."""
import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton
import triton
import triton.language as tl

from .common import INTERPRET, bit_at, num_words, row_and_block


@triton.jit
def pack_bits_kernel(mask_ptr, words_ptr, n, W, num_blocks, BLOCK_W: tl.constexpr):
    """words[r, w] = Σ_b mask[r, 32w + b] << b. Grid: (rows · num_blocks,), num_blocks = cdiv(W, BLOCK_W)."""
    r, blk = row_and_block(num_blocks)
    offs_w = blk * BLOCK_W + tl.arange(0, BLOCK_W)
    shifts = tl.arange(0, 32)
    j = offs_w[:, None] * 32 + shifts[None, :]
    bits = tl.load(mask_ptr + r * n + j, mask=j < n, other=0).to(tl.int32)
    words = tl.sum(bits << shifts[None, :], axis=1)
    tl.store(words_ptr + r * W + offs_w, words, mask=offs_w < W)


@triton.jit
def compare_pack_kernel(values_ptr, words_ptr, threshold, n, W, num_blocks, ABS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Pack 1[v >= threshold] (or 1[|v| >= threshold]) straight from float scores: the mask of a
    trained task goes to bits without a bool tensor in between. Grid as pack_bits_kernel's."""
    r, blk = row_and_block(num_blocks)
    offs_w = blk * BLOCK_W + tl.arange(0, BLOCK_W)
    shifts = tl.arange(0, 32)
    j = offs_w[:, None] * 32 + shifts[None, :]
    v = tl.load(values_ptr + r * n + j, mask=j < n, other=0.0)
    if ABS:
        v = tl.abs(v)
    bits = ((v >= threshold) & (j < n)).to(tl.int32)
    tl.store(words_ptr + r * W + offs_w, tl.sum(bits << shifts[None, :], axis=1), mask=offs_w < W)


@triton.jit
def unpack_bits_kernel(words_ptr, out_ptr, n, W, num_blocks, BLOCK_N: tl.constexpr):
    """out[r, j] = bit j of row r (uint8 0/1). Grid: (rows · num_blocks,), num_blocks = cdiv(n, BLOCK_N)."""
    r, blk = row_and_block(num_blocks)
    j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    word = tl.load(words_ptr + r * W + j // 32, mask=j < n, other=0)
    tl.store(out_ptr + r * n + j, bit_at(word, j).to(tl.uint8), mask=j < n)


@triton.jit
def masked_weight_kernel(w_ptr, words_ptr, out_ptr, n, W, num_blocks, BLOCK_N: tl.constexpr):
    """out = W ⊙ M, row by row (any float dtype). Grid as unpack_bits_kernel's."""
    r, blk = row_and_block(num_blocks)
    j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = j < n
    word = tl.load(words_ptr + r * W + j // 32, mask=inside, other=0)
    w = tl.load(w_ptr + r * n + j, mask=inside, other=0.0)
    tl.store(out_ptr + r * n + j, tl.where(bit_at(word, j) != 0, w, 0.0), mask=inside)


@triton.jit
def signed_masked_weight_kernel(sign_ptr, words_ptr, out_ptr, scale, n, W, num_blocks, BLOCK_N: tl.constexpr):
    """out = scale · (2·sign − 1) ⊙ M from two bit planes (2 bits read per weight). Grid as unpack_bits_kernel's."""
    r, blk = row_and_block(num_blocks)
    j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = j < n
    sw = tl.load(sign_ptr + r * W + j // 32, mask=inside, other=0)
    mw = tl.load(words_ptr + r * W + j // 32, mask=inside, other=0)
    shift = j % 32
    val = tl.where(((sw >> shift) & 1) != 0, scale, -scale)
    val = tl.where(((mw >> shift) & 1) != 0, val, 0.0)
    tl.store(out_ptr + r * n + j, val.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def threshold_masked_weight_kernel(s_ptr, w_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """out = W ⊙ 1[s ≥ 0] (the training-time threshold supermask, one pass)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < numel
    s = tl.load(s_ptr + i, mask=inside, other=-1.0)
    w = tl.load(w_ptr + i, mask=inside, other=0.0)
    tl.store(out_ptr + i, tl.where(s >= 0, w, 0.0), mask=inside)


# -- launchers (torch.library.triton_op, namespace supsup_triton) ------------------------------
@triton_op("supsup_triton::pack_bits", mutates_args={})
def pack_bits(mask: Tensor) -> Tensor:
    """bool [R, n] -> int32 [R, W]."""
    rows, n = mask.shape
    out = torch.empty(rows, num_words(n), dtype=torch.int32, device=mask.device)
    bw = 64 if INTERPRET else 32
    if rows and n:
        nb = triton.cdiv(num_words(n), bw)
        wrap_triton(pack_bits_kernel)[(rows * nb,)](mask.view(torch.uint8), out, n, num_words(n), nb, BLOCK_W=bw)
    return out


@triton_op("supsup_triton::compare_pack", mutates_args={})
def compare_pack(values: Tensor, threshold: float, absolute: bool) -> Tensor:
    """1[v >= threshold] (or |v|) packed: float [R, n] -> int32 [R, W]."""
    rows, n = values.shape
    out = torch.empty(rows, num_words(n), dtype=torch.int32, device=values.device)
    bw = 64 if INTERPRET else 32
    if rows and n:
        nb = triton.cdiv(num_words(n), bw)
        wrap_triton(compare_pack_kernel)[(rows * nb,)](values, out, threshold, n, num_words(n), nb, ABS=absolute, BLOCK_W=bw)
    return out


@triton_op("supsup_triton::unpack_bits", mutates_args={})
def unpack_bits(words: Tensor, n: int) -> Tensor:
    """int32 [R, W] -> bool [R, n]."""
    rows = words.shape[0]
    out = torch.empty(rows, n, dtype=torch.uint8, device=words.device)
    bn = 2048 if INTERPRET else 1024
    if rows and n:
        nb = triton.cdiv(n, bn)
        wrap_triton(unpack_bits_kernel)[(rows * nb,)](words, out, n, words.shape[1], nb, BLOCK_N=bn)
    return out.view(torch.bool)


@triton_op("supsup_triton::masked_weight", mutates_args={})
def masked_weight(weight: Tensor, words: Tensor) -> Tensor:
    """W [R, n] ⊙ M -> [R, n] (W's dtype)."""
    rows, n = weight.shape
    out = torch.empty_like(weight)
    bn = 2048 if INTERPRET else 1024
    if rows and n:
        nb = triton.cdiv(n, bn)
        wrap_triton(masked_weight_kernel)[(rows * nb,)](weight, words, out, n, words.shape[1], nb, BLOCK_N=bn)
    return out


@triton_op("supsup_triton::signed_masked_weight", mutates_args={})
def signed_masked_weight(sign_words: Tensor, words: Tensor, scale: float, n: int, dtype: torch.dtype) -> Tensor:
    rows = words.shape[0]
    out = torch.empty(rows, n, dtype=dtype, device=words.device)
    bn = 2048 if INTERPRET else 1024
    if rows and n:
        nb = triton.cdiv(n, bn)
        wrap_triton(signed_masked_weight_kernel)[(rows * nb,)](sign_words, words, out, scale, n, words.shape[1], nb,
                                                               BLOCK_N=bn)
    return out


@triton_op("supsup_triton::threshold_masked_weight", mutates_args={})
def threshold_masked_weight(scores: Tensor, weight: Tensor) -> Tensor:
    out = torch.empty_like(weight)
    numel = weight.numel()
    block = 4096 if INTERPRET else 1024
    if numel:
        wrap_triton(threshold_masked_weight_kernel)[(triton.cdiv(numel, block),)](scores, weight, out, numel, BLOCK=block)
    return out
