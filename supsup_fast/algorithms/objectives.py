"""Task-inference objectives over the logits of the superposed network (reference doc §1.5, §1.7)."""
from __future__ import annotations

from typing import Callable

import torch

from ..ops.inference import OBJECTIVES, check_num_labels, logit_gradients  # the closed forms live beside the op that runs them in C++

__all__ = ["OBJECTIVES", "entropy", "get_objective", "logit_gradients", "superfluous"]


def entropy(logits: torch.Tensor, num_labels: int) -> torch.Tensor:
    """H: mean over examples of the per-example entropy over all output_size logits (``num_labels``
    is not read: H covers every output)."""
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def superfluous(logits: torch.Tensor, num_labels: int) -> torch.Tensor:
    """G = logsumexp of the logits with gradients flowing only through the superfluous neurons
    (index ≥ num_labels), mean over examples."""
    check_num_labels(num_labels, logits.shape[1])
    real = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    real[:num_labels] = 1
    z = (logits * real).detach() + logits * (1 - real)
    return torch.logsumexp(z, dim=1).mean()


def get_objective(name: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    if name == "entropy":
        return entropy
    if name == "superfluous":
        return superfluous
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
