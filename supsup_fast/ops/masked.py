"""One packed mask inside a linear or conv layer: y = x (W ⊙ M)ᵀ + b, and the threshold-masked
weight of the training step."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import checks
from .backends.reference import DenseConv2d, _bias_grad
from .registry import backend_for
from .dispatch import (outside_autocast, under_autocast, _conv_out_fake, _LINEAR, _dense, _flatten_conv, _pick, _unflatten_conv,
                       direct_function, eager_linear_backend, eager_without_grad)

IntPair = Union[int, Sequence[int]]


@torch.library.custom_op("supsup::masked_linear", mutates_args=())
def masked_linear_op(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _masked_linear(x, weight, mask_words, bias).contiguous()  # as the fake: a compiled graph relies on it


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
    # contiguous as the fake, whatever the input's memory format (a channels_last x gave a channels_last y)
    return _masked_conv2d(x, weight, mask_words, bias, stride, padding, dilation, groups).contiguous()


def _masked_conv2d(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor],
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
    dx, dw = _pick(x.device, x.numel(), grad.numel(), weight.shape[0]).masked_backward(
        dense, grad.contiguous(), x, weight.contiguous(), mask_words.contiguous(), need_input, need_weight)
    return dx.contiguous(), dw.contiguous()  # as the fake, whatever x's strides


@masked_backward_op.register_fake
def _(grad, x, weight, mask_words, conv_params, need_input, need_weight):
    return (x.new_empty(x.shape) if need_input else grad.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else grad.new_empty(0))


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
    """y = x (W ⊙ M)ᵀ + b with M unpacked from ``mask_words`` [out, ceil(in/32)]. Under autocast, an
    op of its fp32 list: x is cast to the weight's dtype (as every op here)."""
    direct = direct_function("direct_masked_linear", x)
    if direct is not None:
        y = direct(x, weight, mask_words, bias)  # C++ with no ATen op inside: autocast cannot reach it
        if y is not None:
            return y
    if under_autocast(x):
        return outside_autocast(masked_linear, x, weight.dtype, weight, mask_words, bias)
    backend = eager_linear_backend(x, weight, mask_words, bias)
    if backend is not None:  # inference on valid arguments: the op's body, checked in one pass
        return backend.masked_forward(_LINEAR, x, weight.contiguous(), mask_words.contiguous(), bias)
    if eager_without_grad(x, weight, mask_words, bias):  # inference: the op's body, without the dispatcher
        return _masked_linear(x, weight, mask_words, bias)
    return masked_linear_op(x, weight, mask_words, bias)


def masked_conv2d(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor] = None,
                  stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1) -> Tensor:
    """conv2d with weight W ⊙ M; ``mask_words`` is [out, ceil(in/groups·kh·kw / 32)]."""
    if under_autocast(x):
        return outside_autocast(masked_conv2d, x, weight.dtype, weight, mask_words, bias, stride, padding, dilation, groups)
    args = (checks.pair("stride", stride), checks.pair("padding", padding), checks.pair("dilation", dilation), int(groups))
    if eager_without_grad(x, weight, mask_words, bias):  # inference: the op's body, without the dispatcher
        return _masked_conv2d(x, weight, mask_words, bias, *args)
    return masked_conv2d_op(x, weight, mask_words, bias, *args)


def threshold_masked_weight(scores: Tensor, weight: Tensor) -> Tensor:
    """W ⊙ 1[scores ≥ 0] in one pass on the active backend (no autograd: the layers wrap it in the
    straight-through estimator)."""
    if scores.shape != weight.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and weight {tuple(weight.shape)} must have the same shape")
    if torch.compiler.is_compiling():  # the reference backend's formula, which a trace can hold
        return torch.where(scores.detach() >= 0, weight, weight.new_zeros(()))
    return backend_for(weight.device).threshold_masked_weight(scores.detach(), weight)


def ste_rmsprop_step_(scores: Tensor, weight_grad: Tensor, weight: Tensor, square_avg: Tensor, masked_weight: Tensor,
                      lr: float, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """One training step of a threshold supermask layer's scores, fused into one pass, in place:
    the straight-through score gradient g = ``weight_grad`` ⊙ W (``weight_grad`` = dL/d(W ⊙ M)),
    torch.optim.RMSprop's update of ``scores`` and ``square_avg`` (no momentum, not centred:
    g += wd·s; v = α·v + (1-α)·g²; s -= lr·g/(√v + ε)), and ``masked_weight`` = W ⊙ 1[s_new ≥ 0],
    the next step's effective weight. All five tensors have the weight's shape and device."""
    _check_step_tensors(weight, scores=scores, weight_grad=weight_grad, square_avg=square_avg, masked_weight=masked_weight)
    if not (lr >= 0 and 0 <= alpha < 1 and eps >= 0 and weight_decay >= 0):  # NaN fails each test too
        raise ValueError(f"expected lr >= 0, 0 <= alpha < 1, eps >= 0, weight_decay >= 0; got lr={lr} alpha={alpha} "
                         f"eps={eps} weight_decay={weight_decay}")
    with torch.no_grad():
        backend_for(weight.device).ste_rmsprop_step_(scores.detach(), weight_grad.detach(), weight, square_avg,
                                                     masked_weight, float(lr), float(alpha), float(eps), float(weight_decay))


def ste_adam_step_(scores: Tensor, weight_grad: Tensor, weight: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                   masked_weight: Tensor, step: int, lr: float, betas: Tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """:func:`ste_rmsprop_step_` with torch.optim.Adam's rule (no amsgrad, L2 weight decay):
    g = ``weight_grad`` ⊙ W + wd·s; m ← lerp(m, g, 1-β₁) as torch computes it; v ← β₂v + (1-β₂)g²;
    s ← s - lr/(1-β₁ᵗ) · m / (√v/√(1-β₂ᵗ) + ε), t = ``step`` (the updates so far, this one included);
    then ``masked_weight`` = W ⊙ 1[s ≥ 0]."""
    _check_step_tensors(weight, scores=scores, weight_grad=weight_grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                        masked_weight=masked_weight)
    beta1, beta2 = betas
    if int(step) < 1:
        raise ValueError(f"step must be >= 1 (the updates so far, this one included), got {step}")
    if not (lr >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and eps >= 0 and weight_decay >= 0):  # NaN fails each test too
        raise ValueError(f"expected lr >= 0, 0 <= betas < 1, eps >= 0, weight_decay >= 0; got lr={lr} betas={betas} "
                         f"eps={eps} weight_decay={weight_decay}")
    with torch.no_grad():
        backend_for(weight.device).ste_adam_step_(scores.detach(), weight_grad.detach(), weight, exp_avg, exp_avg_sq,
                                                  masked_weight, int(step), float(lr), float(beta1), float(beta2),
                                                  float(eps), float(weight_decay))


def _check_step_tensors(weight: Tensor, **named: Tensor) -> None:
    for name, t in named.items():
        if t.shape != weight.shape:
            raise ValueError(f"{name} must have the weight's shape {tuple(weight.shape)}, got {tuple(t.shape)}")
        if t.device != weight.device:
            raise ValueError(f"{name} must be on the weight's device {weight.device}, got {t.device}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def mlp_cross_entropy_grads(x: Tensor, y: Tensor, weights: Sequence[Tensor]) -> Tuple[Tensor, List[Tensor]]:
    """The mean cross-entropy of ``x`` [B, in] through linear layers with ReLU between them
    (``weights`` [out, in] in order, no biases; logits = the last layer's output) against labels
    ``y`` [B], and the gradient of every weight, without autograd: the whole backward of an MLP
    training step (the weights are the effective, masked ones). Returns (loss, [dL/dW per layer]).
    Under autocast it runs outside it, in the operands' dtype, as the cpu backend's C++ call does."""
    if under_autocast(x):
        return outside_autocast(mlp_cross_entropy_grads, x, x.dtype, y, weights)
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one layer")
    if x.dim() != 2 or x.shape[0] == 0:  # the mean over no rows has no value
        raise ValueError(f"x must be [batch, features] with batch >= 1, got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.int64:
        raise ValueError(f"y must be an int64 vector of {x.shape[0]} labels, got {y.dtype} of shape {tuple(y.shape)}")
    width = x.shape[1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != width:
            raise ValueError(f"weights[{i}] must be [out, {width}], got shape {tuple(w.shape)}")
        if w.device != x.device or not w.is_floating_point():
            raise ValueError(f"weights[{i}] must be a floating-point tensor on {x.device}, got {w.dtype} on {w.device}")
        width = w.shape[0]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= width):
        raise ValueError(f"y must hold class indices in [0, {width}) (the last layer's outputs), "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    with torch.no_grad():
        return backend_for(x.device).mlp_cross_entropy_grads(x.detach(), y, [w.detach() for w in weights])
