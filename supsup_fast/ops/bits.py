"""Packing: bool masks to the canonical int32 words and back, and the words of the transposed masks."""
from __future__ import annotations


import torch
from torch import Tensor

from ..bits import num_words
from . import checks
from .dispatch import _pick, eager_without_grad
from .registry import backend_for


@torch.library.custom_op("supsup::pack_bits", mutates_args=())
def pack_bits_op(mask: Tensor) -> Tensor:
    _check_bool_mask(mask)
    return backend_for(mask.device).pack_bits(mask.contiguous())


@pack_bits_op.register_fake
def _(mask):
    _check_bool_mask(mask)
    return mask.new_empty(*mask.shape[:-1], num_words(mask.shape[-1]), dtype=torch.int32)


def _check_bool_mask(mask: Tensor) -> None:
    # the op itself takes only bool masks (the public pack_bits turns 0/1 numbers into one first)
    if mask.dtype != torch.bool or mask.dim() < 1 or mask.shape[-1] < 1:
        raise ValueError(f"mask must be a bool tensor [..., n] with n >= 1, got {mask.dtype} of shape {tuple(mask.shape)}")


@torch.library.custom_op("supsup::unpack_bits", mutates_args=())
def unpack_bits_op(words: Tensor, n: int) -> Tensor:
    checks.check_unpack_bits(words, n, min_n=0)
    return _pick(words.device, n).unpack_bits(words.contiguous(), n)  # n = 0: the reference's empty result


@unpack_bits_op.register_fake
def _(words, n):
    checks.check_unpack_bits(words, n, min_n=0)
    return words.new_empty(*words.shape[:-1], n, dtype=torch.bool)


@torch.library.custom_op("supsup::transpose_masks", mutates_args=())
def transpose_masks_op(words: Tensor, n: int) -> Tensor:
    checks.check_transpose_masks(words, n)
    return backend_for(words.device).transpose_masks(words.contiguous(), n)


@transpose_masks_op.register_fake
def _(words, n):
    checks.check_transpose_masks(words, n)
    return words.new_empty(*words.shape[:-2], n, num_words(words.shape[-2]))


# -- the public functions ---------------------------------------------------------------------
def pack_bits(mask: Tensor) -> Tensor:
    """bool[..., n] -> int32[..., ceil(n/32)] (LSB-first, zero pad bits)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() < 1 or mask.shape[-1] < 1:
        raise ValueError(f"mask must be [..., n] with n >= 1, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        # 0/1 numbers are taken as a mask; anything else (scores, NaN) is not one
        bad = ~((mask == 0) | (mask == 1))
        if bad.any():
            raise ValueError(f"mask must be bool or hold only 0 and 1, got a {mask.dtype} tensor holding "
                             f"{mask[bad].flatten()[0].item()!r} (for float scores, pack scores >= 0 or their top-k)")
        mask = mask != 0
    return pack_bits_op(mask)


def unpack_bits(words: Tensor, n: int) -> Tensor:
    """int32[..., W] -> bool[..., n]; W must equal ceil(n/32)."""
    checks.check_unpack_bits(words, n)
    return unpack_bits_op(words, n)


def transpose_masks(words: Tensor, n: int) -> Tensor:
    """The packed masks of the transposed weights: the words [*, R, ceil(n/32)] of masks M [*, R, n]
    -> the words [*, n, ceil(R/32)] of Mᵀ. With ``interleave_tasks``, the copy of a bank in which
    task inference reads a layer by its nonzero inputs instead of its live outputs."""
    checks.check_transpose_masks(words, n)
    if eager_without_grad(words):
        return backend_for(words.device).transpose_masks(words.contiguous(), n)
    return transpose_masks_op(words, n)
