"""Per-task non-affine BatchNorm: one set of running statistics per task.

Sharing running statistics across tasks is the known SupSup bug (reference doc §5, upstream issue
#11): after sequential training only the last task's statistics survive. Here task t trains its
own statistics and evaluates with them; a superposed forward uses batch statistics.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bank import TaskRows
from .modes import Mode, OneTask, Superposition, Train, task_index


class MultitaskBatchNorm(nn.Module):
    """Non-affine BN over dim 1 ([N, C] or [N, C, H, W]) with per-task running stats."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        dtype = torch.float32 if dtype is None else dtype
        self.means = TaskRows((num_features,), dtype, device)
        self.vars = TaskRows((num_features,), dtype, device)
        # The statistics of the task being trained: in state_dict() while there is one (as the
        # layers' scores are), so that a checkpoint taken mid-task resumes with them.
        self.register_buffer("current_mean", None)
        self.register_buffer("current_var", None)
        self._mode: Mode = OneTask(0)
        self._sum_over_ranks: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def sync_statistics(self, sum_over_ranks: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """Data-parallel training: with ``sum_over_ranks`` (a differentiable all_reduce sum) the
        training-mode statistics are those of the whole batch, not of this rank's slice, so a
        data-parallel step equals the one-process step and every rank keeps the same running
        statistics. ``None`` restores the local statistics."""
        self._sum_over_ranks = sum_over_ranks

    def _whole_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        c = self.num_features
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() / c)])
        total = self._sum_over_ranks(local)
        count = total[-1]
        mean = total[:c] / count
        var = total[c:2 * c] / count - mean * mean  # biased, as batch_norm normalises
        with torch.no_grad():  # the running update uses the unbiased variance, as batch_norm does
            self.current_mean.mul_(1 - self.momentum).add_(mean.detach(), alpha=self.momentum)
            self.current_var.mul_(1 - self.momentum).add_(var.detach() * (count / (count - 1)), alpha=self.momentum)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)

    @property
    def num_tasks(self) -> int:
        return len(self.means)

    def begin_task(self, init_scores=None, generator=None) -> None:
        dev, dtype = self.means.storage.device, self.means.storage.dtype
        self.current_mean = torch.zeros(self.num_features, device=dev, dtype=dtype)
        self.current_var = torch.ones(self.num_features, device=dev, dtype=dtype)
        self._mode = Train()

    def finish_task(self) -> None:
        if self.current_mean is None:
            raise RuntimeError("finish_task needs a task in training: call begin_task first")
        dtype = self.means.storage.dtype  # the module's (model.double(), .bfloat16() convert it)
        self.means.append(self.current_mean.to(dtype))
        self.vars.append(self.current_var.to(dtype))
        self.current_mean = self.current_var = None
        self._mode = OneTask(self.num_tasks - 1)

    def append_stats(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        dtype = self.means.storage.dtype  # the module's: a float64 model loads its own file
        self.means.append(means.to(dtype))
        self.vars.append(variances.to(dtype))

    def truncate_tasks(self, k: int) -> None:
        self.means.truncate(k)
        self.vars.truncate(k)

    def set_mode_task(self, t: int) -> None:
        self._mode = OneTask(task_index(t))

    def set_mode_train(self) -> None:
        if self.current_mean is None:
            raise RuntimeError("train mode needs the statistics of a task in training: call begin_task first")
        self._mode = Train()

    def set_mode_superpose(self, alpha=None, active=None, uniform=False, *, checked: bool = False) -> None:
        self._mode = Superposition()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode
        if isinstance(mode, Train):
            if self.training and self._sum_over_ranks is not None:
                return self._whole_batch_norm(x)
            if self.training:
                return F.batch_norm(x, self.current_mean, self.current_var, None, None, True, self.momentum, self.eps)
            return F.batch_norm(x, self.current_mean, self.current_var, None, None, False, 0.0, self.eps)
        if isinstance(mode, OneTask):
            t = mode.task
            if t >= self.num_tasks:
                raise RuntimeError(f"task {t} has no BN statistics yet ({self.num_tasks} learned)")
            return F.batch_norm(x, self.means.rows[t], self.vars.rows[t], None, None, False, 0.0, self.eps)
        # Superposition: no single task's statistics apply; normalise with the batch's own.
        if x.dim() >= 2 and x.numel() == x.shape[1]:
            raise ValueError(f"a superposed {type(self).__name__} normalises with the batch's own statistics, and x "
                             f"{tuple(x.shape)} holds one value per channel: infer the task from 2 or more images "
                             f"(infer_task(model, x[:2]), --infer-images 2)")
        return F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, tasks={self.num_tasks}"
