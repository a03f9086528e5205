"""The fused training step of threshold supermask layers: RMSprop or Adam applied inside the backward pass.

The plain step makes four passes over every layer's weight-sized tensors besides its GEMMs: the
masked weight W ⊙ 1[s ≥ 0] in the forward, the straight-through product dL/dW_eff ⊙ W in the
backward, and the optimiser's read and write of the scores and its running average. Here each layer
keeps its masked weight from one step to the next, and its backward computes the weight gradient
(one GEMM; the input gradient only where an earlier layer needs it) and hands it to one fused pass
(the backend's ``ste_rmsprop_step_`` / ``ste_adam_step_``, the kernels behind the ops of those names)
that forms the score gradient, updates the scores and their averages as ``torch.optim.RMSprop`` (no
momentum, not centred) or ``torch.optim.Adam`` (no amsgrad) does and writes the next step's masked
weight. The math equals the plain step's to float rounding (tests/nn/test_fused_step.py).

Like PyTorch's optimizer-in-backward recipe, the update happens during ``loss.backward()``:
``step()`` and ``zero_grad()`` do nothing and the scores get no ``.grad``. Every backward through a
layer trains it (a ``torch.autograd.grad`` for a saliency map would too), and a backward of a forward
made before the masked weight last changed is refused: run one backward per forward, in order.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import ops
from .fused_autograd import DDP_REFUSAL, FusedScoreState, ScoreUpdate
from .tasks import supermask_layers


def fused_step_unsupported(model: nn.Module) -> Optional[str]:
    """Why the fused step cannot train ``model``'s current task (None when it can): it needs
    threshold masks and float32 frozen weights in every layer being trained."""
    layers = {n: m for n, m in supermask_layers(model).items() if m.scores is not None}
    if not layers:
        return "no task is being trained: call begin_task first"
    for name, m in layers.items():
        which = f"layer {name!r}" if name else "the layer"
        if m.mask_fn != "threshold":
            return f"{which} uses mask_fn={m.mask_fn!r}; the fused step needs 'threshold'"
        if m.weight.dtype != torch.float32 or m.scores.dtype != torch.float32:
            return f"{which} is {m.weight.dtype}; the fused step needs float32"
    return None


class InBackwardOptimizer(torch.optim.Optimizer):
    """An optimiser over the scores of the task being trained in ``model`` whose update the layers
    apply inside the backward pass (module docstring). Subclasses give the per-layer update."""

    def __init__(self, model: nn.Module, defaults: dict):
        if isinstance(model, DistributedDataParallel):
            raise ValueError(DDP_REFUSAL)
        reason = fused_step_unsupported(model)
        if reason is not None:
            raise ValueError(f"model: {reason}")
        self._layers = [m for m in supermask_layers(model).values() if m.scores is not None]
        super().__init__([m.scores for m in self._layers], defaults)
        self._states = [FusedScoreState(m, self._bind(m.scores)) for m in self._layers]
        for m, state in zip(self._layers, self._states):
            m.set_mode_train(fused=state)

    def _bind(self, scores: torch.Tensor) -> ScoreUpdate:
        """The fused update of ``scores``: it reads this optimiser's group and state at each call."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("an in-backward optimiser trains the scores its model gave it; it takes no other groups")
        super().add_param_group(param_group)

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """Nothing to do: the update was applied in the backward pass. Returns the closure's loss."""
        return None if closure is None else closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the layers give the scores no ``.grad``."""

    def close(self) -> None:
        """Return the layers to the plain training step (their scores keep what was learned). A
        layer that another in-backward optimiser has taken over since keeps that one."""
        for m, state in zip(self._layers, self._states):
            m.release_fused(state)


class InBackwardRMSprop(InBackwardOptimizer):
    """``torch.optim.RMSprop(scores, lr, alpha, eps, weight_decay)`` (no momentum, not centred) on
    the scores of the task being trained in ``model``, applied by the layers inside the backward
    pass with the backend chosen for the scores' device when it is made. Call ``close()`` (or finish
    the task) to return the layers to the plain training step."""

    def __init__(self, model: nn.Module, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not (lr >= 0 and 0 <= alpha < 1 and eps >= 0 and weight_decay >= 0):  # NaN fails each test too
            raise ValueError(f"invalid RMSprop settings lr={lr} alpha={alpha} eps={eps} weight_decay={weight_decay}")
        super().__init__(model, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay))

    def _bind(self, scores):
        self.state[scores]["square_avg"] = torch.zeros_like(scores, memory_format=torch.contiguous_format)
        kernel = ops.backend_for(scores.device).ste_rmsprop_step_  # the op's checks hold by construction

        def update(scores, weight, weight_grad, masked_weight):
            group, state = self.param_groups[0], self.state[scores]  # looked up each time: load_state_dict swaps them
            kernel(scores.detach(), weight_grad, weight, state["square_avg"], masked_weight,
                   group["lr"], group["alpha"], group["eps"], group["weight_decay"])
        return update


    def rmsprop_state(self, scores: List[torch.Tensor]) -> tuple:
        """([square_avg of each of ``scores``], lr, alpha, eps, weight_decay) now, for a step that
        updates every layer in one call (algorithms.training.mlp_step_without_autograd)."""
        group = self.param_groups[0]
        return ([self.state[s]["square_avg"] for s in scores], group["lr"], group["alpha"], group["eps"],
                group["weight_decay"])


class InBackwardAdam(InBackwardOptimizer):
    """``torch.optim.Adam(scores, lr, betas, eps, weight_decay)`` (no amsgrad) on the scores of the
    task being trained in ``model``, applied by the layers inside the backward pass."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if not (lr >= 0 and all(0 <= b < 1 for b in betas) and eps >= 0 and weight_decay >= 0):  # NaN fails each test too
            raise ValueError(f"invalid Adam settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(model, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _bind(self, scores):
        state = self.state[scores]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(scores, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(scores, memory_format=torch.contiguous_format)
        kernel = ops.backend_for(scores.device).ste_adam_step_  # the op's checks hold by construction

        def update(scores, weight, weight_grad, masked_weight):
            group, state = self.param_groups[0], self.state[scores]  # looked up each time: load_state_dict swaps them
            state["step"] += 1
            beta1, beta2 = group["betas"]
            kernel(scores.detach(), weight_grad, weight, state["exp_avg"], state["exp_avg_sq"], masked_weight,
                   int(state["step"]), group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        return update
