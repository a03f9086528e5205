"""A bank of k packed masks against a float vector: superpose (Σᵢ αᵢ Mᵢ), mask_dot ((⟨Mᵢ, v⟩)ᵢ,
its adjoint), the batched mask_dot of q vectors, and mask_dot_outer, the batched mask_dot of q
rank-1 vectors (g_j x_jᵀ) ⊙ W (the α-gradients of q one-image queries through one linear layer), and
bank_linear, every task's masked linear layer on one input at once."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import checks
from .dispatch import _REFERENCE, _finite, _lead, _pick, eager_without_grad, outside_autocast, under_autocast
from .registry import backend_for


@torch.library.custom_op("supsup::superpose", mutates_args=())
def superpose_op(bank: Tensor, alpha: Tensor, n: int, bank_w: Optional[Tensor] = None) -> Tensor:
    return _superpose_body(bank, alpha, n, bank_w)


def _superpose_body(bank: Tensor, alpha: Tensor, n: int, bank_w: Optional[Tensor] = None) -> Tensor:
    checks.check_superpose(bank, alpha, n)
    if bank_w is not None:
        checks.check_bank_w(bank, bank_w, n)
    checks.check_no_nan_alpha(alpha)
    backend = _pick(bank.device, bank.shape[0], _lead(bank))
    if bank_w is not None and backend.reads_interleaved:
        return backend.superpose_interleaved(bank_w.contiguous(), bank.shape[0], alpha.contiguous(), n)
    return backend.superpose(bank.contiguous(), alpha.contiguous(), n)


@superpose_op.register_fake
def _(bank, alpha, n, bank_w=None):
    checks.check_superpose(bank, alpha, n)
    if bank_w is not None:
        checks.check_bank_w(bank, bank_w, n)
    return alpha.new_empty(*bank.shape[1:-1], n)


@torch.library.custom_op("supsup::mask_dot", mutates_args=())
def mask_dot_op(bank: Tensor, v: Tensor, bank_t: Optional[Tensor] = None) -> Tensor:
    return _mask_dot_body(bank, v, bank_t)


def _mask_dot_body(bank: Tensor, v: Tensor, bank_t: Optional[Tensor] = None) -> Tensor:
    checks.check_mask_dot(bank, v)
    if bank_t is not None:
        checks.check_bank_t(bank, bank_t)
    backend = _pick(bank.device, bank.shape[0], _lead(bank))
    if backend is not _REFERENCE and not _finite(v):
        backend = _REFERENCE  # IEEE semantics everywhere: 0·inf = NaN, inf - inf = NaN, NaN propagates
    if bank_t is not None and backend.reads_interleaved:
        return backend.mask_dot_interleaved(bank_t.contiguous(), bank.shape[0], v.contiguous())
    return backend.mask_dot(bank.contiguous(), v.contiguous())


@mask_dot_op.register_fake
def _(bank, v, bank_t=None):
    checks.check_mask_dot(bank, v)
    if bank_t is not None:
        checks.check_bank_t(bank, bank_t)
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


@torch.library.custom_op("supsup::mask_dot_outer", mutates_args=())
def mask_dot_outer_op(bank: Tensor, g: Tensor, x: Tensor, weight: Tensor, bank_t: Optional[Tensor] = None) -> Tensor:
    return _mask_dot_outer_body(bank, g, x, weight, bank_t)


def _mask_dot_outer_body(bank: Tensor, g: Tensor, x: Tensor, weight: Tensor, bank_t: Optional[Tensor]) -> Tensor:
    checks.check_mask_dot_outer(bank, g, x, weight, bank_t)
    backend = _pick(bank.device, bank.shape[0], g.shape[0], weight.shape[0])
    if backend is not _REFERENCE and not checks.outer_in_range(g, x, weight):
        backend = _REFERENCE
    bank_t = bank_t.contiguous() if bank_t is not None and backend.reads_interleaved else None
    return backend.mask_dot_outer(bank.contiguous(), g.contiguous(), x.contiguous(), weight.contiguous(), bank_t)


@mask_dot_outer_op.register_fake
def _(bank, g, x, weight, bank_t=None):
    checks.check_mask_dot_outer(bank, g, x, weight, bank_t)
    return g.new_empty(g.shape[0], bank.shape[0])


@torch.library.custom_op("supsup::bank_linear", mutates_args=())
def bank_linear_op(x: Tensor, weight: Tensor, bank: Tensor, bank_t: Optional[Tensor] = None) -> Tensor:
    return bank_linear_body(x, weight, bank, bank_t)


def bank_linear_body(x: Tensor, weight: Tensor, bank: Tensor, bank_t: Optional[Tensor] = None) -> Tensor:
    """The op's body, for eager callers that skip the dispatcher (no autograd: it has none)."""
    checks.check_bank_linear(x, weight, bank)
    if bank_t is not None:
        checks.check_bank_t(bank, bank_t)
    backend = _pick(x.device, x.numel(), weight.shape[0], bank.shape[0])
    if backend is not _REFERENCE and not (_finite(x) and _finite(weight)):
        backend = _REFERENCE  # IEEE semantics: a masked-out inf still gives 0·inf = NaN
    if bank_t is not None and backend.reads_interleaved:
        return backend.bank_linear(x, weight.contiguous(), bank.contiguous(), bank_t.contiguous())
    return backend.bank_linear(x, weight.contiguous(), bank.contiguous())


@bank_linear_op.register_fake
def _(x, weight, bank, bank_t=None):
    checks.check_bank_linear(x, weight, bank)
    if bank_t is not None:
        checks.check_bank_t(bank, bank_t)
    return x.new_empty(*x.shape[:-1], weight.shape[0], bank.shape[0])


def _superpose_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _superpose_backward(ctx, grad):
    (bank,) = ctx.saved_tensors
    return None, mask_dot_op(bank, grad.contiguous()), None, None


superpose_op.register_autograd(_superpose_backward, setup_context=_superpose_setup)


def _mask_dot_setup(ctx, inputs, output):
    bank, v = inputs[:2]
    ctx.save_for_backward(bank)
    ctx.n = v.shape[-1]


def _mask_dot_backward(ctx, grad):
    (bank,) = ctx.saved_tensors
    return None, superpose_op(bank, grad.contiguous(), ctx.n), None


mask_dot_op.register_autograd(_mask_dot_backward, setup_context=_mask_dot_setup)


# -- the public function ----------------------------------------------------------------------
def superpose(bank: Tensor, alpha: Tensor, n: int, bank_w: Optional[Tensor] = None) -> Tensor:
    """Σᵢ αᵢ Mᵢ: bank [k, *lead, W], alpha [k] -> float [*lead, n].

    ``bank_w``, optional, is ``interleave_weights(bank, n)`` held by the caller
    (``MaskBank.interleaved_weights()`` keeps one): a backend that reads it (``reads_interleaved``:
    cpu) looks 32 tasks' bits of 16 weights up per vector in tables of α's subset sums, about 1.6x
    (AVX-512) to 2.3x (AVX2) as fast as from the bank; the result is the same up to summation order."""
    if eager_without_grad(bank, alpha, bank_w):  # the op's body, without the dispatcher (~50 µs a call)
        return _superpose_body(bank, alpha, n, bank_w)
    return superpose_op(bank, alpha, n, bank_w)


def mask_dot(bank: Tensor, v: Tensor, bank_t: Optional[Tensor] = None) -> Tensor:
    """(⟨Mᵢ, v⟩)ᵢ: bank [k, *lead, W], v [*lead, n] -> float [k].

    ``bank_t``, optional, is ``interleave_tasks(bank)`` held by the caller (``MaskBank.interleaved()``
    keeps one): a backend that reads it (``reads_interleaved``: cpu) loads 16 tasks' words per vector
    with each word's tables held in registers across all tasks, about twice as fast as the bank's own
    layout (which it must transpose); the result is the same up to summation order."""
    if eager_without_grad(bank, v, bank_t):
        return _mask_dot_body(bank, v, bank_t)
    return mask_dot_op(bank, v, bank_t)


def mask_dot_outer(bank: Tensor, g: Tensor, x: Tensor, weight: Tensor, bank_t: Optional[Tensor] = None) -> Tensor:
    """``mask_dot_batched(bank, g[:, :, None] * x[:, None, :] * weight)`` without materialising the
    q products: bank [k, R, W], g [q, R], x [q, n], weight [R, n] -> float [q, k]. Row j is the
    α-gradient of a linear layer for one image with input x_j and output gradient g_j.

    ``bank_t``, optional, is ``interleave_tasks(bank)`` held by the caller (a cache, like ``s`` of
    ``superposed_with_s``): a backend that reads it (``reads_interleaved``: cpu) skips each query's
    rows with g_j = 0 whole and transposes no word; the result is the same."""
    if eager_without_grad(bank, g, x, weight, bank_t):
        return _mask_dot_outer_body(bank, g, x, weight, bank_t)
    return mask_dot_outer_op(bank, g, x, weight, bank_t)


@torch.library.custom_op("supsup::mask_dot_outer_interleaved", mutates_args=())
def mask_dot_outer_interleaved_op(bank_t: Tensor, k: int, g: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    return _mask_dot_outer_interleaved_body(bank_t, k, g, x, weight)


def _mask_dot_outer_interleaved_body(bank_t: Tensor, k: int, g: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    checks.check_mask_dot_outer_interleaved(bank_t, k, g, x, weight)
    backend = _pick(bank_t.device, k, g.shape[0], weight.shape[0])
    if not backend.reads_interleaved or not checks.outer_in_range(g, x, weight):
        backend = _REFERENCE
    return backend.mask_dot_outer_interleaved(bank_t.contiguous(), k, g.contiguous(), x.contiguous(), weight.contiguous())


@mask_dot_outer_interleaved_op.register_fake
def _(bank_t, k, g, x, weight):
    checks.check_mask_dot_outer_interleaved(bank_t, k, g, x, weight)
    return g.new_empty(g.shape[0], k)


def mask_dot_outer_interleaved(bank_t: Tensor, k: int, g: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``mask_dot_outer(bank, g, x, weight)`` read from ``bank_t = interleave_tasks(bank)`` alone (bank
    [k, R, ceil(n/32)]): [q, k]. Task inference reads a layer through the copy of its transposed
    masks this way, ``mask_dot_outer_interleaved(interleave_tasks(transpose_masks(bank, n)), k, x, g,
    weight.t())``, the same sums, where more of the inputs x than of the output gradients g are zero:
    only the rows of a nonzero g_j are read."""
    if eager_without_grad(bank_t, g, x, weight):
        return _mask_dot_outer_interleaved_body(bank_t, k, g, x, weight)
    return mask_dot_outer_interleaved_op(bank_t, k, g, x, weight)


def mlp_mask_dot_outer(banks: Sequence[Tensor], copies: Sequence[Tensor], transposed: Sequence[bool],
                       weights: Sequence[Tensor], backward_weights: Sequence[Tensor], inputs: Sequence[Tensor],
                       g: Tensor) -> Tensor:
    """The α-gradients of q one-image queries through a ReLU MLP of L layers, its backward in one
    call: [q, k] = Σᵢ ``mask_dot_outer(banks[i], g_i, inputs[i], W_i)``, last layer first, with g_{L-1}
    = ``g`` and g_{i-1} = (g_i ``backward_weights[i]``) ⊙ 1[``inputs[i]`` > 0]. ``copies[i]`` is the
    bank's task-interleaved copy, ``interleave_tasks(banks[i])`` with ``weights[i]`` = W_i, or where
    ``transposed[i]`` that of its transposed masks, ``interleave_tasks(transpose_masks(banks[i], n))``
    with ``weights[i]`` = W_iᵀ (read by the queries' nonzero inputs). On the cpu backend one C++ call;
    elsewhere, traced, or where a product may overflow, op by op (the same sums). Under autocast it
    runs outside it, in the operands' dtype, as the fused C++ call does."""
    if under_autocast(g):
        with torch.autocast(g.device.type, enabled=False):
            return mlp_mask_dot_outer(banks, copies, transposed, weights, backward_weights, inputs, g)
    lists = (banks, copies, transposed, weights, backward_weights, inputs)
    fused = getattr(backend_for(g.device), "mlp_mask_dot_outer", None)
    if fused is not None and all(isinstance(v, (list, tuple)) for v in lists) and \
            eager_without_grad(g, *banks, *copies, *weights, *backward_weights, *inputs):
        try:  # the C++ op checks every shape; on a refusal, the checks below name what was wrong
            out = fused(list(banks), list(copies), [bool(t) for t in transposed], list(weights), list(backward_weights),
                        list(inputs), g)
        except RuntimeError:
            checks.check_mlp_mask_dot_outer(*lists, g)
            raise
        if out is not None:
            checks.check_mlp_copies(banks, copies, transposed)  # shapes held; now whose copies they are
            return out
    checks.check_mlp_mask_dot_outer(*lists, g)
    checks.check_mlp_copies(banks, copies, transposed)
    k = banks[0].shape[0]
    out = g.new_zeros(g.shape[0], k)
    for i in reversed(range(len(banks))):
        out += (mask_dot_outer_interleaved(copies[i], k, inputs[i], g, weights[i]) if transposed[i]
                else mask_dot_outer(banks[i], g, inputs[i], weights[i], copies[i]))
        if i > 0:
            g = (g @ backward_weights[i]) * (inputs[i] > 0)
    return out


@torch.library.custom_op("supsup::interleave_tasks", mutates_args=())
def interleave_tasks_op(bank: Tensor) -> Tensor:
    return _interleave_tasks_body(bank)


def _interleave_tasks_body(bank: Tensor) -> Tensor:
    checks.check_bank(bank)
    return backend_for(bank.device).interleave_tasks(bank.contiguous())


@interleave_tasks_op.register_fake
def _(bank):
    checks.check_bank(bank)
    return bank.new_empty(*bank.shape[1:], (bank.shape[0] + 15) // 16 * 16)


def interleave_tasks(bank: Tensor) -> Tensor:
    """The task-interleaved copy of a bank: [k, *lead, W] -> int32 [*lead, W, kp] with
    ``out[..., w, t] = bank[t, ..., w]``, kp = k rounded up to 16 and zero words for t >= k. Word w of
    16 consecutive tasks is one 64-byte vector there. As much memory as the bank."""
    if eager_without_grad(bank):
        return _interleave_tasks_body(bank)
    return interleave_tasks_op(bank)


@torch.library.custom_op("supsup::interleave_weights", mutates_args=())
def interleave_weights_op(bank: Tensor, n: int) -> Tensor:
    return _interleave_weights_body(bank, n)


def _interleave_weights_body(bank: Tensor, n: int) -> Tensor:
    checks.check_bank_rows(bank, n)
    return backend_for(bank.device).interleave_weights(bank.contiguous(), n)


@interleave_weights_op.register_fake
def _(bank, n):
    checks.check_bank_rows(bank, n)
    return bank.new_empty(*bank.shape[1:-1], -bank.shape[0] // 32 * -32 // 32, -n // 16 * -16)


def interleave_weights(bank: Tensor, n: int) -> Tensor:
    """The weight-interleaved copy of a bank of n-wide rows: [k, *lead, ceil(n/32)] -> int32 [*lead,
    ceil(k/32), np], np = n rounded up to 16, where bit i of ``out[..., q, c]`` is weight c's bit of
    task 32q + i (zero for tasks past k and columns past n). Each word holds 32 tasks of one weight,
    16 weights' words are one 64-byte vector: ``superpose(bank_w=)`` reads it as mask_dot reads
    ``interleave_tasks``, with tasks and weights swapped. As much memory as the bank."""
    if eager_without_grad(bank):
        return _interleave_weights_body(bank, n)
    return interleave_weights_op(bank, n)


def bank_linear(x: Tensor, weight: Tensor, bank: Tensor, bank_t: Optional[Tensor] = None) -> Tensor:
    """Every task's masked linear layer on x at once: out[..., r, t] = (x (W ⊙ Mₜ)ᵀ)[..., r]
    (no bias); x [*, in], weight [out, in], bank [k, out, ceil(in/32)] -> [*, out, k]. One pass over
    the bits per row of x on the cpu backend. Not differentiable: call it on tensors that need no
    gradient (superposed_linear uses it, under no_grad, for a first layer's α-gradient).

    ``bank_t``, optional, is ``interleave_tasks(bank)`` held by the caller: a backend that reads it
    (``reads_interleaved``: cpu) keeps each word's tables in registers while every task streams
    past, 1.4-2.4x as fast as from the bank; the result is the same up to summation order."""
    if under_autocast(x):
        return outside_autocast(bank_linear, x, weight.dtype, weight, bank, bank_t)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight) if isinstance(t, Tensor)):
        raise RuntimeError("bank_linear is not differentiable: call it under torch.no_grad() or on x and weight "
                           "that do not require grad")
    if eager_without_grad(x, weight, bank, bank_t):
        return bank_linear_body(x, weight, bank, bank_t)
    return bank_linear_op(x, weight, bank, bank_t)


def mask_dot_batched(bank: Tensor, v: Tensor) -> Tensor:
    """(⟨Mᵢ, v_j⟩)ⱼᵢ for q vectors at once: bank [k, *lead, W], v [q, *lead, n] -> float [q, k].
    One pass over the bits for all q (batched task inference: q α-gradients)."""
    return mask_dot_batched_op(bank, v)
