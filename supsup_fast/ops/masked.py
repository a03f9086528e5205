"""One packed mask inside a linear or conv layer: y = x (W ⊙ M)ᵀ + b, and the threshold-masked
weight of the training step."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import checks
from .backends.reference import DenseConv2d, _bias_grad
from .registry import backend_for
from .dispatch import _conv_out_fake, _LINEAR, _dense, _flatten_conv, _pick, _unflatten_conv, eager_without_grad

IntPair = Union[int, Sequence[int]]


@torch.library.custom_op("supsup::masked_linear", mutates_args=())
def masked_linear_op(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _masked_linear(x, weight, mask_words, bias)


def _masked_linear(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor]) -> Tensor:
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


# -- the public function ----------------------------------------------------------------------
def masked_linear(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x (W ⊙ M)ᵀ + b with M unpacked from ``mask_words`` [out, ceil(in/32)]."""
    if eager_without_grad(x, weight, mask_words, bias):  # inference: the op's body, without the dispatcher
        return _masked_linear(x, weight, mask_words, bias)
    return masked_linear_op(x, weight, mask_words, bias)


def masked_conv2d(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor] = None,
                  stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1) -> Tensor:
    """conv2d with weight W ⊙ M; ``mask_words`` is [out, ceil(in/groups·kh·kw / 32)]."""
    return masked_conv2d_op(x, weight, mask_words, bias, checks.pair("stride", stride),
                            checks.pair("padding", padding), checks.pair("dilation", dilation), int(groups))


def threshold_masked_weight(scores: Tensor, weight: Tensor) -> Tensor:
    """W ⊙ 1[scores ≥ 0] in one pass on the active backend (no autograd: the layers wrap it in the
    straight-through estimator)."""
    if scores.shape != weight.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and weight {tuple(weight.shape)} must have the same shape")
    return backend_for(weight.device).threshold_masked_weight(scores.detach(), weight)
