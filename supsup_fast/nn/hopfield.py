"""HopSupSup building blocks (reference doc §1.9, paper §3.5): BatchNorm whose weight is a binary
per-neuron mask, and a Hopfield matrix per masked layer that stores every task's mask.

The masks are not kept as bits: a layer of d neurons keeps one d×d float matrix Ψ (plus the running
mean of the stored ±1 patterns, the recovery start point), whatever the number of tasks."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .masks import ste_mask


class HopfieldStore(nn.Module):
    """Ψ ∈ R^{d×d}, written with the Storkey-style rule of the official code for each pattern
    x = 2M − 1:  h = Ψx;  Ψ ← Ψ + (xxᵀ − I − xhᵀ − hxᵀ) / d."""

    def __init__(self, d: int, device=None):
        super().__init__()
        if d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        self.d = int(d)
        self.register_buffer("psi", torch.zeros(d, d, device=device))
        self.register_buffer("pattern_sum", torch.zeros(d, device=device))
        self.count = 0

    def store(self, mask: torch.Tensor) -> None:
        """Store one binary mask ``[d]`` (bool or 0/1)."""
        if mask.shape != (self.d,):
            raise ValueError(f"mask must have shape [{self.d}], got {tuple(mask.shape)}")
        x = mask.to(self.psi.dtype).to(self.psi.device) * 2 - 1
        h = self.psi @ x
        # One rank-3 update of the whole matrix (the identity only touches the diagonal).
        update = torch.outer(x, x - h) - torch.outer(h, x)
        update.diagonal().sub_(1.0)
        self.psi.add_(update, alpha=1.0 / self.d)
        self.pattern_sum.add_(x)
        self.count += 1

    def energy(self, s: torch.Tensor) -> torch.Tensor:
        """E(s) = −½ sᵀ Ψ s for s ∈ {±1}^d (differentiable in s)."""
        return -0.5 * (s @ (self.psi @ s))

    def mean_pattern(self) -> torch.Tensor:
        """mean_j (2M_j − 1): where recovery starts."""
        if self.count == 0:
            raise RuntimeError("no mask stored yet")
        return self.pattern_sum / self.count

    def nbytes(self) -> int:
        return self.psi.numel() * self.psi.element_size() + self.pattern_sum.numel() * self.pattern_sum.element_size()


class NeuronMaskBatchNorm(nn.Module):
    """Non-affine BatchNorm on batch statistics (always, as ``track_running_stats=False``) whose
    per-channel weight is a binary mask: 1[score ≥ 0] with a straight-through gradient while
    ``scores`` is set, else the fixed ``mask``. Each instance owns the Hopfield store of its masks."""

    def __init__(self, num_features: int, eps: float = 1e-5, device=None):
        super().__init__()
        self.num_features, self.eps = int(num_features), eps
        self.scores: Optional[nn.Parameter] = None
        self.register_buffer("mask", torch.ones(num_features, device=device))
        self.hopfield = HopfieldStore(num_features, device=device)

    def current_mask(self) -> torch.Tensor:
        return (self.scores.detach() >= 0).float() if self.scores is not None else self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = ste_mask(self.scores, "threshold", 1.0) if self.scores is not None else self.mask
        return F.batch_norm(x, None, None, weight=weight, bias=None, training=True, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, stored={self.hopfield.count}"
