"""HopSupSup (reference doc §1.9, paper §3.5): per-neuron masks stored in Hopfield matrices and
recovered at test time by gradient descent on entropy + Hopfield energy.

Training, per task: scores start at 0 (mask all ones), SGD (lr 0.1, momentum 0.9, wd 1e-4) for one
epoch, then each layer stores 1[score ≥ 0] in its Hopfield matrix. No mask is kept as such.

Recovery, per test task (transductive over its test batches of 64): scores start at the mean stored
pattern; SGD (lr 500, momentum 0.9, wd 1e-4) on (1 − t/T)·H + γ·(t/T)·Σ_layers E(s), t = 1..T over
the test batches. Then the whole test set is classified with the recovered masks. The cost of a
step does not depend on the number of stored tasks (Ψ is d×d).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tasks import TaskSplit
from ..nn.hopfield import NeuronMaskBatchNorm
from ..nn.masks import ste_mask
from .checks import check_finite, check_positive_int
from .objectives import entropy


@dataclass
class HopSettings:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    recovery_lr: float = 500.0
    recovery_momentum: float = 0.9
    recovery_weight_decay: float = 1e-4
    gamma: float = 1.5e-3
    test_batch_size: int = 64

    def __post_init__(self):
        for name in ("epochs", "batch_size", "test_batch_size"):
            check_positive_int(f"HopSupSup {name}", getattr(self, name))
        for name in ("lr", "recovery_lr"):
            check_finite(f"HopSupSup {name}", getattr(self, name))
        for name in ("momentum", "weight_decay", "recovery_momentum", "recovery_weight_decay", "gamma"):
            check_finite(f"HopSupSup {name}", getattr(self, name), inclusive=True)


def mask_layers(model: nn.Module) -> List[NeuronMaskBatchNorm]:
    layers = [m for m in model.modules() if isinstance(m, NeuronMaskBatchNorm)]
    if not layers:
        raise ValueError("HopSupSup needs a model with neuron-mask BN layers (--model bnnet)")
    return layers


def _set_scores(layers: List[NeuronMaskBatchNorm], values: List[torch.Tensor]) -> List[nn.Parameter]:
    params = [nn.Parameter(v.detach().clone().float()) for v in values]
    for layer, p in zip(layers, params):
        layer.scores = p
    return params


def train_task(model: nn.Module, split: TaskSplit, s: HopSettings, *, device: torch.device,
               generator: Optional[torch.Generator] = None,
               on_step: Optional[Callable[[int, float], None]] = None) -> List[torch.Tensor]:
    """Learn one task's neuron masks, store them in the Hopfield matrices, return them (bool)."""
    layers = mask_layers(model)
    params = _set_scores(layers, [torch.zeros(l.num_features, device=device) for l in layers])
    opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs)
    model.train()
    step = 0
    for _ in range(s.epochs):
        for xb, yb in split.batches(s.batch_size, shuffle=True, generator=generator):
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step, float(loss.detach()))
        sched.step()
    masks = []
    for layer in layers:
        m = layer.scores.detach() >= 0
        layer.hopfield.store(m)
        layer.scores = None
        masks.append(m)
    return masks


@dataclass
class Recovery:
    masks: List[torch.Tensor]         # recovered binary masks, one per layer
    steps: int                        # test batches used (gradient steps)
    first_exact_step: Optional[int]   # first step after which the masks equal ``true_masks`` (if given)
    exact_steps: int                  # steps after which they equal ``true_masks``
    bit_errors: int                   # neurons that differ from ``true_masks`` at the end


def recover_masks(model: nn.Module, split: TaskSplit, s: HopSettings, *, device: torch.device,
                  generator: Optional[torch.Generator] = None,
                  true_masks: Optional[List[torch.Tensor]] = None) -> Recovery:
    """Recover a task's masks from its unlabelled test batches (labels are never read)."""
    layers = mask_layers(model)
    params = _set_scores(layers, [l.hopfield.mean_pattern() for l in layers])
    opt = torch.optim.SGD(params, lr=s.recovery_lr, momentum=s.recovery_momentum, weight_decay=s.recovery_weight_decay)
    total = split.num_batches(s.test_batch_size)
    first, exact = None, 0
    model.train()
    for t, (xb, _) in enumerate(split.batches(s.test_batch_size, shuffle=True, generator=generator), 1):
        xb = xb.to(device)
        h = entropy(model(xb), 0)
        energy = sum(l.hopfield.energy(2 * ste_mask(l.scores, "threshold", 1.0) - 1) for l in layers)
        loss = (1 - t / total) * h + s.gamma * (t / total) * energy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if true_masks is not None:
            same = all(torch.equal(l.scores.detach() >= 0, m.to(device)) for l, m in zip(layers, true_masks))
            exact += int(same)
            if same and first is None:
                first = t
    masks = [l.scores.detach() >= 0 for l in layers]
    errors = 0 if true_masks is None else int(sum((m != tm.to(device)).sum() for m, tm in zip(masks, true_masks)))
    for layer, m in zip(layers, masks):
        layer.scores = None
        layer.mask = m.float()
    return Recovery(masks, total, first, exact, errors)


@torch.no_grad()
def accuracy(model: nn.Module, split: TaskSplit, batch_size: int, *, device: torch.device,
             generator: Optional[torch.Generator] = None) -> float:
    """Accuracy with the masks currently set (BN on batch statistics, as the official code)."""
    correct = total = 0
    for xb, yb in split.batches(batch_size, shuffle=True, generator=generator):
        xb, yb = xb.to(device), yb.to(device)
        correct += int((model(xb).argmax(1) == yb).sum())
        total += len(yb)
    return correct / max(total, 1)


def set_masks(model: nn.Module, masks: List[torch.Tensor]) -> None:
    for layer, m in zip(mask_layers(model), masks):
        layer.scores = None
        layer.mask = m.float().to(layer.mask.device)


def hopfield_bytes(model: nn.Module) -> int:
    return sum(l.hopfield.nbytes() for l in mask_layers(model))


def store_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The Hopfield matrices and pattern sums, by layer index (for a safetensors file)."""
    out = {}
    for i, l in enumerate(mask_layers(model)):
        out[f"psi/{i}"] = l.hopfield.psi.detach().cpu().contiguous()
        out[f"pattern_sum/{i}"] = l.hopfield.pattern_sum.detach().cpu().contiguous()
    return out
