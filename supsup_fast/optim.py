"""RMSprop for mask scores with the update fused into one pass (C++ on the CPU).

Same rule as ``torch.optim.RMSprop(params, lr, alpha, eps, weight_decay)`` with no momentum and
no centering (the official SupSup setting): ``g = grad + wd·p; v = α·v + (1-α)·g²;
p -= lr · g / (√v + ε)``. torch's loop makes five passes over each tensor; this makes one. Tensors
that the C++ kernel cannot take (other dtypes or devices, extension unavailable) use the same rule in
torch ops.
"""
from __future__ import annotations

from typing import Iterable

import torch


def _cpu_kernel():
    try:
        from .ops.backends.cpu import load_cpu_extension
        load_cpu_extension()
        return torch.ops.supsup_cpu.rmsprop_step_
    except RuntimeError:
        return None


class FusedRMSprop(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not (lr >= 0 and 0 <= alpha < 1 and eps >= 0 and weight_decay >= 0):  # NaN fails each test too
            raise ValueError(f"invalid RMSprop settings lr={lr} alpha={alpha} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay))
        self._kernel = _cpu_kernel()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps, wd = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                sq = state["square_avg"]
                fast = (self._kernel is not None and p.device.type == "cpu" and p.dtype == torch.float32
                        and p.is_contiguous() and p.grad.is_contiguous() and not p.grad.is_sparse)
                if fast:
                    self._kernel(p, p.grad, sq, lr, alpha, eps, wd)
                    continue
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
                p.addcdiv_(g, sq.sqrt().add_(eps), value=-lr)
        return loss
