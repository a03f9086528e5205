"""Canonical bit layout: a mask [..., n] packed LSB-first along n into int32 words [..., ceil(n/32)].

Bit j of a row is ``(words[..., j // 32] >> (j % 32)) & 1``; pad bits are zero. These pure-torch
helpers are the oracle; ``supsup_fast.pack_bits`` dispatches to the active backend.
"""
from __future__ import annotations

import torch

BITS_PER_WORD = 32


def num_words(n: int) -> int:
    """Number of int32 words holding ``n`` bits."""
    return (int(n) + BITS_PER_WORD - 1) // BITS_PER_WORD


def pad_bits_set(words: torch.Tensor, n: int) -> bool:
    """Whether a row of ``words`` [..., ceil(n/32)] has a bit set past bit n (its padding must be zero)."""
    r = n % BITS_PER_WORD
    return r != 0 and words.numel() > 0 and bool(((words[..., -1] >> r) != 0).any())


def _bit_weights(device: torch.device) -> torch.Tensor:
    # 1, 2, 4, ..., 2**30, -2**31: the int32 value of each single set bit (two's complement).
    w = [1 << j for j in range(31)] + [-(1 << 31)]
    return torch.tensor(w, dtype=torch.int32, device=device)


def pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:
    """bool/0-1 tensor [..., n] -> int32 [..., ceil(n/32)], canonical layout."""
    n = mask.shape[-1]
    w = num_words(n)
    bits = (mask != 0).to(torch.int32)
    pad = w * BITS_PER_WORD - n
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*mask.shape[:-1], w, BITS_PER_WORD)
    # Distinct powers of two never carry, so the int32 sum is exact (the sign bit included).
    return (bits * _bit_weights(mask.device)).sum(-1, dtype=torch.int32)


def unpack_bits_torch(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [..., W] -> bool [..., n]."""
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * BITS_PER_WORD)[..., :n].bool()


def unpack_bits_float(words: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """int32 [..., W] -> {0, 1} tensor [..., n] of ``dtype`` (a transient, never stored)."""
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * BITS_PER_WORD)[..., :n].to(dtype)
