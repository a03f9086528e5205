"""Training one supermask per task (reference doc §1.2): only the current task's scores are in
the optimiser; weights and finished masks are never touched."""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tasks import TaskSplit
from .. import ops
from ..models import MLP
from ..nn import (InBackwardAdam, InBackwardOptimizer, InBackwardRMSprop, Train, begin_task, finish_task,
                  fused_step_unsupported, supermask_layers, task_parameters)
from ..optim import FusedRMSprop
from .checks import check_finite, check_positive_int

OPTIMIZERS = ("rmsprop", "adam", "sgd")
SCHEDULERS = ("none", "cosine", "cosine_warmup")


@dataclass
class TrainSettings:
    iters: Optional[int] = 1000          # batches per task (None: full epochs)
    epochs: int = 3                      # cap on passes over the task's training set
    batch_size: int = 128
    lr: float = 1e-4
    optimizer: str = "rmsprop"
    weight_decay: float = 0.0
    momentum: float = 0.9                # SGD only
    scheduler: str = "none"              # cosine: CosineAnnealingLR(T_max=epochs), stepped per epoch
    warmup_epochs: int = 5               # cosine_warmup: linear warmup, then cosine (SplitImageNet)
    fused_step: bool = True              # RMSprop/Adam with threshold masks: the optimiser runs inside the backward

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainSettings":
        """Each setting in its range (also rechecked by :func:`train_task`: the fields can be reassigned)."""
        for name in ("epochs", "batch_size", "warmup_epochs") + (("iters",) if self.iters is not None else ()):
            check_positive_int(f"TrainSettings.{name}", getattr(self, name))
        check_finite("TrainSettings.lr", self.lr)
        for name in ("weight_decay", "momentum"):
            check_finite(f"TrainSettings.{name}", getattr(self, name), inclusive=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainSettings.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"TrainSettings.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        return self


def make_optimizer(params: List[nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    """As the official code: RMSprop with torch defaults (no momentum; fused, same rule), Adam(lr, wd),
    SGD(lr, 0.9, wd)."""
    if s.optimizer == "rmsprop":
        # torch.optim.RMSprop's rule (defaults: alpha 0.99, eps 1e-8), fused into one pass.
        return FusedRMSprop(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {s.optimizer!r}")


def make_task_optimizer(model: nn.Module, s: TrainSettings, sample: Optional[torch.Tensor] = None) -> torch.optim.Optimizer:
    """The optimiser of the task being trained in ``model``: for RMSprop and Adam the fused
    in-backward one (nn.fused_step, the same rule as :func:`make_optimizer`'s) where
    ``s.fused_step`` is set and the layers allow it, else :func:`make_optimizer` over the scores.
    ``sample``, a batch of inputs, shows a layer run more than once a forward (weight tying), which
    the fused step cannot train (each use's backward would apply its own update): then the plain one."""
    if s.fused_step and fused_step_unsupported(model) is None and s.optimizer in ("rmsprop", "adam") \
            and (sample is None or not layers_run_twice(model, sample)):
        if s.optimizer == "rmsprop":
            return InBackwardRMSprop(model, lr=s.lr, weight_decay=s.weight_decay)
        if s.optimizer == "adam":
            return InBackwardAdam(model, lr=s.lr, weight_decay=s.weight_decay)
    return make_optimizer(task_parameters(model), s)


def layers_run_twice(model: nn.Module, x: torch.Tensor) -> List[str]:
    """The names of the layers being trained that one forward of ``x`` runs more than once (eval
    mode, no gradient: no statistics move)."""
    calls: Counter = Counter()
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: calls.update([name]))
             for name, m in supermask_layers(model).items() if m.scores is not None]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [name for name, c in calls.items() if c > 1]


def warmup_cosine_factor(epoch: int, epochs: int, warmup: int) -> float:
    """The official ``cosine_lr``: lr·(e+1)/warmup for the first epochs, then a half cosine to 0."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    e, span = epoch - warmup, max(epochs - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * e / span))


def make_scheduler(opt: torch.optim.Optimizer, s: TrainSettings):
    if s.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs)
    if s.scheduler == "cosine_warmup":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: warmup_cosine_factor(e, s.epochs, s.warmup_epochs))
    return None


def train_task(model: nn.Module, split: TaskSplit, settings: TrainSettings, *, device: Union[str, torch.device],
               generator: Optional[torch.Generator] = None, init_scores: Optional[Dict[str, torch.Tensor]] = None,
               on_step: Optional[Callable[[int, float], None]] = None) -> Dict[str, float]:
    """Learn one new mask on ``split`` (a :class:`~supsup_fast.data.TaskSplit`, e.g.
    ``load_benchmark(...).train(t)`` or ``TaskSplit(x, y)``) and append it (packed) to every
    layer's bank; ``device`` is where the batches go (the model's device)."""
    device = check_training_inputs(split, settings, device)
    begin_task(model, init_scores=init_scores, generator=generator)
    model.train()
    # The first batch, drawn as the loop would draw it: a model other than MLP may run a layer twice
    # a forward (weight tying), which make_task_optimizer tells from it.
    first_epoch = split.batches(settings.batch_size, shuffle=True, generator=generator)
    first = next(first_epoch)
    first_epoch = itertools.chain([first], first_epoch)
    sample = None if type(model) is MLP else first[0][:2].to(device)
    opt = make_task_optimizer(model, settings, sample)

    def batch_loss(xb, yb):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = F.cross_entropy(model(xb), yb)
        return loss, float(loss.detach())

    try:
        one_step = mlp_step_without_autograd(model, opt, device) or backprop_step(opt, batch_loss)
        step, last_loss = run_steps(split, settings, opt, one_step, generator, on_step, first_epoch)
    finally:
        if isinstance(opt, InBackwardOptimizer):
            opt.close()
    finish_task(model)
    model.eval()
    return {"steps": step, "final_loss": last_loss}


def check_training_inputs(split: TaskSplit, settings: TrainSettings, device: Union[str, torch.device]) -> torch.device:
    """Refuse bad settings, a split that is not one or is empty, and a device that is not one,
    before a task changes the model; returns the device."""
    settings.validate()
    if not (hasattr(split, "batches") and hasattr(split, "__len__")):  # TaskSplit, ImageFileSplit
        raise TypeError(f"split must be a task split with batches() (e.g. supsup_fast.data.TaskSplit(images, labels)), "
                        f"got {type(split).__name__}")
    if len(split) == 0:  # no step would be made, and an untrained mask appended as if learned
        raise ValueError("split (the task's training data) is empty; a mask needs at least one batch to train on")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device (cpu, cuda, cuda:1 ...), got {device!r}") from None


Step = Callable[[torch.Tensor, torch.Tensor], float]


def backprop_step(opt: torch.optim.Optimizer, batch_loss: Callable[[torch.Tensor, torch.Tensor], tuple]) -> Step:
    """One optimisation step on a batch: ``batch_loss(x, y)`` gives the loss to backpropagate and
    the value to report; zero_grad, backward, ``opt.step()``. Returns the reported value."""
    def step(xb: torch.Tensor, yb: torch.Tensor) -> float:
        loss, value = batch_loss(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return value
    return step


def mlp_step_without_autograd(model: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> Optional[Step]:
    """The whole training step of a :class:`~supsup_fast.models.MLP` (LeNet-300-100, FC1024) whose
    scores a fused in-backward optimiser trains: the loss and every weight gradient from one op
    (:func:`supsup_fast.ops.mlp_cross_entropy_grads`: the GEMMs and a few elementwise passes, no
    autograd graph), then each layer's fused update, as the layers' backward would apply it (RMSprop: all in
    one backend call, mlp_ste_rmsprop_step_; where the backend says it is faster,
    mlp_ste_rmsprop_bits_step_, which keeps each mask as bits and reads signed-constant weights as
    their sign bits, so no masked float weight is formed). None where it does not apply (another
    model, biases, a plain optimiser)."""
    if not isinstance(opt, InBackwardOptimizer) or type(model) is not MLP:
        return None
    layers = list(model.layers)
    states = []
    for layer in layers:
        mode = layer.mode()
        if layer.bias is not None or not isinstance(mode, Train) or mode.fused is None:
            return None
        states.append(mode.fused)
    backend = ops.backend_for(device)
    rmsprop = isinstance(opt, InBackwardRMSprop)  # then the whole step is one backend call
    num_weights = sum(layer.weight.numel() for layer in layers)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> float:
        xb, yb = xb.to(device, non_blocking=True).flatten(1), yb.to(device, non_blocking=True)
        scores = [layer.scores for layer in layers]
        weights = [layer.weight for layer in layers]
        if rmsprop and backend.mask_bits_training_step(xb.shape[0], num_weights):  # no masked weight: the masks stay bits
            words = [state.mask_words(s, w) for state, s, w in zip(states, scores, weights)]
            signs = [layer.signed_weight_bits() for layer in layers]
            loss = backend.mlp_ste_rmsprop_bits_step_(xb, yb, weights, [sg[0] if sg else None for sg in signs],
                                                      [sg[1] if sg else 1.0 for sg in signs], words,
                                                      [s.detach() for s in scores], *opt.rmsprop_state(scores))
            for state, s, w in zip(states, scores, weights):
                state.bits_applied(s, w)
        elif rmsprop:  # each gradient meets its update as soon as it is formed, no Python between the layers
            masked = [state.effective_weight(s, w) for state, s, w in zip(states, scores, weights)]
            loss = backend.mlp_ste_rmsprop_step_(xb, yb, masked, weights, [s.detach() for s in scores],
                                                 *opt.rmsprop_state(scores))
            for state, s, w in zip(states, scores, weights):
                state.applied(s, w)
        else:
            masked = [state.effective_weight(s, w) for state, s, w in zip(states, scores, weights)]
            loss, grads = backend.mlp_cross_entropy_grads(xb, yb, masked)
            for state, s, w, grad in zip(states, scores, weights, grads):
                state.apply(s, w, grad)
        opt.step()  # a no-op that keeps the optimiser's step hooks and LR schedulers' bookkeeping as usual
        return float(loss)
    return step


def run_steps(split: TaskSplit, settings: TrainSettings, opt: torch.optim.Optimizer, one_step: Step,
              generator: Optional[torch.Generator], on_step: Optional[Callable[[int, float], None]],
              first_epoch: Optional[Iterator] = None) -> tuple:
    """The optimisation loop of one task: ``settings.iters`` steps (or ``settings.epochs`` epochs)
    over shuffled batches, the scheduler (of ``opt``) stepped per epoch. ``one_step(x, y)`` makes
    one optimisation step and returns the loss to report. ``first_epoch``: the first epoch's
    batches where the caller has begun drawing them. Returns (steps, last reported loss)."""
    sched = make_scheduler(opt, settings)
    step, last_loss = 0, float("nan")
    limit = settings.iters if settings.iters is not None else math.inf
    for epoch in range(settings.epochs):
        batches = first_epoch if epoch == 0 and first_epoch is not None else \
            split.batches(settings.batch_size, shuffle=True, generator=generator)
        for xb, yb in batches:
            if step >= limit:
                break
            last_loss = one_step(xb, yb)
            step += 1
            if on_step is not None:
                on_step(step, last_loss)
        if sched is not None:
            sched.step()
        if step >= limit:
            break
    return step, last_loss
