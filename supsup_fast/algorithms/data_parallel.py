"""One task trained on all ranks at once with DistributedDataParallel (docs/design.md, "Scale-out").

Only the current task's scores are Parameters, so they are all DDP synchronises: frozen weights
and packed banks are buffers and are never broadcast (``broadcast_buffers=False``). Every rank
draws the same batch from the task's generator and takes its own contiguous slice of it. The
local loss is the *sum* over the slice divided by the global batch size, times the world size,
so DDP's gradient average equals the gradient of the single-process mean loss on the whole batch
for any split of it. Per-task BatchNorm normalises with the statistics of the whole batch (one
differentiable all_reduce of the per-channel sums per layer and step), so a data-parallel step
equals the one-process step and every rank keeps the same running statistics.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
import torch.distributed.nn.functional as dist_nn
from torch.nn.parallel import DistributedDataParallel

from ..data.tasks import TaskSplit
from ..distributed import DistContext
from ..nn import MultitaskBatchNorm, begin_task, finish_task, task_parameters
from .training import TrainSettings, backprop_step, check_training_inputs, make_optimizer, run_steps


def local_slice(n: int, ctx: DistContext) -> slice:
    """Rank's contiguous share of a batch of n examples (sizes differ by at most one)."""
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (ctx.rank < extra))


def train_task_data_parallel(model: nn.Module, split: TaskSplit, settings: TrainSettings, ctx: DistContext, *,
                             device: Union[str, torch.device], generator: Optional[torch.Generator] = None,
                             init_scores: Optional[Dict[str, torch.Tensor]] = None,
                             on_step: Optional[Callable[[int, float], None]] = None) -> Dict[str, float]:
    """:func:`.training.train_task` with the batch split over the ranks of ``ctx``."""
    device = check_training_inputs(split, settings, device)
    begin_task(model, init_scores=init_scores, generator=generator)
    model.train()
    with warnings.catch_warnings():  # newer torch renames the flag; its meaning here is unchanged
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    opt = make_optimizer(task_parameters(model), settings)

    def batch_loss(xb, yb):  # this rank's slice; the sum over ranks is the mean over the whole batch
        part = local_slice(len(yb), ctx)
        xl, yl = xb[part].to(device, non_blocking=True), yb[part].to(device, non_blocking=True)
        loss = F.cross_entropy(ddp(xl), yl, reduction="sum") * (ctx.world_size / len(yb))
        return loss, float(loss.detach()) / ctx.world_size

    norms = [m for m in model.modules() if isinstance(m, MultitaskBatchNorm)]
    for bn in norms:
        bn.sync_statistics(lambda t: dist_nn.all_reduce(t))
    try:
        step, last_loss = run_steps(split, settings, opt, backprop_step(opt, batch_loss), generator, on_step)
    finally:
        for bn in norms:
            bn.sync_statistics(None)
    ddp = None  # release DDP (its hooks on the scores) before the task is packed
    finish_task(model)
    model.eval()
    return {"steps": step, "final_loss": last_loss}
