"""The autograd side of the fused training step (:mod:`.fused_step` has the optimisers): a layer in
``Train(fused=state)`` mode runs its forward at ``state``'s kept masked weight, and its backward
computes the weight gradient (and the input gradient only where it is needed) and hands it to
``state.update``, the optimiser's fused pass, which also refreshes the masked weight."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import ops

# update(scores, weight, weight_grad, masked_weight): one fused optimiser pass, in place.
ScoreUpdate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _key(scores: torch.Tensor, weight: torch.Tensor) -> tuple:
    return scores.data_ptr(), ops.checks.tensor_version(scores), weight.data_ptr(), ops.checks.tensor_version(weight)


class FusedScoreState:
    """One layer's part of the fused step: its current mask, kept as the masked weight W ⊙ 1[s ≥ 0]
    (``effective_weight``) or as bits (``mask_words``, for a whole-model step that never forms the
    masked weight), and ``update(scores, weight, weight_grad, masked_weight)``, the optimiser's fused
    pass bound to this layer's state (it reads the learning rate and the rest from the parameter
    group at every call, so LR schedulers work). Each form is rebuilt from the scores when it is
    asked for after the other was updated, or after the scores changed outside the step."""

    def __init__(self, layer, update: ScoreUpdate):
        self.update = update
        self.masked_weight: Optional[torch.Tensor] = ops.threshold_masked_weight(layer.scores, layer.weight)
        self._key: Optional[tuple] = _key(layer.scores, layer.weight)
        self._words: Optional[torch.Tensor] = None
        self._words_key: Optional[tuple] = None
        # Bumped whenever the mask changes: a forward's backward must see the generation it was made in.
        self.generation = 0

    def forget(self) -> None:
        """Rebuild both forms from the scores at their next use (scores written through ``.data``)."""
        self.masked_weight, self._key, self._words, self._words_key = None, None, None, None
        self.generation += 1

    def effective_weight(self, scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.masked_weight is None or _key(scores, weight) != self._key:  # stale, or scores or weight changed
            self.masked_weight = ops.threshold_masked_weight(scores, weight)
            self._key = _key(scores, weight)
            self.generation += 1
        return self.masked_weight

    def mask_words(self, scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The mask 1[s ≥ 0] as bits [out, ceil(in / 32)], for a step that updates it in place."""
        if self._words is None or _key(scores, weight) != self._words_key:
            self._words = ops.pack_bits(scores.detach() >= 0)
            self._words_key = _key(scores, weight)
        return self._words

    def apply(self, scores: torch.Tensor, weight: torch.Tensor, weight_grad: torch.Tensor) -> None:
        self.update(scores, weight, weight_grad, self.masked_weight)
        self.applied(scores, weight)

    def applied(self, scores: torch.Tensor, weight: torch.Tensor) -> None:
        """Record that an update of ``scores`` (made here or by a whole-model fused step) rewrote the
        masked weight."""
        self._key = _key(scores, weight)
        self._words_key = None
        self.generation += 1

    def bits_applied(self, scores: torch.Tensor, weight: torch.Tensor) -> None:
        """Record that a whole-model step rewrote the scores and ``mask_words``: the masked weight is
        stale, and its memory is freed until a forward asks for it again."""
        self._words_key = _key(scores, weight)
        self.masked_weight, self._key = None, None
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
                               "updated the scores, or they were edited); run one backward per forward, in order. "
                               "A layer run twice in one forward (weight tying) cannot take the fused step: train "
                               "it with a plain optimiser over snn.task_parameters(model) (algorithms.train_task "
                               "does so itself)")
        dx, dw = layer._dense_grads(grad, x, state.masked_weight, need_input=ctx.needs_input_grad[0])
        state.apply(ctx.scores, layer.weight, dw)
        return dx, None, None, None


DDP_REFUSAL = ("an in-backward optimiser (InBackwardRMSprop / InBackwardAdam) updates the scores with this "
               "rank's own gradient inside the backward, before DistributedDataParallel averages it, so the "
               "ranks would train different masks: under DDP use torch.optim.RMSprop / Adam over "
               "snn.task_parameters(model) (algorithms.train_task_data_parallel does)")


def fused_train_forward(layer, x: torch.Tensor, state: FusedScoreState) -> torch.Tensor:
    # DDP marks its forward (a private attribute, read defensively: torch.compile's DDP optimiser uses it).
    if getattr(DistributedDataParallel, "_active_ddp_module", None) is not None:
        raise RuntimeError(DDP_REFUSAL)
    return _FusedThresholdStep.apply(x, layer.scores, layer, state)
