"""What every kernel module shares: the interpreter switch, the one bit-expansion helper, and the
launchers' dtype rules."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def expand_bits(words):
    """[R, L] int32 words -> [R, L, 32] of their bits (0/1 int32), LSB first: the canonical layout."""
    shifts = tl.arange(0, 32)
    return (words[:, :, None] >> shifts[None, None, :]) & 1


@triton.jit
def bit_at(word, j):
    """Bit j % 32 of ``word`` (0/1), for kernels that handle one bit per lane."""
    return (word >> (j % 32)) & 1


@triton.jit
def row_and_block(num_blocks):
    """(row, block) of a program in a 1-D grid over rows × ``num_blocks`` blocks. One axis: CUDA
    allows 2^31 - 1 programs on axis 0 but only 65,535 on axes 1 and 2, which one long row of blocks
    (a flattened model's mask) or many rows would pass."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // num_blocks, (pid % num_blocks).to(tl.int32)


def num_words(n: int) -> int:
    return (n + 31) // 32


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 tl.dot runs as TF32 on the GPU unless told otherwise: follow torch's own matmul setting."""
    if INTERPRET or dtype != torch.float32:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def upcast(*ts):
    """In the interpreter compute low-precision inputs in fp32 (its low-precision tl.dot is wrong)."""
    if not INTERPRET:
        return ts
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in ts)
