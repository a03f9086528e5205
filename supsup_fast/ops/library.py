"""The op contract as ``torch.library`` custom ops in the ``supsup`` namespace.

Each op validates its arguments (in the real and in the fake implementation, so errors are the
same eagerly and under torch.compile), then hands the work to the backend chosen by
:mod:`supsup_fast.ops.registry`. Backward formulas call registered ops only, so a kernel backend
accelerates training and task inference without touching this file.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..bits import BITS_PER_WORD, num_words
from . import checks
from .reference import DenseConv2d, DenseLinear, ReferenceBackend, _bias_grad
from .registry import backend_for

_LINEAR = DenseLinear()
_REFERENCE = ReferenceBackend()


def _pick(device: torch.device, *sizes: int):
    """The backend for ``device``; the reference one when a size is zero (k = 0 tasks, q = 0
    queries, out = 0 rows, an empty batch), so that every backend returns the same empty or zero
    result (an empty sum is 0: superpose of k = 0 tasks is all zeros, a superposed layer over no
    task outputs its bias)."""
    backend = backend_for(device)  # a forced backend that cannot run here still says so
    return _REFERENCE if checks.degenerate(*sizes) else backend


def _finite(v: Tensor) -> bool:
    """Whether v is finite (True, unchecked, inside a CUDA-graph capture: the check is a host sync)."""
    return checks.capturing(v) or bool(torch.isfinite(v).all())


def _lead(bank: Tensor) -> int:
    return math.prod(bank.shape[1:-1])


def _dense(conv_params):
    return _LINEAR if conv_params is None else DenseConv2d(*conv_params)


# ---------------------------------------------------------------------------------------------
# bits
@torch.library.custom_op("supsup::pack_bits", mutates_args=())
def pack_bits_op(mask: Tensor) -> Tensor:
    return backend_for(mask.device).pack_bits(mask.contiguous())


@pack_bits_op.register_fake
def _(mask):
    return mask.new_empty(*mask.shape[:-1], num_words(mask.shape[-1]), dtype=torch.int32)


@torch.library.custom_op("supsup::unpack_bits", mutates_args=())
def unpack_bits_op(words: Tensor, n: int) -> Tensor:
    checks.words_tensor("words", words)
    return backend_for(words.device).unpack_bits(words.contiguous(), n)


@unpack_bits_op.register_fake
def _(words, n):
    checks.words_tensor("words", words)
    return words.new_empty(*words.shape[:-1], n, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# superpose / mask_dot (each the other's adjoint)
@torch.library.custom_op("supsup::superpose", mutates_args=())
def superpose_op(bank: Tensor, alpha: Tensor, n: int) -> Tensor:
    checks.check_superpose(bank, alpha, n)
    checks.check_no_nan_alpha(alpha)
    return _pick(bank.device, bank.shape[0], _lead(bank)).superpose(bank.contiguous(), alpha.contiguous(), n)


@superpose_op.register_fake
def _(bank, alpha, n):
    checks.check_superpose(bank, alpha, n)
    return alpha.new_empty(*bank.shape[1:-1], n)


@torch.library.custom_op("supsup::mask_dot", mutates_args=())
def mask_dot_op(bank: Tensor, v: Tensor) -> Tensor:
    checks.check_mask_dot(bank, v)
    backend = _pick(bank.device, bank.shape[0], _lead(bank))
    if backend is not _REFERENCE and not _finite(v):
        backend = _REFERENCE  # IEEE semantics everywhere: 0·inf = NaN, inf - inf = NaN, NaN propagates
    return backend.mask_dot(bank.contiguous(), v.contiguous())


@mask_dot_op.register_fake
def _(bank, v):
    checks.check_mask_dot(bank, v)
    return v.new_empty(bank.shape[0])


@torch.library.custom_op("supsup::mask_dot_batched", mutates_args=())
def mask_dot_batched_op(bank: Tensor, v: Tensor) -> Tensor:
    checks.check_mask_dot(bank, v, batched=True)
    backend = _pick(bank.device, bank.shape[0], v.shape[0], _lead(bank))
    if backend is not _REFERENCE and not _finite(v):
        backend = _REFERENCE
    return backend.mask_dot_batched(bank.contiguous(), v.contiguous())


@mask_dot_batched_op.register_fake
def _(bank, v):
    checks.check_mask_dot(bank, v, batched=True)
    return v.new_empty(v.shape[0], bank.shape[0])


def _superpose_setup(ctx, inputs, output):
    bank, alpha, n = inputs
    ctx.save_for_backward(bank)


def _superpose_backward(ctx, grad):
    (bank,) = ctx.saved_tensors
    return None, mask_dot_op(bank, grad.contiguous()), None


superpose_op.register_autograd(_superpose_backward, setup_context=_superpose_setup)


def _mask_dot_setup(ctx, inputs, output):
    bank, v = inputs
    ctx.save_for_backward(bank)
    ctx.n = v.shape[-1]


def _mask_dot_backward(ctx, grad):
    (bank,) = ctx.saved_tensors
    return None, superpose_op(bank, grad.contiguous(), ctx.n)


mask_dot_op.register_autograd(_mask_dot_backward, setup_context=_mask_dot_setup)


# ---------------------------------------------------------------------------------------------
# masked linear / conv (one packed mask)
@torch.library.custom_op("supsup::masked_linear", mutates_args=())
def masked_linear_op(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor]) -> Tensor:
    checks.check_masked(x, weight, mask_words, bias, conv=False)
    return _pick(x.device, x.numel(), weight.shape[0]).masked_forward(_LINEAR, x, weight.contiguous(), mask_words.contiguous(), bias)


@masked_linear_op.register_fake
def _(x, weight, mask_words, bias):
    checks.check_masked(x, weight, mask_words, bias, conv=False)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("supsup::masked_conv2d", mutates_args=())
def masked_conv2d_op(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor],
                     stride: List[int], padding: List[int], dilation: List[int], groups: int) -> Tensor:
    checks.check_masked(x, weight, mask_words, bias, conv=True)
    checks.check_conv_params(stride, padding, dilation, groups, x, weight)
    dense = DenseConv2d(stride, padding, dilation, groups)
    return _pick(x.device, x.numel(), weight.shape[0]).masked_forward(dense, x, weight.contiguous(), mask_words.contiguous(), bias)


def _conv_out_fake(x, weight, stride, padding, dilation):
    dims = []
    for i in range(2):
        size = x.shape[-2 + i]
        k = dilation[i] * (weight.shape[2 + i] - 1) + 1
        dims.append((size + 2 * padding[i] - k) // stride[i] + 1)
    return x.new_empty(*x.shape[:-3], weight.shape[0], *dims)


@masked_conv2d_op.register_fake
def _(x, weight, mask_words, bias, stride, padding, dilation, groups):
    checks.check_masked(x, weight, mask_words, bias, conv=True)
    checks.check_conv_params(stride, padding, dilation, groups, x, weight)
    return _conv_out_fake(x, weight, stride, padding, dilation)


@torch.library.custom_op("supsup::masked_backward", mutates_args=())
def masked_backward_op(grad: Tensor, x: Tensor, weight: Tensor, mask_words: Tensor,
                       conv_params: Optional[List[int]], need_input: bool, need_weight: bool) -> Tuple[Tensor, Tensor]:
    """Gradients of masked_linear (conv_params None) or masked_conv2d
    (conv_params = stride + padding + dilation + [groups]). Unrequested outputs are empty."""
    dense = _dense(_unflatten_conv(conv_params))
    return _pick(x.device, x.numel(), grad.numel(), weight.shape[0]).masked_backward(dense, grad.contiguous(), x, weight.contiguous(),
                                                 mask_words.contiguous(), need_input, need_weight)


@masked_backward_op.register_fake
def _(grad, x, weight, mask_words, conv_params, need_input, need_weight):
    return (torch.empty_like(x) if need_input else grad.new_empty(0),
            torch.empty_like(weight) if need_weight else grad.new_empty(0))


def _flatten_conv(stride, padding, dilation, groups) -> List[int]:
    return list(stride) + list(padding) + list(dilation) + [int(groups)]


def _unflatten_conv(p: Optional[List[int]]):
    if p is None:
        return None
    return p[0:2], p[2:4], p[4:6], p[6]


def _masked_setup(ctx, inputs, output):
    x, weight, mask_words, bias = inputs[:4]
    ctx.conv_params = _flatten_conv(*inputs[4:8]) if len(inputs) > 4 else None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, mask_words)


def _masked_backward(ctx, grad):
    x, weight, mask_words = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dw = masked_backward_op(grad, x, weight, mask_words, ctx.conv_params, need_x, need_w)
    db = _bias_grad(grad, ctx.conv_params is not None) if need_b else None
    rest = (None,) * 4 if ctx.conv_params is not None else ()
    return (dx if need_x else None, dw if need_w else None, None, db) + rest


masked_linear_op.register_autograd(_masked_backward, setup_context=_masked_setup)
masked_conv2d_op.register_autograd(_masked_backward, setup_context=_masked_setup)


# ---------------------------------------------------------------------------------------------
# superposed linear / conv: W ⊙ Σᵢ αᵢ Mᵢ
@torch.library.custom_op("supsup::superposed_linear", mutates_args=())
def superposed_linear_op(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, bias: Optional[Tensor]) -> Tensor:
    checks.check_superposed(x, weight, bank, alpha, bias, conv=False)
    checks.check_no_nan_alpha(alpha)
    return _pick(x.device, x.numel(), weight.shape[0], bank.shape[0]).superposed_forward(_LINEAR, x, weight.contiguous(), bank.contiguous(),
                                                    alpha.contiguous(), None, bias)


@superposed_linear_op.register_fake
def _(x, weight, bank, alpha, bias):
    checks.check_superposed(x, weight, bank, alpha, bias, conv=False)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("supsup::superposed_conv2d", mutates_args=())
def superposed_conv2d_op(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, bias: Optional[Tensor],
                         stride: List[int], padding: List[int], dilation: List[int], groups: int) -> Tensor:
    checks.check_superposed(x, weight, bank, alpha, bias, conv=True)
    checks.check_conv_params(stride, padding, dilation, groups, x, weight)
    checks.check_no_nan_alpha(alpha)
    dense = DenseConv2d(stride, padding, dilation, groups)
    return _pick(x.device, x.numel(), weight.shape[0], bank.shape[0]).superposed_forward(dense, x, weight.contiguous(), bank.contiguous(),
                                                    alpha.contiguous(), None, bias)


@superposed_conv2d_op.register_fake
def _(x, weight, bank, alpha, bias, stride, padding, dilation, groups):
    checks.check_superposed(x, weight, bank, alpha, bias, conv=True)
    checks.check_conv_params(stride, padding, dilation, groups, x, weight)
    return _conv_out_fake(x, weight, stride, padding, dilation)


@torch.library.custom_op("supsup::superposed_given_s", mutates_args=())
def superposed_given_s_op(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, s: Tensor,
                          bias: Optional[Tensor], conv_params: Optional[List[int]]) -> Tensor:
    """Superposed linear/conv whose superposition ``s`` = Σᵢ αᵢ Mᵢ (shaped like weight) the caller
    already has, e.g. the cached per-weight count of set bits / k for uniform α. The α-gradient
    still comes from the bank (one pass over the bits)."""
    checks.check_superposed(x, weight, bank, alpha, bias, conv=conv_params is not None)
    if tuple(s.shape) != tuple(weight.shape):
        raise ValueError(f"s must be shaped like weight {tuple(weight.shape)}, got {tuple(s.shape)}")
    checks.check_no_nan_alpha(alpha)  # the count-cache path validates α like every other path
    dense = _dense(_unflatten_conv(conv_params))
    return _pick(x.device, x.numel(), weight.shape[0], bank.shape[0]).superposed_forward(
        dense, x, weight.contiguous(), bank, alpha, s.contiguous(), bias)


@superposed_given_s_op.register_fake
def _(x, weight, bank, alpha, s, bias, conv_params):
    if conv_params is None:
        return x.new_empty(*x.shape[:-1], weight.shape[0])
    st, pad, dil, _ = _unflatten_conv(conv_params)
    return _conv_out_fake(x, weight, st, pad, dil)


@torch.library.custom_op("supsup::superposed_backward", mutates_args=())
def superposed_backward_op(grad: Tensor, x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor,
                           s: Optional[Tensor], conv_params: Optional[List[int]],
                           need_input: bool, need_alpha: bool, need_weight: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dense = _dense(_unflatten_conv(conv_params))
    return _pick(x.device, x.numel(), grad.numel(), weight.shape[0], bank.shape[0]).superposed_backward(
        dense, grad.contiguous(), x, weight.contiguous(), bank.contiguous(), alpha.contiguous(),
        None if s is None else s.contiguous(), need_input, need_alpha, need_weight)


@superposed_backward_op.register_fake
def _(grad, x, weight, bank, alpha, s, conv_params, need_input, need_alpha, need_weight):
    return (torch.empty_like(x) if need_input else grad.new_empty(0),
            alpha.new_empty(alpha.shape) if need_alpha else grad.new_empty(0),
            torch.empty_like(weight) if need_weight else grad.new_empty(0))


def _superposed_setup(ctx, inputs, output):
    x, weight, bank, alpha, bias = inputs[:5]
    ctx.conv_params = _flatten_conv(*inputs[5:9]) if len(inputs) > 5 else None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bank, alpha)
    ctx.has_s = False


def _given_s_setup(ctx, inputs, output):
    x, weight, bank, alpha, s, bias, conv_params = inputs
    ctx.conv_params = conv_params
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bank, alpha, s)
    ctx.has_s = True


def _superposed_backward(ctx, grad):
    saved = ctx.saved_tensors
    x, weight, bank, alpha = saved[:4]
    s = saved[4] if ctx.has_s else None
    need = ctx.needs_input_grad
    need_x, need_w, need_a = need[0], need[1], need[3]
    bias_idx = 5 if ctx.has_s else 4
    need_b = ctx.has_bias and need[bias_idx]
    dx, da, dw = superposed_backward_op(grad, x, weight, bank, alpha, s, ctx.conv_params, need_x, need_a, need_w)
    db = _bias_grad(grad, ctx.conv_params is not None) if need_b else None
    grads = [dx if need_x else None, dw if need_w else None, None, da if need_a else None]
    if ctx.has_s:
        return tuple(grads + [None, db, None])
    rest = [None] * 4 if ctx.conv_params is not None else []
    return tuple(grads + [db] + rest)


superposed_linear_op.register_autograd(_superposed_backward, setup_context=_superposed_setup)
superposed_conv2d_op.register_autograd(_superposed_backward, setup_context=_superposed_setup)
superposed_given_s_op.register_autograd(_superposed_backward, setup_context=_given_s_setup)


# ---------------------------------------------------------------------------------------------
# signed-constant weights as bits: W = scale · (2·sign − 1), two bits per weight with the mask
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


# (data_ptr, version) pairs of sign/mask words whose pad bits were found clear for n features:
# a layer's words are checked once, not on every small-batch forward (that would cost a sync).
_PAD_CHECKED: dict = {}


def _check_pad_bits(n: int, sign_words: Tensor, mask_words: Tensor) -> None:
    """Words built for more features than x has (70 vs 65: the same 3 words) have bits set past
    bit n; packed words hold zero pad bits. Catches x with too few features."""
    r = n % BITS_PER_WORD
    if r == 0 or mask_words.shape[0] == 0:
        return
    if checks.capturing(sign_words):
        return
    key = (sign_words.data_ptr(), sign_words._version, mask_words.data_ptr(), mask_words._version,
           tuple(mask_words.shape), n)
    if key in _PAD_CHECKED:
        return
    tail = (sign_words[:, -1] | mask_words[:, -1]) >> r
    if bool((tail != 0).any()):
        raise ValueError(f"sign_words/mask_words have bits set past bit {n}: they were built for more than "
                         f"the {n} features of x [*, {n}]; pass x with the words' in_features (in_features= names it)")
    if len(_PAD_CHECKED) > 1024:
        _PAD_CHECKED.clear()
    _PAD_CHECKED[key] = True


@torch.library.custom_op("supsup::signed_masked_linear", mutates_args=())
def signed_masked_linear_op(x: Tensor, sign_words: Tensor, mask_words: Tensor, scale: float,
                            bias: Optional[Tensor], in_features: Optional[int] = None) -> Tensor:
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
