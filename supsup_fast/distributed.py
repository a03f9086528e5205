"""torch.distributed plumbing for runs launched by torchrun (docs/design.md, "Scale-out").

World size 1 (a plain ``supsup-fast run``) never initialises a process group: every helper here
then works on the one process alone. Under torchrun, CPU runs use gloo and CUDA runs NCCL with
``cuda:LOCAL_RANK``. The only communication a run needs:

- task-parallel training: a counter per segment of tasks in the c10d store (``TaskQueue``), and a
  barrier at each evaluation point;
- data-parallel training: DDP's gradient all-reduce over the current task's scores;
- evaluation: results gathered on every rank (``gather_objects``), and for a sharded bank one
  all-reduce of each layer's partial pre-activation per step (``ShardedSum``), one of the
  gradient of each layer's input in the backward (``SharedInput``), and a gather of the
  α-gradients.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: Optional[str] = None   # "gloo" / "nccl" when a process group is up

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank, "backend": self.backend}


SINGLE = DistContext()


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError as exc:
        raise RuntimeError(f"WORLD_SIZE must be an int (set by torchrun), got {value!r}") from exc


def init_from_env(device: str, timeout_minutes: float = 60.0) -> tuple:
    """(DistContext, device string) for this process. Under torchrun with WORLD_SIZE > 1 this
    initialises the default process group once (gloo on CPU, NCCL with cuda:LOCAL_RANK on CUDA);
    otherwise it returns the single-process context and ``device`` unchanged."""
    world = launched_world_size()
    if world <= 1:
        return SINGLE, device
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                           f"not: launch with torchrun (which sets them all), or unset WORLD_SIZE for one process")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} under torchrun needs CUDA, but this torch sees no GPU")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(world, rank, local_rank, backend), device


def shutdown(ctx: DistContext, wait_for_peers: bool = True) -> None:
    """Tear the process group down. After a finished command every rank waits for the others
    first: a rank that destroys its group while a peer still talks to it can abort that peer (gloo:
    "terminate called without an active exception"). After an error it does not wait."""
    if ctx.enabled and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def _store() -> dist.Store:
    # The store torchrun's rendezvous gave the default group: shared by every rank on every host.
    return dist.distributed_c10d._get_default_store()


class TaskQueue:
    """Hands out ``tasks`` (one segment of the run) to whichever rank asks next.

    Under world size 1 it yields them in order. Under torchrun each rank atomically increments
    one counter in the c10d store and takes the task at that position, so a slow task does not
    hold the others back. ``key`` must be the same on every rank and new for each segment."""

    def __init__(self, ctx: DistContext, key: str, tasks: Sequence[int]):
        self.ctx, self.key, self.tasks = ctx, key, list(tasks)

    def __iter__(self) -> Iterator[int]:
        if not self.ctx.enabled:
            yield from self.tasks
            return
        store = _store()
        while True:
            i = store.add(f"supsup_fast/queue/{self.key}", 1) - 1
            if i >= len(self.tasks):
                return
            yield self.tasks[i]


class SharedCounter:
    """A counter every rank can add to and read (finished tasks, for rank 0's progress bar)."""

    def __init__(self, ctx: DistContext, key: str):
        self.ctx, self.key, self.local = ctx, f"supsup_fast/counter/{key}", 0

    def add(self, n: int = 1) -> int:
        if not self.ctx.enabled:
            self.local += n
            return self.local
        return int(_store().add(self.key, n))

    def value(self) -> int:
        return self.add(0)


def gather_objects(ctx: DistContext, obj) -> List:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: List = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= ctx.world_size
    return t


def broadcast_object(ctx: DistContext, obj, src: int = 0):
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_range(num_tasks: int, ctx: DistContext) -> range:
    """Rank r's contiguous range of tasks for a sharded bank (sizes differ by at most one)."""
    base, extra = divmod(num_tasks, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return range(start, start + base + (ctx.rank < extra))


class ShardedSum(torch.autograd.Function):
    """y = Σ_ranks partial_r. Every rank then runs the same downstream graph on the same y, so
    ∂L/∂y is identical on all ranks and the gradient of each partial is ∂L/∂y itself."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor) -> torch.Tensor:
        out = partial.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class SharedInput(torch.autograd.Function):
    """The input of a sharded layer: the same tensor on every rank, consumed by every rank's
    partial sum, so its gradient is the sum of the ranks' local gradients (identity forward,
    all-reduce backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class ShardedSuperposition:
    """While entered, the output of every supermask layer in superposition mode is all-reduced
    over the ranks, and so is the gradient of its input in the backward: each rank holds a
    contiguous range of the tasks, so its output is a partial sum of the layer's pre-activation. ``scale`` multiplies the partial first (the layers' uniform
    path normalises by the local task count; the caller sets ``scale = k_local / k_global``). A
    frozen bias is counted once: ranks other than 0 remove theirs."""

    def __init__(self, ctx: DistContext, layers: dict):
        self.ctx, self.layers, self.scale, self._handles = ctx, layers, 1.0, []

    def _hook(self, module, inputs, output):
        if module.mode().kind != "superpose":
            return output
        if module.bias is not None and self.ctx.rank != 0:
            output = output - module.bias.view((1, -1) + (1,) * (output.dim() - 2))
        output = output * self.scale
        return ShardedSum.apply(output) if self.ctx.enabled else output

    def _pre_hook(self, module, inputs):
        if module.mode().kind != "superpose" or not self.ctx.enabled or not inputs[0].requires_grad:
            return None
        return (SharedInput.apply(inputs[0]),) + tuple(inputs[1:])

    def __enter__(self) -> "ShardedSuperposition":
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers.values()]
        self._handles += [layer.register_forward_pre_hook(self._pre_hook) for layer in self.layers.values()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
