"""Model-wide task control: every supermask layer and per-task BN follows the same mode."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from .. import ops
from .batchnorm import MultitaskBatchNorm
from .layers import SupermaskLayer
from .modes import check_uniform_alpha, task_index


def task_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (SupermaskLayer, MultitaskBatchNorm))]


def supermask_layers(model: nn.Module) -> Dict[str, SupermaskLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SupermaskLayer)}


def num_tasks(model: nn.Module) -> int:
    counts = {m.num_tasks for m in task_modules(model)}
    if not counts:
        raise ValueError(f"{type(model).__name__} has no supermask layer (SupermaskLinear / SupermaskConv2d) or "
                         f"per-task BatchNorm: nothing in it holds tasks")
    if len(counts) != 1:
        raise RuntimeError(f"layers disagree on the number of learned tasks: {sorted(counts)}")
    return counts.pop()


def begin_task(model: nn.Module, init_scores: Optional[Dict[str, torch.Tensor]] = None,
               generator: Optional[torch.Generator] = None) -> None:
    """Give every supermask layer fresh scores for a new task (``init_scores`` by layer name, e.g.
    the Transfer running mean; a layer it leaves out starts from random scores; for a model that is
    one layer, a tensor) and put the model in train mode for it."""
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(init_scores, torch.Tensor):
        if not isinstance(model, SupermaskLayer):
            raise TypeError("init_scores must be a dict of tensors by layer name (a tensor only for a model that is "
                            "one supermask layer)")
        init_scores = {"": init_scores}
    if init_scores is not None:
        if not isinstance(init_scores, dict):
            raise TypeError(f"init_scores must be a dict of tensors by layer name, got {type(init_scores).__name__}")
        unknown = sorted(set(init_scores) - set(supermask_layers(model)))
        if unknown:
            raise ValueError(f"init_scores names no supermask layer of the model: {unknown}; its layers are "
                             f"{sorted(supermask_layers(model))}")
    for m in task_modules(model):
        init = None if init_scores is None else init_scores.get(names[id(m)])
        m.begin_task(init, generator)


def initial_scores(model: nn.Module, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """The scores ``begin_task(model, generator=generator)`` would start from, by layer name
    (the generator is consumed layer by layer in the same order)."""
    return {name: layer.initial_scores(generator) for name, layer in supermask_layers(model).items()}


def enable_transfer(model: nn.Module) -> None:
    """Keep, per supermask layer, the running mean of the trained scores of finished tasks (the
    Transfer variant, reference doc §1.10). Enable it before the first task."""
    for layer in supermask_layers(model).values():
        layer.track_score_mean = True


def transfer_init_scores(model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """Initial scores for the next task under Transfer: the running mean of all previous tasks'
    scores (None before the first task, which starts from the usual random init)."""
    layers = supermask_layers(model)
    if not layers or any(l.score_mean is None for l in layers.values()):
        return None
    return {name: l.score_mean for name, l in layers.items()}


def finish_task(model: nn.Module) -> None:
    """Pack the trained masks into the banks and drop the scores."""
    for m in task_modules(model):
        m.finish_task()


def task_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The scores of the task being trained: the only parameters an optimiser may see."""
    params = [m.scores for m in supermask_layers(model).values() if m.scores is not None]
    if not params:
        raise RuntimeError("no task is being trained: call begin_task first")
    return params


def set_task(model: nn.Module, task: int) -> None:
    """Evaluate with the finished mask (and BN statistics) of ``task``."""
    task = task_index(task)
    k = num_tasks(model)
    if not 0 <= task < k:
        raise ValueError(f"task must be in [0, {k}) (tasks learned), got {task}")
    for m in task_modules(model):
        m.set_mode_task(task)


def set_train_mode(model: nn.Module) -> None:
    mods = task_modules(model)
    # Checked for all first, so that a refusal leaves no module switched.
    if any((m.scores if isinstance(m, SupermaskLayer) else m.current_mean) is None for m in mods):
        raise RuntimeError("no task is being trained: call begin_task first")
    for m in mods:
        m.set_mode_train()


def set_superposition(model: nn.Module, alpha: torch.Tensor, active: Optional[torch.Tensor] = None,
                      uniform: bool = False) -> None:
    """Superpose the learned masks with one α shared by all layers (reference doc §1.4).
    ``active`` restricts it to a subset of tasks (alpha then has one entry per active task).
    ``uniform=True`` (the layers use their cached per-weight counts) is checked: alpha must be 1/k."""
    if active is not None:
        ops.checks.check_active(active, num_tasks(model))
    k = num_tasks(model) if active is None else active.numel()
    if not isinstance(alpha, torch.Tensor) or not alpha.is_floating_point():
        raise TypeError(f"alpha must be a floating-point tensor, got {type(alpha).__name__}"
                        f"{'' if not isinstance(alpha, torch.Tensor) else ' of dtype ' + str(alpha.dtype)}")
    if alpha.dim() != 1 or alpha.shape[0] != k:
        raise ValueError(f"alpha must have shape [{k}], got {tuple(alpha.shape)}")
    if ops.checks.capturing(alpha):
        pass  # inside a CUDA-graph capture the data checks (host syncs) cannot run
    elif k and not alpha.is_meta and not bool(torch.isfinite(alpha.detach()).all()):
        raise ValueError("alpha contains NaN or ±inf; the superposition coefficients must be finite")
    if uniform:
        # Every layer checks it too (set_mode_superpose); once here, so no layer is switched when it fails.
        check_uniform_alpha(alpha, k, fresh=True)
    for m in task_modules(model):
        m.set_mode_superpose(alpha, active, uniform, checked=True)


@contextlib.contextmanager
def superposition(model: nn.Module, alpha: torch.Tensor, active: Optional[torch.Tensor] = None,
                  uniform: bool = False) -> Iterator[None]:
    """``with superposition(model, alpha): logits = model(x)``; restores the previous modes of the
    modules it superposed. A module whose mode was changed inside the block (``set_task``,
    ``begin_task``) keeps its new mode: restoring it would, e.g., drop a task begun there."""
    mods = task_modules(model)
    saved = [m._mode for m in mods]
    placed = None
    try:
        set_superposition(model, alpha, active, uniform)
        placed = [m._mode for m in mods]
        yield
    finally:
        for i, (m, mode) in enumerate(zip(mods, saved)):
            if placed is None or m._mode is placed[i]:
                m._mode = mode


def clear_caches(model: nn.Module) -> None:
    """Drop what the supermask layers derived from their weights, banks and scores (sign bits,
    per-weight mask counts, transposed weights, the banks' interleaved copies, a fused step's
    masked weight); each is rebuilt on first use. Needed only after a write the tensors' version
    counters do not show: one through ``.data``."""
    for m in supermask_layers(model).values():
        m.clear_caches()


def mask_bytes(model: nn.Module) -> int:
    """Bytes of packed masks stored by the model (all tasks, all layers)."""
    return sum(m.bank.nbytes() for m in supermask_layers(model).values())


def mask_entropy_bytes(model: nn.Module) -> float:
    """What the stored masks would take entropy-coded: Σ over layers and tasks of n·H(p)/8 bytes,
    p the task's density in the layer (how the paper's byte counts scale with sparsity)."""
    total = 0.0
    for layer in supermask_layers(model).values():
        if layer.num_tasks == 0:
            continue
        numel = layer.weight.numel()
        # Set bits per task in one pass over the packed bank (⟨Mᵢ, 1⟩), never unpacking it.
        ones = ops.mask_dot(layer.bank.words, torch.ones(layer.weight.shape[0], layer.n, device=layer.weight.device))
        p = (ones.double() / numel).clamp(1e-12, 1 - 1e-12)
        h = -(p * p.log2() + (1 - p) * (1 - p).log2())
        total += float((h * numel / 8).sum())
    return total


def bn_bytes(model: nn.Module) -> int:
    return sum(2 * m.num_tasks * m.num_features * 4 for m in model.modules() if isinstance(m, MultitaskBatchNorm))
