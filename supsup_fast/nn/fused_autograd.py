"""The autograd side of the fused training step (:mod:`.fused_step` has the optimisers): a layer in
``Train(fused=state)`` mode runs its forward at ``state``'s kept masked weight, and its backward
computes the weight gradient (and the input gradient only where it is needed) and hands it to
``state.update``, the optimiser's fused pass, which also refreshes the masked weight."""
from __future__ import annotations

from typing import Callable

import torch

from .. import ops

# update(scores, weight, weight_grad, masked_weight): one fused optimiser pass, in place.
ScoreUpdate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _key(scores: torch.Tensor, weight: torch.Tensor) -> tuple:
    return scores.data_ptr(), scores._version, weight.data_ptr(), weight._version


class FusedScoreState:
    """One layer's part of the fused step: its current masked weight and ``update(scores, weight,
    weight_grad, masked_weight)``, the optimiser's fused pass bound to this layer's state (it reads
    the learning rate and the rest from the parameter group at every call, so LR schedulers work)."""

    def __init__(self, layer, update: ScoreUpdate):
        self.update = update
        self.masked_weight = ops.threshold_masked_weight(layer.scores, layer.weight)
        self._key = _key(layer.scores, layer.weight)
        # Bumped whenever the masked weight changes: a forward's backward must see the generation it was made in.
        self.generation = 0

    def effective_weight(self, scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if _key(scores, weight) != self._key:  # scores or weight changed outside the fused step
            self.masked_weight = ops.threshold_masked_weight(scores, weight)
            self._key = _key(scores, weight)
            self.generation += 1
        return self.masked_weight

    def apply(self, scores: torch.Tensor, weight: torch.Tensor, weight_grad: torch.Tensor) -> None:
        self.update(scores, weight, weight_grad, self.masked_weight)
        self.applied(scores, weight)

    def applied(self, scores: torch.Tensor, weight: torch.Tensor) -> None:
        """Record that an update of ``scores`` (made here or by a whole-model fused step) rewrote the
        masked weight."""
        self._key = _key(scores, weight)
        self.generation += 1


class _FusedThresholdStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scores, layer, state):
        masked_weight = state.effective_weight(scores, layer.weight)
        ctx.layer, ctx.state, ctx.generation = layer, state, state.generation
        ctx.scores = scores
        ctx.save_for_backward(x)
        return layer._dense(x, masked_weight)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        layer, state = ctx.layer, ctx.state
        if state.generation != ctx.generation:
            raise RuntimeError("fused training step: the masked weight changed after this forward (another backward "
                               "updated the scores, or they were edited); run one backward per forward, in order "
                               "(or train with a plain optimiser)")
        dx, dw = layer._dense_grads(grad, x, state.masked_weight, need_input=ctx.needs_input_grad[0])
        state.apply(ctx.scores, layer.weight, dw)
        return dx, None, None, None


def fused_train_forward(layer, x: torch.Tensor, state: FusedScoreState) -> torch.Tensor:
    return _FusedThresholdStep.apply(x, layer.scores, layer, state)
