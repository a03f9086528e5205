"""The superposed layer W ⊙ Σᵢ αᵢ Mᵢ (linear, conv, or with a caller-held S), differentiable in α:
the α-gradient is one mask_dot per layer."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import checks
from .bank import bank_linear_body, bank_linear_op, superpose
from .backends.reference import DenseConv2d, _bias_grad
from .dispatch import outside_autocast, under_autocast, _conv_out_fake, _LINEAR, _dense, _flatten_conv, _pick, _unflatten_conv, eager_plain, eager_without_grad
from .registry import backend_for

IntPair = Union[int, Sequence[int]]


@torch.library.custom_op("supsup::superposed_linear", mutates_args=())
def superposed_linear_op(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, bias: Optional[Tensor]) -> Tensor:
    checks.check_superposed(x, weight, bank, alpha, bias, conv=False)
    checks.check_no_nan_alpha(alpha)
    return _pick(x.device, x.numel(), weight.shape[0], bank.shape[0]).superposed_forward(_LINEAR, x, weight.contiguous(), bank.contiguous(),
                                                    alpha.contiguous(), None, bias).contiguous()  # as the fake


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
    # contiguous as the fake, whatever the input's memory format (a channels_last x gave a channels_last y)
    return _pick(x.device, x.numel(), weight.shape[0], bank.shape[0]).superposed_forward(dense, x, weight.contiguous(), bank.contiguous(),
                                                    alpha.contiguous(), None, bias).contiguous()


@superposed_conv2d_op.register_fake
def _(x, weight, bank, alpha, bias, stride, padding, dilation, groups):
    checks.check_superposed(x, weight, bank, alpha, bias, conv=True)
    checks.check_conv_params(stride, padding, dilation, groups, x, weight)
    return _conv_out_fake(x, weight, stride, padding, dilation)


@torch.library.custom_op("supsup::superposed_given_s", mutates_args=())
def superposed_given_s_op(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, s: Tensor,
                          bias: Optional[Tensor], conv_params: Optional[List[int]],
                          bank_t: Optional[Tensor] = None) -> Tensor:
    """Superposed linear/conv whose superposition ``s`` = Σᵢ αᵢ Mᵢ (shaped like weight) the caller
    already has, e.g. the cached per-weight count of set bits / k for uniform α. The α-gradient
    still comes from the bank (one pass over the bits), or from ``bank_t`` = interleave_tasks(bank)
    where given and the backend reads it."""
    return _given_s_body(x, weight, bank, alpha, s, bias, conv_params).contiguous()  # as the fake


def _given_s_body(x, weight, bank, alpha, s, bias, conv_params):
    checks.check_superposed(x, weight, bank, alpha, bias, conv=conv_params is not None)
    if tuple(s.shape) != tuple(weight.shape):
        raise ValueError(f"s must be shaped like weight {tuple(weight.shape)}, got {tuple(s.shape)}")
    checks.check_no_nan_alpha(alpha)  # the count-cache path validates α like every other path
    dense = _dense(_unflatten_conv(conv_params))
    return _pick(x.device, x.numel(), weight.shape[0], bank.shape[0]).superposed_forward(
        dense, x, weight.contiguous(), bank, alpha, s.contiguous(), bias)


@superposed_given_s_op.register_fake
def _(x, weight, bank, alpha, s, bias, conv_params, bank_t=None):
    if conv_params is None:
        return x.new_empty(*x.shape[:-1], weight.shape[0])
    st, pad, dil, _ = _unflatten_conv(conv_params)
    return _conv_out_fake(x, weight, st, pad, dil)


@torch.library.custom_op("supsup::superposed_backward", mutates_args=())
def superposed_backward_op(grad: Tensor, x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor,
                           s: Optional[Tensor], conv_params: Optional[List[int]],
                           need_input: bool, need_alpha: bool, need_weight: bool,
                           bank_t: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    dx, da, dw = _superposed_backward_body(grad, x, weight, bank, alpha, s, conv_params, need_input, need_alpha,
                                           need_weight, bank_t)
    return dx.contiguous(), da.contiguous(), dw.contiguous()  # as the fake, whatever x's strides


def _superposed_backward_body(grad, x, weight, bank, alpha, s, conv_params, need_input, need_alpha, need_weight,
                              bank_t=None):
    dense = _dense(_unflatten_conv(conv_params))
    backend = _pick(x.device, x.numel(), grad.numel(), weight.shape[0], bank.shape[0])
    # the task-interleaved copy goes only to a backend that reads it (cpu: the one-image α-gradient)
    copy = {"bank_t": bank_t.contiguous()} if bank_t is not None and backend.reads_interleaved else {}
    return backend.superposed_backward(
        dense, grad.contiguous(), x, weight.contiguous(), bank.contiguous(), alpha.contiguous(),
        None if s is None else s.contiguous(), need_input, need_alpha, need_weight, **copy)


@superposed_backward_op.register_fake
def _(grad, x, weight, bank, alpha, s, conv_params, need_input, need_alpha, need_weight, bank_t=None):
    return (x.new_empty(x.shape) if need_input else grad.new_empty(0),
            alpha.new_empty(alpha.shape) if need_alpha else grad.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else grad.new_empty(0))


def _superposed_setup(ctx, inputs, output):
    x, weight, bank, alpha, bias = inputs[:5]
    ctx.conv_params = _flatten_conv(*inputs[5:9]) if len(inputs) > 5 else None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bank, alpha)
    ctx.has_s = False


def _given_s_setup(ctx, inputs, output):
    x, weight, bank, alpha, s, bias, conv_params = inputs[:7]
    bank_t = inputs[7] if len(inputs) > 7 else None
    ctx.conv_params = conv_params
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bank, alpha, s, *([] if bank_t is None else [bank_t]))
    ctx.has_s = True


def _superposed_backward(ctx, grad):
    saved = ctx.saved_tensors
    x, weight, bank, alpha = saved[:4]
    s = saved[4] if ctx.has_s else None
    bank_t = saved[5] if len(saved) > 5 else None
    need = ctx.needs_input_grad
    need_x, need_w, need_a = need[0], need[1], need[3]
    bias_idx = 5 if ctx.has_s else 4
    need_b = ctx.has_bias and need[bias_idx]
    # Eagerly (no compile, no dispatch mode, no double backward) the op's body runs without the custom-op
    # dispatcher, whose overhead (about 0.1 ms a call) is a visible part of a one-image α-gradient.
    backward = (_superposed_backward_body if eager_without_grad(grad, x, weight, bank, alpha, s, bank_t)
                else superposed_backward_op)
    dx, da, dw = backward(grad, x, weight, bank, alpha, s, ctx.conv_params, need_x, need_a, need_w, bank_t)
    db = _bias_grad(grad, ctx.conv_params is not None) if need_b else None
    grads = [dx if need_x else None, dw if need_w else None, None, da if need_a else None]
    if ctx.has_s:
        return tuple(grads + [None, db, None, None])
    rest = [None] * 4 if ctx.conv_params is not None else []
    return tuple(grads + [db] + rest)


superposed_linear_op.register_autograd(_superposed_backward, setup_context=_superposed_setup)
superposed_conv2d_op.register_autograd(_superposed_backward, setup_context=_superposed_setup)
superposed_given_s_op.register_autograd(_superposed_backward, setup_context=_given_s_setup)


class _GivenSEager(torch.autograd.Function):
    """superposed_given_s with its registered gradient, run eagerly without the custom-op dispatcher:
    the same bodies (checks, the backend's forward, _superposed_backward_body), without ~0.2 ms of
    dispatch per layer and query (a whole one-image α-gradient through a tiny layer took 225 µs).
    Only for plain eager tensors (no torch.compile, no dispatch mode such as opcheck's)."""

    @staticmethod
    def forward(ctx, x, weight, bank, alpha, s, bias, conv_params, bank_t):
        ctx.conv_params, ctx.has_bias = conv_params, bias is not None
        ctx.save_for_backward(x, weight, bank, alpha, s, bank_t)
        return _given_s_body(x, weight, bank, alpha, s, bias, conv_params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, bank, alpha, s, bank_t = ctx.saved_tensors
        need_x, need_w, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 1, 3, 5))
        dx, da, dw = _superposed_backward_body(grad.contiguous(), x, weight, bank, alpha, s, ctx.conv_params,
                                               need_x, need_a, need_w, bank_t)
        db = _bias_grad(grad, ctx.conv_params is not None) if need_b and ctx.has_bias else None
        return dx if need_x else None, dw if need_w else None, None, da if need_a else None, None, db, None, None


def _given_s(x, weight, bank, alpha, s, bias, conv_params, bank_t=None):
    if eager_plain(x, weight, bank, alpha, s, bias, bank_t):
        return _GivenSEager.apply(x, weight, bank, alpha, s, bias, conv_params, bank_t)
    return superposed_given_s_op(x, weight, bank, alpha, s, bias, conv_params, bank_t)


# -- the public function ----------------------------------------------------------------------
def superposed_linear(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, bias: Optional[Tensor] = None,
                      bank_t: Optional[Tensor] = None, bank_w: Optional[Tensor] = None) -> Tensor:
    """y = x (W ⊙ Σᵢ αᵢ Mᵢ)ᵀ + b; differentiable in x, alpha, weight, bias.

    ``bank_t`` and ``bank_w``, optional, are ``interleave_tasks(bank)`` and ``interleave_weights(bank,
    n)`` held by the caller (``MaskBank.interleaved()`` and ``interleaved_weights()`` keep them). Where
    x and α both need gradients (task inference past the first layer), the cpu backend reads the
    α-gradient of one image from ``bank_t`` (about twice as fast as from the bank) and S = Σᵢ αᵢ Mᵢ
    from ``bank_w`` (``superpose(bank_w=)``); where only α does (a first layer), it reads every
    task's output from ``bank_t`` (``bank_linear(bank_t=)``). The result is the same up to summation
    order. Other paths and backends ignore them."""
    if under_autocast(x):
        return outside_autocast(superposed_linear, x, weight.dtype, weight, bank, alpha, bias, bank_t, bank_w)
    if bank_t is not None:
        checks.check_bank_t(bank, bank_t)
    if bank_w is not None:
        checks.check_bank_w(bank, bank_w, weight.shape[-1])
    if _backward_needs_s(x, alpha):
        checks.check_superposed(x, weight, bank, alpha, bias, conv=False)
        # S in the weight's dtype (it multiplies W): a float64 α on a float32 layer sums in fp32 on the fast path.
        s = superpose(bank, alpha.detach().to(weight.dtype), weight.shape[1], bank_w).view_as(weight)
        return _given_s(x, weight, bank, alpha, s, bias, None, bank_t)
    if _per_task_outputs_pay(x, weight, alpha):
        checks.check_superposed(x, weight, bank, alpha, bias, conv=False)
        checks.check_no_nan_alpha(alpha)
        with torch.no_grad():  # [*, out, k]: every task's output of this layer
            d = (bank_linear_body(x, weight, bank, bank_t) if eager_plain(x, weight, bank, bank_t)
                 else bank_linear_op(x, weight, bank, bank_t))
        y = torch.matmul(d, alpha.to(d.dtype))  # autograd: dα = Σ dᵀ g, no second pass over the bits
        return y if bias is None else y + bias
    return superposed_linear_op(x, weight, bank, alpha, bias)


def _per_task_outputs_pay(x: Tensor, weight: Tensor, alpha: Tensor) -> bool:
    """Whether to run a layer as y = D α with D = every task's output (bank_linear): when only α
    needs a gradient (the first layer of task inference: x and W need none) and the backend has a
    native bank_linear, D costs one pass over the bits and gives both the output and, through
    autograd, the α-gradient Dᵀg. Otherwise S = Σᵢ αᵢ Mᵢ (one pass) then a mask_dot in the backward
    (another pass)."""
    if not (torch.is_grad_enabled() and alpha.requires_grad and not x.requires_grad and not weight.requires_grad):
        return False
    if torch.compiler.is_compiling() or x.dim() == 0 or x.numel() != x.shape[-1]:  # one row of x
        return False
    return bool(getattr(backend_for(x.device), "fast_bank_linear", False))


def _backward_needs_s(x: Tensor, alpha: Tensor) -> bool:
    """Whether the backward will want both the α-gradient and the input gradient, which needs
    S = Σᵢ αᵢ Mᵢ again: then S is computed once here and kept for the backward (one pass over the
    bits instead of two)."""
    return torch.is_grad_enabled() and x.requires_grad and alpha.requires_grad


def superposed_conv2d(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, bias: Optional[Tensor] = None,
                      stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1) -> Tensor:
    """conv2d with weight W ⊙ Σᵢ αᵢ Mᵢ; differentiable in x, alpha, weight, bias."""
    if under_autocast(x):
        return outside_autocast(superposed_conv2d, x, weight.dtype, weight, bank, alpha, bias, stride, padding, dilation, groups)
    if _backward_needs_s(x, alpha):
        checks.check_superposed(x, weight, bank, alpha, bias, conv=True)
        s = superpose(bank, alpha.detach().to(weight.dtype), weight[0].numel()).view_as(weight)
        return superposed_with_s(x, weight, bank, alpha, s, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups))
    return superposed_conv2d_op(x, weight, bank, alpha, bias, checks.pair("stride", stride),
                                checks.pair("padding", padding), checks.pair("dilation", dilation), int(groups))


def superposed_with_s(x: Tensor, weight: Tensor, bank: Tensor, alpha: Tensor, s: Tensor,
                      bias: Optional[Tensor] = None, conv: Optional[dict] = None,
                      bank_t: Optional[Tensor] = None) -> Tensor:
    """Like ``superposed_linear``/``superposed_conv2d`` (``conv`` = their keyword arguments) when the
    caller already holds ``s`` = Σᵢ αᵢ Mᵢ shaped like ``weight`` (e.g. a cached count of set bits
    divided by k). The forward reads no mask bit; the α-gradient still reads each bit once (from
    ``bank_t``, the task-interleaved copy, where given: see ``superposed_linear``)."""
    if under_autocast(x):
        return outside_autocast(superposed_with_s, x, weight.dtype, weight, bank, alpha, s, bias, conv, bank_t)
    if bank_t is not None:
        checks.check_bank_t(bank, bank_t)
    if conv is None:
        checks.check_superposed(x, weight, bank, alpha, bias, conv=False)
        params = None
    else:
        checks.check_superposed(x, weight, bank, alpha, bias, conv=True)
        stride, padding = checks.pair("stride", conv.get("stride", 1)), checks.pair("padding", conv.get("padding", 0))
        dilation, groups = checks.pair("dilation", conv.get("dilation", 1)), int(conv.get("groups", 1))
        checks.check_conv_params(stride, padding, dilation, groups, x, weight)
        params = _flatten_conv(stride, padding, dilation, groups)
    if tuple(s.shape) != tuple(weight.shape):
        raise ValueError(f"s must be shaped like weight {tuple(weight.shape)}, got {tuple(s.shape)}")
    return _given_s(x, weight, bank, alpha, s.to(weight.dtype), bias, params, bank_t)
