"""Mask functions with the straight-through estimator (reference doc §1.2)."""
from __future__ import annotations

import math

import torch

MASK_FUNCTIONS = ("threshold", "topk")
COMPAT_TOPK = "topk_sorted"  # top-k with the official GetSubnet's choice among ties (compat layers only)


class _ThresholdSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores):
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _TopKSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, magnitudes, density, sorted_ties=False):
        pick = sorted_topk_mask if sorted_ties else topk_mask
        return pick(magnitudes, density).to(magnitudes.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def kept_count(numel: int, density: float) -> int:
    """Weights kept by edge-popup: numel - int((1 - density) * numel), as the official code."""
    return numel - int((1.0 - density) * numel)


def topk_mask(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping exactly ``kept_count`` largest entries (top-k selection, no full sort)."""
    flat = magnitudes.reshape(-1)
    keep = kept_count(flat.numel(), density)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(magnitudes)


def sorted_topk_mask(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """``topk_mask`` as the official ``GetSubnet`` computes it, by a full ascending sort: the same
    kept count, and among entries tied at the threshold the same ones kept (``torch.topk`` may keep
    others). ``supsup_fast.compat``'s top-k layer uses it, to give the official code's masks."""
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    drop = n - kept_count(n, density)
    if 0 < drop < n:
        # The drop-th smallest value: the sort keeps all above it and drops all below; only entries equal
        # to it need the sort's own order, and without such a tie the O(n) selection is the answer.
        threshold = flat.kthvalue(drop).values
        if int((flat == threshold).sum()) == 1 and not bool(torch.isnan(threshold)):
            return (flat > threshold).view_as(magnitudes)
    mask = torch.ones(n, dtype=torch.bool, device=flat.device)
    mask[flat.sort()[1][:drop]] = False
    return mask.view_as(magnitudes)


def threshold_mask(scores: torch.Tensor) -> torch.Tensor:
    return scores >= 0


def mask_from_scores(scores: torch.Tensor, mask_fn: str, density: float) -> torch.Tensor:
    """Boolean mask of a finished task (no gradient)."""
    if mask_fn == "threshold":
        return threshold_mask(scores)
    if mask_fn == "topk":
        return topk_mask(scores.abs(), density)
    if mask_fn == COMPAT_TOPK:
        return sorted_topk_mask(scores.abs(), density)
    raise ValueError(f"mask_fn must be one of {MASK_FUNCTIONS}, got {mask_fn!r}")


def ste_mask(scores: torch.Tensor, mask_fn: str, density: float) -> torch.Tensor:
    """Float {0,1} mask whose gradient flows straight through to the scores.

    threshold: M = 1[s >= 0], ∂L/∂s = ∂L/∂M (GNu/NNs, Piggyback-style).
    topk: M = top-k of |s| (edge-popup), ∂L/∂s = ∂L/∂M · sign(s) through the abs.
    """
    if mask_fn == "threshold":
        return _ThresholdSTE.apply(scores)
    if mask_fn in ("topk", COMPAT_TOPK):
        return _TopKSTE.apply(scores.abs(), density, mask_fn == COMPAT_TOPK)
    raise ValueError(f"mask_fn must be one of {MASK_FUNCTIONS}, got {mask_fn!r}")


def er_density(c_out: int, c_in: int, kh: int = 1, kw: int = 1, multiplier: float = 1.0) -> float:
    """Erdős–Rényi per-layer density of the official code (main.py:60-75):
    min(0.5, S · (c_out + c_in) / (c_out · c_in · kh · kw)); no kernel-size term in the numerator."""
    if multiplier <= 0:
        raise ValueError(f"ER multiplier must be > 0, got {multiplier}")
    return min(0.5, multiplier * (c_out + c_in) / (c_out * c_in * kh * kw))


def score_init_bound(fan_in: int) -> float:
    """kaiming_uniform_(a=√5) bound, the official score init: U(-1/√fan_in, 1/√fan_in)."""
    return 1.0 / math.sqrt(fan_in)


class _ThresholdMaskedWeight(torch.autograd.Function):
    """W ⊙ 1[s ≥ 0] in one pass, with the straight-through gradient ∂L/∂s = ∂L/∂W_eff ⊙ W and,
    for a trained weight (the official ``--train-weight-tasks``), ∂L/∂W = ∂L/∂W_eff ⊙ 1[s ≥ 0]."""

    @staticmethod
    def forward(ctx, scores, weight):
        from .. import ops
        # The scores only where the weight's gradient needs them: an in-backward optimiser may have
        # stepped them by then (a layer run twice), which a saved tensor would refuse.
        ctx.save_for_backward(weight, scores if ctx.needs_input_grad[1] else None)
        return ops.threshold_masked_weight(scores, weight)

    @staticmethod
    def backward(ctx, grad):
        weight, scores = ctx.saved_tensors
        grad_scores = grad * weight if ctx.needs_input_grad[0] else None
        grad_weight = grad * (scores >= 0).to(grad.dtype) if ctx.needs_input_grad[1] else None
        return grad_scores, grad_weight


def masked_weight_from_scores(scores: torch.Tensor, weight: torch.Tensor, mask_fn: str, density: float) -> torch.Tensor:
    """The training-time effective weight W ⊙ M(scores), differentiable in the scores (STE)."""
    if mask_fn == "threshold":
        return _ThresholdMaskedWeight.apply(scores, weight)
    return weight * ste_mask(scores, mask_fn, density).to(weight.dtype)  # a {0, 1} mask: exact in any dtype
