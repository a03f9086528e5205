"""``MultitaskNonAffineBN``: one non-affine BatchNorm2d (own running statistics) per task."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .settings import resolve_num_tasks


class MultitaskNonAffineBN(nn.Module):
    """As the official module: ``bns.{t}`` are ``BatchNorm2d(dim, affine=False)`` and ``task``
    picks one. Deliberate deviation: for ``task < 0`` (superposition) the official code indexes
    ``bns[-1]``, the last task's statistics (possibly an untrained task's); here the superposed
    forward normalises with the batch's own statistics and updates no task's running stats."""

    def __init__(self, dim: int, num_tasks: Optional[int] = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.bns = nn.ModuleList([nn.BatchNorm2d(dim, affine=False) for _ in range(resolve_num_tasks(num_tasks))])
        self.task = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task >= 0:
            return self.bns[self.task](x)
        eps = self.bns[0].eps
        return F.batch_norm(x, None, None, None, None, True, 0.0, eps)
