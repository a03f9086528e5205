"""Task inference by the gradient of an objective w.r.t. the superposition coefficients α
(reference doc §1.5 one-shot, §1.6 binary). Only the inference images go through the superposed
network; with uniform α the forward uses each layer's cached count of set bits."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..nn import num_tasks, superposition
from .objectives import get_objective

METHODS = ("oneshot", "binary")


def alpha_gradient(model: nn.Module, x: torch.Tensor, objective: str, num_labels: int,
                   active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """∂f/∂α at α = 1/k over the learned tasks (or the ``active`` subset): one forward, one backward."""
    k = num_tasks(model) if active is None else active.numel()
    device = next(iter(model.buffers())).device
    alpha = torch.full((k,), 1.0 / k, device=device, requires_grad=True)
    with superposition(model, alpha, active=active, uniform=True):
        logits = model(x)
    obj = get_objective(objective)(logits, num_labels)
    (grad,) = torch.autograd.grad(obj, alpha)
    return grad


def infer_oneshot(model: nn.Module, x: torch.Tensor, objective: str = "entropy", num_labels: int = 10) -> int:
    """argminᵢ ∂f/∂αᵢ over the learned tasks (== argmax of -∇αH, paper Eq. 4)."""
    if num_tasks(model) == 1:
        return 0
    return int(alpha_gradient(model, x, objective, num_labels).argmin())


def infer_binary(model: nn.Module, x: torch.Tensor, objective: str = "entropy", num_labels: int = 10,
                 log_base: float = 2.0) -> int:
    """Repeatedly keep the 1/log_base of the surviving tasks whose gradient is lowest (for base 2
    the official code keeps g ≤ lower median), until one remains.

    The official loop stops after ⌊log₂ k⌋ + 1 rounds and then reports a stale index; here, if ties
    keep more than one task after that many rounds, the lowest gradient among them is returned."""
    if log_base <= 1:
        raise ValueError(f"log_base must be > 1, got {log_base}")
    k = num_tasks(model)
    device = next(iter(model.buffers())).device
    good = torch.arange(k, device=device)
    grad = None
    for _ in range(int(math.floor(math.log(max(k, 1), log_base))) + 1):
        if good.numel() == 1:
            return int(good[0])
        grad = alpha_gradient(model, x, objective, num_labels, active=None if good.numel() == k else good)
        keep = max(1, math.ceil(good.numel() / log_base))
        thr = grad.sort().values[keep - 1]
        sel = grad <= thr
        good, grad = good[sel], grad[sel]
    if good.numel() == 1:
        return int(good[0])
    return int(good[grad.argmin()])


def infer_task(model: nn.Module, x: torch.Tensor, method: str = "oneshot", objective: str = "entropy",
               num_labels: int = 10, log_base: float = 2.0) -> int:
    if method == "oneshot":
        return infer_oneshot(model, x, objective, num_labels)
    if method == "binary":
        return infer_binary(model, x, objective, num_labels, log_base)
    raise ValueError(f"inference must be one of {METHODS}, got {method!r}")
