"""Signed-constant weights as bits: W = scale · (2·sign − 1), two bits per weight with the mask."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from ..bits import BITS_PER_WORD, num_words, pad_bits_set
from . import checks
from .backends.reference import _bias_grad
from .bits import unpack_bits_op
from .masked import masked_backward_op
from .dispatch import _pick, direct_function, eager_without_grad, outside_autocast, under_autocast


def _check_signed(x, sign_words, mask_words, bias, in_features) -> None:
    _check_signed_shapes(x, sign_words, mask_words, bias, in_features)
    checks.same_device(x=x, sign_words=sign_words, mask_words=mask_words, bias=bias)


def _check_signed_shapes(x, sign_words, mask_words, bias, in_features) -> None:
    checks._floating("x", x)
    checks.words_tensor("sign_words", sign_words)
    checks.words_tensor("mask_words", mask_words)
    if x.dim() < 1:
        raise ValueError(f"x must be [*, in], got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if in_features is not None and n != in_features:
        raise ValueError(f"x must be [*, {in_features}] (in_features of the words), got shape {tuple(x.shape)}")
    if sign_words.shape != mask_words.shape or mask_words.dim() != 2 or mask_words.shape[1] != num_words(n):
        raise ValueError(f"sign_words and mask_words must both be [out, ceil(in/32)] for x [*, {n}], "
                         f"got {tuple(sign_words.shape)} and {tuple(mask_words.shape)}")
    if bias is not None:
        checks._floating("bias", bias)
        if tuple(bias.shape) != (mask_words.shape[0],):
            raise ValueError(f"bias must have shape [{mask_words.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:  # as masked_linear's bias and the weight (backends differed: one cast, one raised)
            raise TypeError(f"bias dtype {bias.dtype} must match x's dtype {x.dtype}")


# Sign/mask words whose pad bits were found clear for n features: a layer's words are checked once,
# not on every small-batch forward (that would cost a sync). Keyed by address and version, and held
# by weak references to the tensors that own the memory: a new tensor at a freed tensor's address
# (same data_ptr, version 0) is not the one that was checked, and is checked again.
_PAD_CHECKED: dict = {}


def _owner(t: Tensor) -> Tensor:
    return t if t._base is None else t._base  # a view (bank.words[i]) lives as long as its base


def _check_pad_bits(n: int, sign_words: Tensor, mask_words: Tensor) -> None:
    """Words built for more features than x has (70 vs 65: the same 3 words) have bits set past
    bit n; packed words hold zero pad bits. Catches x with too few features."""
    r = n % BITS_PER_WORD
    if r == 0 or mask_words.shape[0] == 0:
        return
    if checks.capturing(sign_words):
        return
    key = (sign_words.data_ptr(), checks.tensor_version(sign_words), mask_words.data_ptr(), checks.tensor_version(mask_words),
           tuple(mask_words.shape), n)
    owners = _PAD_CHECKED.get(key)
    if owners is not None and owners[0]() is _owner(sign_words) and owners[1]() is _owner(mask_words):
        return
    if pad_bits_set(sign_words[:, -1:] | mask_words[:, -1:], n):
        raise ValueError(f"sign_words/mask_words have bits set past bit {n}: they were built for more than "
                         f"the {n} features of x [*, {n}]; pass x with the words' in_features (in_features= names it)")
    if len(_PAD_CHECKED) > 1024:
        _PAD_CHECKED.clear()
    _PAD_CHECKED[key] = (weakref.ref(_owner(sign_words)), weakref.ref(_owner(mask_words)))


@torch.library.custom_op("supsup::signed_masked_linear", mutates_args=())
def signed_masked_linear_op(x: Tensor, sign_words: Tensor, mask_words: Tensor, scale: float,
                            bias: Optional[Tensor], in_features: Optional[int] = None) -> Tensor:
    return _signed_masked_linear(x, sign_words, mask_words, scale, bias, in_features)


def _signed_masked_linear(x: Tensor, sign_words: Tensor, mask_words: Tensor, scale: float,
                          bias: Optional[Tensor], in_features: Optional[int]) -> Tensor:
    _check_signed(x, sign_words, mask_words, bias, in_features)
    _check_pad_bits(x.shape[-1], sign_words, mask_words)
    return _pick(x.device, x.numel(), mask_words.shape[0]).signed_masked_linear(
        x.contiguous(), sign_words.contiguous(), mask_words.contiguous(), scale, bias)


@signed_masked_linear_op.register_fake
def _(x, sign_words, mask_words, scale, bias, in_features=None):
    _check_signed_shapes(x, sign_words, mask_words, bias, in_features)
    return x.new_empty(*x.shape[:-1], mask_words.shape[0])


def _signed_setup(ctx, inputs, output):
    x, sign_words, mask_words, scale, bias = inputs[:5]
    ctx.scale, ctx.has_bias = scale, bias is not None
    ctx.save_for_backward(x, sign_words, mask_words)


def _signed_backward(ctx, grad):
    x, sign_words, mask_words = ctx.saved_tensors
    weight = (unpack_bits_op(sign_words, x.shape[-1]).to(x.dtype) * 2 - 1) * ctx.scale
    dx, _ = masked_backward_op(grad, x, weight, mask_words, None, True, False)
    db = _bias_grad(grad, False) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return dx if ctx.needs_input_grad[0] else None, None, None, None, db, None


signed_masked_linear_op.register_autograd(_signed_backward, setup_context=_signed_setup)


# -- the public function ----------------------------------------------------------------------
def signed_masked_linear(x: Tensor, sign_words: Tensor, mask_words: Tensor, scale: float,
                         bias: Optional[Tensor] = None, in_features: Optional[int] = None) -> Tensor:
    """y = x (W ⊙ M)ᵀ + b for a signed-constant W = scale · (±1) given as sign bits
    (bit set = +scale): two bits per weight, for the small-batch forward of signed-constant layers.

    The words alone do not fix the feature count (65 and 70 features both take 3 words): x's last
    dimension must equal ``in_features`` when given, and set bits past x's features in the words
    (words built for a wider x) are refused."""
    if in_features is not None and (isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1):
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    direct = direct_function("direct_signed_masked_linear", x)
    if direct is not None and (in_features is None or in_features == x.shape[-1]):
        y = direct(x, sign_words, mask_words, scale, bias)  # the op refuses set padding bits too (no ATen op: no autocast)
        if y is not None:
            return y
    if under_autocast(x):  # an op of autocast's fp32 list (there is no weight tensor to take a dtype from)
        bias = bias.float() if isinstance(bias, torch.Tensor) and bias.is_floating_point() else bias
        return outside_autocast(signed_masked_linear, x, torch.float32, sign_words, mask_words, scale, bias, in_features)
    # Before the dispatcher: a meta operand beside real ones would reach the fake kernel and return
    # uninitialised memory (the other ops check the same).
    checks.same_device(x=x, sign_words=sign_words, mask_words=mask_words, bias=bias)
    if eager_without_grad(x, sign_words, mask_words, bias):  # inference: the op's body, without the dispatcher
        return _signed_masked_linear(x, sign_words, mask_words, float(scale), bias, in_features)
    return signed_masked_linear_op(x, sign_words, mask_words, float(scale), bias, in_features)
