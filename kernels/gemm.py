"""GEMMs with the mask unpacked in registers (never materialised in memory):

- ``masked_linear_kernel``: y = x (W ⊙ M)ᵀ + b. Each K-step loads BLOCK_K/32 mask words per output
  row (one word per 32 K-columns), expands them to a 0/1 tile in registers and feeds ``tl.dot``.
  With ``SIGNED`` the weight is not read at all: W = scale·(2·sign − 1) from a second bit plane
  (2 bits per weight, the signed-constant init).
- ``masked_linear_dx_kernel``: dx = g (W ⊙ M), the same bits read along the other axis.
- ``grad_weight_kernel``: V = (gᵀ x) ⊙ W [⊙ M] in the epilogue: with W it is the v of the α-gradient
  (⟨Mᵢ, V⟩) and the straight-through score gradient; with M it is the masked weight gradient.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton
import triton
import triton.language as tl

from .common import INTERPRET, dot_precision, expand_bits, upcast

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). On a GPU the autotuner times them per shape
# and skips those that need more shared memory than the card has (128×128 fp32 tiles on sm_90);
# the interpreter gets one large tile (its cost is per program and per K-step).
GPU_TILES = [(16, 64, 128, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3),
             (128, 64, 64, 4, 3), (128, 128, 64, 8, 3)]
INTERPRETER_TILE = (64, 128, 256, 4, 1)


def _configs(names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    tiles = [INTERPRETER_TILE] if INTERPRET else GPU_TILES
    return [triton.Config(dict(zip(names, t[:3])), num_warps=t[3], num_stages=t[4]) for t in tiles]


@triton.jit
def _unpack_tile(words_ptr, rows, W, k0, n_rows, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """0/1 int32 tile [BLOCK_R, BLOCK_K] of bits k0 .. k0+BLOCK_K (k0 a multiple of 32)."""
    offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(words_ptr + rows[:, None].to(tl.int64) * W + offs_w[None, :],
                    mask=(rows[:, None] < n_rows) & (offs_w[None, :] < W), other=0)
    return tl.reshape(expand_bits(words), (BLOCK_R, BLOCK_K))


@triton.autotune(configs=_configs(), key=["M", "N", "K"])
@triton.jit
def masked_linear_kernel(x_ptr, w_ptr, sign_ptr, words_ptr, bias_ptr, y_ptr, M, N, K, W, scale,
                         SIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [M, K], W [N, K] (or sign bits [N, W]), mask words [N, W] -> y [M, N]."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        bits = _unpack_tile(words_ptr, rn, W, k0, N, BLOCK_N, BLOCK_K)
        if SIGNED:
            signs = _unpack_tile(sign_ptr, rn, W, k0, N, BLOCK_N, BLOCK_K)
            w = tl.where(signs != 0, scale, -scale)
        else:
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        wm = tl.where((bits != 0) & (rk[None, :] < K), w, 0.0).to(x.dtype)
        acc += tl.dot(x, tl.trans(wm), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=_configs(), key=["M", "N", "K"])
@triton.jit
def masked_linear_dx_kernel(g_ptr, w_ptr, words_ptr, dx_ptr, M, N, K, W, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """g [M, N], W [N, K], mask words [N, W] -> dx [M, K]. Grid over (M, K) tiles; BLOCK_K % 32 == 0."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        bits = _unpack_tile(words_ptr, rn, W, k0, N, BLOCK_N, BLOCK_K)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        wm = tl.where(bits != 0, w, 0.0).to(g.dtype)
        acc += tl.dot(g, wm, input_precision=PRECISION)
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.autotune(configs=_configs(("BLOCK_N", "BLOCK_K", "BLOCK_M")), key=["M", "N", "K"])
@triton.jit
def grad_weight_kernel(g_ptr, x_ptr, w_ptr, words_ptr, out_ptr, M, N, K, W,
                       MUL_W: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N, K] = (gᵀ x) ⊙ W (if MUL_W) ⊙ M (if HAS_MASK), with g [M, N], x [M, K]."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        acc += tl.dot(tl.trans(g), x, input_precision=PRECISION)
    inside = (rn[:, None] < N) & (rk[None, :] < K)
    if MUL_W:
        acc *= tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_MASK:
        bits = _unpack_tile(words_ptr, rn, W, k0, N, BLOCK_N, BLOCK_K)
        acc = tl.where(bits != 0, acc, 0.0)
    tl.store(out_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)


# -- launchers (torch.library.triton_op, namespace supsup_triton) ------------------------------
@triton_op("supsup_triton::masked_linear", mutates_args={})
def masked_linear(x: Tensor, weight: Optional[Tensor], sign_words: Optional[Tensor], words: Tensor,
                  bias: Optional[Tensor], scale: float) -> Tensor:
    """x [M, K] (W ⊙ M)ᵀ + b; W given as a float tensor or (sign_words, scale)."""
    dtype = x.dtype
    x, weight, bias = upcast(x, weight, bias)
    m, k = x.shape
    n = words.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        wrap_triton(masked_linear_kernel)[grid](
            x, weight if weight is not None else words, sign_words if sign_words is not None else words, words,
            bias if bias is not None else x, y, m, n, k, words.shape[1], scale,
            SIGNED=weight is None, HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype))
    return y.to(dtype)


@triton_op("supsup_triton::masked_linear_dx", mutates_args={})
def masked_linear_dx(g: Tensor, weight: Tensor, words: Tensor) -> Tensor:
    """g [M, N] (W ⊙ M) -> [M, K]."""
    dtype = g.dtype
    g, weight = upcast(g, weight)
    m, n = g.shape
    k = weight.shape[1]
    dx = torch.empty(m, k, dtype=g.dtype, device=g.device)
    if m and k:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
        wrap_triton(masked_linear_dx_kernel)[grid](
            g, weight, words, dx, m, n, k, words.shape[1], PRECISION=dot_precision(g.dtype))
    return dx.to(dtype)


@triton_op("supsup_triton::grad_weight", mutates_args={})
def grad_weight(g: Tensor, x: Tensor, weight: Optional[Tensor], words: Optional[Tensor]) -> Tensor:
    """(gᵀ x) ⊙ W (if weight) ⊙ M (if words): [N, K], always fp32 (the α-gradient's v; callers cast)."""
    g, x, weight = upcast(g, x, weight)
    m, n = g.shape
    k = x.shape[1]
    out = torch.empty(n, k, dtype=torch.float32, device=x.device)
    if n and k:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
        wrap_triton(grad_weight_kernel)[grid](
            g, x, weight if weight is not None else x, words if words is not None else g, out, m, n, k,
            words.shape[1] if words is not None else 0,
            MUL_W=weight is not None, HAS_MASK=words is not None, PRECISION=dot_precision(x.dtype))
    return out
