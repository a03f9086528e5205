"""NNs: no task identity at training or inference (reference doc §1.8, paper §3.4).

Every ``check_every`` training batches (epoch-local batch index, as the official trainer) the
current batch goes through the superposition of K = max(masks so far, 5) masks at α = 1/K. When
K · max softmax(−∂H/∂α) < 1 + ε the data is new to every mask and a new mask is allocated;
otherwise the argmax mask is trained further. Slots not learned yet take part as the random
masks their initial scores give (the same scores the slot starts from if it is allocated).

Finished masks live only as bits. A reused mask needs float scores to keep training; we keep
the scores of the ``score_cache`` most recently trained masks (bounded memory, no float copy per
task) and rebuild the scores of an older mask from its bits as ±(half the init bound), the mean
|score| at init. In PermutedMNIST the reused mask is almost always the one just trained, which is
in the cache, so training continues exactly as in the official code.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tasks import TaskSplit
from .. import ops
from ..distributed import SINGLE, DistContext, all_reduce_mean_
from ..nn import MultitaskBatchNorm, initial_scores, num_tasks, superposition, supermask_layers
from ..nn.masks import mask_from_scores
from .data_parallel import local_slice
from .checks import check_finite, check_positive_int
from .objectives import entropy
from .training import TrainSettings, make_optimizer


@dataclass
class NNsSettings:
    check_every: int = 100          # batches between allocation decisions
    min_superposed: int = 5         # K = max(masks so far, min_superposed)
    epsilon: float = 2.0 ** -3      # allocate when K · max softmax(-∇αH) < 1 + ε
    budget: int = 2500              # most masks ever allocated; later new data is not trained
    score_cache: int = 4            # masks whose float scores are kept for further training

    def validate(self) -> "NNsSettings":
        for name in ("check_every", "min_superposed", "budget", "score_cache"):
            check_positive_int(name, getattr(self, name))
        check_finite("epsilon", self.epsilon, inclusive=True)
        return self


@dataclass
class Decision:
    true_task: int
    batch: int          # training step within the true task
    mask: Optional[int]  # mask trained for the next batches (None: over budget, not trained)
    new: bool
    confidence: float   # max softmax(-∇αH) (1.0 for the very first mask)
    superposed: int     # K


@dataclass
class AllocatorState:
    decisions: List[Decision] = field(default_factory=list)
    batches_per_mask: Dict[int, Dict[int, int]] = field(default_factory=dict)  # true task -> mask -> batches

    def mask_for_task(self, true_task: int) -> Optional[int]:
        """The mask trained most on ``true_task`` (what task inference should pick for it)."""
        counts = self.batches_per_mask.get(true_task) or {}
        return max(counts, key=lambda m: (counts[m], -m)) if counts else None

    def to_dict(self) -> dict:
        return {"decisions": [d.__dict__ for d in self.decisions],
                "batches_per_mask": {str(t): {str(m): c for m, c in v.items()} for t, v in self.batches_per_mask.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "AllocatorState":
        return cls([Decision(**d) for d in data["decisions"]],
                   {int(t): {int(m): c for m, c in v.items()} for t, v in data["batches_per_mask"].items()})


class MaskAllocator:
    """Trains a model's masks under NNs, one true task's batches at a time."""

    def __init__(self, model: nn.Module, settings: NNsSettings, seed: int, state: Optional[AllocatorState] = None,
                 ctx: DistContext = SINGLE):
        if any(isinstance(m, MultitaskBatchNorm) for m in model.modules()):
            raise ValueError("NNs needs a model without per-task BatchNorm (fc1024 or lenet): a reused mask "
                             "would have no per-mask BN statistics to continue from")
        if not supermask_layers(model):
            raise ValueError("NNs needs a model with supermask layers")
        self.model, self.settings, self.seed = model, settings.validate(), seed
        # Under torchrun (data-parallel): every rank sees the same batches, trains on its slice of
        # each, averages the score gradients, and takes every decision on all-reduced values.
        self.ctx = ctx
        self.state = state or AllocatorState()
        self.layers = supermask_layers(model)
        self.current: Optional[int] = None
        self._scores: "OrderedDict[int, Dict[str, nn.Parameter]]" = OrderedDict()

    # -- slots ---------------------------------------------------------------------------------
    def _slot_generator(self, slot: int) -> torch.Generator:
        return torch.Generator().manual_seed(7_919 * (self.seed + 1) * 1_000_003 + slot)

    def _slot_scores(self, slot: int) -> Dict[str, torch.Tensor]:
        return initial_scores(self.model, self._slot_generator(slot))

    def _random_slot_words(self, slots: range) -> Dict[str, torch.Tensor]:
        """Packed masks of not-yet-learned slots, stacked per layer ``[len(slots), out, W]``."""
        per_layer: Dict[str, List[torch.Tensor]] = {name: [] for name in self.layers}
        for slot in slots:
            for name, s in self._slot_scores(slot).items():
                layer = self.layers[name]
                mask = mask_from_scores(s, layer.mask_fn, layer.density)
                per_layer[name].append(ops.pack_bits(mask.reshape(layer.weight.shape[0], -1)))
        return {name: torch.stack(w) for name, w in per_layer.items()}

    # -- the allocation rule -------------------------------------------------------------------
    @torch.enable_grad()
    def decide(self, x: torch.Tensor) -> Tuple[int, bool, float, int]:
        """(mask, is_new, confidence, K) for batch ``x``; the current mask must be committed."""
        k = num_tasks(self.model)
        if k == 0:
            return 0, True, 1.0, 1
        big_k = max(k, self.settings.min_superposed)
        if big_k > k:
            extra = self._random_slot_words(range(k, big_k))
            for name, layer in self.layers.items():
                layer.append_packed(extra[name])
        try:
            alpha = torch.full((big_k,), 1.0 / big_k, device=x.device, requires_grad=True)
            with superposition(self.model, alpha):
                logits = self.model(x)
            (grad,) = torch.autograd.grad(entropy(logits, logits.shape[1]), alpha)
            grad = all_reduce_mean_(self.ctx, grad.detach().clone())  # every rank decides the same
        finally:
            for layer in self.layers.values():
                layer.truncate_tasks(k)
        g = -grad
        confidence = float(torch.softmax(g, 0).max())
        if big_k * confidence < 1.0 + self.settings.epsilon:
            return k, True, confidence, big_k
        best = int(g.argmax())
        if best >= k:
            # The official code would train the untrained slot `best` without counting it as
            # allocated; we allocate the next mask instead, so mask indices stay contiguous.
            return k, True, confidence, big_k
        return best, False, confidence, big_k

    # -- training ------------------------------------------------------------------------------
    def _commit(self) -> None:
        if self.current is not None:
            for layer in self.layers.values():
                layer.commit_mask(self.current)

    def _scores_for(self, mask: int, new: bool) -> Dict[str, nn.Parameter]:
        if mask in self._scores:
            self._scores.move_to_end(mask)
            return self._scores[mask]
        if new:
            scores = self._slot_scores(mask)
        else:
            scores = {name: layer.scores_from_bits(mask) for name, layer in self.layers.items()}
        params = {name: nn.Parameter(s) for name, s in scores.items()}
        self._scores[mask] = params
        while len(self._scores) > self.settings.score_cache:
            self._scores.popitem(last=False)
        return params

    def _activate(self, mask: Optional[int], new: bool) -> Optional[Dict[str, nn.Parameter]]:
        self.current = mask
        if mask is None:
            for layer in self.layers.values():
                layer.scores = None
            return None
        params = self._scores_for(mask, new)
        for name, layer in self.layers.items():
            layer.train_scores(params[name])
        return params

    def train_true_task(self, true_task: int, split: TaskSplit, settings: TrainSettings, *, device: torch.device,
                        generator: Optional[torch.Generator] = None,
                        on_step: Optional[Callable[[int, float], None]] = None) -> dict:
        """Train on one true task's batches (the model never sees ``true_task``; it only labels the log)."""
        opt: Optional[torch.optim.Optimizer] = None
        in_opt: set = set()
        counts = self.state.batches_per_mask.setdefault(true_task, {})
        limit = settings.iters if settings.iters is not None else math.inf
        step, last_loss, new_masks = 0, float("nan"), 0
        self.model.train()
        for _ in range(settings.epochs):
            for b, (xb, yb) in enumerate(split.batches(settings.batch_size, shuffle=True, generator=generator)):
                if step >= limit:
                    break
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                if b % self.settings.check_every == 0:
                    self._commit()
                    mask, new, confidence, big_k = self.decide(xb)
                    if new and mask >= self.settings.budget:
                        mask = None
                    new_masks += int(new and mask is not None)
                    self.state.decisions.append(Decision(true_task, step, mask, new, confidence, big_k))
                    params = self._activate(mask, new)
                    if params is not None and id(next(iter(params.values()))) not in in_opt:
                        group = list(params.values())
                        if opt is None:
                            opt = make_optimizer(group, settings)
                        else:
                            opt.add_param_group({"params": group})
                        in_opt.add(id(group[0]))
                if self.current is not None:
                    loss = self._step_loss(xb, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for p in self._scores[self.current].values():
                        all_reduce_mean_(self.ctx, p.grad)
                    opt.step()
                    last_loss = float(loss.detach())
                    counts[self.current] = counts.get(self.current, 0) + 1
                step += 1
                if on_step is not None:
                    on_step(step, last_loss)
            if step >= limit:
                break
        self._commit()
        self.model.eval()
        return {"steps": step, "final_loss": last_loss, "new_masks": new_masks}

    def _step_loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The batch's mean cross-entropy; under torchrun this rank's share of it, scaled so that
        the ranks' averaged gradient is the whole batch's (see algorithms/data_parallel.py)."""
        if not self.ctx.enabled:
            return F.cross_entropy(self.model(xb), yb)
        part = local_slice(len(yb), self.ctx)
        return F.cross_entropy(self.model(xb[part]), yb[part], reduction="sum") * (self.ctx.world_size / len(yb))

    def score_cache(self) -> List[Tuple[int, Dict[str, torch.Tensor]]]:
        """The float scores kept for further training, least recently used first: a checkpoint saves
        them, so that a resumed run trains a reused mask on from the same floats as an uninterrupted one."""
        return [(mask, {name: p.detach() for name, p in params.items()}) for mask, params in self._scores.items()]

    def restore_score_cache(self, cache: List[Tuple[int, Dict[str, torch.Tensor]]]) -> None:
        """Take back what :meth:`score_cache` gave, on a fresh allocator over the same masks."""
        if self._scores or self.current is not None:
            raise RuntimeError("restore_score_cache needs a fresh allocator (no scores kept yet)")
        k = num_tasks(self.model)
        for mask, scores in cache:
            if not 0 <= mask < k:
                raise ValueError(f"the score cache holds mask {mask}, but the model holds {k} masks")
            if set(scores) != set(self.layers):
                raise ValueError(f"the score cache of mask {mask} names layers {sorted(scores)}, the model's are "
                                 f"{sorted(self.layers)}")
            for name, layer in self.layers.items():
                if tuple(scores[name].shape) != tuple(layer.weight.shape):
                    raise ValueError(f"the score cache of mask {mask}, layer {name!r}: shape {tuple(scores[name].shape)}, "
                                     f"the layer's weight is {tuple(layer.weight.shape)}")
        for mask, scores in cache[-self.settings.score_cache:]:
            self._scores[mask] = {name: nn.Parameter(scores[name].detach().to(layer.weight.device, layer.score_dtype).clone())
                                  for name, layer in self.layers.items()}

    def finish(self) -> None:
        """Commit the current mask and drop all float scores (masks stay as bits)."""
        self._commit()
        self._activate(None, False)
        self._scores.clear()
