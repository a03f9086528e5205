"""Task inference and evaluation over a mask bank sharded across ranks (docs/design.md, "Scale-out").

Rank r holds the bits of a contiguous task range [lo_r, hi_r) only. The superposed forward is
linear in the masks, so each supermask layer's pre-activation is the all-reduce of the ranks'
partial sums (:class:`~supsup_fast.distributed.ShardedSuperposition`); every rank then sees the
same logits and the same objective, computes the α-gradient of its own tasks locally through the
fused ops, and the gradients are gathered in task order. One-shot and binary inference then take
exactly the decisions of :mod:`.inference` on the gathered vector; results equal one process up to
float summation order.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from ..data.tasks import TaskSplit
from ..distributed import DistContext, ShardedSuperposition, all_reduce_sum, gather_objects
from ..ops.registry import backend_for
from ..nn import num_tasks, set_task, superposition, supermask_layers
from .evaluation import EvalSettings, TaskEval, test_order
from .inference import alpha_gradients_batched, supports_batched
from .objectives import get_objective


class ShardedModel:
    """A model whose bank holds global tasks ``[offset, offset + num_tasks(model))`` of
    ``total_tasks``, evaluated together with the other ranks' shards."""

    def __init__(self, model: nn.Module, ctx: DistContext, offset: int, total_tasks: int):
        layers = supermask_layers(model)
        if not supports_batched(model):  # per-task BN statistics do not superpose across shards
            raise ValueError("--shard-bank needs an MLP of supermask layers without BatchNorm (fc1024 or lenet)")
        self.model, self.ctx, self.offset, self.total = model, ctx, offset, total_tasks
        for layer in layers.values():  # the bank is split to save memory: no second, interleaved copy
            layer.bank.keep_interleaved = False
        self.local = num_tasks(model)
        self.sum = ShardedSuperposition(ctx, layers)

    def owns(self, task: int) -> bool:
        return self.offset <= task < self.offset + self.local

    def alpha_gradients(self, x: torch.Tensor, objective: str, num_labels: int,
                        survivors: Optional[torch.Tensor] = None) -> torch.Tensor:
        """∂f/∂α at α = 1/n over the ``survivors`` (global task indices, ascending; all tasks by
        default), in that order. Collective: every rank calls it with the same arguments."""
        survivors = torch.arange(self.total) if survivors is None else survivors
        mine = survivors[(survivors >= self.offset) & (survivors < self.offset + self.local)] - self.offset
        m = mine.numel()
        device = next(iter(self.model.buffers())).device
        # A rank none of whose tasks survive still joins every all-reduce, contributing zeros.
        active = torch.zeros(1, dtype=torch.long) if m == 0 else (None if m == self.local else mine)
        alpha = torch.full((max(m, 1),), 1.0 / max(m, 1), device=device, requires_grad=True)
        # The layers' uniform path divides by the local count; rescale the partial to 1/n.
        self.sum.scale = m / survivors.numel()
        with self.sum, superposition(self.model, alpha, active=None if active is None else active.to(device),
                                     uniform=True):
            logits = self.model(x)
        obj = get_objective(objective)(logits, num_labels)
        (grad,) = torch.autograd.grad(obj, alpha)
        local = grad.detach().cpu()[:m] / self.sum.scale if m else grad.detach().cpu()[:0]
        return torch.cat(gather_objects(self.ctx, local))

    def alpha_gradients_batched(self, xs: torch.Tensor, objective: str, num_labels: int) -> torch.Tensor:
        """[q, total] α-gradients of q independent one-image queries (see
        :func:`.inference.alpha_gradients_batched`): one sharded forward and backward for all of
        them, so the collectives are per layer, not per query."""
        self.sum.scale = self.local / self.total
        with self.sum:
            local = alpha_gradients_batched(self.model, xs, objective, num_labels).cpu()
        return torch.cat(gather_objects(self.ctx, local), dim=1)

    def infer_oneshot(self, x: torch.Tensor, objective: str, num_labels: int) -> int:
        if self.total == 1:
            return 0
        return int(self.alpha_gradients(x, objective, num_labels).argmin())

    def infer_binary(self, x: torch.Tensor, objective: str, num_labels: int, log_base: float) -> int:
        """The rule of :func:`.inference.infer_binary` on the gathered gradients."""
        good = torch.arange(self.total)
        grad = None
        for _ in range(int(math.floor(math.log(max(self.total, 1), log_base))) + 1):
            if good.numel() == 1:
                return int(good[0])
            grad = self.alpha_gradients(x, objective, num_labels, good)
            keep = max(1, math.ceil(good.numel() / log_base))
            sel = grad <= grad.sort().values[keep - 1]
            if bool(sel.all()):  # nothing ruled out: every later round would repeat this one
                break
            good, grad = good[sel], grad[sel]
        return int(good[0]) if good.numel() == 1 else int(good[grad.argmin()])

    def infer(self, x: torch.Tensor, settings: EvalSettings, num_labels: int) -> int:
        if settings.inference == "oneshot":
            return self.infer_oneshot(x, settings.objective, num_labels)
        return self.infer_binary(x, settings.objective, num_labels, settings.log_base)


def evaluate_task_sharded(sharded: ShardedModel, split: TaskSplit, task: int, settings: EvalSettings, *,
                          device: torch.device, num_labels: int, seed: int = 0,
                          on_batch: Optional[Callable[[], None]] = None) -> TaskEval:
    """:func:`.evaluation.evaluate_task` on a sharded bank: the task is inferred by all ranks
    together; the batch is classified by the rank that holds the chosen mask."""
    model = sharded.model
    if settings.calibration != "none":
        raise ValueError(f"calibration {settings.calibration!r} is not supported with a sharded bank (--shard-bank)")
    model.eval()
    correct = total = right_task = batches = 0
    chosen_per_batch = []
    data = [(xb.to(device), yb.to(device))
            for xb, yb in split.batches(settings.batch_size, shuffle=True, generator=test_order(split, task, seed))]
    batched = None
    if (settings.scenario != "GG" and settings.inference == "oneshot" and settings.infer_images == 1
            and sharded.total > 1 and backend_for(device).fast_batched_inference):
        with torch.enable_grad():  # every query of the task (first image of each batch) at once
            grads = sharded.alpha_gradients_batched(torch.cat([xb[:1] for xb, _ in data]), settings.objective,
                                                    num_labels)
        batched = grads.argmin(1).tolist()
    for xb, yb in data:
        batches += 1
        if settings.scenario == "GG":
            chosen = task
        elif batched is not None:
            chosen = batched[batches - 1]
        else:
            with torch.enable_grad():
                chosen = sharded.infer(xb[: settings.infer_images], settings, num_labels)
        chosen_per_batch.append(int(chosen))
        right_task += int(chosen == task)
        total += len(yb)
        if on_batch is not None:
            on_batch()
        if settings.scenario == "GNu" and chosen != task:
            continue
        if sharded.owns(chosen):
            set_task(model, chosen - sharded.offset)
            with torch.no_grad():
                correct += int((model(xb).argmax(1) == yb).sum())
    # On the model's device: NCCL reduces CUDA tensors only.
    correct = int(all_reduce_sum(sharded.ctx, torch.tensor([correct], dtype=torch.long, device=device))[0])
    gg = settings.scenario == "GG"
    return TaskEval(correct / max(total, 1), None if gg else right_task / max(batches, 1), batches,
                    None if gg else chosen_per_batch)
